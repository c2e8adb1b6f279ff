"""Feature absorption on the first-letter task (Chanin et al. 2024), as SAEBench's ``absorption_first_letter``.

The task (:mod:`saehook.bench.first_letter`): single-token alphabetic words of the model's own vocabulary, each in
an in-context prompt ``"... \\n{word} has the first letter:"``; ``x [d]`` is the hookpoint's activation at the
word's token. Then, per dictionary:

1. **Ground-truth probe** (:func:`~saehook.bench.letter_probes.train_letter_probe`): 26 one-vs-rest logistic
   probes on the train words' ``x``; ``u_c = W_c / |W_c|`` is letter ``c``'s probe direction. A test word is a
   *probe true positive* of its letter ``c`` when ``x . W_c + b_c > 0``; ``f1_probe_c`` is the probe's test F1.
2. **Main latents by k-sparse probing**: an L1 probe on the train words' codes ranks letter ``c``'s latents; for
   ``k = 1 .. max_k_value`` a balanced logistic regression on the top ``k`` latents is fitted on train and its F1
   measured on test. The main latents ("split features") are the top ``k`` of the last ``k`` whose F1 rose by more
   than ``f1_jump_threshold`` (0.03) over the previous kept one (``k = 1`` is always kept).
3. **Per probe true positive** (``a_j`` its latents' activations, ``D_j`` latent ``j``'s decoder row in the
   activation's units, ``cos_j = cos(u_c, D_j)``, latent ``j``'s projection ``p_j = a_j (D_j . u_c)``, which is
   SAEBench's ``a_j cos_j`` for a unit-norm decoder on unscaled inputs; ``P = x . u_c``; ``M = sum_{main} p_j``):

   - absorbers: latents outside the main ones with ``cos_j >= 0.1`` and ``p_j > 0``; ``A`` = the sum of the
     largest 3 of their ``p_j``;
   - absorption fraction = 0 if ``M >= P`` or ``A / P < 0.4``; else 1 if ``M <= 0``; else ``min(A, P - M) /
     (min(A, P - M) + M)``, clipped to [0, 1];
   - full absorption: every main latent's activation is below 1e-8, the latent with the largest ``p_j`` has
     ``cos_j >= 0.025``, ``P >= 0`` and that latent's ``p_j / P >= 0.4``.

4. **Per letter**: ``mean_absorption_fraction`` = the fractions' sum / the letter's probe true positives;
   ``full_absorption_rate`` = full absorptions / probe true positives; ``num_split_features`` = number of main
   latents. The metrics (``mean_absorption_fraction_score``, ``mean_full_absorption_score``,
   ``mean_num_split_features`` and their ``std_dev_*``, sample standard deviations) are over the letters whose
   probe has test F1 above ``min_GT_probe_f1`` (0.6); fewer than ``min_feats_for_eval`` (20) such letters is an
   error, as SAEBench refuses to score.

Every number above is SAEBench's; what differs is in docs/metrics/absorption.md.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from ..sae import TopKSAE
from .first_letter import LETTERS, first_letter_task
from .letter_probes import dense_columns, f1_score, fit_balanced_logreg, train_l1_latent_probe, train_letter_probe

log = logging.getLogger(__name__)

__all__ = ["AbsorptionConfig", "EVAL_TYPE_ID", "word_absorption", "sae_word_absorption", "main_latents",
           "absorption_scores", "run"]

EVAL_TYPE_ID = "absorption_first_letter"
FULL_ABSORPTION_PROBE_COS_THRESHOLD = 0.025
ABSORPTION_FRACTION_PROBE_COS_THRESHOLD = 0.1
ABSORPTION_PROBE_PROJECTION_PROPORTION_THRESHOLD = 0.4
ABSORPTION_FRACTION_MAX_ABSORBING_LATENTS = 3
EPS = 1e-8


@dataclass(frozen=True)
class AbsorptionConfig:
    """Settings of the absorption metric; the names SAEBench's ``AbsorptionEvalConfig`` has mean the same here."""

    random_seed: int = 42
    """Seed of the word shuffle and split, the in-context examples and the probes' initialisation and batches."""
    f1_jump_threshold: float = 0.03
    """A k-sparse probe's test F1 must rise by more than this over the last kept k for its k-th latent to count
    as a main (split) latent."""
    max_k_value: int = 10
    """Largest k tried by k-sparse probing."""
    prompt_template: str = "{word} has the first letter:"
    """The word's line; in-context examples are this plus ``" " + first letter upper-cased``."""
    prompt_token_pos: int = -6
    """The word's token, counted from the end of the prompt's token ids."""
    llm_batch_size: int = 10
    """Prompts per forward pass."""
    k_sparse_probe_l1_decay: float = 0.01
    """L1 penalty of the probe that ranks latents."""
    k_sparse_probe_batch_size: int = 256
    """Rows per step of that probe (SAEBench: 4096, for ~5x more words than ``max_words`` keeps: at 4096 a few
    thousand words make one step an epoch, too few for the ranking to leave its random initialisation)."""
    k_sparse_probe_num_epochs: int = 50
    """Epochs of that probe."""
    min_GT_probe_f1: float = 0.6
    """A letter is scored only if its ground-truth probe's test F1 exceeds this."""
    min_feats_for_eval: int = 20
    """At least this many letters must pass ``min_GT_probe_f1``, else the hookpoint is refused."""
    max_words: int | None = 5000
    """Keep this many of the vocabulary's words, drawn at random (None: all, as SAEBench; ~47k on SmolLM2)."""
    probe_num_epochs: int = 50
    """Epochs of the ground-truth probe (SAEBench: 50)."""
    probe_batch_size: int = 64
    """Rows per step of the ground-truth probe (SAEBench: 64)."""
    probe_weight_decay: float = 1e-4
    """Adam weight decay of the ground-truth probe (SAEBench: 1e-4)."""

    def __post_init__(self):
        if self.max_k_value < 1:
            raise ValueError(f"max_k_value must be at least 1, got {self.max_k_value}")
        if self.min_feats_for_eval < 1:
            raise ValueError(f"min_feats_for_eval must be at least 1, got {self.min_feats_for_eval}")
        if self.max_words is not None and self.max_words < 26:
            raise ValueError(f"max_words must be at least 26 (one per letter) or None, got {self.max_words}")

    def eval_config(self, model_name: str = "") -> dict:
        """The config as JSON: SAEBench's field names as they are, saehook's own with a ``saehook_`` prefix."""
        ours = {"max_words", "probe_num_epochs", "probe_batch_size", "probe_weight_decay"}
        out = {"model_name": model_name}
        for f in dataclasses.fields(self):
            out[("saehook_" if f.name in ours else "") + f.name] = getattr(self, f.name)
        return out


# ---------------------------------------------------------------------------------------------- the math
def word_absorption(x: Tensor, values: Tensor, indices: Tensor, u: Tensor, decoder: Tensor, main: Tensor,
                    row_scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Absorption fraction and full absorption (module docstring, step 3) of ``N`` words of one letter.

    Args:
        x: ``[N, d]`` the words' activations.
        values: ``[N, k]`` their codes' activations (latent ``indices[i, j]`` active with ``values[i, j]``).
        indices: ``[N, k]`` their codes' latent ids.
        u: ``[d]`` the letter's probe weight (normalised here).
        decoder: ``[n_latents, d]`` each latent's decoder row in the activation's units.
        main: ``[m]`` int, the letter's main latents.
        row_scale: ``[N]`` a per-row factor of the decoder rows (a per-row normalisation), or None.

    Returns ``(fraction [N] float, full [N] bool)``.
    """
    u = u.float() / u.float().norm()
    dec = decoder.float()
    along = dec @ u  # [n]
    cos = along / dec.norm(dim=1).clamp_min(EPS)
    vals = values.float()
    proj = vals * along[indices]  # [N, k]
    if row_scale is not None:
        proj = proj * row_scale.float().unsqueeze(1)
    P = x.float() @ u  # [N]
    is_main = (indices.unsqueeze(-1) == main.to(indices.device)).any(-1)  # [N, k]
    M = (proj * is_main).sum(1)
    cand = ~is_main & (cos[indices] >= ABSORPTION_FRACTION_PROBE_COS_THRESHOLD) & (proj > 0)
    top = torch.where(cand, proj, torch.zeros_like(proj))
    A = top.topk(min(ABSORPTION_FRACTION_MAX_ABSORBING_LATENTS, top.shape[1]), dim=1).values.sum(1)
    absorbed = torch.minimum(A, P - M)
    partial = (absorbed / (absorbed + M)).clamp(0, 1)
    fraction = torch.where((M >= P) | (A / P < ABSORPTION_PROBE_PROJECTION_PROPORTION_THRESHOLD),
                           torch.zeros_like(P), torch.where(M <= 0, torch.ones_like(P), partial))
    # full absorption: the top-projecting latent (an inactive one, p = 0, when every active p_j < 0)
    main_quiet = ~((vals >= EPS) & is_main).any(1)
    best, arg = proj.max(1)
    top_cos = cos[indices.gather(1, arg.unsqueeze(1)).squeeze(1)]
    full = main_quiet & (best > 0) & (top_cos >= FULL_ABSORPTION_PROBE_COS_THRESHOLD) & (P >= 0) & \
        (best / P >= ABSORPTION_PROBE_PROJECTION_PROPORTION_THRESHOLD)
    return fraction, full


def main_latents(f1_by_k: list[float], latents_by_k: list[list[int]], threshold: float) -> list[int]:
    """SAEBench's ``add_feature_splits_to_metrics_df``: walk ``k = 1, 2, ...``; keep ``k`` while its F1 exceeds the
    last kept F1 by more than ``threshold`` (k = 1 always kept), stop at the first that does not. Returns the last
    kept k's latents."""
    best, kept = -100.0, []
    for f1, latents in zip(f1_by_k, latents_by_k):
        if f1 > best + threshold:
            best, kept = f1, list(latents)
        else:
            break
    return kept


def _codes(sae: TopKSAE, x: Tensor, batch: int = 4096) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(values [N, k], indices [N, k], row_scale [N] or None)`` of ``x [N, d]``, encoded in batches."""
    vals, idxs, scales = [], [], []
    dev, dtype = sae.W_enc.device, sae.W_enc.dtype
    with torch.no_grad():
        for s in range(0, len(x), batch):
            xb = x[s:s + batch].to(dev, dtype)
            codes = sae.encode(xb)
            vals.append(codes.values.float().cpu())
            idxs.append(codes.indices.cpu())
            if getattr(sae, "per_row_scale", False):  # e.g. a layer norm: the row's own factor
                scales.append(sae.unscale(torch.ones_like(xb), codes)[..., 0].float().cpu())
    return torch.cat(vals), torch.cat(idxs), (torch.cat(scales) if scales else None)


def _decoder_in_activation_units(sae: TopKSAE) -> Tensor:
    with torch.no_grad():
        if getattr(sae, "per_row_scale", False):
            return sae.W_dec.detach().float().cpu()
        return sae.unscale(sae.W_dec.detach()).float().cpu()


def sae_word_absorption(sae: TopKSAE, x: Tensor, u: Tensor, main: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`word_absorption` of the words ``x [N, d]`` under ``sae``'s codes, with its decoder rows in the
    activation's units (``sae.unscale(W_dec)``; a per-row factor for a per-row normalisation)."""
    values, indices, row_scale = _codes(sae, x)
    return word_absorption(x, values, indices, u, _decoder_in_activation_units(sae), main, row_scale)


def absorption_scores(x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor, sae: TopKSAE,
                      probe: tuple[Tensor, Tensor], config: AbsorptionConfig | None = None) -> dict:
    """Steps 1-4 of the module docstring for one dictionary, given the words' activations ``x_* [N, d]`` and
    first-letter classes ``y_* [N]`` and the ground-truth probe ``(weight [26, d], bias [26])``.

    Returns ``{"eval_result_metrics": {"mean": {...}}, "eval_result_details": [per letter], "saehook_letters":
    [per letter: probe F1, k-sparse F1s, main latents]}``. Raises ``ValueError`` when fewer than
    ``min_feats_for_eval`` letters have a probe F1 above ``min_GT_probe_f1``."""
    cfg = config or AbsorptionConfig()
    W, b = probe
    scores = x_test.float() @ W.t() + b  # [N_test, 26]
    v_tr, i_tr, _ = _codes(sae, x_train)
    v_te, i_te, scale_te = _codes(sae, x_test)
    l1 = train_l1_latent_probe(v_tr, i_tr, sae.n_latents, y_train, l1=cfg.k_sparse_probe_l1_decay,
                               epochs=cfg.k_sparse_probe_num_epochs, batch_size=cfg.k_sparse_probe_batch_size,
                               seed=cfg.random_seed)
    ks = range(1, min(cfg.max_k_value, sae.n_latents) + 1)
    f1_by_k: dict[int, list[float]] = {c: [] for c in range(26)}
    latents_by_k: dict[int, list[list[int]]] = {c: [] for c in range(26)}
    for k in ks:
        chosen = l1.topk(k, dim=1).indices  # [26, k]
        xk_tr = torch.stack([dense_columns(v_tr, i_tr, chosen[c]) for c in range(26)])
        w, b0 = fit_balanced_logreg(xk_tr, torch.stack([y_train == c for c in range(26)]))
        for c in range(26):
            pred = dense_columns(v_te, i_te, chosen[c]) @ w[c] + b0[c] > 0
            f1_by_k[c].append(f1_score(pred, y_test == c))
            latents_by_k[c].append(chosen[c].tolist())
    decoder = _decoder_in_activation_units(sae)
    details, ours = [], []
    for c, letter in enumerate(LETTERS):
        truth = y_test == c
        f1_probe = f1_score(scores[:, c] > 0, truth)
        main = main_latents(f1_by_k[c], latents_by_k[c], cfg.f1_jump_threshold)
        tp = truth & (scores[:, c] > 0)
        n_tp = int(tp.sum())
        ours.append({"first_letter": letter, "f1_probe": f1_probe, "f1_sparse_sae_by_k": f1_by_k[c],
                     "split_feats": main, "scored": f1_probe > cfg.min_GT_probe_f1 and n_tp > 0})
        if not ours[-1]["scored"]:
            continue
        frac, full = word_absorption(x_test[tp], v_te[tp], i_te[tp], W[c], decoder, torch.tensor(main),
                                     None if scale_te is None else scale_te[tp])
        details.append({"first_letter": letter, "mean_absorption_fraction": float(frac.sum()) / n_tp,
                        "full_absorption_rate": int(full.sum()) / n_tp, "num_full_absorption": int(full.sum()),
                        "num_probe_true_positives": n_tp, "num_split_features": len(main)})
    n_ok = sum(o["f1_probe"] > cfg.min_GT_probe_f1 for o in ours)
    if n_ok < cfg.min_feats_for_eval:
        raise ValueError(f"only {n_ok} letters have a first-letter probe with test F1 above {cfg.min_GT_probe_f1} "
                         f"(need min_feats_for_eval={cfg.min_feats_for_eval}): this hookpoint does not represent first "
                         f"letters well enough to measure absorption; use a later layer or a larger model")
    cols = {"absorption_fraction_score": "mean_absorption_fraction", "full_absorption_score": "full_absorption_rate",
            "num_split_features": "num_split_features"}
    mean = {}
    for name, col in cols.items():
        xs = [float(d[col]) for d in details]
        mean[f"mean_{name}"] = statistics.mean(xs)
        mean[f"std_dev_{name}"] = statistics.stdev(xs) if len(xs) > 1 else float("nan")
    order = ["mean_absorption_fraction_score", "mean_full_absorption_score", "mean_num_split_features",
             "std_dev_absorption_fraction_score", "std_dev_full_absorption_score", "std_dev_num_split_features"]
    return {"eval_result_metrics": {"mean": {k: mean[k] for k in order}}, "eval_result_details": details,
            "saehook_letters": ours}


# ---------------------------------------------------------------------------------------------- the run
def _word_activations(model, saes: Mapping, docs: list[list[int]], cfg: AbsorptionConfig, cache_dir, progress: bool
                      ) -> dict:
    """``{key: [N, d]}``: each document's last token's activation (the word's), collected in slices of 512 prompts
    so only one slice's tokens are held at once (each slice its own cache folder)."""
    from .activations import token_activations

    out: dict = {key: [] for key in saes}
    n = (len(docs) + 511) // 512
    for s in range(0, len(docs), 512):  # the tag names the slice, so each slice's bar says "i of n"
        acts = token_activations(model, dict(saes), docs[s:s + 512], cache_dir=cache_dir,
                                 tag=f"absorption-{s // 512 + 1}of{n}", batch_size=cfg.llm_batch_size,
                                 progress=progress)
        for key, ragged in acts.items():
            out[key].append(ragged.values[ragged.offsets[1:] - 1])
    return {key: torch.cat(parts) for key, parts in out.items()}


def run(model, tokenizer, saes: Mapping, *, config: AbsorptionConfig | None = None, cache_dir=None,
        progress: bool = True) -> dict:
    """Feature absorption of every dictionary in ``saes`` (``{hookpoint key: autoencoder}``, keys as
    :func:`saehook.attach` takes them) on the first-letter task built from ``tokenizer``'s vocabulary.

    Returns ``{key: {"eval_type_id": "absorption_first_letter", "eval_config": {...}, "eval_result_metrics":
    {"mean": {...}}, "eval_result_details": [...], "wall_seconds": float, ...}}`` (saehook's extra fields start with
    ``saehook_``). ``wall_seconds`` includes the shared activation collection. Raises ``ValueError`` for a
    transcoder (it does not reconstruct its hookpoint) or a hookpoint without enough letters (see
    :func:`absorption_scores`)."""
    cfg = config or AbsorptionConfig()
    for key, sae in saes.items():
        if getattr(sae, "transcoder", False):
            raise ValueError(f"the dictionary at {key!r} is a transcoder, which predicts another module's output "
                             f"instead of reconstructing its hookpoint; absorption needs an autoencoder")
    t0 = time.perf_counter()
    task = first_letter_task(tokenizer, template=cfg.prompt_template, prompt_token_pos=cfg.prompt_token_pos,
                             max_words=cfg.max_words, seed=cfg.random_seed)
    acts = _word_activations(model, saes, task.docs, cfg, cache_dir, progress)
    labels = torch.tensor(task.labels)
    n = task.n_train
    collect_s = time.perf_counter() - t0
    name = str(getattr(getattr(model, "config", None), "_name_or_path", ""))
    results = {}
    for key, sae in saes.items():
        t1 = time.perf_counter()
        x = acts[key]
        probe = train_letter_probe(x[:n], labels[:n], epochs=cfg.probe_num_epochs, batch_size=cfg.probe_batch_size,
                                   weight_decay=cfg.probe_weight_decay, seed=cfg.random_seed)
        scored = absorption_scores(x[:n], labels[:n], x[n:], labels[n:], sae, probe, cfg)
        results[key] = {"eval_type_id": EVAL_TYPE_ID, "eval_config": cfg.eval_config(name),
                        "eval_result_metrics": scored["eval_result_metrics"],
                        "eval_result_details": scored["eval_result_details"],
                        "wall_seconds": collect_s + time.perf_counter() - t1,
                        "saehook_letters": scored["saehook_letters"],
                        "saehook_words": {"train": n, "test": len(labels) - n, "dropped": task.n_dropped},
                        "saehook_activation_seconds": collect_s}
    return results
