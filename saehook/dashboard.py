"""A static HTML dashboard of autoencoder latents: top examples, density, logit effects, N2G explanations.

:func:`build_dashboard` writes plain files (no server, no network, no external asset):

    out/index.html                  search box over the shown latents (ids, top tokens, explanations);
                                    the JSON index is embedded, the search is inline JavaScript and
                                    reads ``?q=...`` on load
    out/<hookpoint>/latent-<j>.html one page per shown latent: statistics, N2G explanation and its
                                    precision / recall, logit effects, top examples shaded by activation
    out/<hookpoint>/density.png     the latent-density histogram (:func:`saehook.plots.plot_density`)
    out/summary.json                settings, timings and the explainability means per hookpoint (and,
                                    given ``evaluation=``, its reconstruction metrics)

Every token string is HTML-escaped; the embedded JSON escapes ``<``, ``>`` and ``&`` so no token can
close the script element.
"""

from __future__ import annotations

import html
import json
import logging
import math
import os
import random
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .dashboard_assets import EXTRA_CSS, INDEX_JS, LATENT_JS, LOADER_JS
from .dashboard_data import (
    CHUNK,
    contexts,
    details,
    index_rows,
    label_arrays,
    token_separator,
    used_ids,
    write_chunks,
    write_vocab,
)
from .evaluate import EvalReport
from .examples import TopExamples, as_saes, decode_token, logit_effects, top_examples, top_tokens
from .hookpoints import Key, hookpoint_dirname, saved_key
from .latent_sample import sample_activations
from .sae import TopKSAE

log = logging.getLogger(__name__)

__all__ = ["build_dashboard", "load_saes"]


# ---------------------------------------------------------------------------------------------- inputs
def load_saes(run_or_saes) -> dict[Key, TopKSAE]:
    """``{key: TopKSAE}`` from a mapping (returned as is), one autoencoder whose ``metadata["hookpoint"]``
    names its hookpoint, or a path: a training run / folder of autoencoders (every sub-folder
    :func:`saehook.formats.find_hookpoints` finds) or one autoencoder folder. The key is the autoencoder's
    ``metadata["hookpoint"]``, else its folder name (as ``saehook eval`` does)."""
    from .formats import find_hookpoints, load
    from .formats.detect import single_format

    if isinstance(run_or_saes, (Mapping, TopKSAE)):
        return as_saes(run_or_saes)
    path = Path(run_or_saes).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: give a training run folder (e.g. runs/demo) or one "
                                "autoencoder folder (e.g. runs/demo/model.layers.20)")
    found = {path.name: path} if single_format(path) else {n: p for n, (p, _) in find_hookpoints(path).items()}
    if not found:
        raise FileNotFoundError(f"no autoencoder under {path} (expected folders with cfg.json + sae.safetensors)")
    saes: dict = {}
    for sub in found.values():
        sae = load(sub)
        key = saved_key(sub, sae.metadata)
        if key in saes:
            raise ValueError(f"two autoencoders under {path} have hookpoint {key!r}")
        saes[key] = sae
    return saes


def _split_source(source, tokens: int, score_tokens: int, batch_size: int, skip_positions: int):
    """The source's batches: the first ``tokens`` evaluated positions for the examples, the next
    ``score_tokens`` for scoring the explanations."""
    from .evaluate import eval_batches, position_masks

    first, second, n1, n2 = [], [], 0, 0
    for batch in eval_batches(source, batch_size):
        n = int(position_masks(batch, skip_positions)[0].sum())
        if n1 < tokens:
            first.append(batch)
            n1 += n
        elif n2 < score_tokens:
            second.append(batch)
            n2 += n
        else:
            break
    return first, second, n1, n2


# ---------------------------------------------------------------------------------------------- HTML
CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse}td,th{padding:2px 8px;text-align:left;vertical-align:top;font-size:.9em}
tr:nth-child(even){background:#f6f6f6}.num{text-align:right;font-variant-numeric:tabular-nums}
input[type=search]{font-size:1.1em;width:60%;padding:4px}
.ex{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.85em;margin:3px 0;line-height:1.7}
.v{display:inline-block;width:5em;color:#666}.t{white-space:pre;border-radius:2px;margin-right:1px}
.t.hit{outline:2px solid #c00}.muted{color:#777}.pat{font-family:ui-monospace,Menlo,Consolas,monospace}
.cols{display:flex;gap:3em}code{background:#f3f3f3;padding:0 3px}.warning{color:#a40}
"""

def _esc(text) -> str:
    return html.escape(str(text), quote=True)


def _visible(tok: str) -> str:
    return tok.replace("\n", "\u21b5").replace("\t", "\u21e5").replace("\r", "")


def _json_for_script(obj) -> str:
    """JSON safe inside ``<script>``: ``<``, ``>`` and ``&`` as unicode escapes."""
    text = json.dumps(obj, ensure_ascii=False, allow_nan=False)
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def _page(title: str, body: str, script: str = "") -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>{_esc(title)}</title><style>{CSS}{EXTRA_CSS}</style></head>\n<body>\n{body}\n{script}</body></html>\n")


def _num(x, fmt="{:.3f}") -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else fmt.format(x)


class _Decoder:
    def __init__(self, tokenizer):
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, token_id: int) -> str:
        if token_id not in self.cache:
            self.cache[token_id] = decode_token(self.tokenizer, token_id)
        return self.cache[token_id]


def _example_html(ex: dict, top: float, dec: _Decoder) -> str:
    spans = []
    for i, (t, a) in enumerate(zip(ex["tokens"], ex["acts"])):
        alpha = max(0.0, min(1.0, a / top)) if top > 0 else 0.0
        cls = "t hit" if i == ex["index"] else "t"
        style = f' style="background:rgba(255,140,0,{alpha:.3f})"' if alpha > 0 else ""
        spans.append(f'<span class="{cls}"{style} title="{a:.3f}">{_esc(_visible(dec(t)))}</span>')
    return f'<div class="ex"><span class="v">{ex["value"]:.3f}</span>{"".join(spans)}</div>'


def _latent_page(key, latent: int, ex: TopExamples, expl, effects, dec: _Decoder, prev_next, n_tokens: int,
                 settings: dict) -> str:
    examples = ex.examples(latent)
    top = ex.max_activation(latent)
    density = float(ex.density[latent])
    parts = [f"<h1>Latent {latent} <span class='muted'>at {_esc(key)}</span></h1>",
             "<nav><a href='../index.html'>index</a>"
             + "".join(f" &middot; <a href='{_esc(url)}'>{label}</a>" for label, url in prev_next if url)
             + "</nav>",
             "<h2>Statistics</h2><table>"
             f"<tr><td>density</td><td class='num'>{density:.5%}</td><td class='muted'>fires on "
             f"{round(density * n_tokens)} of {n_tokens} evaluated tokens</td></tr>"
             f"<tr><td>mean activation when firing</td><td class='num'>{float(ex.mean_activation[latent]):.4f}</td>"
             "<td></td></tr>"
             f"<tr><td>max activation</td><td class='num'>{top:.4f}</td><td></td></tr></table>"]
    parts.append("<h2>Explanation (Neuron-to-Graph)</h2>")
    if expl is None:
        parts.append("<p class='muted'>not explained (only a sample of the shown latents is explained)</p>")
    else:
        ff = settings.get("fire_fraction", 0.5)
        c = expl.counts
        parts.append(
            f"<p>precision <b>{_num(expl.precision)}</b>, recall <b>{_num(expl.recall)}</b>, F1 "
            f"<b>{_num(expl.f1)}</b> on {c.get('tokens', 0)} held-out tokens, where &ldquo;fires&rdquo; means an "
            f"activation above {ff:g} &times; max ({c.get('fires', 0)} positions; {c.get('predicted', 0)} "
            f"predicted, {c.get('hits', 0)} correct). Any activation &gt; 0: precision {_num(expl.precision_any)}, "
            f"recall {_num(expl.recall_any)}.</p>")
        rows = "".join(f"<tr><td class='pat'>{_esc(_visible(txt))}</td><td class='num'>{act:.2f}</td>"
                       f"<td class='num'>{cnt}</td></tr>"
                       for txt, (_, act, cnt) in zip(expl.pattern_texts(dec.tokenizer), expl.trie.patterns()))
        parts.append("<p class='muted'>Patterns in reading order: the activating token in brackets, * matches "
                     "any token.</p><table><tr><th>pattern</th><th>activation / max</th><th>examples</th></tr>"
                     f"{rows}</table>")
    parts.append("<h2>Logit effects</h2>")
    if effects is None:
        parts.append("<p class='muted'>not available for this hookpoint</p>")
    else:
        def table(name, items):
            body = "".join(f"<tr><td class='t'>{_esc(_visible(t))}</td><td class='num'>{v:+.3f}</td></tr>"
                           for t, v in items)
            return f"<div><b>{name}</b><table>{body}</table></div>"

        parts.append("<p class='muted'>Direct effect of one unit of the latent on the logits: "
                     "W_U (g &#8857; W_dec[j]) through the final norm's weight g, linearised.</p>"
                     f"<div class='cols'>{table('promoted', effects['promoted'])}"
                     f"{table('suppressed', effects['suppressed'])}</div>")
    parts.append(f"<h2>Top {len(examples)} activating examples</h2><div id='examples'>")
    parts.extend(_example_html(e, top, dec) for e in examples)
    if not examples:
        parts.append("<p class='muted'>no example: this latent never fired</p>")
    parts.append("</div>")
    return _page(f"latent {latent} ({key})", "\n".join(parts))


# ---------------------------------------------------------------------------------------------- build
def build_dashboard(run_or_saes, out_dir: str | os.PathLike, model, tokenizer, source, *, tokens: int = 20_000,
                    score_tokens: int | None = None, n_latents_shown: int = 64, n_explained: int = 32,
                    latents: Sequence[int] | Mapping[Key, Sequence[int]] | None = None, n_examples: int = 20,
                    context: tuple[int, int] = (16, 4), n_logits: int = 10, batch_size: int = 8,
                    skip_positions: int = 1, seed: int = 0, explain_kwargs: dict | None = None,
                    evaluation: EvalReport | str | os.PathLike | None = None, progress: bool = False,
                    labels: str | os.PathLike | tuple[Sequence, Sequence] | None = None, per_label: int = 20,
                    n_sample: int = 24) -> Path:
    """Write a static HTML dashboard of autoencoder latents to ``out_dir``; returns ``out_dir/index.html``.

    Args:
        run_or_saes: ``{key: TopKSAE}``, or a run folder / autoencoder folder (see :func:`load_saes`).
        model: the language model the autoencoders read.
        tokenizer: its tokenizer (to show tokens).
        source: held-out text: a :class:`~saehook.Corpus` (its ``"test"`` windows) or an iterable of
            ``input_ids`` batches / model-input dicts. Its first ``tokens`` evaluated positions give the top
            examples and densities, the next ``score_tokens`` (default ``tokens // 2``) score the explanations.
        n_latents_shown: pages for this many latents per hookpoint, a random sample (``seed``) of those that
            fired; ``latents`` names them instead (a list, or ``{key: list}``).
        n_explained: N2G explanations for this many of the shown latents (a random sample; 0: none).
        n_examples: top examples per latent.
        context: their ``(left, right)`` tokens of context.
        n_logits: promoted / suppressed tokens listed per latent.
        explain_kwargs: passed on to :func:`saehook.explain.explain` (``fire_fraction``, ``keep_fraction``...).
        evaluation: an :class:`~saehook.evaluate.EvalReport` of these autoencoders, or the path of its
            ``report.json`` (``saehook eval`` writes one): the index then shows FVU, FVU on standardised
            channels, the median relative error, the top channel's variance share, the delta LM loss beside
            the random-error control's, and the report's warnings. Matched by hookpoint.
        progress: a tqdm bar (stderr) for every long phase: collecting examples, sampling the activation
            quantiles, the labelled text, explaining (re-runs, then scoring), writing the latent data.
        labels: labelled text for per-label firing rates and each latent's top label and specificity
            (:func:`saehook.features.find_by_labels`): ``"bbc"``, a labelled ``.jsonl``
            (:func:`saehook.features.labelled_texts`, ``per_label`` documents per label), or ``(texts, labels)``.
        n_sample: firings of each latent sampled uniformly for its histogram page's quantile examples
            (:func:`saehook.latent_sample.sample_activations`; one more pass over the ``tokens``).

    Every latent gets a row in the index (sortable; searchable by id, token, label and, over the top examples'
    contexts, by phrase) and a page (``latent.html?h=<hookpoint dir>&id=<j>``, its data loaded on demand
    from ``data/<hookpoint dir>/chunk-<c>.js``); the ``n_latents_shown`` sample also gets a static page with
    its logit effects and N2G explanation.
    """
    from .explain import explain
    from .plots import plot_density

    t_start = time.perf_counter()
    saes = load_saes(run_or_saes)
    if evaluation is not None and not isinstance(evaluation, EvalReport):
        evaluation = EvalReport.load(evaluation)
    from .counts import as_count

    tokens = as_count(tokens)
    score_tokens = tokens // 2 if score_tokens is None else as_count(score_tokens, "score_tokens")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    first, second, n1, n2 = _split_source(source, tokens, score_tokens, batch_size, skip_positions)
    if not first:
        raise ValueError("the source gave no batch to collect examples from")
    timings: dict = {}
    t0 = time.perf_counter()
    exs = top_examples(model, saes, first, tokens=tokens, n_examples=n_examples, context=context,
                       batch_size=batch_size, skip_positions=skip_positions, progress=progress)
    timings["examples_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    maxima = {}
    for key, ex in exs.items():
        maxima[key] = torch.zeros(ex.n_latents)
        maxima[key][ex.latents] = ex.values[:, 0]
    samples = sample_activations(model, saes, first, maxima, n_sample=n_sample, seed=seed,
                                 skip_positions=skip_positions, progress=progress, total=n1)
    timings["quantiles_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    tables: dict = {}
    labels_source = None
    if labels is not None:
        from .features import find_by_labels, labelled_texts

        texts, labs = (labels if isinstance(labels, tuple)
                       else labelled_texts(labels, per_label=per_label, seed=seed))
        labels_source = "given texts" if isinstance(labels, tuple) else f"{labels}, {per_label} documents per label"
        tables = find_by_labels(model, saes, texts, labs, tokenizer=tokenizer, batch_size=batch_size,
                                skip_positions=skip_positions, progress=progress)
    timings["labels_s"] = time.perf_counter() - t0
    rng = random.Random(seed)
    shown: dict = {}
    explained: dict = {}
    for key, ex in exs.items():
        wanted = latents.get(key) if isinstance(latents, Mapping) else latents
        if wanted is not None:
            shown[key] = sorted(int(j) for j in wanted)
        else:
            alive = (ex.values[:, 0] > 0).nonzero().flatten().tolist()
            shown[key] = sorted(rng.sample(alive, min(n_latents_shown, len(alive))))
        explained[key] = sorted(rng.sample(shown[key], min(n_explained, len(shown[key]))))
    report = None
    t0 = time.perf_counter()
    if n_explained > 0 and any(explained.values()):
        if not second:
            log.warning("the source has no text left after the %d example tokens: no explanations", n1)
        else:
            report = explain(model, saes, exs, second, tokens=score_tokens, latents=explained,
                             batch_size=batch_size, skip_positions=skip_positions, progress=progress,
                             **(explain_kwargs or {}))
    timings["explain_s"] = time.perf_counter() - t0
    dec = _Decoder(tokenizer)
    index, summary, meta = [], {}, {}
    t0 = time.perf_counter()
    sep = token_separator(tokenizer, next((e["tokens"] for ex in exs.values() for j in ex.latents.tolist()[:50]
                                           for e in ex.examples(j) if len(e["tokens"]) > 1), []))
    used: set = set()
    bar = tqdm(total=sum(len(ex.latents) for ex in exs.values()), unit="latent", disable=not progress,
               desc="saehook dashboard: writing latent data")
    for key, ex in exs.items():
        name = hookpoint_dirname(str(key))
        rows, lab = contexts(first), label_arrays(tables.get(key))
        per_latent = details(ex, samples[key], rows, lab, progress=bar)
        used |= used_ids(per_latent)
        all_rows = {r["id"]: r for r in index_rows(key, name, ex, tables.get(key), dec)}
        (out / name).mkdir(parents=True, exist_ok=True)
        plot_density(ex.density, out / name / "density.png", title=f"latent density at {key} ({ex.n_tokens} tokens)")
        try:
            eff = logit_effects(model, saes[key], shown[key])
            effects = dict(zip(shown[key], top_tokens(eff, tokenizer, n_logits)))
        except ValueError as e:
            log.info("no logit effects for %r: %s", key, e)
            effects = {}
        exps = report[key] if report is not None else {}
        lats = shown[key]
        for i, lat in enumerate(lats):
            expl = exps.get(lat)
            url = f"{name}/latent-{lat}.html"
            prev_next = [("previous", f"latent-{lats[i - 1]}.html" if i > 0 else None),
                         ("next", f"latent-{lats[i + 1]}.html" if i + 1 < len(lats) else None)]
            page = _latent_page(key, lat, ex, expl, effects.get(lat), dec, prev_next, ex.n_tokens,
                                report.settings if report is not None else {})
            (out / url).write_text(page, encoding="utf-8")
            pats = expl.pattern_texts(tokenizer)[:5] if expl is not None else []
            clean = (lambda v: v if v is not None and math.isfinite(v) else None)  # noqa: E731
            row = all_rows[lat]
            row.update(explanation=pats, precision=clean(expl.precision) if expl else None,
                       recall=clean(expl.recall) if expl else None, text=" ".join([row["text"], *pats]).lower())
            per_latent[lat]["page"] = url
            if expl is not None:
                per_latent[lat]["explanation"] = {"precision": _num(expl.precision), "recall": _num(expl.recall),
                                                  "patterns": pats}
        index.extend(all_rows.values())
        chunks = write_chunks(out, name, per_latent)
        meta[name] = {"key": str(key), "dir": name, "chunks": chunks, "tokens": ex.n_tokens,
                      "labels_source": labels_source}
        dead = float((ex.density == 0).float().mean())
        summary[str(key)] = {"dir": name, "tokens": ex.n_tokens, "score_tokens": n2, "n_latents": ex.n_latents,
                             "dead_frac": dead, "shown": len(lats), "explained": len(exps),
                             "explainability": report.summary(key) if report is not None else None,
                             "reconstruction": _reconstruction(evaluation, model, key)}
    bar.close()
    write_vocab(out, used, dec, sep)
    (out / "latent.html").write_text(_viewer_page(meta), encoding="utf-8")
    timings["pages_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start
    settings = {"tokens": tokens, "score_tokens": score_tokens, "n_examples": n_examples, "context": list(context),
                "skip_positions": skip_positions, "seed": seed, "explain": report.settings if report else None}
    (out / "summary.json").write_text(json.dumps({"hookpoints": summary, "settings": settings, "timings": timings},
                                                 indent=2, default=_json_default))
    (out / "index.html").write_text(_index_page(summary, index, report, meta), encoding="utf-8")
    return out / "index.html"


_RECONSTRUCTION = [("fvu", "FVU"), ("fvu_standardized", "FVU standardised"), ("rel_error_median", "rel. error median"),
                  ("top_channel_share", "top channel share"), ("delta_lm_loss", "delta LM loss"),
                  ("random_error_delta_lm_loss", "random-error delta")]


def _reconstruction(evaluation, model, key) -> dict | None:
    """The ``_RECONSTRUCTION`` metrics (NaN as None) and warnings of ``key``'s hookpoint in the
    ``EvalReport`` ``evaluation``, None when it is not there."""
    from .hookpoints import resolve, unwrap

    if evaluation is None:
        return None
    hp = str(resolve(unwrap(model), key))
    finite = lambda v: v if isinstance(v, (int, float)) and math.isfinite(v) else None  # noqa: E731
    for k, m in evaluation.items():
        if m.get("hookpoint", str(k)) == hp:
            out = {n: finite(m.get(n)) for n, _ in _RECONSTRUCTION}
            return {**out, "top_channel": (m.get("top_channels") or [None])[0], "warnings": m.get("warnings", [])}
    return None


def _json_default(v):
    if isinstance(v, float):
        return None
    if isinstance(v, torch.Tensor):
        return v.tolist()
    return str(v)


def _viewer_page(meta: dict) -> str:
    """``latent.html``: renders the latent named by ``?h=<hookpoint dir>&id=<j>`` from its data file."""
    meta_json = _json_for_script({"hookpoints": meta, "chunk": CHUNK})
    data = f'<script id="meta" type="application/json">{meta_json}</script>\n'
    return _page("saehook latent", "<div id='main'></div><noscript><p>This page needs JavaScript.</p></noscript>",
                 data + f"<script>{LOADER_JS}</script>\n<script>{LATENT_JS}</script>\n")


def _index_page(summary: dict, index: list, report, meta: dict) -> str:
    rows = []
    for key, s in summary.items():
        e = s["explainability"] or {}
        rows.append(f"<tr><td>{_esc(key)}</td><td class='num'>{s['n_latents']}</td><td class='num'>{s['tokens']}</td>"
                    f"<td class='num'>{s['dead_frac']:.2%}</td><td class='num'>{s['explained']}</td>"
                    f"<td class='num'>{_num(e.get('precision'))}</td><td class='num'>{_num(e.get('recall'))}</td>"
                    f"<td class='num'>{_num(e.get('f1'))}</td></tr>")
    ff = report.settings["fire_fraction"] if report is not None else None
    recon = {k: s["reconstruction"] for k, s in summary.items() if s.get("reconstruction")}
    recon_html = ""
    if recon:
        head = "".join(f"<th>{_esc(label)}</th>" for _, label in _RECONSTRUCTION)
        body = "".join(f"<tr><td>{_esc(k)}</td>" + "".join(f"<td class='num'>{_num(r[n], '{:.4f}')}</td>"
                                                          for n, _ in _RECONSTRUCTION) + "</tr>"
                       for k, r in recon.items())
        notes = "".join(f"<p class='warning'>{_esc(k)}: {_esc(w)}</p>" for k, r in recon.items() for w in r["warnings"])
        recon_html = (f"<h2>Reconstruction</h2><table id='reconstruction'><tr><th>hookpoint</th>{head}</tr>{body}"
                      "</table><p class='muted'>From saehook.evaluate on held-out text. One high-variance channel can "
                      "make FVU look good: the standardised FVU, the relative error and the delta LM loss against "
                      "a random error of the same size cannot hide it.</p>" + notes)
    imgs = "".join(f"<figure><img src='{_esc(s['dir'])}/density.png' alt='density at {_esc(k)}'>"
                   f"<figcaption>{_esc(k)}</figcaption></figure>" for k, s in summary.items())
    body = ("<h1>saehook latent dashboard</h1>"
            "<table><tr><th>hookpoint</th><th>latents</th><th>tokens</th><th>dead</th><th>explained</th>"
            "<th>precision</th><th>recall</th><th>F1</th></tr>" + "".join(rows) + "</table>"
            + (f"<p class='muted'>Mean N2G precision / recall over the explained latents, on held-out text; fires = "
               f"activation &gt; {ff:g} &times; the latent's max.</p>" if ff is not None else "")
            + recon_html + f"<div class='cols'>{imgs}</div>"
            "<h2>Latents</h2><p><input id='q' type='search' placeholder='filter: latent id (#123), token, label or "
            "explanation' autofocus></p><form id='phrase-form'><input id='phrase' type='search' "
            "placeholder='phrase in the top contexts, e.g. prime minister'> <button>search contexts</button></form>"
            "<p class='muted'>Click a column to sort. The phrase search loads every latent's top examples and keeps "
            "those whose activating token is part of the phrase (saehook.features.search_contexts), ranked by the "
            "fraction of examples that match. <span id='count'></span></p>"
            "<table id='results'><thead><tr><th data-sort='id'>latent</th><th data-sort='key'>hookpoint</th>"
            "<th data-sort='density'>firing rate</th><th data-sort='mean'>mean act.</th><th data-sort='max'>max</th>"
            "<th data-sort='top_label'>top label</th><th data-sort='specificity'>specificity</th>"
            "<th>top activating tokens</th><th data-sort='match'>explanation / phrase match</th></tr></thead>"
            "<tbody id='rows'></tbody></table><button id='more' hidden>show 200 more</button>"
            "<noscript><p>The search and the list need JavaScript.</p></noscript>")
    index_json = _json_for_script({"latents": index, "hookpoints": meta, "chunk": CHUNK})
    data = f'<script id="latent-index" type="application/json">{index_json}</script>\n'
    return _page("saehook dashboard", body, data + f"<script>{LOADER_JS}</script>\n<script>{INDEX_JS}</script>\n")
