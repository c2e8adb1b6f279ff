"""The paper's scaling law of the reconstruction loss in the number of latents n and sparsity k:

    L(n, k) = exp(a + b_k log k + b_n log n + g log k log n) + exp(z + h log k)

The first term is the reducible loss, the second an irreducible floor that depends on k only. Fitted by
least squares on log L (the losses span orders of magnitude) with L-BFGS from several starts.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

NAMES = ("a", "b_k", "b_n", "g", "z", "h")


@dataclass(frozen=True)
class ScalingFit:
    """The fitted law ``L(n, k) = exp(a + b_k log k + b_n log n + g log k log n) + exp(z + h log k)``;
    call it with ``(n, k)`` for the predicted loss."""

    a: float
    b_k: float
    b_n: float
    g: float
    z: float
    h: float
    rmse_log: float
    """Root-mean-square error of the fit in log L."""

    def __call__(self, n: float, k: float) -> float:
        lk, ln = math.log(k), math.log(n)
        return math.exp(self.a + self.b_k * lk + self.b_n * ln + self.g * lk * ln) + math.exp(self.z + self.h * lk)

    def to_dict(self) -> dict:
        """The parameters and ``rmse_log`` as a dict."""
        return asdict(self)


def _predict(p: torch.Tensor, lk: torch.Tensor, ln: torch.Tensor) -> torch.Tensor:
    a, b_k, b_n, g, z, h = p
    return torch.exp(a + b_k * lk + b_n * ln + g * lk * ln) + torch.exp(z + h * lk)


def fit_scaling_law(n: list[float], k: list[float], loss: list[float], restarts: int = 8, seed: int = 0) -> ScalingFit:
    """Fit ``L(n, k)`` to measured losses (e.g. held-out FVU) at grid points ``(n_i, k_i)``."""
    if not (len(n) == len(k) == len(loss)) or len(n) < 3:
        raise ValueError(f"need >= 3 points with matching lengths, got {len(n)}, {len(k)}, {len(loss)}")
    if min(loss) <= 0:
        raise ValueError("losses must be positive")
    lk = torch.tensor(k, dtype=torch.float64).log()
    ln = torch.tensor(n, dtype=torch.float64).log()
    y = torch.tensor(loss, dtype=torch.float64).log()
    g = torch.Generator().manual_seed(seed)
    best, best_err = None, float("inf")
    floor = math.log(min(loss) / 2)
    for r in range(restarts):
        init = torch.tensor([y.mean().item(), -0.3, -0.3, 0.0, floor, 0.0], dtype=torch.float64)
        if r:
            init += 0.3 * torch.randn(6, generator=g, dtype=torch.float64)
        p = init.clone().requires_grad_(True)
        opt = torch.optim.LBFGS([p], max_iter=500, line_search_fn="strong_wolfe")

        def closure(p=p, opt=opt):
            opt.zero_grad()
            err = (_predict(p, lk, ln).log() - y).pow(2).mean()
            err.backward()
            return err

        opt.step(closure)
        with torch.no_grad():
            err = (_predict(p, lk, ln).log() - y).pow(2).mean().item()
        if math.isfinite(err) and err < best_err:
            best, best_err = p.detach().clone(), err
    return ScalingFit(*best.tolist(), rmse_log=math.sqrt(best_err))
