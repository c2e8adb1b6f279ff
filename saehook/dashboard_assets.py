"""The dashboard's JavaScript: the index's sortable table of every latent with its phrase search, and the one
latent page that renders any latent from its lazily loaded data file (see :mod:`saehook.dashboard`).

Data files are ``.js`` files loaded with ``<script src>``, which browsers allow from ``file://`` pages (a
``fetch`` of a ``.json`` file is refused there). ``data/vocab.js`` calls ``saehookVocab({id: text}, sep)``;
``data/<hookpoint>/chunk-<c>.js`` calls ``saehookChunk(dir, c, {latent: details})`` for ``CHUNK`` latents.

The phrase search reproduces :func:`saehook.features.search_contexts`: an example's text is its tokens joined
with ``sep`` (the tokenizer's decoding of consecutive tokens), it matches when the phrase (case-insensitive)
overlaps the characters from the end of the text before the activating token to the end of that token, and
latents are ranked by matching fraction of their examples, then matches, then the best match's activation.
All text is inserted with ``textContent``: nothing from the data is parsed as HTML.
"""

LOADER_JS = r"""
window.saehookVocab = function (v, sep) { window.SAEHOOK_VOCAB = v; window.SAEHOOK_SEP = sep; };
window.saehookChunks = window.saehookChunks || {};
window.saehookChunk = function (dir, c, latents) { window.saehookChunks[dir + '/' + c] = latents; };
function saehookLoad(src) {
  return new Promise(function (ok, fail) {
    const s = document.createElement('script');
    s.src = src; s.onload = ok; s.onerror = function () { fail(new Error('cannot load ' + src)); };
    document.head.appendChild(s);
  });
}
function saehookTok(id) { const t = window.SAEHOOK_VOCAB[id]; return t === undefined ? '<' + id + '>' : t; }
function saehookEl(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = text;
  if (cls) e.className = cls;
  return e;
}
function saehookVisible(t) { return t.replace(/\n/g, '\u21b5').replace(/\t/g, '\u21e5').replace(/\r/g, ''); }
"""

INDEX_JS = r"""
(function () {
  const data = JSON.parse(document.getElementById('latent-index').textContent);
  const box = document.getElementById('q'), pbox = document.getElementById('phrase');
  const body = document.getElementById('rows'), count = document.getElementById('count');
  const more = document.getElementById('more');
  const params = new URLSearchParams(location.search);
  let sortKey = params.get('sort') || 'density', order = params.get('order') || 'desc', limit = 200;
  let matches = null;  // latent uid -> [hits, examples, value, context] of the phrase search
  const uid = e => e.key + '#' + e.id;
  function textMatch(e, q) {
    if (!q) return true;
    const id = q.match(/^#?(\d+)$/);
    if (id && e.id === Number(id[1])) return true;
    if (q.startsWith('#')) return false;
    return q.split(/\s+/).every(w => e.text.includes(w));
  }
  function fmt(x, d) { return x === null || x === undefined ? '' : Number(x).toFixed(d); }
  function cell(tr, text, cls) { const td = saehookEl('td', text, cls); tr.appendChild(td); return td; }
  function value(e, k) {
    const v = e[k];
    return v === null || v === undefined ? -Infinity : v;
  }
  function byMatch(a, b) {  // search_contexts' order: matching fraction, then matches, then best activation
    const x = matches[uid(a)], y = matches[uid(b)];
    return (y[0] / y[1] - x[0] / x[1]) || (y[0] - x[0]) || (y[2] - x[2]);
  }
  function sorted(list) {
    const s = order === 'asc' ? 1 : -1;
    return list.slice().sort(function (a, b) {
      if (sortKey === 'match') return matches ? -s * byMatch(a, b) : 0;
      const x = value(a, sortKey), y = value(b, sortKey);
      if (typeof x === 'string' || typeof y === 'string') return s * String(x).localeCompare(String(y));
      return x !== y ? s * (x - y) : (a.key < b.key ? -1 : a.key > b.key ? 1 : a.id - b.id);
    });
  }
  function render() {
    const q = (box.value || '').trim().toLowerCase();
    let hits = data.latents.filter(e => textMatch(e, q) && (!matches || uid(e) in matches));
    hits = sorted(hits);
    body.replaceChildren();
    for (const e of hits.slice(0, limit)) {
      const tr = saehookEl('tr', null, 'latent');
      tr.dataset.key = e.key; tr.dataset.id = String(e.id);
      const a = saehookEl('a', String(e.id));
      a.href = 'latent.html?h=' + encodeURIComponent(e.dir) + '&id=' + e.id;
      cell(tr, '').appendChild(a);
      cell(tr, e.key);
      cell(tr, fmt(100 * e.density, 3) + '%', 'num');
      cell(tr, fmt(e.mean, 3), 'num');
      cell(tr, e.max === null ? '' : Number(e.max).toPrecision(3), 'num');
      cell(tr, e.top_label === null ? '' : e.top_label);
      cell(tr, fmt(e.specificity, 3), 'num');
      cell(tr, e.top.map(t => JSON.stringify(t)).join(' '));
      const m = matches && matches[uid(e)];
      cell(tr, m ? m[0] + '/' + m[1] + ': ' + m[3] : e.explanation.join(' | '), m ? 'ctx' : 'pat');
      body.appendChild(tr);
    }
    count.textContent = hits.length + ' of ' + data.latents.length + ' latents' +
      (hits.length > limit ? ', first ' + limit + ' shown' : '');
    more.hidden = hits.length <= limit;
    for (const th of document.querySelectorAll('th[data-sort]')) {
      th.dataset.order = th.dataset.sort === sortKey ? order : '';
    }
  }
  // --- phrase search over the top examples (saehook.features.search_contexts, in the browser)
  function escapeRe(s) { return s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&'); }
  function searchLatent(lat, re) {
    let n = 0, best = null;
    for (const ex of lat.top) {
      const pieces = ex[1].map(saehookTok), i = ex[3], sep = window.SAEHOOK_SEP;
      const text = pieces.join(sep);
      const a = pieces.slice(0, i).join(sep).length, b = pieces.slice(0, i + 1).join(sep).length;
      let hit = false;
      for (const m of text.matchAll(re)) { if (m.index < b && a < m.index + m[0].length) { hit = true; break; } }
      if (!hit) continue;
      n += 1;
      if (best === null || ex[0] > best[0]) {
        const a2 = a + (text.slice(a, b).length - text.slice(a, b).trimStart().length);
        best = [ex[0], text.slice(0, a2) + '[[' + text.slice(a2, b) + ']]' + text.slice(b)];
      }
    }
    return n ? [n, lat.top.length, best[0], best[1]] : null;
  }
  async function phraseSearch(phrase) {
    if (!phrase) { matches = null; if (sortKey === 'match') sortKey = 'density'; render(); return; }
    count.textContent = 'loading the top examples...';
    if (!window.SAEHOOK_VOCAB) await saehookLoad('data/vocab.js');
    const loads = [];
    for (const h of Object.values(data.hookpoints)) {
      for (let c = 0; c < h.chunks; c++) {
        const src = 'data/' + h.dir + '/chunk-' + c + '.js';
        if (!window.saehookChunks[h.dir + '/' + c]) loads.push(saehookLoad(src));
      }
    }
    await Promise.all(loads);
    const re = new RegExp(escapeRe(phrase), 'gi');
    const found = {};
    for (const e of data.latents) {
      const lat = window.saehookChunks[e.dir + '/' + Math.floor(e.id / data.chunk)][e.id];
      const m = lat && searchLatent(lat, re);
      if (m) found[uid(e)] = m;
    }
    matches = found; sortKey = 'match'; order = 'desc'; limit = 200;
    render();
    document.body.dataset.phrase = phrase;  // the search is done (tests wait for this)
  }
  function setUrl() {
    try {
      const u = new URL(location.href);
      for (const [k, v] of [['q', box.value], ['phrase', pbox.value], ['sort', sortKey], ['order', order]]) {
        if (v) u.searchParams.set(k, v); else u.searchParams.delete(k);
      }
      history.replaceState(null, '', u);
    } catch (err) { /* some browsers refuse replaceState on file:// URLs */ }
  }
  for (const th of document.querySelectorAll('th[data-sort]')) {
    th.addEventListener('click', function () {
      if (sortKey === th.dataset.sort) order = order === 'desc' ? 'asc' : 'desc';
      else { sortKey = th.dataset.sort; order = th.dataset.sort === 'key' ? 'asc' : 'desc'; }
      render(); setUrl();
    });
  }
  box.value = params.get('q') || '';
  pbox.value = params.get('phrase') || '';
  box.addEventListener('input', function () { render(); setUrl(); });
  document.getElementById('phrase-form').addEventListener('submit', function (ev) {
    ev.preventDefault(); phraseSearch(pbox.value.trim()).then(setUrl);
  });
  more.addEventListener('click', function () { limit += 200; render(); });
  render();
  if (pbox.value.trim()) phraseSearch(pbox.value.trim());
})();
"""

LATENT_JS = r"""
(function () {
  const params = new URLSearchParams(location.search);
  const dir = params.get('h'), id = Number(params.get('id'));
  const meta = JSON.parse(document.getElementById('meta').textContent);
  const main = document.getElementById('main');
  function add(parent, tag, text, cls) { const e = saehookEl(tag, text, cls); parent.appendChild(e); return e; }
  function example(parent, ex, top, shade) {
    // ex = [value, ids, acts or null, index]
    const div = add(parent, 'div', null, 'ex');
    add(div, 'span', ex[0].toFixed(3), 'v');
    ex[1].forEach(function (t, i) {
      const s = add(div, 'span', saehookVisible(saehookTok(t)), i === ex[3] ? 't hit' : 't');
      const a = shade && ex[2] ? ex[2][i] : (i === ex[3] ? ex[0] : 0);
      if (a > 0 && top > 0) s.style.background = 'rgba(255,140,0,' + Math.min(1, a / top).toFixed(3) + ')';
      if (shade && ex[2]) s.title = String(ex[2][i]);
    });
  }
  function table(parent, head, rows, id) {
    const t = add(parent, 'table'); if (id) t.id = id;
    const tr = add(t, 'tr'); head.forEach(h => add(tr, 'th', h));
    rows.forEach(function (r) {
      const row = add(t, 'tr');
      r.forEach((c, i) => add(row, 'td', c, i ? 'num' : ''));
    });
    return t;
  }
  function show(lat) {
    const h = meta.hookpoints[dir];
    document.title = 'latent ' + id + ' (' + h.key + ')';
    add(main, 'h1', 'Latent ' + id + ' at ' + h.key);
    const nav = add(main, 'nav'); const back = add(nav, 'a', 'index'); back.href = 'index.html';
    if (lat.page) {
      nav.append(' \u00b7 ');
      add(nav, 'a', 'explanation and logit effects').href = lat.page;
    }
    add(main, 'h2', 'Statistics');
    table(main, ['', ''], [['firing rate', (100 * lat.density).toFixed(4) + '% of ' + h.tokens + ' tokens'],
      ['mean activation when firing', lat.mean.toFixed(4)], ['max activation', lat.max.toFixed(4)]], 'stats');
    add(main, 'h2', 'Per-label firing rates');
    if (lat.labels && lat.labels.length) {
      add(main, 'p', 'Fraction of each label\u2019s tokens (' + h.labels_source + ') on which the latent fires, ' +
          'its mean activation there, and the label-vs-rest effect size (saehook.features.find_by_labels).', 'muted');
      table(main, ['label', 'firing rate', 'mean activation', 'effect'],
            lat.labels.map(l => [l[0], (100 * l[1]).toFixed(3) + '%', l[2].toFixed(3), l[3].toFixed(3)]), 'labels');
    } else add(main, 'p', 'no labelled text was given (saehook dashboard --labels)', 'muted');
    add(main, 'h2', 'Activation histogram');
    const hist = add(main, 'div', null, 'hist'); hist.id = 'histogram';
    const peak = Math.max(1, ...lat.hist);
    lat.hist.forEach(function (n, b) {
      const bar = add(hist, 'div', null, 'bar');
      bar.style.height = (100 * Math.sqrt(n / peak)).toFixed(1) + '%';
      bar.title = n + ' firings with activation in (' + (b * lat.max / lat.hist.length).toFixed(2) + ', ' +
                  ((b + 1) * lat.max / lat.hist.length).toFixed(2) + ']';
    });
    add(main, 'p', 'Firings by activation, 0 to the max (' + lat.max.toFixed(3) + ') in ' + lat.hist.length +
        ' bins; bar height is the square root of the count (hover for it).', 'muted');
    add(main, 'h2', 'Examples by activation quantile');
    add(main, 'p', 'A uniform random sample of the latent\u2019s firings, sorted by activation and cut into ' +
        'quantiles (lowest first); the activating token is outlined.', 'muted');
    const q = add(main, 'div'); q.id = 'quantiles';
    lat.quantiles.forEach(function (g) {
      add(q, 'h3', 'quantile ' + Math.round(100 * g.q[0]) + '-' + Math.round(100 * g.q[1]) + '%: activation ' +
          g.lo.toFixed(3) + ' to ' + g.hi.toFixed(3));
      g.ex.forEach(ex => example(q, [ex[0], ex[1], null, ex[2]], lat.max, false));
    });
    add(main, 'h2', 'Top ' + lat.top.length + ' activating examples');
    const t = add(main, 'div'); t.id = 'examples';
    lat.top.forEach(ex => example(t, ex, lat.max, true));
    if (lat.explanation) {
      add(main, 'h2', 'Explanation (Neuron-to-Graph)');
      add(main, 'p', 'precision ' + lat.explanation.precision + ', recall ' + lat.explanation.recall);
      lat.explanation.patterns.forEach(p => add(main, 'div', saehookVisible(p), 'pat'));
    }
  }
  const chunk = 'data/' + dir + '/chunk-' + Math.floor(id / meta.chunk) + '.js';
  saehookLoad('data/vocab.js').then(() => saehookLoad(chunk))
    .then(function () {
      const lat = (window.saehookChunks[dir + '/' + Math.floor(id / meta.chunk)] || {})[id];
      if (!lat) { add(main, 'p', 'latent ' + id + ' is not in this dashboard', 'warning'); return; }
      show(lat);
      document.body.dataset.ready = '1';
    }).catch(e => add(main, 'p', String(e), 'warning'));
})();
"""

EXTRA_CSS = """
th[data-sort]{cursor:pointer;text-decoration:underline dotted}th[data-order=desc]::after{content:" \\25BC"}
th[data-order=asc]::after{content:" \\25B2"}.ctx{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.85em}
.hist{display:flex;align-items:flex-end;gap:2px;height:120px;border-bottom:1px solid #999;max-width:700px}
.hist .bar{flex:1;background:#e08020;min-height:1px}h3{font-size:.95em;margin:1em 0 .2em}
"""
