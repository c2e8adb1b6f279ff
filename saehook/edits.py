"""What the sub-contexts of :class:`saehook.Hooked` do to a hookpoint's activation.

Let ``x`` be the hookpoint activation, ``s`` the autoencoder's input scale, ``z`` its code of ``x`` and
``x_hat`` its reconstruction. Every edit maps the current value ``y`` (initially ``x``) to a new one,
only at the positions it is restricted to:

- splice:               ``y <- y - x + x_hat``         (``x_hat`` when no other edit acts)
- splice(keep_error):   ``y <- y - x + x_hat + sg(x - x_hat)``   (numerically ``y``)
- steer (add):          ``y <- y + sum_j v_j W_dec[j] / s``
- steer (clamp):        ``y <- y + sum_j (v_j - z_j) W_dec[j] / s``   (latent j set to v_j, error kept)
- ablate:               ``y <- y - sum_j z_j W_dec[j] / s``           (its share removed, error kept)

``v_j`` is in the units of the latent's activation, so clamping latent ``j`` to ``v`` and adding ``v`` to
a latent that is not firing give the same vector; with the default scale ``s = 1`` steering adds exactly
``v * W_dec[j]``. Clamp and ablate are computed from the code of the clean activation ``x``.

``sg`` is stop-gradient (``.detach()``): with ``keep_error`` the error term ``e = x - x_hat`` is a
constant, as in attribution patching. Values are those of the run without the splice; under autograd
``d y / d x_hat`` is the identity, as in a plain splice, so a loss downstream, evaluated at the clean
values, reaches the autoencoder (``W_dec``, ``W_enc``, the code ``z``), and upstream of the hookpoint
the clean part ``x`` is differentiated through the autoencoder only (``d y / d x = d x_hat / d x``).
(``x_hat + (x - x_hat)`` with nothing detached would cancel it: the gradient on ``x_hat`` is exactly 0.)
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Union

import torch
from torch import Tensor

from .sae import Codes, TopKSAE

Positions = Union[None, int, slice, Sequence[int], str]
"""``None``: every position. ``int`` n: positions >= n. ``slice`` / list of ints: those positions.
``"generated"``: tokens after the prompt of the first (prefill) forward seen in the context.
Positions are token positions as the model numbers them (its ``position_ids``), so with left padding
position 0 is each row's first real token."""


@dataclass
class Edit:
    """One active edit, pushed by :meth:`saehook.Hooked.splice`, ``steer`` or ``ablate`` for the
    duration of its context and applied by the hooks, in order, at every forward."""

    kind: str
    """``"splice"``, ``"add"``, ``"clamp"`` or ``"ablate"``."""
    targets: dict
    """key -> ``(latent indices [m], values [m])`` (values unused for ablate; empty for splice)."""
    keep_error: bool = False
    positions: Positions = None
    prompt_len: Tensor | None = field(default=None, repr=False)
    """Per-row prompt length, learnt at the first prefill when ``positions == "generated"``."""

    def mask(self, pos: Tensor) -> Tensor | None:
        """Bool ``[B, T, 1]`` (or ``[1, T, 1]``) of positions this edit applies to, None for all."""
        p = self.positions
        if p is None:
            return None
        if isinstance(p, str):  # "generated"
            if int(pos.min()) == 0:  # a prefill (even a one-token prompt): remember where the prompt ends
                self.prompt_len = pos.max(-1).values + 1
            if self.prompt_len is None:
                return None
            plen = self.prompt_len if self.prompt_len.shape[0] == pos.shape[0] else self.prompt_len.max()
            m = pos >= plen.reshape(-1, 1) if plen.dim() else pos >= plen
        elif isinstance(p, int):
            m = pos >= p
        elif isinstance(p, slice):
            start, stop = p.start or 0, p.stop if p.stop is not None else 1 << 62
            m = (pos >= start) & (pos < stop)
            if p.step not in (None, 1):
                m &= (pos - start) % p.step == 0
        else:
            m = torch.isin(pos, torch.as_tensor(list(p), device=pos.device))
        return m.unsqueeze(-1)

    def apply(self, key, sae: TopKSAE, x: Tensor, y: Tensor, codes: Codes | None, x_hat: Tensor | None) -> Tensor:
        """The new value of ``y [..., d]`` at this edit's positions (before masking), by the formulas of
        the module docstring. Splice: ``y - x + x_hat``, and with ``keep_error`` plus the error term
        ``(x - x_hat).detach()``: numerically ``y``, with gradients reaching ``x_hat`` (never cancelled)."""
        if self.kind == "splice":  # replace the clean part x of y by x_hat; other edits' shares stay
            spliced = y - x + x_hat
            return spliced + (x - x_hat).detach() if self.keep_error else spliced
        idx, vals = self.targets[key]
        W = sae.W_dec[idx]  # [m, d]
        if self.kind == "add":
            return y + sae.unscale(vals.to(W.dtype) @ W, codes)
        # clamp / ablate: current activation of each target latent, 0 where it is not among the top k
        hit = codes.indices.unsqueeze(-1) == idx  # [..., k, m]
        current = (hit * codes.values.unsqueeze(-1)).sum(-2)  # [..., m]
        target = vals.to(W.dtype) if self.kind == "clamp" else torch.zeros_like(current)
        return y + sae.unscale((target - current) @ W, codes)


def check_positions(positions: Positions) -> None:
    """Raise ``TypeError`` or ``ValueError`` unless ``positions`` is one of the forms of :data:`Positions`."""
    if positions is None or isinstance(positions, (slice, int)) and not isinstance(positions, bool):
        return
    if isinstance(positions, str):
        if positions != "generated":
            raise ValueError(f"positions={positions!r}: the only named choice is 'generated'")
        return
    if isinstance(positions, Sequence) and all(isinstance(p, int) for p in positions):
        return
    raise TypeError(f"positions must be None, an int, a slice, a list of ints or 'generated', got {positions!r}")


def _is_bool(v) -> bool:
    """A Python, NumPy or torch boolean (scalar)."""
    return isinstance(v, bool) or str(getattr(v, "dtype", "")) in ("bool", "torch.bool")


def _latent_id(v, what: str) -> int:
    """One latent id as a Python int: anything integer-like (``operator.index``), but not a bool."""
    if _is_bool(v):
        raise TypeError(f"{what}: latent id {v!r} is a bool; pass an integer latent index (an int, a NumPy "
                        f"integer or a 0-d integer tensor)")
    if isinstance(v, Tensor) and v.dim() != 0:
        raise TypeError(f"{what}: latent id {v!r} is a tensor of shape {tuple(v.shape)}; pass an integer latent "
                        f"index (an int, a NumPy integer or a 0-d integer tensor)")
    try:
        return operator.index(v)
    except TypeError:
        raise TypeError(f"{what}: latent id {v!r} is not an integer; pass an integer latent index (an int, a "
                        f"NumPy integer or a 0-d integer tensor)") from None


def latent_ids(items, n_latents: int, what: str) -> list[int]:
    """The latent ids ``items`` (one id, or a sequence / 1-d tensor / 1-d array of ids) as Python ints.

    An id is anything integer-like (``int``, NumPy integers, 0-d integer tensors: ``operator.index``).
    Refused, with an error naming the value: bools and non-integers (``TypeError``), ids outside
    ``0 .. n_latents - 1`` (``IndexError``; a negative id is not counted from the end: a latent id names
    a latent), tensors of 2 or more dimensions (``TypeError``) and repeated ids (``ValueError``: ablating
    or steering a latent twice would act twice).
    """
    if getattr(items, "ndim", 1) == 0 or isinstance(items, (str, bytes)) or not hasattr(items, "__iter__"):
        items = [items]  # one id (checked below)
    elif getattr(items, "ndim", 1) != 1:
        raise TypeError(f"{what}: expected a latent id or a 1-d sequence of them, got shape "
                        f"{tuple(items.shape)}")
    ids = [_latent_id(v, what) for v in items]
    bad = [j for j in ids if not 0 <= j < n_latents]
    if bad:
        raise IndexError(f"{what}: latents {bad} out of range (n_latents={n_latents}: ids are 0..{n_latents - 1}; "
                         f"negative ids are not counted from the end)")
    repeated = sorted({j for j in ids if ids.count(j) > 1})
    if repeated:
        raise ValueError(f"{what}: latents {repeated} given more than once; give each latent once")
    return ids
