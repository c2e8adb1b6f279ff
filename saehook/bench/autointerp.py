"""Autointerp with detection scoring (SAEBench's ``autointerp`` eval; EleutherAI delphi's detection scorer).

For each sampled live latent of a dictionary:

1. **Examples** (:mod:`saehook.bench.autointerp_examples`) from the hookpoint's cached activations over the
   documents (``saehook.bench.activations.token_activations``), windows of ``2 * buffer + 1`` tokens:
   ``n_top_ex_for_generation + n_top_ex_for_scoring`` top windows and ``n_iw_sampled_ex_for_generation +
   n_iw_sampled_ex_for_scoring`` importance-weighted ones, each set split at random between explanation and
   scoring (held out), plus ``n_random_ex_for_scoring`` windows on which the latent does not activate.
2. **Explanation**: the explainer answers SAEBench's prompt over the generation windows (activating tokens marked
   ``<<tok>>``, strongest window first); the explanation is the answer after "activates on".
3. **Detection**: for each scoring window, unmarked, the scorer is asked whether the latent activates on it; it
   predicts "active" when ``P(yes) > 0.5``. A window is active when some token's activation exceeds
   ``act_threshold_frac`` times the largest activation in the latent's top windows (SAEBench's rule).

::

    score_j          = (1 / n) sum_i [ (P_i(yes) > 0.5) == active_i ]     (n scoring windows of latent j)
    autointerp_score = mean_j score_j,   autointerp_std_dev = std_j score_j  (unbiased, over scored latents)

With the defaults the scoring windows are balanced (4 active, 4 not), so a judge that always answers yes (or no)
scores 0.5. Seeds: latents drawn with ``random_seed``; each latent's draws with ``random_seed + latent``.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .autointerp_examples import gather_windows, iw_windows, quiet_windows, top_windows, window_centers
from .autointerp_prompts import explanation_prompt, parse_explanation, scoring_prompt
from .judges import Judge

__all__ = ["AutoInterpConfig", "EVAL_TYPE_ID", "LatentExamples", "latent_examples", "render", "detection_score",
           "detection_auroc", "latent_codes", "make_judge", "run"]

EVAL_TYPE_ID = "autointerp"
"""SAEBench's ``eval_type_id`` for this eval."""


@dataclass(frozen=True)
class AutoInterpConfig:
    """Autointerp's settings; names as SAEBench's ``AutoInterpEvalConfig`` where it has them."""

    n_latents: int = 100
    """Live latents drawn at random to explain and score (SAEBench: 1000; a local judge on a CPU is slow)."""
    override_latents: tuple[int, ...] | None = None
    """Exactly these latents instead of a random draw."""
    dead_latent_threshold: int = 15
    """A latent is live when it fires (non-zero code) on at least this many tokens of the documents."""
    random_seed: int = 42
    """Seed of the latent draw; each latent's example draws use ``random_seed + latent``."""
    llm_context_size: int = 128
    """Tokens kept of each document (the default documents: BBC News articles, truncated)."""
    n_docs: int | None = None
    """Documents of the embedded BBC News corpus used when ``run`` gets no ``docs`` (None: all 2,225)."""
    buffer: int = 10
    """A window is ``2 * buffer + 1`` tokens around its centre."""
    act_threshold_frac: float = 0.01
    """A token is active above this fraction of the latent's largest top-window activation."""
    max_tokens_in_explanation: int = 30
    """New tokens the explainer may write."""
    use_demos_in_explanation: bool = True
    """SAEBench's four example explanations in the explainer's prompt."""
    n_top_ex_for_generation: int = 10
    n_iw_sampled_ex_for_generation: int = 5
    n_top_ex_for_scoring: int = 2
    n_iw_sampled_ex_for_scoring: int = 2
    n_random_ex_for_scoring: int = 4
    """Non-activating scoring windows (SAEBench: 10 random windows; 4 here balances the 2 + 2 activating ones)."""
    judge_model: str = "smollm2"
    """The judge (explainer and scorer): a name for :func:`saehook.load_model` (``"smollm2"``: the embedded
    SmolLM2-135M-Instruct), or the served model's name when ``judge_url`` is set."""
    judge_url: str | None = None
    """An OpenAI-compatible base URL (``http://host:port/v1``) to judge with instead of a local model."""
    batch_rows: int = 4096
    """Tokens per ``sae.encode`` call."""

    def __post_init__(self):
        counts = ("n_latents", "buffer", "max_tokens_in_explanation", "n_top_ex_for_generation",
                  "n_top_ex_for_scoring", "n_random_ex_for_scoring", "llm_context_size", "batch_rows")
        for name in counts:
            if getattr(self, name) < 1:
                raise ValueError(f"AutoInterpConfig.{name} must be at least 1, got {getattr(self, name)}")
        for name in ("n_iw_sampled_ex_for_generation", "n_iw_sampled_ex_for_scoring", "dead_latent_threshold"):
            if getattr(self, name) < 0:
                raise ValueError(f"AutoInterpConfig.{name} must be at least 0, got {getattr(self, name)}")
        if not 0 <= self.act_threshold_frac < 1:
            raise ValueError(f"AutoInterpConfig.act_threshold_frac must be in [0, 1), got {self.act_threshold_frac}")
        if self.override_latents is not None and not self.override_latents:
            raise ValueError("AutoInterpConfig.override_latents is empty; give latent indices or None")
        if self.n_docs is not None and self.n_docs < 1:
            raise ValueError(f"AutoInterpConfig.n_docs must be at least 1 or None, got {self.n_docs}")


@dataclass
class LatentExamples:
    """One latent's windows: token ids and activations ``[2 * buffer + 1]`` each, as lists."""

    generation: list[tuple[list[int], list[float]]]
    """Explanation windows, strongest first."""
    scoring: list[tuple[list[int], list[float], bool]]
    """Held-out scoring windows in random order, with whether each is active."""
    act_threshold: float
    """Activation above which a token counts as active (marked ``<<tok>>``)."""


def latent_examples(a: Tensor, tokens: Tensor, valid: Tensor, cfg: AutoInterpConfig,
                    generator: torch.Generator) -> LatentExamples | None:
    """Windows for one latent from its activations ``a [T]`` over tokens ``tokens [T]`` (valid centres ``valid
    [T]``, see :func:`~saehook.bench.autointerp_examples.window_centers`); None when the documents hold too few
    top, importance-weighted or quiet windows for the counts of ``cfg``."""
    b = cfg.buffer
    n_top = cfg.n_top_ex_for_generation + cfg.n_top_ex_for_scoring
    n_iw = cfg.n_iw_sampled_ex_for_generation + cfg.n_iw_sampled_ex_for_scoring
    top = top_windows(a, valid, n_top, b)
    if len(top) < n_top:
        return None
    thr = cfg.act_threshold_frac * float(gather_windows(a, top, b).max())
    iw = iw_windows(a, valid, n_iw, float(a[top].min()), generator) if n_iw else top[:0]
    quiet = quiet_windows(a, valid, cfg.n_random_ex_for_scoring, b, thr, generator)
    if iw is None or quiet is None:
        return None
    top = top[torch.randperm(n_top, generator=generator)]  # SAEBench: a random split of each set
    iw = iw[torch.randperm(n_iw, generator=generator)]
    g_top, s_top = top[:cfg.n_top_ex_for_generation], top[cfg.n_top_ex_for_generation:]
    g_iw, s_iw = iw[:cfg.n_iw_sampled_ex_for_generation], iw[cfg.n_iw_sampled_ex_for_generation:]

    def windows(centres):
        return list(zip(gather_windows(tokens, centres, b).tolist(), gather_windows(a, centres, b).tolist()))

    gen = sorted(windows(torch.cat([g_top, g_iw])), key=lambda w: -max(w[1]))
    score = [(t, v, max(v) > thr) for t, v in windows(torch.cat([s_top, s_iw, quiet]))]
    order = torch.randperm(len(score), generator=generator).tolist()
    return LatentExamples(gen, [score[i] for i in order], thr)


def render(tokenizer, ids: Sequence[int], acts: Sequence[float] | None = None, threshold: float = 0.0) -> str:
    """A window as text, tokens with ``act > threshold`` marked ``<<tok>>`` when ``acts`` is given. Each token's
    text is what it adds to the decoded prefix (so spaces sit where the tokenizer puts them); special tokens are
    dropped, newlines shown as ``↵`` and replacement characters removed (as SAEBench)."""
    pieces, prev = [], ""
    for i in range(len(ids)):
        cur = tokenizer.decode(list(ids[:i + 1]), skip_special_tokens=True)
        pieces.append(cur[len(prev):] if cur.startswith(prev) else tokenizer.decode([ids[i]], skip_special_tokens=True))
        prev = cur
    marked = (f"<<{p}>>" if acts is not None and acts[i] > threshold and p else p for i, p in enumerate(pieces))
    return "".join(marked).replace("\ufffd", "").replace("\n", "↵")


def detection_score(active: Sequence[bool], p_yes: Sequence[float]) -> float:
    """The fraction of windows the scorer classifies right (``P(yes) > 0.5`` means active)."""
    if len(active) != len(p_yes) or not active:
        raise ValueError(f"need one P(yes) per window and at least one window, got {len(active)} and {len(p_yes)}")
    return sum((p > 0.5) == bool(t) for t, p in zip(active, p_yes)) / len(active)


@torch.no_grad()
def detection_auroc(active: Sequence[bool], p_yes: Sequence[float]) -> float | None:
    """The probability that an active window gets a higher ``P(yes)`` than an inactive one (ties count half): the
    scorer's ranking, free of its yes/no bias; None without both kinds of window."""
    pos = [p for t, p in zip(active, p_yes) if t]
    neg = [p for t, p in zip(active, p_yes) if not t]
    if not pos or not neg:
        return None
    return sum((a > b) + 0.5 * (a == b) for a in pos for b in neg) / (len(pos) * len(neg))


@torch.no_grad()
def latent_codes(sae, values: Tensor, latents: Sequence[int], batch_rows: int = 4096) -> tuple[Tensor, Tensor]:
    """``(counts [n_latents], a [T, len(latents)])`` from activations ``values [T, d]``: how many tokens each latent
    fires on (code > 0), and the codes of ``latents`` (0 where a latent is not active), encoded in batches."""
    m = sae.n_latents
    col = torch.full((m,), -1, dtype=torch.long)
    col[torch.as_tensor(list(latents), dtype=torch.long)] = torch.arange(len(latents))
    counts = torch.zeros(m, dtype=torch.long)
    a = torch.zeros(len(values), len(latents))
    dev, dtype = sae.W_enc.device, sae.W_enc.dtype
    for s in range(0, len(values), batch_rows):
        codes = sae.encode(values[s:s + batch_rows].to(dev, dtype))
        v, idx = codes.values.float().cpu(), codes.indices.cpu()
        fired = v > 0
        counts += torch.bincount(idx[fired], minlength=m)
        c = col[idx]
        keep = fired & (c >= 0)
        rows = torch.arange(s, s + len(v)).unsqueeze(1).expand_as(idx)
        a[rows[keep], c[keep]] = v[keep]
    return counts, a


def make_judge(cfg: AutoInterpConfig) -> Judge:
    """The judge ``cfg`` names: :class:`~saehook.bench.judges.OpenAIChat` at ``judge_url`` (or, when that is None,
    at ``$SAEHOOK_JUDGE_URL`` if set: how ``saehook eval --suite autointerp`` reaches an endpoint), else a
    :class:`~saehook.bench.judges.LocalLM` over :func:`saehook.load_model` ``(judge_model)``."""
    from .judges import LocalLM, OpenAIChat

    url = cfg.judge_url or os.environ.get("SAEHOOK_JUDGE_URL")
    if url:
        model = cfg.judge_model if cfg.judge_url or cfg.judge_model != "smollm2" else None  # then $SAEHOOK_JUDGE_MODEL
        return OpenAIChat(url, model, seed=cfg.random_seed)
    from ..models import load_model

    return LocalLM(*load_model(None if cfg.judge_model.lower() in ("", "smollm2") else cfg.judge_model),
                   seed=cfg.random_seed)


def _default_docs(tokenizer, cfg: AutoInterpConfig) -> list[list[int]]:
    from ..corpus import bbc_news

    docs = bbc_news()[:cfg.n_docs]
    ctx = cfg.llm_context_size
    return [ids for d in docs if (ids := tokenizer(d.text, truncation=True, max_length=ctx)["input_ids"])]


def _score_latent(ex: LatentExamples, tokenizer, cfg: AutoInterpConfig, explainer: Judge, scorer: Judge,
                  explanation: str | None) -> dict:
    if explanation is None:
        texts = [render(tokenizer, t, v, ex.act_threshold) for t, v in ex.generation]
        prompt = explanation_prompt(texts, cfg.use_demos_in_explanation)
        explanation = parse_explanation(explainer.complete(prompt, cfg.max_tokens_in_explanation))
    texts = [render(tokenizer, t) for t, _, _ in ex.scoring]
    p_yes = scorer.yes_probabilities([scoring_prompt(explanation, t) for t in texts])
    active = [s[2] for s in ex.scoring]
    return {"explanation": explanation, "score": detection_score(active, p_yes),
            "saehook_auroc": detection_auroc(active, p_yes),
            "predictions": [i + 1 for i, p in enumerate(p_yes) if p > 0.5],
            "correct seqs": [i + 1 for i, t in enumerate(active) if t],
            "saehook_p_yes": [round(p, 6) for p in p_yes], "saehook_examples": texts}


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _metrics(per_latent: dict[int, dict], n_skipped: int) -> dict:
    scores = [r["score"] for r in per_latent.values()]

    def rate(want: bool) -> float | None:  # per latent: the fraction of its active (quiet) windows judged so
        rates = []
        for r in per_latent.values():
            n = len(r["saehook_p_yes"])
            idx = [i for i in range(1, n + 1) if (i in r["correct seqs"]) == want]
            if idx:
                rates.append(sum((i in r["predictions"]) == want for i in idx) / len(idx))
        return _mean(rates)

    aurocs = [r["saehook_auroc"] for r in per_latent.values() if r["saehook_auroc"] is not None]
    std = float(torch.tensor(scores).std()) if len(scores) > 1 else None
    return {"autointerp_score": _mean(scores), "autointerp_std_dev": std,
            "saehook_true_positive_rate": rate(True), "saehook_true_negative_rate": rate(False),
            "saehook_auroc": _mean(aurocs),
            "saehook_n_latents_scored": len(scores), "saehook_n_latents_skipped": n_skipped}


def run(model, tokenizer, saes: Mapping, *, config: AutoInterpConfig | None = None, cache_dir=None,
        progress: bool = True, docs: Sequence[Sequence[int]] | None = None, explainer: Judge | None = None,
        scorer: Judge | None = None, explanations: Mapping[int, str] | None = None) -> dict:
    """Autointerp detection scores of each dictionary in ``saes`` (``{hookpoint key: autoencoder}``).

    Args:
        model: the model the dictionaries read.
        tokenizer: its tokenizer (renders the windows as text).
        saes: ``{key: autoencoder}``, keys as :func:`saehook.attach` takes them.
        config: :class:`AutoInterpConfig` (defaults when None).
        cache_dir: where ``token_activations`` (``saehook.bench.activations``) caches the activations (None: memory).
        progress: progress bars (activation collection, then latents) on stderr.
        docs: token-id lists to draw windows from; default the embedded BBC News articles, each truncated to
            ``llm_context_size`` tokens (``n_docs`` of them).
        explainer: the judge that writes explanations (:mod:`saehook.bench.judges`); default :func:`make_judge`
            ``(config)``, shared with ``scorer``.
        scorer: the judge that answers yes or no; default as ``explainer``.
        explanations: ``{latent: explanation}`` to score instead of asking the explainer (for every hookpoint).

    Returns ``{key: {"eval_type_id": "autointerp", "eval_config", "eval_result_metrics": {"autointerp":
    {"autointerp_score", "autointerp_std_dev", saehook_...}}, "eval_result_details": [], "eval_result_unstructured":
    {latent: {...}}, "wall_seconds"}}``; the score is None when no latent could be scored (too few windows).
    Raises ``ValueError`` for an override latent out of range, or no documents.
    """
    from tqdm.auto import tqdm

    from .activations import token_activations

    cfg = config or AutoInterpConfig()
    t0 = time.perf_counter()
    docs = _default_docs(tokenizer, cfg) if docs is None else [list(d) for d in docs]
    if not docs:
        raise ValueError("autointerp needs at least one document")
    acts = token_activations(model, saes, docs, cache_dir=cache_dir, tag="autointerp", progress=progress)
    collect_s = time.perf_counter() - t0
    if explainer is None or scorer is None:
        judge = make_judge(cfg) if (explainer or scorer) is None else (explainer or scorer)
        explainer, scorer = explainer or judge, scorer or judge
    tokens = torch.tensor([t for d in docs for t in d], dtype=torch.long)
    special = torch.isin(tokens, torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long))
    out = {}
    for key, sae in saes.items():
        t1 = time.perf_counter()
        ragged = acts[key]
        valid = window_centers(ragged.offsets, cfg.buffer)
        if cfg.override_latents is not None:
            latents = sorted(set(cfg.override_latents))
            if latents[0] < 0 or latents[-1] >= sae.n_latents:
                raise ValueError(f"AutoInterpConfig.override_latents must lie in [0, {sae.n_latents}) for hookpoint "
                                 f"{key!r}, got {latents[0]}..{latents[-1]}")
        else:
            counts, _ = latent_codes(sae, ragged.values, [], cfg.batch_rows)
            alive = torch.nonzero(counts >= max(cfg.dead_latent_threshold, 1)).squeeze(1)
            pick = torch.randperm(len(alive), generator=torch.Generator().manual_seed(cfg.random_seed))
            latents = sorted(alive[pick[:cfg.n_latents]].tolist())
        _, dense = latent_codes(sae, ragged.values, latents, cfg.batch_rows)
        dense[special] = 0  # SAEBench masks BOS, pad and EOS tokens
        per_latent, skipped = {}, 0
        for j, latent in enumerate(tqdm(latents, desc=f"autointerp {key}", disable=not progress)):
            g = torch.Generator().manual_seed(cfg.random_seed + latent)
            ex = latent_examples(dense[:, j], tokens, valid, cfg, g)
            if ex is None:
                skipped += 1
                continue
            given = None if explanations is None else explanations.get(latent)
            per_latent[latent] = {"latent": latent, **_score_latent(ex, tokenizer, cfg, explainer, scorer, given)}
        eval_config = dataclasses.asdict(cfg) | {"saehook_explainer": explainer.name, "saehook_scorer": scorer.name,
                                                 "saehook_n_docs": len(docs), "saehook_n_tokens": len(tokens)}
        metrics = _metrics(per_latent, skipped)
        out[key] = {"eval_type_id": EVAL_TYPE_ID, "eval_config": eval_config,
                    "eval_result_metrics": {"autointerp": metrics}, "eval_result_details": [],
                    "eval_result_unstructured": {str(k): v for k, v in per_latent.items()},
                    "wall_seconds": time.perf_counter() - t1 + collect_s / len(saes)}
    return out
