"""Neuron-to-Graph (N2G) explanations of autoencoder latents, scored by precision and recall on held-out text.

Following Foote et al. (2023), as used by Gao et al. (2024) to measure explainability, for each explained
latent and each of its top-activating examples (:func:`saehook.examples.top_examples`):

1. **Trim.** Re-run the model on ``[BOS] + `` the last ``s = 1, 2, ...`` tokens ending at the activating token
   and keep the shortest suffix on which the latent's TopK value is at least ``keep_fraction`` (0.5) of
   the example's activation in its full window. All examples still running are batched together at each
   ``s``. When no suffix within the stored left context gets there, the whole stored context is kept.
2. **Saliency.** Replace each token of the trimmed suffix in turn by a neutral token (the pad token) and
   re-run. Importance = the relative drop of the latent's ReLU pre-activation (smooth, unlike the TopK
   value, which jumps to 0 when a replacement pushes the latent out of the top k). Tokens with importance
   below ``saliency_threshold`` (0.75, as in the N2G code) become wildcards; the activating token never
   does (as in N2G), and wildcards at the far end of the suffix are dropped.
3. **Trie.** The patterns, read backwards from the activating token, go into a trie; each end node
   stores the largest normalised activation (example activation / the latent's max) of its patterns.
4. **Predict.** On held-out text the latent is predicted at position ``t`` when the tokens ending at ``t``
   match a pattern of the trie (wildcards match any token). The prediction is that pattern's stored
   activation; the matching walks the trie once for all positions at a time (tensor masks per node).

Scores per latent, over the evaluated held-out positions (not padding, not the first ``skip_positions``):

    fires      = activation > fire_fraction * max_activation        (max over the top-examples pass)
    predicted  = a pattern with stored activation > fire_fraction matches
    precision  = |predicted & fires| / |predicted|     recall = |predicted & fires| / |fires|
    f1         = 2 |predicted & fires| / (|predicted| + |fires|)

and the same with ``fire_fraction = 0`` (``*_any``: the latent is active at all, and any pattern matches).
Not done from N2G: the augmentation of examples with similar tokens (a BERT model), the normalisation
of token strings (case, surrounding spaces) before matching, and predicting graded activations rather
than firing.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .examples import TopExamples, _limited, as_saes, decode_token, encoded_batches
from .hookpoints import Key, unwrap
from .sae import TopKSAE

__all__ = ["WILDCARD", "ExplainReport", "Explanation", "Trie", "explain"]

WILDCARD = -1
"""The token id of a wildcard in a pattern: it matches any token."""


# ---------------------------------------------------------------------------------------------- the trie
class _Node:
    __slots__ = ("children", "end", "count")

    def __init__(self):
        self.children: dict[int, _Node] = {}
        self.end = 0.0  # largest normalised activation of the patterns ending here (0: none ends here)
        self.count = 0  # examples whose pattern ends here


class Trie:
    """Token patterns keyed from the activating token backwards: ``pattern[0]`` is the activating token,
    ``pattern[i]`` the token ``i`` positions before it, :data:`WILDCARD` matches any token."""

    def __init__(self):
        self.root = _Node()

    def insert(self, pattern: Sequence[int], activation: float = 1.0) -> None:
        """Add a backward pattern whose example reached ``activation`` (normalised, in (0, 1])."""
        if not len(pattern):
            raise ValueError("a pattern needs at least one token")
        node = self.root
        for tok in pattern:
            node = node.children.setdefault(int(tok), _Node())
        node.end = max(node.end, float(activation))
        node.count += 1

    def patterns(self) -> list[tuple[tuple[int, ...], float, int]]:
        """``(backward pattern, stored activation, examples)`` of every pattern, strongest first."""
        out, stack = [], [(self.root, ())]
        while stack:
            node, path = stack.pop()
            if node.count:
                out.append((path, node.end, node.count))
            stack.extend((child, (*path, tok)) for tok, child in node.children.items())
        return sorted(out, key=lambda p: (-p[1], -p[2], p[0]))

    def __len__(self) -> int:
        return len(self.patterns())

    def predict(self, ids: Tensor, cache: dict | None = None) -> Tensor:
        """``ids [B, T]`` (-1 on padding) -> ``[B, T]`` float: at each position the largest stored activation
        of the patterns that match the tokens ending there (0 where none does).

        One pass down the trie with a boolean mask of the positions still matching per node; ``cache``
        (a dict) shares the shifted copies of ``ids`` between calls on the same ids."""
        cache = {} if cache is None else cache
        B, T = ids.shape
        out = torch.zeros(B, T, device=ids.device)
        stack = [(self.root, 0, torch.ones(B, T, dtype=torch.bool, device=ids.device))]
        while stack:
            node, depth, mask = stack.pop()
            if node.count:
                out = torch.where(mask, out.clamp_min(node.end), out)
            for tok, child in node.children.items():
                if depth not in cache:  # token `depth` positions before each position; -2 before the row
                    sh = torch.full_like(ids, -2)
                    sh[:, depth:] = ids[:, : T - depth]
                    cache[depth] = sh
                sh = cache[depth]
                m = mask & (sh >= 0) if tok == WILDCARD else mask & (sh == tok)
                if bool(m.any()):
                    stack.append((child, depth + 1, m))
        return out

    def to_json(self) -> list:
        """The patterns as ``[[backward tokens (None = wildcard)], activation, examples]`` lists."""
        return [[[None if t == WILDCARD else t for t in p], a, c] for p, a, c in self.patterns()]


def pattern_text(pattern: Sequence[int], tokenizer=None) -> str:
    """A backward pattern in reading order: token strings (``repr``), ``*`` for wildcards, the activating
    token in brackets, e.g. ``' the' * [' of']``."""
    parts = ["*" if t == WILDCARD else repr(decode_token(tokenizer, t)) for t in reversed(pattern)]
    parts[-1] = f"[{parts[-1]}]"
    return " ".join(parts)


# ---------------------------------------------------------------------------------------------- results
def _ratio(a: int, b: int) -> float:
    return a / b if b else float("nan")


@dataclass
class Explanation:
    """The N2G explanation of one latent and its scores on held-out text."""

    key: Key
    latent: int
    max_activation: float
    """Largest activation in the top-examples pass (the normalisation of the trie's activations)."""
    trie: Trie
    examples: list[dict] = field(repr=False)
    """Per top example: ``value``, ``suffix`` (trimmed tokens, reading order), ``trimmed_activation`` and
    ``trimmed_pre`` (the latent's TopK value and ReLU pre-activation on the trimmed suffix),
    ``reached`` (the suffix kept ``keep_fraction`` of the activation), ``importance`` (per suffix token,
    the relative drop when it is replaced), ``pattern`` (backward, or None when the example gave none)."""
    counts: dict = field(default_factory=dict)
    """Held-out counts: ``tokens``, ``fires``, ``predicted``, ``hits`` and ``fires_any``, ``predicted_any``,
    ``hits_any``."""

    @property
    def precision(self) -> float:
        """Of the positions predicted to fire strongly, the fraction that do (NaN if none is predicted)."""
        return _ratio(self.counts.get("hits", 0), self.counts.get("predicted", 0))

    @property
    def recall(self) -> float:
        """Of the positions where the latent fires strongly, the fraction predicted (NaN if it never does)."""
        return _ratio(self.counts.get("hits", 0), self.counts.get("fires", 0))

    @property
    def f1(self) -> float:
        """``2 hits / (predicted + fires)`` (NaN when both are 0)."""
        c = self.counts
        return _ratio(2 * c.get("hits", 0), c.get("predicted", 0) + c.get("fires", 0))

    @property
    def precision_any(self) -> float:
        """Precision of "any pattern matches" at "the latent is active at all"."""
        return _ratio(self.counts.get("hits_any", 0), self.counts.get("predicted_any", 0))

    @property
    def recall_any(self) -> float:
        """Recall of "any pattern matches" at "the latent is active at all"."""
        return _ratio(self.counts.get("hits_any", 0), self.counts.get("fires_any", 0))

    @property
    def f1_any(self) -> float:
        """F1 of "any pattern matches" at "the latent is active at all"."""
        c = self.counts
        return _ratio(2 * c.get("hits_any", 0), c.get("predicted_any", 0) + c.get("fires_any", 0))

    def pattern_texts(self, tokenizer=None) -> list[str]:
        """The trie's patterns in reading order (see :func:`pattern_text`), strongest first."""
        return [pattern_text(p, tokenizer) for p, _, _ in self.trie.patterns()]

    def to_dict(self, tokenizer=None) -> dict:
        """JSON-ready summary (NaN as None)."""
        def clean(v):
            return None if isinstance(v, float) and not math.isfinite(v) else v

        return {"key": self.key, "latent": self.latent, "max_activation": self.max_activation,
                "patterns": self.trie.to_json(), "pattern_texts": self.pattern_texts(tokenizer),
                **{n: clean(getattr(self, n)) for n in ("precision", "recall", "f1", "precision_any",
                                                        "recall_any", "f1_any")},
                "counts": self.counts}


class ExplainReport(Mapping):
    """What :func:`explain` found: ``report[key][latent]`` is an :class:`Explanation`; :meth:`summary`
    averages the scores over the explained latents of a hookpoint."""

    def __init__(self, explanations: dict, settings: dict):
        self.explanations, self.settings = explanations, dict(settings)

    def __getitem__(self, key: Key) -> dict[int, Explanation]:
        return self.explanations[key]

    def __iter__(self) -> Iterator[Key]:
        return iter(self.explanations)

    def __len__(self) -> int:
        return len(self.explanations)

    def summary(self, key: Key) -> dict:
        """Means over the explained latents of ``key`` of ``precision``, ``recall``, ``f1`` and the ``*_any``
        variants, ignoring undefined (NaN) values; ``n_<metric>`` says how many latents each mean covers."""
        exps = list(self.explanations[key].values())
        out: dict = {"latents": len(exps)}
        for name in ("precision", "recall", "f1", "precision_any", "recall_any", "f1_any"):
            vals = [v for v in (getattr(e, name) for e in exps) if math.isfinite(v)]
            out[name] = sum(vals) / len(vals) if vals else float("nan")
            out[f"n_{name}"] = len(vals)
        return out

    def __repr__(self) -> str:
        lines = [f"ExplainReport(fire_fraction={self.settings.get('fire_fraction')})"]
        for key in self:
            s = self.summary(key)
            lines.append(f"  {key}: {s['latents']} latents  precision {s['precision']:.3f}  recall {s['recall']:.3f}"
                         f"  f1 {s['f1']:.3f}  (any: {s['precision_any']:.3f} / {s['recall_any']:.3f})")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- re-running
class _Runner:
    """Activation of given latents at the last position of short token sequences (batched forwards)."""

    def __init__(self, model, key: Key, sae: TopKSAE, chunk: int, bar=None):
        from .hooks import attach

        self.hooked = attach(model, {key: sae}, record=False)
        self.key, self.sae, self.chunk, self.bar = key, self.hooked.saes[key], chunk, bar
        self.forwards = self.rows = self.tokens = 0

    @torch.no_grad()
    def __call__(self, seqs: Tensor, latents: Tensor) -> dict[str, Tensor]:
        """``seqs [R, m]``, ``latents [R]`` -> ``{"pre": [R], "coded": [R]}``: the ReLU pre-activation and the
        TopK value (0 unless among the k largest) of ``latents[r]`` at the end of ``seqs[r]``."""
        pre, coded = [], []
        for i in range(0, len(seqs), self.chunk):
            ids = seqs[i: i + self.chunk]
            run = self.hooked.run(ids)
            self.forwards += 1
            self.rows += ids.shape[0]
            self.tokens += ids.numel()
            if self.bar is not None:
                self.bar.update(ids.shape[0])
            x = run.acts[self.key][:, -1].to(self.sae.W_enc.dtype)
            lat = latents[i: i + self.chunk].to(x.device)
            pre.append(self.sae.pre_acts(x).gather(-1, lat[:, None]).squeeze(-1).float().relu().cpu())
            codes = self.sae.encode(x)
            coded.append(((codes.indices == lat[:, None]) * codes.values.float()).sum(-1).cpu())
        empty = torch.zeros(0)
        return {"pre": torch.cat(pre) if pre else empty, "coded": torch.cat(coded) if coded else empty}

    def close(self):
        self.hooked.detach()


def _explain_key(run: _Runner, key: Key, ex: TopExamples, latents: list[int], *, keep_fraction: float,
                 saliency_threshold: float, bos_id: int | None, neutral_id: int, keep_activating: bool,
                 trim_on: str, saliency_on: str) -> dict[int, Explanation]:
    head = [] if bos_id is None else [bos_id]
    items = []  # (latent, value, available suffix in reading order ending at the activating token)
    for lat in latents:
        r = ex.row(lat)
        for e in range(ex.values.shape[1]):
            value = float(ex.values[r, e])
            if value <= 0:
                break
            left = ex.tokens[r, e, : ex.left + 1].tolist()
            avail: list[int] = []
            for t in reversed(left):  # the contiguous in-window run ending at the activating token
                if t < 0:
                    break
                avail.insert(0, t)
            if bos_id is not None and len(avail) > 1 and avail[0] == bos_id:
                avail = avail[1:]  # the row's own BOS: the prefix already provides one
            items.append({"latent": lat, "value": value, "avail": avail})
    # 1. trim: the shortest suffix keeping keep_fraction of the activation; all unfinished examples per length
    todo = list(range(len(items)))
    s = 0
    while todo:
        s += 1
        seqs = torch.tensor([head + items[i]["avail"][-s:] for i in todo], dtype=torch.long)
        acts = run(seqs, torch.tensor([items[i]["latent"] for i in todo]))[trim_on]
        left_over = []
        for i, a in zip(todo, acts.tolist()):
            it = items[i]
            if a >= keep_fraction * it["value"] or s == len(it["avail"]):
                it.update(suffix=it["avail"][-s:], reached=a >= keep_fraction * it["value"])
            else:
                left_over.append(i)
        todo = left_over
    # 2. saliency: the trimmed suffix, then each of its tokens replaced by the neutral token; by suffix length
    by_len: dict[int, list[int]] = {}
    for i, it in enumerate(items):
        by_len.setdefault(len(it["suffix"]), []).append(i)
    for m, group in by_len.items():
        base = torch.tensor([head + items[i]["suffix"] for i in group], dtype=torch.long)  # [G, h + m]
        seqs = base.repeat_interleave(m + 1, 0)  # row g*(m+1) + 1 + j: token j of example g replaced
        cols = torch.arange(-1, m).repeat(len(group)) + len(head)
        rows = torch.arange(len(seqs))[cols >= len(head)]
        seqs[rows, cols[cols >= len(head)]] = neutral_id
        lats = torch.tensor([items[i]["latent"] for i in group]).repeat_interleave(m + 1)
        res = run(seqs, lats)
        acts = res[saliency_on].view(len(group), m + 1)
        trimmed, acts = acts[:, 0], acts[:, 1:]
        importance = (trimmed[:, None] - acts) / trimmed[:, None].clamp_min(1e-12)
        for g, i in enumerate(group):
            items[i]["trimmed_activation"] = float(res["coded"].view(len(group), m + 1)[g, 0])
            items[i]["trimmed_pre"] = float(res["pre"].view(len(group), m + 1)[g, 0])
            if float(trimmed[g]) <= 0:
                items[i].update(importance=[], pattern=None)
                continue
            imp = importance[g]
            keep = imp >= saliency_threshold
            if keep_activating:
                keep[-1] = True
            if not bool(keep.any()):
                keep[int(imp.argmax())] = True
            first = int(keep.nonzero()[0, 0])  # wildcards before the first kept token say nothing
            suffix = items[i]["suffix"]
            pattern = [t if k else WILDCARD for t, k in zip(suffix[first:], keep[first:].tolist())]
            items[i].update(importance=imp.tolist(), pattern=tuple(reversed(pattern)))
    # 3. one trie per latent
    out: dict[int, Explanation] = {}
    for lat in latents:
        mx = ex.max_activation(lat)
        exp = Explanation(key, lat, mx, Trie(), [])
        for it in items:
            if it["latent"] != lat:
                continue
            if it["pattern"] is not None:
                exp.trie.insert(it["pattern"], min(it["value"] / mx, 1.0))
            exp.examples.append({k: it[k] for k in ("value", "suffix", "trimmed_activation", "trimmed_pre", "reached",
                                                    "importance", "pattern")})
        out[lat] = exp
    return out


def _skip_rows(batches: Iterable[dict], rows: int) -> Iterator[dict]:
    for batch in batches:
        n = batch["input_ids"].shape[0]
        if rows >= n:
            rows -= n
            continue
        if rows:
            batch = {k: (v[rows:] if isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == n else v)
                     for k, v in batch.items()}
            rows = 0
        yield batch


def _pick_latents(ex: TopExamples, wanted, n_latents: int, rng: random.Random) -> list[int]:
    if wanted is not None:
        return [int(j) for j in wanted]
    alive = ex.latents[ex.values[:, 0] > 0].tolist()
    return sorted(rng.sample(alive, min(n_latents, len(alive))))


@torch.no_grad()
def explain(model, saes: Mapping[Key, TopKSAE] | TopKSAE, examples: Mapping[Key, TopExamples], source, tokens: int, *,
            latents: Sequence[int] | Mapping[Key, Sequence[int]] | None = None, n_latents: int = 32, seed: int = 0,
            keep_fraction: float = 0.5, saliency_threshold: float = 0.75, fire_fraction: float = 0.5,
            keep_activating: bool = True, trim_on: str = "coded", saliency_on: str = "pre",
            bos_id: int | None | str = "auto", neutral_id: int | None = None,
            skip_rows: int = 0,
            batch_size: int = 8, rerun_batch: int = 64, skip_positions: int = 1, progress: bool = False
            ) -> ExplainReport:
    """Build N2G explanations of latents from their top examples and score them on held-out text.

    Args:
        model: the causal LM the examples came from.
        saes: ``{key: TopKSAE}``, the same as for :func:`saehook.examples.top_examples`.
        examples: its result (the latents to explain must have been tracked there).
        source: held-out text to score on, as for ``top_examples`` (a Corpus gives its ``"test"`` windows).
            Use text the examples did not come from: other batches, or the same source with
            ``skip_rows=examples[key].n_rows``.
        tokens: score on at least this many evaluated positions.
        latents: which latents to explain (a list for every key, or ``{key: list}``); default a random
            sample (``seed``) of ``n_latents`` latents that fired in the examples pass.
        keep_fraction: the trimmed suffix keeps at least this fraction of the example's activation.
        saliency_threshold: a token whose replacement drops the activation by less than this fraction
            becomes a wildcard (0.75, the N2G code's importance threshold).
        fire_fraction: "fires" means activation > this fraction of the latent's max (0: active at all).
        bos_id: prepended to every re-run suffix ("auto": ``model.config.bos_token_id``; None: nothing).
        neutral_id: the replacement token of the saliency step (default the pad, else EOS token, else 0).
        keep_activating: the activating token is never a wildcard (as in N2G).
        trim_on: what the trimming step measures on a suffix: ``"coded"``, the latent's TopK value (0 unless
            it is among the k largest: the suffix must make the latent actually fire), or ``"pre"``, its
            ReLU pre-activation (no TopK competition).
        saliency_on: the same for the saliency step (default ``"pre"``: a smooth measure, so that a latent
            pushed just out of the top k by a replacement does not make every token look salient).
        rerun_batch: sequences per forward when re-running suffixes.

    Returns an :class:`ExplainReport`.
    """
    model = unwrap(model)
    saes = as_saes(saes)
    if not 0 < keep_fraction <= 1 or not 0 < saliency_threshold <= 1 or not 0 <= fire_fraction < 1:
        raise ValueError("keep_fraction and saliency_threshold must be in (0, 1], fire_fraction in [0, 1)")
    if trim_on not in ("pre", "coded") or saliency_on not in ("pre", "coded"):
        raise ValueError(f"trim_on and saliency_on must be 'pre' or 'coded', got {trim_on!r}, {saliency_on!r}")
    cfg = getattr(model, "config", None)
    if bos_id == "auto":
        bos_id = getattr(cfg, "bos_token_id", None)
    if neutral_id is None:
        neutral_id = next((v for v in (getattr(cfg, "pad_token_id", None), getattr(cfg, "eos_token_id", None))
                           if isinstance(v, int)), 0)
    rng = random.Random(seed)
    chosen = {key: _pick_latents(examples[key], latents.get(key) if isinstance(latents, Mapping) else latents,
                                 n_latents, rng) for key in saes}
    explanations: dict = {}
    rerun_stats: dict = {}
    for key, sae in saes.items():
        # the number of re-runs is known only as the suffixes are trimmed: a count and a rate, no total
        bar = tqdm(unit="seq", disable=not progress or not chosen[key],
                   desc=f"saehook explain: re-running suffixes of {len(chosen[key])} latents at {key}")
        run = _Runner(model, key, sae, rerun_batch, bar)
        try:
            explanations[key] = _explain_key(run, key, examples[key], chosen[key], keep_fraction=keep_fraction,
                                             saliency_threshold=saliency_threshold, bos_id=bos_id,
                                             neutral_id=int(neutral_id), keep_activating=keep_activating,
                                             trim_on=trim_on, saliency_on=saliency_on)
        finally:
            run.close()
            bar.close()
        rerun_stats[key] = {"forwards": run.forwards, "sequences": run.rows, "tokens": run.tokens}
    _score(model, saes, explanations, source, tokens, fire_fraction=fire_fraction, skip_rows=skip_rows,
           batch_size=batch_size, skip_positions=skip_positions, progress=progress)
    settings = {"keep_fraction": keep_fraction, "saliency_threshold": saliency_threshold,
                "fire_fraction": fire_fraction, "bos_id": bos_id, "neutral_id": int(neutral_id),
                "keep_activating": keep_activating, "trim_on": trim_on, "saliency_on": saliency_on,
                "reruns": rerun_stats,
                "tokens_requested": tokens, "skip_rows": skip_rows, "skip_positions": skip_positions}
    return ExplainReport(explanations, settings)


def _score(model, saes, explanations, source, tokens: int, *, fire_fraction: float, skip_rows: int, batch_size: int,
           skip_positions: int, progress: bool) -> None:
    """Held-out counts of every explanation, in one streaming pass."""
    from .evaluate import eval_batches

    names = ("tokens", "fires", "predicted", "hits", "fires_any", "predicted_any", "hits_any")
    for exps in explanations.values():
        for e in exps.values():
            e.counts = dict.fromkeys(names, 0)
    bar = tqdm(total=tokens, unit="tok", unit_scale=True, disable=not progress,
               desc="saehook explain: scoring on held-out text")
    batches = _limited(_skip_rows(eval_batches(source, batch_size), skip_rows), tokens, skip_positions)
    seen = 0
    try:
        for batch, evaluated, real, codes in encoded_batches(model, saes, batches, skip_positions=skip_positions):
            ids = torch.where(real, batch["input_ids"], torch.full_like(batch["input_ids"], -1))
            seen += int(evaluated.sum())
            for key, exps in explanations.items():
                if not exps:
                    continue
                vals, idx = codes[key].values.float(), codes[key].indices
                lats = torch.tensor(list(exps), device=idx.device)
                acts = ((idx.unsqueeze(-1) == lats) * vals.unsqueeze(-1)).sum(-2)  # [B, T, m]
                cache: dict = {}
                for j, e in enumerate(exps.values()):
                    pred = e.trie.predict(ids, cache)
                    act = acts[..., j]
                    for suffix, fires, predicted in (
                            ("", act > fire_fraction * e.max_activation, pred > fire_fraction),
                            ("_any", act > 0, pred > 0)):
                        fires, predicted = fires & evaluated, predicted & evaluated
                        e.counts["fires" + suffix] += int(fires.sum())
                        e.counts["predicted" + suffix] += int(predicted.sum())
                        e.counts["hits" + suffix] += int((fires & predicted).sum())
                    e.counts["tokens"] += int(evaluated.sum())
            bar.update(int(evaluated.sum()))
    finally:
        bar.close()
    if seen == 0:
        raise ValueError("the held-out source gave no evaluated positions to score the explanations on")
