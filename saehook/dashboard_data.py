"""The dashboard's per-latent data: one index row per latent (for the sortable table) and the lazily loaded
details of every latent (``data/<hookpoint>/chunk-<c>.js``, :data:`CHUNK` latents each) that the one latent
page (``latent.html?h=<hookpoint dir>&id=<latent>``) renders: statistics, per-label firing rates, activation
histogram, examples by activation quantile, top examples. See :mod:`saehook.dashboard_assets` for the file
format and :func:`saehook.dashboard.build_dashboard` for how it is built.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

from .examples import TopExamples
from .latent_sample import LatentSample

__all__ = ["CHUNK", "contexts", "details", "index_rows", "label_arrays", "token_separator", "used_ids", "write_chunks",
           "write_vocab"]

CHUNK = 256
"""Latents per data file: opening one latent loads one file of about 256 x 6 kB on a 16,384-latent dashboard."""


def _r(x: float, d: int = 6) -> float:
    """``x`` to ``d`` significant digits (0 for NaN / inf): small files, and activations of any scale keep their order
    (rounding to decimals would tie 0.00585 and 0.00578)."""
    return float(f"{float(x):.{d}g}") if math.isfinite(float(x)) else 0.0


def token_separator(tokenizer, ids: list[int]) -> str:
    """What the tokenizer puts between two decoded tokens: ``""`` for byte-level / SentencePiece tokenizers (the
    pieces carry their spaces), ``" "`` for word-level ones. Read from the first two ``ids`` (default ``""``)."""
    from .examples import decode_token

    if len(ids) < 2:
        return ""
    a, b = decode_token(tokenizer, ids[0]), decode_token(tokenizer, ids[1])
    both = tokenizer.decode(ids[:2], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return " " if both == f"{a} {b}" and both != a + b else ""


def contexts(batches: list[dict]) -> list[tuple[list[int], list[bool]]]:
    """Every source row as ``(ids, real)`` lists, in the order the passes count rows."""
    out = []
    for b in batches:
        ids = b["input_ids"]
        mask = b.get("attention_mask")
        for r in range(ids.shape[0]):
            out.append((ids[r].tolist(), [True] * ids.shape[1] if mask is None else (mask[r] > 0).tolist()))
    return out


def _window(rows, row: int, pos: int, left: int, right: int) -> tuple[list[int], int]:
    """The real tokens of source ``row`` within ``left`` / ``right`` of ``pos``, and the index of ``pos`` in them."""
    ids, real = rows[row]
    lo, hi = max(0, pos - left), min(len(ids), pos + right + 1)
    keep = [i for i in range(lo, hi) if real[i]]
    return [ids[i] for i in keep], sum(1 for i in keep if i < pos)


def label_arrays(table) -> tuple[list[str], list, list, list] | None:
    """``(labels, rate, mean activation, effect)`` of a :class:`saehook.features.LabelTable` as ``[L][n_latents]``
    lists (computed once: the table's properties recompute on every access); None for None."""
    if table is None:
        return None
    return (table.labels, table.rate.T.tolist(), table.mean_activation.T.tolist(), table.effect.T.tolist())


def details(ex: TopExamples, sample: LatentSample, rows, labels, *, groups: int = 4, per_group: int = 3,
            progress=None) -> dict[int, dict]:
    """The data of every latent page of ``ex`` (JSON-ready), ``{latent: {...}}``: ``density``, ``mean``, ``max``,
    ``hist``, ``quantiles`` (``groups`` activation quantile groups of the sampled firings of
    :class:`~saehook.latent_sample.LatentSample`, ``[value, ids, index]`` per example), ``top``
    (``[value, ids, acts, index]`` per example: tokens outside the row dropped) and ``labels`` (``[name, rate,
    mean activation, effect]``, from :func:`label_arrays`, or None). ``progress``: a tqdm bar advanced per latent.

    The tensors are turned into lists once: about 20 µs per latent, not a tensor operation per example."""
    values, tokens, acts = ex.values.tolist(), ex.tokens.tolist(), ex.acts.tolist()
    density, mean, hist = ex.density.tolist(), ex.mean_activation.tolist(), sample.hist.tolist()
    s_val, s_row, s_pos = sample.values.tolist(), sample.rows.tolist(), sample.positions.tolist()
    out = {}
    for r, j in enumerate(ex.latents.tolist()):
        top = []
        for v, tk, ac in zip(values[r], tokens[r], acts[r]):
            if v <= 0:
                break
            ok = [i for i, t in enumerate(tk) if t >= 0]
            top.append([_r(v), [tk[i] for i in ok], [_r(ac[i], 3) for i in ok], sum(1 for i in ok if i < ex.left)])
        fired = sorted((v, rw, ps) for v, rw, ps in zip(s_val[j], s_row[j], s_pos[j]) if rw >= 0)
        quant = []
        for g in range(groups if fired else 0):
            a, b = len(fired) * g // groups, len(fired) * (g + 1) // groups
            if a == b:
                continue
            picks = sorted({a + (b - a - 1) * i // max(per_group - 1, 1) for i in range(per_group)}, reverse=True)
            exs = []
            for i in picks:
                ids, idx = _window(rows, fired[i][1], fired[i][2], ex.left, ex.right)
                exs.append([_r(fired[i][0]), ids, idx])
            quant.append({"lo": _r(fired[a][0]), "hi": _r(fired[b - 1][0]), "q": [g / groups, (g + 1) / groups],
                          "ex": exs})
        by_label = []
        if labels is not None:
            names, rate, lmean, effect = labels
            by_label = [[name, _r(rate[j][i]), _r(lmean[j][i]), _r(effect[j][i])] for i, name in enumerate(names)]
        out[j] = {"density": _r(density[j]), "mean": _r(mean[j]), "max": _r(values[r][0]), "hist": hist[j],
                  "quantiles": quant, "top": top, "labels": by_label}
        if progress is not None:
            progress.update(1)
    return out


def index_rows(key, dirname: str, ex: TopExamples, label_table, dec) -> list[dict]:
    """One row per latent of ``ex`` for the index table: id, firing rate (``density``), mean and max activation,
    ``top_label`` and its ``specificity`` (the label-vs-rest effect size, :class:`saehook.features.LabelTable`),
    the 5 most frequent activating tokens, and the lower-cased search ``text``."""
    effect = label_table.effect if label_table is not None else None
    best = effect.max(0) if effect is not None else None
    toks = ex.tokens[:, :, ex.left].tolist()
    vals = ex.values.tolist()
    out = []
    for r, j in enumerate(ex.latents.tolist()):
        top = [dec(t) for t, _ in Counter(t for t, v in zip(toks[r], vals[r]) if v > 0).most_common(5)]
        label = label_table.labels[int(best.indices[j])] if best is not None and ex.density[j] > 0 else None
        out.append({"key": str(key), "dir": dirname, "id": j, "density": _r(ex.density[j]),
                    "mean": _r(ex.mean_activation[j]), "max": _r(vals[r][0]), "top_label": label,
                    "specificity": _r(best.values[j]) if label is not None else None, "top": top,
                    "explanation": [], "precision": None, "recall": None,
                    "text": " ".join([str(key), *top, *([label] if label else [])]).lower()})
    return out


def _script(call: str, *args) -> str:
    text = ", ".join(json.dumps(a, ensure_ascii=False, allow_nan=False, separators=(",", ":")) for a in args)
    return f"{call}({text});\n"


def write_chunks(out: Path, dirname: str, per_latent: dict[int, dict]) -> int:
    """Write ``out/data/<dirname>/chunk-<c>.js`` for latents ``c * CHUNK ...``; returns the number of chunks."""
    folder = out / "data" / dirname
    folder.mkdir(parents=True, exist_ok=True)
    n = (max(per_latent) // CHUNK + 1) if per_latent else 0
    for c in range(n):
        part = {j: d for j, d in per_latent.items() if c * CHUNK <= j < (c + 1) * CHUNK}
        (folder / f"chunk-{c}.js").write_text(_script("saehookChunk", dirname, c, part), encoding="utf-8")
    return n


def write_vocab(out: Path, used: set[int], dec, sep: str) -> None:
    """``out/data/vocab.js``: the text of every token id the data files use, and the separator."""
    (out / "data").mkdir(parents=True, exist_ok=True)
    (out / "data" / "vocab.js").write_text(_script("saehookVocab", {int(i): dec(int(i)) for i in sorted(used)}, sep),
                                           encoding="utf-8")


def used_ids(per_latent: dict[int, dict]) -> set[int]:
    """The token ids in the examples of ``per_latent`` (``details`` dicts)."""
    used: set[int] = set()
    for d in per_latent.values():
        for e in d["top"]:
            used.update(e[1])
        for g in d["quantiles"]:
            for e in g["ex"]:
                used.update(e[1])
    return used
