"""Autointerp's examples: windows of ``2 * buffer + 1`` tokens around chosen positions, picked from one latent's
activations over documents stored back to back (pure functions on tensors, as SAEBench's ``indexing_utils``).

For one latent with activations ``a [T]`` (0 where it is not among a token's top k) and ``valid [T]`` (positions at
least ``buffer`` tokens from both ends of their document, see :func:`window_centers`):

- **top**: the ``k`` largest ``a`` at valid positions, greedily, no two in one window (SAEBench's ``no_overlap``);
- **importance-weighted**: ``k`` valid positions drawn without replacement with probability ``∝ a²`` among those with
  ``0 < a < min(a at the top positions)`` (SAEBench's replacement for quantile sampling);
- **quiet**: ``k`` valid positions drawn uniformly among those whose whole window stays ``<= threshold``: windows
  on which the latent does not activate (SAEBench draws random windows and calls them inactive unchecked).

Windows never cross documents: a valid centre is ``buffer`` tokens from its document's ends.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["window_centers", "top_windows", "iw_windows", "quiet_windows", "gather_windows", "window_max"]


def window_centers(offsets: Tensor, buffer: int) -> Tensor:
    """``valid [T]`` bool for documents ``offsets [N + 1]``: position ``p`` of a document of length ``L`` is a
    window centre when ``buffer <= p < L - buffer``."""
    lengths = offsets.diff()
    pos = torch.arange(int(offsets[-1])) - offsets[:-1].repeat_interleave(lengths)
    return (pos >= buffer) & (pos < lengths.repeat_interleave(lengths) - buffer)


def top_windows(a: Tensor, valid: Tensor, k: int, buffer: int) -> Tensor:
    """Up to ``k`` centres ``[n]`` int64, largest ``a`` first, ``a > 0``, no two within ``buffer`` of each other."""
    cand = torch.nonzero(valid & (a > 0)).squeeze(1)
    order = cand[a[cand].argsort(descending=True, stable=True)]
    picked: list[int] = []
    taken: set[int] = set()
    for c in order.tolist():
        if c in taken:
            continue
        picked.append(c)
        taken.update(range(c - buffer, c + buffer + 1))
        if len(picked) == k:
            break
    return torch.tensor(picked, dtype=torch.long)


def iw_windows(a: Tensor, valid: Tensor, k: int, below: float, generator: torch.Generator) -> Tensor | None:
    """``k`` centres drawn without replacement ``∝ a²`` among valid positions with ``0 < a < below``; None when
    fewer than ``k`` positions qualify."""
    cand = torch.nonzero(valid & (a > 0) & (a < below)).squeeze(1)
    if len(cand) < k:
        return None
    w = a[cand].double().pow(2)
    return cand[torch.multinomial(w / w.sum(), k, replacement=False, generator=generator)]


def window_max(a: Tensor, buffer: int) -> Tensor:
    """``[T]``: the largest ``a`` within ``buffer`` positions of each position (meaningful at valid centres)."""
    return F.max_pool1d(a.view(1, 1, -1).float(), 2 * buffer + 1, stride=1, padding=buffer).view(-1)


def quiet_windows(a: Tensor, valid: Tensor, k: int, buffer: int, threshold: float,
                  generator: torch.Generator) -> Tensor | None:
    """``k`` valid centres drawn uniformly without replacement among windows whose every ``a <= threshold``; None
    when fewer than ``k`` qualify."""
    cand = torch.nonzero(valid & (window_max(a, buffer) <= threshold)).squeeze(1)
    if len(cand) < k:
        return None
    return cand[torch.randperm(len(cand), generator=generator)[:k]]


def gather_windows(x: Tensor, centres: Tensor, buffer: int) -> Tensor:
    """``[n, 2 * buffer + 1]``: ``x [T]`` around each centre."""
    return x[centres.view(-1, 1) + torch.arange(-buffer, buffer + 1)]
