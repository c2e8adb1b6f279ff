"""Steering strength in a unit a person can choose: multiples of a latent's typical activation.

:meth:`saehook.Hooked.steer` takes values ``v`` in the latent's own units (it adds ``v * W_dec[j] / s``).
Those units differ from latent to latent, so "8.0" means little by itself. Here the typical activation
``a_j`` of latent ``j`` is measured on text (its mean activation on the tokens where it fires, or a
quantile of those activations), and a strength ``m`` ("m times typical") becomes ``v = m * a_j``:

- ``m = 1`` adds what the latent contributes on a typical token where it is active;
- a few times typical is a strong push; far beyond the largest activations seen in training the
  residual stream leaves the range the later layers were trained on (measured in docs/steering.md).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from .evaluate import eval_batches
from .examples import as_saes, encoded_batches
from .forward import position_masks
from .hookpoints import Key
from .sae import TopKSAE

__all__ = ["steering_values", "typical_activations"]


@torch.no_grad()
def typical_activations(model, saes: Mapping[Key, TopKSAE] | TopKSAE, source, *, tokens: int = 20_000,
                        quantile: float | None = None, batch_size: int = 8, skip_positions: int = 1
                        ) -> dict[Key, Tensor]:
    """``{key: [n_latents] float32}``: each latent's typical activation on ``source``.

    Args:
        source: a :class:`~saehook.Corpus` (its held-out ``"test"`` windows) or an iterable of ``input_ids``
            tensors / model-input dicts.
        tokens: read at least this many evaluated tokens (whole batches).
        quantile: ``None``: the mean activation over the tokens where the latent fires (> 0); a number in
            ``[0, 1]``: that quantile of those activations (0.5: the median).

    A latent that never fired on the text gets NaN (its typical activation is unknown).
    """
    if quantile is not None and not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must be in [0, 1] or None, got {quantile}")
    from .counts import as_count

    tokens = as_count(tokens)
    if tokens <= 0:
        raise ValueError(f"tokens must be positive, got {tokens}")
    saes = as_saes(saes)
    fired: dict = {k: ([], []) for k in saes}
    seen = 0

    def limited():
        nonlocal seen
        for batch in eval_batches(source, batch_size):
            if seen >= tokens:
                return
            seen += int(position_masks(batch, skip_positions)[0].sum())
            yield batch

    for _, evaluated, _, codes in encoded_batches(model, saes, limited(), skip_positions=skip_positions):
        for key, c in codes.items():
            on = evaluated.unsqueeze(-1).to(c.values.device) & (c.values > 0)
            fired[key][0].append(c.indices[on].cpu())
            fired[key][1].append(c.values[on].float().cpu())
    if seen == 0:
        raise ValueError("the source gave no evaluated tokens; pass a corpus or batches with text in them")
    out = {}
    for key, (idx, val) in fired.items():
        n = saes[key].n_latents
        idx, val = torch.cat(idx), torch.cat(val)
        count = torch.bincount(idx, minlength=n)
        if quantile is None:
            typ = torch.zeros(n, dtype=torch.float64).index_add_(0, idx, val.double()) / count.clamp_min(1)
        else:  # sort by (latent, value); the quantile of each latent's run, linearly interpolated
            order = torch.argsort(val, stable=True)
            order = order[torch.argsort(idx[order], stable=True)]
            v = val[order].double()
            start = torch.cumsum(count, 0) - count
            pos = start.double() + quantile * (count - 1).clamp_min(0).double()
            lo, hi = pos.floor().long().clamp(0, max(len(v) - 1, 0)), pos.ceil().long().clamp(0, max(len(v) - 1, 0))
            frac = pos - pos.floor()
            typ = v[lo] * (1 - frac) + v[hi] * frac if len(v) else torch.zeros(n, dtype=torch.float64)
        out[key] = torch.where(count > 0, typ, torch.full_like(typ, math.nan)).float()
    return out


def steering_values(multiples: Mapping[Key, Mapping[int, float]], typical: Mapping[Key, Tensor]
                    ) -> dict[Key, dict[int, float]]:
    """``{key: {latent: m}}`` in multiples of typical activation -> ``{key: {latent: m * typical[key][latent]}}``,
    the values :meth:`saehook.Hooked.steer` takes (``mode="add"`` or ``"clamp"``).

    ``typical`` is :func:`typical_activations`' result, or any ``{key: [n_latents]}`` such as
    ``{key: top_examples(...)[key].mean_activation}``. Raises ``KeyError`` for a key without typical
    activations and ``ValueError`` for a latent whose typical activation is unknown (NaN: it never fired
    on the measured text) or not positive.
    """
    out: dict = {}
    for key, spec in multiples.items():
        if key not in typical:
            raise KeyError(f"no typical activations for hookpoint {key!r} (have {list(typical)}); measure them "
                           "with typical_activations at that hookpoint")
        t = typical[key]
        out[key] = {}
        for latent, m in spec.items():
            j = int(latent)
            if not 0 <= j < len(t):
                raise IndexError(f"latent {j} out of range at {key!r} (n_latents={len(t)})")
            a = float(t[j])
            if not a > 0:  # NaN or 0: never fired on the measured text
                raise ValueError(f"latent {j} at {key!r} never fired on the measured text, so its typical activation "
                                 "is unknown; measure on more tokens or steer it with an absolute value")
            out[key][j] = float(m) * a
    return out
