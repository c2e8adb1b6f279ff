"""Every latent's activation histogram and a uniform random sample of its firings, in one streaming pass.

The dashboard shows, beside a latent's top examples, how its activations are distributed and examples
from several quantiles of that distribution (as Neuronpedia does): the top examples alone show only the
extreme. For latent ``j`` with largest activation ``max_j`` (known beforehand, e.g. from
:func:`saehook.examples.top_examples` over the same text):

- ``hist[j, b]`` counts its firings with ``b / bins < a / max_j <= (b + 1) / bins`` (activation ``a > 0``);
- ``values / rows / positions[j]`` keep ``n_sample`` of its firings drawn uniformly without replacement
  (each firing gets a random priority; the smallest ``n_sample`` priorities are kept: a reservoir), so the
  sample's own quantiles estimate the latent's (the dashboard cuts it into quartiles).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from .examples import as_saes, encoded_batches
from .hookpoints import Key
from .sae import TopKSAE

__all__ = ["LatentSample", "sample_activations"]


@dataclass
class LatentSample:
    """Histogram and random firings of every latent of one autoencoder (rows = latent ids)."""

    key: Key
    hist: Tensor
    """``[n_latents, bins]`` int64 firings per activation bin, bin ``b`` covering ``(b, b + 1] / bins x max``."""
    maxima: Tensor
    """``[n_latents]`` the maxima the bins are relative to."""
    values: Tensor
    """``[n_latents, n_sample]`` float32 activation of each sampled firing (0 in unused slots)."""
    rows: Tensor
    """``[n_latents, n_sample]`` int64 source row (counted across batches from 0; -1 in unused slots)."""
    positions: Tensor
    """``[n_latents, n_sample]`` int64 position of the firing in that row."""


class _Reservoir:
    def __init__(self, key, sae: TopKSAE, maxima: Tensor, n_sample: int, bins: int, gen: torch.Generator):
        n, dev = sae.n_latents, sae.W_enc.device
        self.key, self.n, self.s, self.bins, self.gen = key, n, n_sample, bins, gen
        self.maxima = maxima.to(dev).float().clamp_min(1e-12)
        self.hist = torch.zeros(n * bins, dtype=torch.long, device=dev)
        self.prio = torch.full((n, n_sample), float("inf"), device=dev)  # ascending per row
        self.values = torch.zeros(n, n_sample, device=dev)
        self.rows = torch.full((n, n_sample), -1, dtype=torch.long, device=dev)
        self.positions = torch.full((n, n_sample), -1, dtype=torch.long, device=dev)

    @torch.no_grad()
    def update(self, vals: Tensor, idx: Tensor, evaluated: Tensor, row0: int) -> None:
        on = evaluated.unsqueeze(-1) & (vals > 0)  # [B, T, k]
        b, t, s = on.nonzero(as_tuple=True)
        lat, v = idx[b, t, s], vals[b, t, s].float()
        rel = (v / self.maxima[lat] * self.bins).ceil().long().clamp(1, self.bins) - 1
        self.hist += torch.bincount(lat * self.bins + rel, minlength=len(self.hist))
        prio = torch.rand(len(lat), generator=self.gen).to(v.device)
        keep = prio < self.prio[lat, -1]
        lat, v, prio, b, t = lat[keep], v[keep], prio[keep], b[keep], t[keep]
        if not len(lat):
            return
        u, inv = torch.unique(lat, return_inverse=True)
        U, S = len(u), self.s
        grp = torch.cat([torch.arange(U, device=u.device).repeat_interleave(S), inv])
        p = torch.cat([self.prio[u].flatten(), prio])
        o1 = torch.argsort(p, stable=True)
        order = o1[torch.argsort(grp[o1], stable=True)]  # by latent, then by priority
        g = grp[order]
        rank = torch.arange(len(g), device=g.device) - torch.searchsorted(g, g)
        win = rank < S
        order, g, rank = order[win], g[win], rank[win]
        for table, new in ((self.prio, p), (self.values, torch.cat([self.values[u].flatten(), v])),
                           (self.rows, torch.cat([self.rows[u].flatten(), b + row0])),
                           (self.positions, torch.cat([self.positions[u].flatten(), t]))):
            block = table[u].clone()
            block[g, rank] = new[order]
            table[u] = block

    def result(self) -> LatentSample:
        return LatentSample(self.key, self.hist.view(self.n, self.bins).cpu(), self.maxima.cpu(), self.values.cpu(),
                            self.rows.cpu(), self.positions.cpu())


@torch.no_grad()
def sample_activations(model, saes: Mapping[Key, TopKSAE] | TopKSAE, batches: Iterable[dict],
                       maxima: Mapping[Key, Tensor], *, n_sample: int = 24, bins: int = 20, seed: int = 0,
                       skip_positions: int = 1, progress: bool = False, total: int | None = None
                       ) -> dict[Key, LatentSample]:
    """One pass over ``batches`` (model-input dicts; rows counted from 0 across them): each latent's histogram
    relative to ``maxima[key] [n_latents]`` and a uniform sample of ``n_sample`` of its firings.

    ``progress`` shows a tqdm bar (stderr) over ``total`` evaluated tokens. Returns ``{key: LatentSample}``.
    """
    from tqdm.auto import tqdm

    saes = as_saes(saes)
    gen = torch.Generator().manual_seed(seed)
    res = {k: _Reservoir(k, s, maxima[k], n_sample, bins, gen) for k, s in saes.items()}
    bar = tqdm(total=total, unit="tok", unit_scale=True, disable=not progress, desc="saehook dashboard: quantiles")
    row0 = 0
    try:
        for batch, evaluated, _, codes in encoded_batches(model, saes, batches, skip_positions=skip_positions):
            for key, r in res.items():
                r.update(codes[key].values, codes[key].indices, evaluated, row0)
            row0 += batch["input_ids"].shape[0]
            bar.update(int(evaluated.sum()))
    finally:
        bar.close()
    return {k: r.result() for k, r in res.items()}
