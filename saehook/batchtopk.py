"""The BatchTopK autoencoder of Bussmann et al. (2024), "BatchTopK Sparse Autoencoders".

A :class:`~saehook.TopKSAE` whose sparsity is a budget per batch instead of per row. For a training batch of
``B`` rows (``x'`` = :meth:`~saehook.TopKSAE.normalise` ``(x)``, ``s x`` here):

    a     = ReLU(W_enc (x' - b_dec) + b_enc)                          [B, n]
    z     = a  on the k B largest entries of the whole batch, else 0  (some rows get more than k, some fewer)
    x_hat = (W_dec^T z + b_dec) / s

At inference (:meth:`BatchTopKSAE.encode`, and ``forward`` in eval mode or without grad) a token's code must not
depend on its batch, so a threshold ``theta`` replaces the batch selection: ``z_j = a_j if a_j > theta``. It is
estimated during training as the authors do, an exponential moving average of the smallest kept activation of
each training batch:

    m_t     = min { z_bj : z_bj > 0 }               (batch t's cut-off: its k B-th largest activation)
    theta_t = (1 - beta) theta_{t-1} + beta m_t     beta = 0.01 (the authors' lr)

with one difference: ``theta`` starts at the first batch's ``m_1`` (the authors start from 0, which biases it
low for the first few hundred steps). ``theta`` is the ``threshold`` buffer (saved in ``sae.safetensors``; -1 until
the first training batch), in normalised units. An autoencoder never trained as BatchTopK (``threshold < 0``)
encodes with the per-row TopK ``k`` instead. The average's time constant is ``1 / beta = 100`` steps, so a run of
a few hundred steps leaves it trailing the weights (planted features, k = 4: held-out L0 3.91 after 500 steps,
1.71 after 60); :meth:`BatchTopKSAE.fit_threshold_` sets it from a sample with the final weights.

Per-row cap: :class:`~saehook.Codes` are fixed width, here ``k_max`` (default ``min(4k, n_latents)``, stored in
``cfg.json``); unused slots hold value 0 (inactive everywhere downstream). A row whose selection would hold more
than ``k_max`` latents keeps its ``k_max`` largest: in training the rest of the budget then goes to the next
largest activations of other rows (the batch still keeps ``k B`` if it has that many positive), at inference they
are dropped. :attr:`BatchTopKSAE.capped_fraction` is the fraction of the last forward's rows over the cap: exact
at inference; in training an upper bound (exact unless a row is over by two or more), since only one activation
beyond the cap is computed per row.

The encoder runs through the sparse kernels (:class:`saehook.kernels.TopKEncode` at width ``k_max + 1``: the
extra column only tells whether a row exceeded the cap), so gradients are exact and sparse; the batch selection
is a top-``kB`` over the ``[B, k_max]`` candidates. Under data parallelism ``B`` is the global batch: the trainer
passes ``forward`` a ``gather_fn`` that all-gathers every rank's candidates (``[B_r, k_max + 1]`` values), each rank
keeps its rows' share of the global top-``kB`` and updates ``theta`` from the global cut-off, so every rank holds
the same ``theta`` and N ranks train as one process with the N-times batch (SAELens's BatchTopK has no collective:
per rank under DDP). AuxK and ``matmul_dtype`` work as in the parent; Multi-TopK does not apply (refused).
"""

from __future__ import annotations

import json
import os

import torch
from torch import Tensor

from . import atomic
from .sae import CFG_NAME, Codes, SAEConfigError, SAEOutput, TopKSAE, fvu, total_variance

THRESHOLD_LR = 0.01
"""``beta`` of the threshold's moving average (the authors' ``lr=0.01``)."""


class BatchTopKSAE(TopKSAE):
    """A BatchTopK sparse autoencoder (see the module docstring for the math).

    Args:
        d_in: width of the activations it reads.
        n_latents: number of latents.
        k: average number of active latents per row (the batch keeps ``k * B`` in training).
        k_max: the code width, the most latents one row may hold (default ``min(4k, n_latents)``).
        multi_topk: must be False (a per-row TopK option); raises ``SAEConfigError`` otherwise.
        dtype: of the parameters (default float32).
        device: of the parameters (default CPU).

    Parameters and ``input_scale`` as :class:`~saehook.TopKSAE`; buffer ``threshold`` (a scalar, normalised
    units). Raises ``SAEConfigError`` for sizes that do not fit (``k <= k_max <= n_latents``).
    """

    architecture = "batchtopk"
    batch_coupled = True
    """Read by :class:`~saehook.SAETrainer`: the training batch's rows depend on each other beyond the FVU (here
    the selection), so under data parallelism it passes ``forward`` a ``gather_fn``, and the batch selection and the
    threshold are over every rank's rows."""

    def __init__(self, d_in: int, n_latents: int, k: int, *, k_max: int | None = None, multi_topk: bool = False,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        if multi_topk:
            raise SAEConfigError(f"{type(self).__name__} has no Multi-TopK (a per-row TopK loss): pass "
                                 "multi_topk=False")
        super().__init__(d_in, n_latents, k, dtype=dtype, device=device)
        k_max = min(4 * k, n_latents) if k_max is None else k_max
        if isinstance(k_max, bool) or not isinstance(k_max, int) or not k <= k_max <= n_latents:
            raise SAEConfigError(f"k_max must be an integer with k={k} <= k_max <= n_latents={n_latents}, "
                                 f"got {k_max!r}")
        self.k_max = k_max
        self.register_buffer("threshold", torch.full((), -1.0, dtype=dtype or torch.float32, device=device))
        self.capped_fraction = 0.0
        """Fraction of the rows of the last forward (or encode) over the ``k_max`` cap (module docstring)."""

    # ------------------------------------------------------------------ selection
    def batch_select(self, vals: Tensor) -> Tensor:
        """Keep mask ``[B, K]`` of the ``k * B`` largest of ``vals [B, K]`` (ReLU'd candidates, each row's largest
        first); zeros are never kept."""
        flat = vals.detach().reshape(-1)
        budget = self.k * vals.shape[0]
        keep = torch.zeros_like(flat, dtype=torch.bool)
        if budget >= flat.numel():
            keep[:] = True
        else:
            keep[flat.topk(budget, sorted=False).indices] = True
        return (keep & (flat > 0)).view_as(vals)

    def threshold_select(self, vals: Tensor) -> Tensor:
        """Keep mask of ``vals [..., K]`` at inference: ``vals > threshold``, or the first ``k`` columns (per-row
        TopK) while no threshold has been estimated (``threshold < 0``)."""
        if float(self.threshold) < 0:
            cols = torch.arange(vals.shape[-1], device=vals.device)
            return (cols < self.k) & (vals > 0)
        return vals > self.threshold

    @torch.no_grad()
    def update_threshold_(self, vals: Tensor, keep: Tensor) -> None:
        """``theta <- (1 - beta) theta + beta min(kept)`` (``theta <- min(kept)`` on the first batch)."""
        kept = vals.detach()[keep]
        if kept.numel() == 0:
            return
        m = kept.min().to(self.threshold.dtype)
        self.threshold.copy_(m if float(self.threshold) < 0 else torch.lerp(self.threshold, m, THRESHOLD_LR))

    def _select(self, vals: Tensor, batch: bool, gather_fn=None) -> Tensor:
        # vals [N, k_max + 1]: the selection is over the first k_max columns; the extra one only tells whether a
        # row wanted more than k_max (its next activation is selected too when it competes in the selection).
        cand = vals[:, :-1]
        if batch:  # over the whole batch: every rank's rows under data parallelism (gather_fn), so all ranks agree
            full, mine = gather_fn(vals) if gather_fn is not None else (vals.detach(), slice(None))
            keep = self.batch_select(full[:, :-1])
            self.update_threshold_(full[:, :-1], keep)
            over = self.batch_select(full)[:, -1]
            self.capped_fraction = float(over.float().mean()) if len(full) else 0.0
            return cand * keep[mine]
        keep = self.threshold_select(cand)
        if float(self.threshold) >= 0:
            over = vals.detach()[:, -1] > self.threshold
        else:
            over = torch.zeros(len(vals), dtype=torch.bool)
        self.capped_fraction = float(over.float().mean()) if len(vals) else 0.0
        return cand * keep

    @torch.no_grad()
    def fit_threshold_(self, x: Tensor) -> float:
        """Set ``threshold`` to the batch cut-off of a sample ``x [N, d_in]`` with the current weights (its
        ``k N``-th largest activation), so that the inference code of such rows has average L0 ``k``; returns it.
        Useful after a short run, where the moving average still trails the weights (module docstring)."""
        xn = self.normalise(x.reshape(-1, self.d_in))[0]
        a = torch.nn.functional.linear(xn - self.b_dec, self.W_enc, self.b_enc).relu().reshape(-1)
        cut = a.topk(min(self.k * len(xn), a.numel())).values[-1]
        self.threshold.copy_(cut)
        return float(cut)

    # ------------------------------------------------------------------ encode / forward
    def encode(self, x: Tensor, k: int | None = None) -> Codes:
        """``x [..., d_in] -> Codes(values [..., K], indices [..., K])`` with the inference threshold (never the
        batch): the latents whose activation exceeds ``threshold``, at most ``K = k`` (default ``k_max``) per row,
        the largest first, zero values in unused slots."""
        xn, state = self.normalise(x)
        width = k or self.k_max
        pre = torch.nn.functional.linear(xn - self.b_dec, self.W_enc, self.b_enc)
        v, i = pre.topk(min(width + 1, self.n_latents), dim=-1, sorted=True)
        v = v.relu().reshape(-1, v.shape[-1])
        if v.shape[-1] == width:  # width = n_latents: no row can exceed it
            v = torch.cat([v, v.new_zeros(len(v), 1)], 1)
        vals = self._select(v, batch=False).reshape(*i.shape[:-1], width)
        return self.make_codes(vals, i[..., :width], state)

    def forward(self, x: Tensor, dead_mask: Tensor | None = None, k_aux: int | None = None,
                matmul_dtype: torch.dtype | None = None, variance_fn=None, gather_fn=None) -> SAEOutput:
        """As :meth:`TopKSAE.forward` (AuxK over ``dead_mask``, ``matmul_dtype``, ``variance_fn``), with the batch
        selection when training (``self.training`` and grad enabled; updates ``threshold``), else the threshold.
        ``codes`` are ``k_max`` wide. ``gather_fn`` (data parallelism) maps this process's candidates
        ``[N, k_max + 1]`` to ``(every rank's, in rank order; the slice that is this process's)``
        (:func:`saehook.distributed.all_gather_rows_at`): the batch is then all of them (module docstring)."""
        from .kernels import TopKEncode

        lead = x.shape[:-1]
        xn_lead, state = self.normalise(x)
        xn = xn_lead.reshape(-1, self.d_in)
        dm, n_aux = None, 0
        if dead_mask is not None:
            n_dead = int(dead_mask.sum())
            if n_dead > 0:
                dm, n_aux = dead_mask.to(xn.device), min(k_aux or self.d_in // 2, n_dead)
        width = min(self.k_max + 1, self.n_latents)
        vals, idx, aux_vals, aux_idx = TopKEncode.apply(xn, self.W_enc, self.b_enc, self.b_dec, width, dm, n_aux,
                                                        matmul_dtype)
        if width == self.k_max:  # k_max = n_latents: a zero column stands for the cap's extra one
            vals = torch.cat([vals, vals.new_zeros(len(vals), 1)], 1)
        vals = self._select(vals, batch=self.training and torch.is_grad_enabled(), gather_fn=gather_fn)
        codes = Codes(vals, idx[:, : self.k_max])
        var_x = (variance_fn or total_variance)(xn)
        xn_hat, main, recon = self._reconstruct(xn, codes, var_x)
        auxk = None
        if dm is not None:
            e = (xn - xn_hat).detach()
            auxk = fvu(e, self._decode_normalised(Codes(aux_vals, aux_idx), bias=False),
                       (variance_fn or total_variance)(e))
        x_hat = self.unnormalise(xn_hat.reshape(*lead, self.d_in), state)
        return SAEOutput(x_hat, self.make_codes(vals.reshape(*lead, self.k_max), codes.indices.reshape(*lead, -1),
                                                state), main, auxk, recon_loss=recon)

    def _reconstruct(self, xn: Tensor, codes: Codes, var_x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(x_hat' [N, d_in], fvu, recon_loss)`` of normalised rows ``xn`` from ``codes``; recon_loss None (the
        trainer minimises ``fvu``). Subclasses with another loss override this."""
        xn_hat = self._decode_normalised(codes)
        return xn_hat, fvu(xn, xn_hat, var_x), None

    # ------------------------------------------------------------------ persistence
    def config(self) -> dict:
        """:meth:`TopKSAE.config` plus ``k_max``."""
        return {**super().config(), "k_max": self.k_max}

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str | None = None,
             dtype: torch.dtype | None = None) -> BatchTopKSAE:
        """:meth:`TopKSAE.load` (every check, the ``threshold`` buffer included), then ``k_max`` from ``cfg.json``
        (and what ``_read_config`` adds)."""
        sae = super().load(path, device=device, dtype=dtype)
        cfg = json.loads((atomic.committed(path) / CFG_NAME).read_text())  # valid: TopKSAE.load has read it
        sae._read_config(cfg, atomic.committed(path) / CFG_NAME)
        return sae

    def _read_config(self, cfg: dict, cfg_file) -> None:
        k_max = cfg.get("k_max", min(4 * self.k, self.n_latents))
        if isinstance(k_max, bool) or not isinstance(k_max, int) or not self.k <= k_max <= self.n_latents:
            raise SAEConfigError(f"{cfg_file} has k_max={k_max!r}; expected an integer in [k={self.k}, "
                                 f"n_latents={self.n_latents}]")
        self.k_max = k_max

    def extra_repr(self) -> str:
        """The parent's, plus ``k_max`` and the threshold."""
        return f"{super().extra_repr()}, k_max={self.k_max}, threshold={float(self.threshold):.4g}"
