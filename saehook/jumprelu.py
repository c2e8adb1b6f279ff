"""The JumpReLU autoencoder of Rajamanoharan et al. (2024), "Jumping Ahead: Improving Reconstruction Fidelity with
JumpReLU Sparse Autoencoders" (the architecture of Gemma Scope).

For a row ``x`` normalised as in :class:`~saehook.TopKSAE` (``x' = s x``), with per-latent thresholds
``theta = exp(log_threshold) [n_latents]``:

    pre   = W_enc (x' - b_dec) + b_enc                          [n_latents]
    z     = pre * H(pre - theta)                                JumpReLU (H: the Heaviside step, H(0) = 0)
    z_k   = z with all but its k largest entries set to 0       the cap (see below)
    x_hat = (W_dec^T z_k + b_dec) / s

The training loss (:class:`~saehook.SAETrainer` adds ``out.penalty`` to the FVU) is

    loss = fvu + sparsity_coef * mean_rows sum_j H(pre_j - theta_j)           (the L0 of the uncapped code)

Both ``H`` and the jump are trained through straight-through estimators with the paper's kernel-density
pseudo-derivatives, a rectangle kernel ``K(u) = 1[|u| < 1/2]`` of bandwidth ``eps``:

    d z_j / d theta_j      := -(theta_j / eps) K((pre_j - theta_j) / eps)     (and d z_j / d pre_j = H(pre_j - theta_j))
    d H(pre_j - theta_j) / d theta_j := -(1 / eps) K((pre_j - theta_j) / eps) (and 0 with respect to pre_j)

so the L0 term moves the thresholds only, as in the paper; ``log_threshold`` gets ``theta * dL/dtheta``.

**A target L0.** Adam moves ``log_threshold`` by about the learning rate per step, so in a short run (hundreds of
steps) the thresholds stay near their initial value and ``sparsity_coef`` barely changes L0 (measured in
docs/variants.md). With ``target_l0 = T`` given, training reaches an L0 from its first step instead:

    theta_j = the (1 - T / n_latents) quantile of pre_j over the trainer's first sample    (init_threshold_)
    loss    = fvu + sparsity_coef * (L0 / T - 1)^2                                        (default coef 1.0)

so each latent fires on a fraction ``T / n_latents`` of those rows (their mean L0 is ``T``, no latent starts
dead), and the penalty, dictionary_learning's ``JumpReluTrainer`` term, pulls L0 back towards ``T`` as the weights
move. ``threshold_lr_scale`` multiplies the learning rate of ``log_threshold`` alone (its own Adam parameter group,
:meth:`~JumpReLUSAE.optimizer_groups`), so that either penalty can move the thresholds within a short run.

**Units.** The paper normalises activations to ``E ||x||^2 = 1`` and uses ``eps = 0.001`` and an initial
``theta = 0.001``. saehook's scalar normalisation gives ``E ||x'||^2 = d_in``, which multiplies pre-activations,
codes, thresholds and the bandwidth by ``sqrt(d_in)`` (the decoder rows stay unit-norm): the defaults are the
paper's values times ``sqrt(d_in)``. The FVU is close to the paper's ``||x - x_hat||^2`` in its units (it divides by
the variance rather than the mean square), so ``sparsity_coef`` is on the paper's scale of lambda.

**The cap.** :class:`~saehook.Codes` have a fixed width: ``k`` is the most latents a row keeps. A row whose JumpReLU
code has more than ``k`` non-zero entries keeps its ``k`` largest, in :meth:`~JumpReLUSAE.encode`, in
:meth:`~JumpReLUSAE.forward` and so in training (the dropped entries get no gradient); a row with fewer fills the
remaining slots with zero values, which every consumer treats as inactive. :meth:`~JumpReLUSAE.active_counts`
gives the uncapped counts, to choose ``k`` above them (:meth:`~JumpReLUSAE.set_cap_` changes it). A save read from
SAELens / Gemma Scope files, which carry no cap, gets ``k = n_latents`` (never binds; codes as wide as the
dictionary) unless its ``cfg.json`` names one.

Unlike :class:`~saehook.TopKSAE`'s sparse kernels, :meth:`~JumpReLUSAE.forward` builds dense ``[N, n_latents]``
pre-activations, codes and decoder input (as the paper's implementation does); ``dead_mask`` is ignored (no AuxK:
the paper has none) and ``multi_topk`` is refused.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .sae import Codes, SAEConfigError, SAEOutput, TopKSAE, fvu, total_variance

PAPER_BANDWIDTH = 0.001
"""The paper's kernel bandwidth ``eps``, in its units (``E ||x||^2 = 1``)."""
PAPER_THRESHOLD_INIT = 0.001
"""The paper's initial threshold ``theta``, in its units."""
SPARSITY_COEF = 1e-3
"""saehook's default ``sparsity_coef`` (lambda): not a value from the paper, which sweeps lambda to reach each L0;
a starting point to tune (tests/test_jumprelu.py measures L0 falling as it rises)."""
TARGET_SPARSITY_COEF = 1.0
"""The default ``sparsity_coef`` with a ``target_l0``: dictionary_learning's ``sparsity_penalty`` of its
``(L0 / target - 1)^2`` term."""
TARGET_THRESHOLD_LR_SCALE = 10.0
"""The default ``threshold_lr_scale`` with a ``target_l0``: on SmolLM2's layer 20 (1,024 latents, 146 steps at
lr 3.2e-3) targets 8 / 80 ended at L0 7.6 / 44.6 with 1.0 and 8.1 / 83.6 with 10 (docs/variants.md)."""
QUANTILE_CHUNK = 1 << 24
"""Most pre-activations :meth:`JumpReLUSAE.init_threshold_` holds at once (64 MiB of float32)."""


def rectangle(u: Tensor) -> Tensor:
    """The rectangle kernel ``K(u) = 1[-1/2 < u < 1/2]`` (as the paper's code and SAELens's), in ``u``'s dtype."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class JumpReLUFn(torch.autograd.Function):
    """``(pre [N, n], theta [n], eps) -> pre * H(pre - theta)`` with the paper's pseudo-derivative for ``theta``:
    ``dz/dtheta = -(theta / eps) K((pre - theta) / eps)``; ``dz/dpre = H(pre - theta)``."""

    @staticmethod
    def forward(ctx, pre: Tensor, theta: Tensor, eps: float) -> Tensor:
        """The JumpReLU, saving ``pre`` and ``theta`` for the backward."""
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return pre * (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):
        """``(g H(pre - theta), sum_rows -g (theta / eps) K((pre - theta) / eps), None)``."""
        pre, theta = ctx.saved_tensors
        g_pre = g * (pre > theta).to(g.dtype) if ctx.needs_input_grad[0] else None
        g_theta = None
        if ctx.needs_input_grad[1]:
            g_theta = -(theta / ctx.eps) * (rectangle((pre - theta) / ctx.eps) * g).sum(0)
        return g_pre, g_theta, None


class StepFn(torch.autograd.Function):
    """``(pre [N, n], theta [n], eps) -> H(pre - theta)`` with the paper's pseudo-derivative for ``theta``:
    ``dH/dtheta = -(1 / eps) K((pre - theta) / eps)``; no gradient to ``pre``."""

    @staticmethod
    def forward(ctx, pre: Tensor, theta: Tensor, eps: float) -> Tensor:
        """The step, saving ``pre`` and ``theta`` for the backward."""
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):
        """``(None, sum_rows -g K((pre - theta) / eps) / eps, None)``."""
        pre, theta = ctx.saved_tensors
        g_theta = -(rectangle((pre - theta) / ctx.eps) * g).sum(0) / ctx.eps if ctx.needs_input_grad[1] else None
        return None, g_theta, None


def _positive(name: str, v: float) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
        raise SAEConfigError(f"{name} must be a positive finite number, got {v!r}")
    return float(v)


class JumpReLUSAE(TopKSAE):
    """A JumpReLU sparse autoencoder (see the module docstring for the math, the units and the cap).

    Args:
        d_in: width of the activations it reads.
        n_latents: number of latents.
        k: the cap: at most ``k`` active latents per row (the width of its :class:`~saehook.Codes`).
        multi_topk: must be False (refused otherwise: a JumpReLU has no top-4k code).
        bandwidth: ``eps`` of the pseudo-derivatives, in normalised units; None = the paper's 0.001 times
            ``sqrt(d_in)`` (its ``E ||x||^2 = 1`` against saehook's ``d_in``).
        sparsity_coef: lambda of the L0 penalty; None = ``1e-3`` (:data:`SPARSITY_COEF`), or ``1.0``
            (:data:`TARGET_SPARSITY_COEF`) with a ``target_l0``.
        threshold_init: initial ``theta`` of every latent, in normalised units; None = the paper's 0.001 times
            ``sqrt(d_in)``. A larger one starts sparser: the log parameterisation moves ``theta`` by about a
            factor ``exp(lr)`` per Adam step, so a short run travels only a few e-folds.
        target_l0: the mean number of active latents per row to train for (``0 < target_l0 <= k``), or None
            (the paper's ``sparsity_coef * L0`` penalty). When set, :class:`~saehook.SAETrainer` sets the
            thresholds from its first sample (:meth:`init_threshold_`, which overrides ``threshold_init``) and the
            penalty is ``sparsity_coef * (L0 / target_l0 - 1)^2``.
        threshold_lr_scale: the learning rate of ``log_threshold`` over the trainer's; None = 1.0 (one learning
            rate, as the paper), or 10.0 (:data:`TARGET_THRESHOLD_LR_SCALE`) with a ``target_l0``.
        dtype: of the parameters (default float32).
        device: of the parameters (default CPU).

    Parameters: those of :class:`~saehook.TopKSAE` plus ``log_threshold [n_latents]`` (``theta = exp`` of it).
    Raises ``SAEConfigError`` for a bad size, bandwidth, coefficient, threshold or target L0.
    """

    architecture = "jumprelu"

    def __init__(self, d_in: int, n_latents: int, k: int, *, multi_topk: bool = False,
                 bandwidth: float | None = None, sparsity_coef: float | None = None,
                 threshold_init: float | None = None, target_l0: float | None = None,
                 threshold_lr_scale: float | None = None, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        if multi_topk:
            raise SAEConfigError("a JumpReLUSAE has no Multi-TopK code (its rows keep every latent above its "
                                 "threshold, up to k): build it with multi_topk=False")
        super().__init__(d_in, n_latents, k, dtype=dtype, device=device)
        root = math.sqrt(d_in)
        self.bandwidth = _positive("bandwidth", PAPER_BANDWIDTH * root if bandwidth is None else bandwidth)
        self.target_l0 = None if target_l0 is None else _positive("target_l0", target_l0)
        if threshold_lr_scale is None:
            threshold_lr_scale = 1.0 if self.target_l0 is None else TARGET_THRESHOLD_LR_SCALE
        self.threshold_lr_scale = _positive("threshold_lr_scale", threshold_lr_scale)
        if self.target_l0 is not None and self.target_l0 > k:
            raise SAEConfigError(f"target_l0={target_l0!r} is above the cap k={k}, which would cut rows to k "
                                 f"latents: raise k to at least target_l0 or lower target_l0")
        if sparsity_coef is None:
            sparsity_coef = SPARSITY_COEF if self.target_l0 is None else TARGET_SPARSITY_COEF
        if isinstance(sparsity_coef, bool) or not isinstance(sparsity_coef, (int, float)) or not (
                math.isfinite(sparsity_coef) and sparsity_coef >= 0):
            raise SAEConfigError(f"sparsity_coef must be a finite number >= 0, got {sparsity_coef!r}")
        self.sparsity_coef = float(sparsity_coef)
        theta0 = _positive("threshold_init", PAPER_THRESHOLD_INIT * root if threshold_init is None
                           else threshold_init)
        self.log_threshold = nn.Parameter(torch.full((n_latents,), math.log(theta0), dtype=self.W_enc.dtype,
                                                     device=device))

    @property
    def threshold(self) -> Tensor:
        """``theta = exp(log_threshold) [n_latents]``, in normalised units (differentiable)."""
        return self.log_threshold.exp()

    @torch.no_grad()
    def init_threshold_(self, x: Tensor, target_l0: float | None = None) -> Tensor:
        """Set every latent's threshold from rows ``x [N, d_in]`` so that it fires on ``m = round(N T / n_latents)``
        of them (``T = target_l0``, default ``self.target_l0``): ``theta_j`` is the midpoint of the ``m``-th and
        ``m+1``-th largest ``pre_j``, floored at the paper's initial threshold (a latent can only fire where
        ``pre_j > 0``). The rows' mean L0 is then ``T`` up to the rounding of ``m`` and ties. Call it after the input
        scale and ``b_dec`` are set (:class:`~saehook.SAETrainer` does, on its first sample). Holds at most
        :data:`QUANTILE_CHUNK` pre-activations at once. Returns ``theta [n_latents]``. Raises ``SAEConfigError``
        without a target, or when ``x`` has too few rows for one firing per latent (``N < n_latents / T``)."""
        target = self.target_l0 if target_l0 is None else _positive("target_l0", target_l0)
        if target is None:
            raise SAEConfigError("init_threshold_ needs a target L0: pass target_l0= or build the JumpReLUSAE "
                                 "with target_l0=")
        xc = self.normalise(x.reshape(-1, self.d_in))[0] - self.b_dec  # [N, d]
        N, n = len(xc), self.n_latents
        m = round(N * target / n)
        if N * target < n or m >= N:
            raise SAEConfigError(f"init_threshold_ got {N} rows for target_l0={target:g} over {n} latents: each "
                                 f"latent must fire on between 1 and N-1 of them, so pass at least "
                                 f"{math.ceil(n / target)} rows (and target_l0 < n_latents)")
        theta = torch.empty(n, dtype=self.W_enc.dtype, device=self.W_enc.device)
        chunk = max(1, QUANTILE_CHUNK // N)
        for s in range(0, n, chunk):
            pre = F.linear(xc, self.W_enc[s:s + chunk], self.b_enc[s:s + chunk])  # [N, c]
            top = pre.topk(m + 1, dim=0).values  # [m + 1, c], descending
            theta[s:s + chunk] = (top[m - 1] + top[m]) / 2
        floor = PAPER_THRESHOLD_INIT * math.sqrt(self.d_in)
        self.log_threshold.copy_(theta.clamp_min(floor).log())
        return self.threshold

    def optimizer_groups(self) -> list[dict]:
        """Adam parameter groups for :class:`~saehook.SAETrainer`: every parameter but ``log_threshold``, then
        ``log_threshold`` with ``lr_scale = threshold_lr_scale`` (the trainer's learning rate times it)."""
        rest = [p for name, p in self.named_parameters() if name != "log_threshold"]
        return [{"params": rest}, {"params": [self.log_threshold], "lr_scale": self.threshold_lr_scale}]

    def init_from_sample_(self, x: Tensor) -> None:
        """What :class:`~saehook.SAETrainer` fits on its first sample ``x [N, d_in]`` after the input scale and
        ``b_dec``: the thresholds for ``target_l0`` (:meth:`init_threshold_`) when one is set, else nothing."""
        if self.target_l0 is not None:
            self.init_threshold_(x)

    # ------------------------------------------------------------------ the code
    def _topk(self, pre: Tensor, k: int) -> Codes:
        # encode's selection: the k largest entries of z = pre * H(pre - theta); zeros fill the unused slots.
        z = pre * (pre > self.threshold.to(pre.dtype)).to(pre.dtype)
        values, indices = z.topk(min(k, self.n_latents), dim=-1, sorted=True)
        return Codes(values, indices)

    @torch.no_grad()
    def active_counts(self, x: Tensor) -> Tensor:
        """``x [..., d_in] -> [...]`` int64: how many latents pass their threshold in each row, before the cap
        (rows where it exceeds ``k`` lose their smallest entries)."""
        pre = self.pre_acts(x)
        return (pre > self.threshold.to(pre.dtype)).sum(-1)

    def set_cap_(self, k: int) -> None:
        """Set the cap ``k`` (the width of the codes). Raises ``SAEConfigError`` unless ``1 <= k <= n_latents``."""
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.n_latents:
            raise SAEConfigError(f"the cap k must be an integer in [1, n_latents={self.n_latents}], got {k!r}")
        self.k = k

    @property
    def batch_coupled(self) -> bool:
        """Read by :class:`~saehook.SAETrainer`: with a ``target_l0`` the penalty is not a mean over rows, so under
        data parallelism it passes ``forward`` a ``gather_fn`` (its ``mean L0`` is then every rank's)."""
        return self.target_l0 is not None

    def forward(self, x: Tensor, dead_mask: Tensor | None = None, k_aux: int | None = None,
                matmul_dtype: torch.dtype | None = None, variance_fn=None, gather_fn=None) -> SAEOutput:
        """``x [..., d_in] -> SAEOutput(x_hat [..., d_in], codes [..., k], fvu, penalty=...)``:
        the capped JumpReLU code, its reconstruction, the FVU in normalised units and
        ``penalty = sparsity_coef * mean L0`` (uncapped; ``sparsity_coef * (mean L0 / target_l0 - 1)^2`` with a
        ``target_l0``), both differentiable with the pseudo-derivatives of the
        module docstring. ``matmul_dtype`` (e.g. bfloat16) is the pre-activation matmul's dtype (codes then keep
        its precision); ``variance_fn`` maps rows to the FVU denominator. ``gather_fn`` (data parallelism, see
        :func:`saehook.distributed.all_gather_rows_at`): the target-L0 penalty takes the value of every rank's mean
        L0 and the gradient of this rank's (its share of the global penalty once the trainer sums the ranks'
        ``penalty / world``). ``dead_mask`` and ``k_aux`` are accepted for the trainer and ignored. Dense: about
        three ``[N, n_latents]`` tensors."""
        lead = x.shape[:-1]
        xn_lead, state = self.normalise(x)
        xn = xn_lead.reshape(-1, self.d_in)  # [N, d]
        xc, W, b = xn - self.b_dec, self.W_enc, self.b_enc
        if matmul_dtype is not None and matmul_dtype != W.dtype:
            pre = F.linear(xc.to(matmul_dtype), W.to(matmul_dtype), b.to(matmul_dtype)).to(W.dtype)
        else:
            pre = F.linear(xc, W, b)  # [N, n]
        theta = self.threshold
        z = JumpReLUFn.apply(pre, theta, self.bandwidth)  # [N, n]
        k = min(self.k, self.n_latents)
        with torch.no_grad():
            idx = z.topk(k, dim=-1, sorted=True).indices  # [N, k]
            over = (z > 0).sum(-1) > k
        if bool(over.any()):  # the cap: drop the active entries beyond the k largest (and their gradient)
            keep = torch.ones_like(z, dtype=torch.bool)
            keep[over] = False
            keep.scatter_(1, idx, True)
            z = z * (keep | (z.detach() <= 0)).to(z.dtype)  # inactive entries keep their threshold gradient
        xn_hat = z @ self.W_dec + self.b_dec  # [N, d]
        main = fvu(xn, xn_hat, (variance_fn or total_variance)(xn))
        l0 = StepFn.apply(pre, theta, self.bandwidth).sum(-1)  # [N], uncapped
        if gather_fn is not None and self.target_l0 is not None:  # (L0 / T - 1)^2 of the global mean L0
            every = gather_fn(l0.detach()[:, None])[0]
            l0 = l0.mean() + (every.mean() - l0.mean()).detach()
        else:
            l0 = l0.mean()
        penalty = self.sparsity_coef * (l0 if self.target_l0 is None else (l0 / self.target_l0 - 1) ** 2)
        x_hat = self.unnormalise(xn_hat.reshape(*lead, self.d_in), state)
        codes = self.make_codes(z.gather(1, idx).reshape(*lead, k), idx.reshape(*lead, k), state)
        return SAEOutput(x_hat, codes, main, penalty=penalty)

    # ------------------------------------------------------------------ persistence
    def config(self) -> dict:
        """:meth:`TopKSAE.config` plus ``bandwidth``, ``sparsity_coef``, ``target_l0`` and ``threshold_lr_scale``
        (``architecture: "jumprelu"``)."""
        cfg = super().config()
        cfg.update(bandwidth=self.bandwidth, sparsity_coef=self.sparsity_coef, target_l0=self.target_l0,
                   threshold_lr_scale=self.threshold_lr_scale)
        return cfg

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str | None = None,
             dtype: torch.dtype | None = None) -> JumpReLUSAE:
        """Load a folder written by :meth:`save`: :meth:`TopKSAE.load`'s checks (``log_threshold`` included), then
        ``bandwidth``, ``sparsity_coef``, ``target_l0`` and ``threshold_lr_scale`` (None and 1.0 in files written
        before them) from ``cfg.json``."""
        import json

        from . import atomic
        from .sae import CFG_NAME

        sae = super().load(path, device=device, dtype=dtype)
        cfg = json.loads((atomic.committed(path) / CFG_NAME).read_text())  # valid: TopKSAE.load has read it
        sae.bandwidth = _positive("bandwidth", cfg.get("bandwidth", sae.bandwidth))
        sae.sparsity_coef = float(cfg.get("sparsity_coef", sae.sparsity_coef))
        target = cfg.get("target_l0")
        sae.target_l0 = None if target is None else _positive("target_l0", target)
        sae.threshold_lr_scale = _positive("threshold_lr_scale", cfg.get("threshold_lr_scale", 1.0))
        return sae

    def extra_repr(self) -> str:
        """The sizes, the cap, the bandwidth and the sparsity coefficient, shown in ``repr(sae)``."""
        return (f"d_in={self.d_in}, n_latents={self.n_latents}, k={self.k} (cap), bandwidth={self.bandwidth:.4g}, "
                f"sparsity_coef={self.sparsity_coef:.4g}, target_l0={self.target_l0}, "
                f"input_scale={float(self.input_scale.mean()):.4g}")
