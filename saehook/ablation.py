"""Ablation sparsity (Gao et al. 2024, section 4): how concentrated is one latent's downstream effect?

At a position ``p`` of a sequence, for each latent ``j`` active there (value > 0), latent ``j`` is zeroed at
``p`` only, error term kept (:meth:`saehook.Hooked.ablate` with ``positions=[p]``), and the model is run
again. ``delta`` is the change of the logits over the next ``T`` tokens: the logits at positions
``p, p+1, ..., p+T-1`` (the predictions of tokens ``p+1 .. p+T``), a ``[T, V]`` array flattened to
``T*V`` numbers. Its score is

    s(delta) = (||delta||_1 / ||delta||_2)^2 / (V * T)

``(L1/L2)^2`` is an "effective number of changed logits", between 1 (one logit changed) and ``V*T``
(all changed by the same amount), so ``s`` lies in ``[1/(V T), 1]``; lower is sparser. Ablations that
change nothing (``||delta||_2 <= min_change``, e.g. a latent whose decoder row is zero) have no defined
score: they are counted in ``n_unchanged`` and left out of the mean. The report's ``score`` is the
mean over every (position, latent) pair scored.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from .forward import model_device
from .hookpoints import Key, unwrap
from .hooks import attach
from .sae import TopKSAE


def sparsity_score(delta: Tensor) -> float:
    """``(||delta||_1 / ||delta||_2)^2 / numel`` of a change ``delta [T, V]``; NaN for a zero change."""
    d = delta.double().flatten()
    l2 = d.norm()
    if l2 == 0:
        return float("nan")
    return float((d.abs().sum() / l2) ** 2 / d.numel())


@torch.no_grad()
def ablation_sparsity(model, saes: Mapping[Key, TopKSAE], input_ids: Tensor, *, T: int = 16,
                      positions: Sequence[int] | None = None, skip_positions: int = 1,
                      max_latents: int | None = None, min_change: float = 0.0) -> dict:
    """Ablation sparsity of each autoencoder over the sequences ``input_ids [B, L]`` (or ``[L]``).

    Args:
        T: logit positions compared after (and including) the ablated one.
        positions: where to ablate (the same for every row); default: every ``p >= skip_positions`` with
            ``p + T <= L``. Each costs one forward pass per active latent, on ``input_ids[b, :p+T]``.
        max_latents: ablate only the first (largest pre-activation) active latents at each position.
        min_change: ablations whose ``||delta||_2`` is at most this are counted as unchanged.

    Returns ``{key: {"score" (mean, NaN if nothing scored), "scores" [m] tensor, "latents" [m, 3] long
    tensor of (row, position, latent), "n_scored", "n_unchanged", "T", "V"}}``.
    """
    ids = input_ids if input_ids.dim() == 2 else input_ids.unsqueeze(0)
    B, L = ids.shape
    if T < 1 or T > L:
        raise ValueError(f"T must be in 1..{L} (the sequence length), got {T}")
    if positions is None:
        positions = list(range(skip_positions, L - T + 1))
    bad = [p for p in positions if not 0 <= p <= L - T]
    if bad:
        raise ValueError(f"positions {bad} leave fewer than T={T} logits in a sequence of length {L}")
    model = unwrap(model)  # the torch module behind a wrapper
    ids = ids.to(model_device(model))
    out = {}
    with attach(model, saes) as hooked:
        for key in hooked.saes:
            scores, where, unchanged, V = [], [], 0, None
            for b in range(B):
                for p in positions:
                    seq = ids[b:b + 1, :p + T]
                    clean = model(seq).logits[0, p:p + T].double()  # also records the latents
                    V = clean.shape[-1]
                    codes = hooked.latents[key]
                    active = codes.indices[0, p][codes.values[0, p] > 0].tolist()
                    for j in active[:max_latents]:
                        with hooked.ablate({key: [j]}, positions=[p]):
                            delta = model(seq).logits[0, p:p + T].double() - clean
                        if float(delta.norm()) <= min_change:
                            unchanged += 1
                            continue
                        scores.append(sparsity_score(delta))
                        where.append((b, p, j))
            s = torch.tensor(scores, dtype=torch.float64)
            out[key] = {"score": float(s.mean()) if len(scores) else float("nan"), "scores": s,
                        "latents": torch.tensor(where, dtype=torch.long).reshape(-1, 3),
                        "n_scored": len(scores), "n_unchanged": unchanged, "T": T, "V": V}
    return out
