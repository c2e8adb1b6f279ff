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

import numbers
import operator
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

import torch
from torch import Tensor

from .sae import Codes, TopKSAE

Positions = Union[None, int, slice, Sequence[int], str]
"""Which tokens an edit acts on, by their position ``p`` in their row (see :mod:`saehook.forward`: each
row's index among its real tokens, the KV cache included, so with left padding position 0 is the row's
first real token, and a decoding step at position 9 is position 9). Negative indices count from ``n``,
the row's prompt length: in a plain forward the row itself (Python's ``-1``: its last real token), in
``generate`` the prompt given to it, with or without the KV cache and with chunked prefill alike.

- ``None``: every token (padding included; it changes no real token's output).
- ``int`` i: ``p >= i``, i.e. ``slice(i, None)``; ``-2``: the prompt's last two tokens and all after them.
- ``slice(a, b, c)``: ``a <= p < b`` every ``c``-th from ``a``, as Python's ``range(n)[a:b:c]`` in a plain
  forward (negative ``a`` / ``b`` count from ``n``); ``b=None`` has no end (generated tokens included);
  ``c`` may be negative (``a`` then defaults to ``n - 1``), never 0.
- a sequence of ints: those positions, a negative ``i`` meaning ``n + i`` (``[-1]``: the last prompt token).
- ``"generated"``: tokens after the prompt (none in a plain forward without a cache; in a loop of your own
  over a KV cache, the prompt is the forward that started the cache).

Position-restricted edits never act on padding. Ints may be Python, NumPy or 0-d tensor integers; a 1-d
integer tensor or NumPy array is a sequence.
"""


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

    def mask(self, pos: Tensor, length: Tensor | None = None, generated: Tensor | None = None,
             real: Tensor | None = None) -> Tensor | None:
        """Bool ``[B, T, 1]`` of the tokens this edit acts on, None for all.

        ``pos [B, T]``: token positions; ``length [B]``: each row's prompt length (for negative indices;
        default ``pos.max + 1``); ``generated [B, T]``: tokens after the prompt; ``real [B, T]``: not padding.
        """
        p = self.positions
        if p is None:
            return None
        n = (pos.max(-1).values + 1 if length is None else length.to(pos.device)).reshape(-1, 1)  # [B, 1]
        if isinstance(p, str):  # "generated"
            m = torch.zeros_like(pos, dtype=torch.bool) if generated is None else generated.to(pos.device)
        elif isinstance(p, slice):
            m = _slice_mask(pos, n, p)
        elif isinstance(p, int):
            m = pos >= (p if p >= 0 else n + p)
        else:
            idx = torch.as_tensor([int(i) for i in p], dtype=torch.long, device=pos.device)
            m = torch.isin(pos, idx[idx >= 0])
            for i in idx[idx < 0].tolist():
                m |= pos == n + i
        if real is not None:
            m &= real.to(pos.device)
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


def _slice_mask(pos: Tensor, n: Tensor, s: slice) -> Tensor:
    """``pos in range(n)[s]`` per row, ``n [B, 1]`` (Python's slice semantics, vectorised over rows), except
    that a missing ``stop`` has no end (tokens after the prompt included)."""
    step = 1 if s.step is None else s.step

    def bound(v, default):  # a slice bound as a [B, 1] tensor, negatives counted from n
        if v is None:
            return default
        return n + v if v < 0 else torch.full_like(n, v)

    if step > 0:
        lo, hi = bound(s.start, torch.zeros_like(n)).clamp_min(0), bound(s.stop, torch.full_like(n, 1 << 62))
        return (pos >= lo) & (pos < hi) & ((pos - lo) % step == 0)
    hi, lo = bound(s.start, n - 1).clamp_max(n - 1), bound(s.stop, torch.full_like(n, -1)).clamp_min(-1)
    return (pos <= hi) & (pos > lo) & ((hi - pos) % -step == 0)


_INTEGER_FORMS = "an int, a NumPy integer or a 0-d integer tensor"


def integer(v, what: str, expected: str = "an integer") -> int:
    """``v`` as a Python int: anything integer-like (``operator.index``: ``int``, NumPy integers, 0-d integer
    tensors and arrays), never a bool. Otherwise ``TypeError``: ``"<what> <v> is a bool; pass <expected> (an
    int, a NumPy integer or a 0-d integer tensor)"``. The one parser of latent ids and positions."""
    if isinstance(v, bool) or str(getattr(v, "dtype", "")) in ("bool", "torch.bool"):
        problem = "is a bool"
    elif getattr(v, "ndim", 0) != 0:
        problem = f"has shape {tuple(v.shape)}"
    else:
        try:
            return operator.index(v)
        except TypeError:
            problem = "is not an integer"
    raise TypeError(f"{what} {v!r} {problem}; pass {expected} ({_INTEGER_FORMS})")


def check_positions(positions: Positions) -> Positions:
    """Raise ``TypeError`` or ``ValueError`` unless ``positions`` is one of the forms of :data:`Positions`;
    returns it with plain Python ints (each parsed by :func:`integer`) and sequences (a list, a tuple, a 1-d
    tensor or array) as tuples."""
    if positions is None or isinstance(positions, str) and positions == "generated":
        return positions
    if isinstance(positions, str):
        raise ValueError(f"positions={positions!r}: the only named choice is 'generated'")
    if isinstance(positions, slice):
        parts = [None if v is None else integer(v, f"positions={positions!r}: slice {name}")
                 for name, v in zip(("start", "stop", "step"), (positions.start, positions.stop, positions.step))]
        if parts[2] == 0:
            raise ValueError(f"positions={positions!r}: slice step cannot be zero")
        return slice(*parts)
    ndim = getattr(positions, "ndim", None)
    if ndim == 0 or isinstance(positions, numbers.Number):  # one int (a bool or a float is refused)
        return integer(positions, f"positions={positions!r}: the position")
    if ndim == 1 or ndim is None and isinstance(positions, Sequence) and not isinstance(positions, bytes):
        items = positions.tolist() if ndim == 1 else positions
        return tuple(integer(p, f"positions={positions!r}: position") for p in items)
    if ndim is not None:
        raise TypeError(f"positions: a tensor of positions must be 1-d, got shape {tuple(positions.shape)}")
    raise TypeError(f"positions must be None, an int, a slice, a list of ints or 'generated', got {positions!r}")


def latent_ids(items, n_latents: int, what: str) -> list[int]:
    """The latent ids ``items`` (one id, or a sequence / 1-d tensor / 1-d array of ids) as Python ints.

    An id is anything integer-like (``int``, NumPy integers, 0-d integer tensors: :func:`integer`).
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
    elif hasattr(items, "tolist"):  # a 1-d tensor or array: its Python scalars (bools stay bools)
        items = items.tolist()
    ids = [integer(v, f"{what}: latent id", "an integer latent index") for v in items]
    bad = [j for j in ids if not 0 <= j < n_latents]
    if bad:
        raise IndexError(f"{what}: latents {bad} out of range (n_latents={n_latents}: ids are 0..{n_latents - 1}; "
                         f"negative ids are not counted from the end)")
    repeated = sorted(j for j, count in Counter(ids).items() if count > 1)
    if repeated:
        raise ValueError(f"{what}: latents {repeated} given more than once; give each latent once")
    return ids
