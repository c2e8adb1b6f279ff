"""The three probe fitters feature absorption needs, as SAEBench's ``sae_bench/evals/absorption`` fits them.

1. :func:`train_letter_probe`: the ground-truth probe on the hookpoint's activations, 26 one-vs-rest logistic
   regressions trained together (``probing.train_multi_probe``): loss ``BCEWithLogits`` with ``pos_weight_c =
   negatives_c / positives_c``, Adam (lr 1e-2, weight decay 1e-4) for 50 epochs of mini-batches of 64 rows, the
   learning rate decayed exponentially to 1e-5 over the epochs.
2. :func:`train_l1_latent_probe`: the same on the dictionary's codes with an L1 penalty ``0.01 * mean_c
   sum_j |W_cj|`` (Adam weight decay 1e-6, batches of 4096): it ranks each letter's latents
   (``k_sparse_probing.train_sparse_multi_probe``). Built from the sparse codes, never a dense ``[N, n_latents]``.
3. :func:`fit_balanced_logreg`: the k-sparse probe on k chosen latents, sklearn's ``LogisticRegression(
   class_weight="balanced")`` objective ``0.5 |w|^2 + sum_i s_i BCE_i`` with ``s_i = N / (2 N_{class(i)})``
   (intercept not penalised), solved here by Newton's method in float64 (sklearn is not a dependency; the
   objective is strictly convex in ``w``, so both reach the same optimum).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["train_letter_probe", "train_l1_latent_probe", "fit_balanced_logreg", "f1_score", "dense_columns"]


def _adam_one_vs_rest(forward, params: list[Tensor], y: Tensor, *, n_rows: int, batch_size: int, epochs: int,
                      lr: float, end_lr: float, weight_decay: float, extra_loss=None, seed: int = 0) -> None:
    """SAEBench's ``_run_probe_training``: ``forward(rows) -> logits [B, C]`` against one-hot ``y [N, C]``."""
    pos = y.sum(0)
    pos_weight = (len(y) - pos) / pos.clamp_min(1)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=math.exp(math.log(end_lr / lr) / epochs))
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for rows in torch.randperm(n_rows, generator=g).split(batch_size):
            opt.zero_grad()
            loss = loss_fn(forward(rows), y[rows])
            if extra_loss is not None:
                loss = loss + extra_loss()
            loss.backward()
            opt.step()
        sched.step()


def train_letter_probe(x: Tensor, labels: Tensor, *, n_classes: int = 26, epochs: int = 50, batch_size: int = 64,
                       lr: float = 1e-2, end_lr: float = 1e-5, weight_decay: float = 1e-4, seed: int = 42
                       ) -> tuple[Tensor, Tensor]:
    """One-vs-rest logistic probes on ``x [N, d]`` for ``labels [N]`` (ints ``< n_classes``), see the module
    docstring. Returns ``(weight [n_classes, d], bias [n_classes])`` float32; letter ``c``'s score is
    ``x @ weight[c] + bias[c]`` (positive: predicted ``c``)."""
    torch.manual_seed(seed)
    x = x.float()
    lin = torch.nn.Linear(x.shape[1], n_classes)
    y = torch.nn.functional.one_hot(labels.long(), n_classes).float()
    with torch.enable_grad():
        _adam_one_vs_rest(lambda rows: lin(x[rows]), list(lin.parameters()), y, n_rows=len(x), batch_size=batch_size,
                          epochs=epochs, lr=lr, end_lr=end_lr, weight_decay=weight_decay, seed=seed)
    return lin.weight.detach().clone(), lin.bias.detach().clone()


def train_l1_latent_probe(values: Tensor, indices: Tensor, n_latents: int, labels: Tensor, *, n_classes: int = 26,
                          l1: float = 0.01, epochs: int = 50, batch_size: int = 4096, lr: float = 1e-2,
                          end_lr: float = 1e-5, l2: float = 1e-6, seed: int = 42) -> Tensor:
    """The L1-penalised one-vs-rest probe on sparse codes ``values, indices [N, k]`` (latent ``indices[i, j]`` has
    activation ``values[i, j]``) of a dictionary with ``n_latents`` latents. Returns ``weight [n_classes,
    n_latents]`` float32; SAEBench ranks letter ``c``'s latents by ``weight[c]`` (signed, largest first)."""
    torch.manual_seed(seed)
    lin = torch.nn.Linear(n_latents, n_classes)  # SAEBench's init: nn.Linear's
    wt = torch.nn.Parameter(lin.weight.detach().t().contiguous())  # [n_latents, C]
    bias = torch.nn.Parameter(lin.bias.detach().clone())
    values, indices = values.float(), indices.long()
    y = torch.nn.functional.one_hot(labels.long(), n_classes).float()

    def forward(rows):  # logits[b, c] = sum_j values[b, j] * W[c, indices[b, j]] + bias[c]
        return torch.einsum("bk,bkc->bc", values[rows], wt[indices[rows]]) + bias

    with torch.enable_grad():
        _adam_one_vs_rest(forward, [wt, bias], y, n_rows=len(values), batch_size=batch_size, epochs=epochs, lr=lr,
                          end_lr=end_lr, weight_decay=l2, extra_loss=lambda: l1 * wt.abs().sum(0).mean(), seed=seed)
    return wt.detach().t().contiguous()


def dense_columns(values: Tensor, indices: Tensor, latents: Tensor) -> Tensor:
    """``[N, m]``: the activations of ``latents [m]`` in sparse codes ``values, indices [N, k]`` (0 where a latent
    is not active)."""
    hit = indices.unsqueeze(-1) == latents.to(indices.device)  # [N, k, m]
    return (hit * values.float().unsqueeze(-1)).sum(1)


def fit_balanced_logreg(x: Tensor, y: Tensor, *, C: float = 1.0, iters: int = 100, tol: float = 1e-10
                        ) -> tuple[Tensor, Tensor]:
    """``P`` independent balanced logistic regressions at once: ``x [P, N, k]``, ``y [P, N]`` bool. Minimises
    ``0.5 |w_p|^2 + C sum_i s_pi BCE(x_pi . w_p + b_p, y_pi)`` with ``s_pi = N / (2 N_{y_pi})`` by damped Newton
    steps. Returns ``(w [P, k], b [P])`` float32. A problem whose labels are all one class gets ``w = 0`` and the
    intercept that a balanced weighting implies (0)."""
    x, yy = x.double(), y.double()
    P, N, k = x.shape
    npos = yy.sum(1, keepdim=True)
    s = torch.where(y, N / (2 * npos.clamp_min(1)), N / (2 * (N - npos).clamp_min(1)))  # [P, N]
    xa = torch.cat([x, torch.ones(P, N, 1, dtype=x.dtype)], -1)  # [P, N, k + 1]
    theta = torch.zeros(P, k + 1, dtype=x.dtype)
    reg = torch.ones(k + 1, dtype=x.dtype)
    reg[-1] = 0

    def objective(th):
        z = torch.einsum("pnk,pk->pn", xa, th)
        return 0.5 * (th[:, :-1] ** 2).sum(1) + C * (s * (torch.nn.functional.softplus(z) - yy * z)).sum(1)

    obj = objective(theta)
    for _ in range(iters):
        z = torch.einsum("pnk,pk->pn", xa, theta)
        p = torch.sigmoid(z)
        grad = reg * theta + C * torch.einsum("pn,pnk->pk", s * (p - yy), xa)
        h = torch.einsum("pn,pnk,pnl->pkl", C * s * p * (1 - p), xa, xa) + torch.diag(reg + 1e-9)
        step = torch.linalg.solve(h, grad.unsqueeze(-1)).squeeze(-1)
        t = torch.ones(P, 1, dtype=x.dtype)
        for _ in range(30):  # backtracking: halve each problem's step until its objective does not rise
            new = objective(theta - t * step)
            bad = new > obj + 1e-12
            if not bad.any():
                break
            t = torch.where(bad.unsqueeze(1), t / 2, t)
        new = objective(theta - t * step)
        better = new <= obj
        theta = torch.where(better.unsqueeze(1), theta - t * step, theta)
        done = (obj - torch.minimum(new, obj)).abs() <= tol * (1 + obj.abs())
        obj = torch.minimum(new, obj)
        if bool(done.all()):
            break
    return theta[:, :-1].float(), theta[:, -1].float()


def f1_score(pred: Tensor, truth: Tensor) -> float:
    """Binary F1 of bool ``pred`` against bool ``truth`` (sklearn's convention: 0.0 when it is 0/0)."""
    tp = int((pred & truth).sum())
    denom = int(pred.sum()) + int(truth.sum())
    return 2 * tp / denom if denom else 0.0
