"""One autoencoder, one optimizer: the paper's training step on a batch of activations.

Per step, for rows ``x [N, d]``:

    loss = fvu(x, x_hat) + auxk_coef * auxk_fvu + multi_topk_coef * fvu(x, x_hat_4k)
           + out.penalty      (a variant's own term when it returns one: e.g. JumpReLU's L0 penalty)
    (a variant's ``out.recon_loss``, when it returns one, replaces ``fvu(x, x_hat)``: e.g. Matryoshka's prefixes)
    g(W_dec) <- g - (g . w) w  for each unit decoder row w      (remove the parallel component)
    Adam(betas, eps) step; W_dec rows renormalised to unit norm; optional weight EMA

Dead latents: a latent that has not fired for ``dead_threshold`` tokens is dead; AuxK reconstructs the
residual from the top ``k_aux`` dead pre-activations. The counters live on the autoencoder's device.
"""

from __future__ import annotations

import logging
import math
from typing import NamedTuple

import torch
from torch import Tensor

from .allocator import tune_cpu_allocator
from .config import TrainConfig
from .hardware import auto_dtype
from .sae import SAEOutput, TopKSAE

log = logging.getLogger(__name__)


class NonFiniteError(FloatingPointError):
    """NaN or inf in activations or loss, with the step and hookpoint."""


class TrainForward(NamedTuple):
    """The first half of a step (:meth:`SAETrainer.forward`), handed to :meth:`SAETrainer.apply`."""

    acts: Tensor
    """``[N, d_in]`` the rows trained on (non-finite rows dropped under ``nan_policy="skip"``)."""
    out: SAEOutput
    """The autoencoder's output on them."""
    loss: Tensor
    """Scalar: the autoencoder's own loss (reconstruction, AuxK, Multi-TopK)."""


class SAETrainer:
    """Trains one :class:`TopKSAE` (or a subclass, e.g. :class:`~saehook.LayerNormTopKSAE`) on batches of
    activations from any origin, through the autoencoder's public methods only.

    Args:
        sae: the autoencoder (trained in place).
        config: the recipe.
        total_tokens: length of the run if known; scales the dead-latent threshold for short runs.
        name: how errors and logs call this autoencoder (e.g. its hookpoint).
    """

    def __init__(self, sae: TopKSAE, config: TrainConfig | None = None, *, total_tokens: int | None = None,
                 name: str = "sae", dist=None):
        self.sae, self.cfg, self.name = sae, config or TrainConfig(), name
        self.dist = dist  # a saehook.distributed.Dist for data-parallel training, else None
        self.ddp = None
        cfg = self.cfg
        self.peak_lr = cfg.lr_for(sae.n_latents)
        self.batch_tokens = cfg.batch_for(total_tokens)
        """Rows per optimizer step (all ranks together): ``config.batch_for(total_tokens)``."""
        self.total_steps = -(-total_tokens // self.batch_tokens) if total_tokens else None
        """Steps of the whole run (for the learning-rate schedule), None when its length is unknown."""
        self.lr = self.peak_lr * cfg.lr_factor(0, self.total_steps)
        if sae.W_enc.device.type == "cpu":
            tune_cpu_allocator()  # reuse freed blocks instead of page-faulting them in every step
        # torch's fused Adam (one pass over each parameter instead of ~8) exists for CPU and CUDA floats.
        fused = sae.W_enc.device.type in ("cpu", "cuda") and sae.W_enc.dtype in (torch.float32, torch.float64)
        groups = sae.optimizer_groups() if hasattr(sae, "optimizer_groups") else sae.parameters()  # JumpReLU: 2
        self.opt = torch.optim.Adam(groups, lr=self.lr, betas=cfg.betas, eps=cfg.eps, fused=fused or None)
        self.init_rows = min(cfg.init_samples, total_tokens) if total_tokens else cfg.init_samples
        """Rows :meth:`initialize` fits the input scale and ``b_dec`` on (all ranks together):
        ``config.init_samples``, or the whole run when it is shorter."""
        self.dead_threshold = cfg.dead_tokens
        if total_tokens:
            # never before a latent had one full batch to fire in
            floor = math.ceil(cfg.dead_firings * sae.n_latents / sae.k)  # tokens for dead_firings expected firings
            self.dead_threshold = max(self.batch_tokens,
                                      min(cfg.dead_tokens, max(floor, int(cfg.dead_fraction * total_tokens))))
        self.k_aux = min(cfg.k_aux or sae.d_in // 2, sae.n_latents)
        self.matmul_dtype = auto_dtype(cfg.matmul_dtype, sae.W_enc.device)
        """The encoder matmul's dtype name: ``config.matmul_dtype`` with ``"auto"`` resolved for this device."""
        log.info("%s: encoder matmul in %s (matmul_dtype=%r on %s)", name, self.matmul_dtype, cfg.matmul_dtype,
                 sae.W_enc.device)
        dev = sae.W_enc.device
        self.tokens_since_fired = torch.zeros(sae.n_latents, dtype=torch.long, device=dev)
        self.step_count = 0
        self.tokens = 0
        self.skipped = 0
        self.initialized = False
        self.ema = ({n: p.detach().clone() for n, p in sae.named_parameters()} if cfg.ema else None)

    # ------------------------------------------------------------------ init from data
    @torch.no_grad()
    def initialize(self, acts: Tensor) -> None:
        """Input scale and ``b_dec`` from a sample of activations ``acts [N, d_in]``: its first
        :attr:`init_rows` rows (with several ranks, each rank's rows gathered first, in rank order). Training
        sessions (:meth:`saehook.Hooked.train`, :meth:`saehook.Hooked.training`) call it once they hold
        :attr:`init_rows` rows; a first :meth:`step` without it calls it on that step's batch. Only the
        autoencoder's public methods are used (``set_input_scale_``, ``init_b_dec_``, then
        ``init_from_sample_`` where the class has one), so a subclass's own normalisation (e.g.
        :class:`~saehook.LayerNormTopKSAE`'s) is what ``b_dec`` is fitted in."""
        sample = self._init_sample(acts.reshape(-1, self.sae.train_width))
        if self.cfg.normalize in ("scalar", "channel"):  # channel: s_c = 1/std_c; b_dec takes the channel means
            self.sae.set_input_scale_(sample, mode=self.cfg.normalize)
        if self.cfg.init_b_dec != "none":
            self.sae.init_b_dec_(sample, method=self.cfg.init_b_dec)
        fit_rest = getattr(self.sae, "init_from_sample_", None)  # a variant's own: JumpReLU's target-L0 thresholds
        if fit_rest is not None:
            fit_rest(sample)
        log.info("%s: normalisation and b_dec (%s) fitted on %d rows: %s", self.name, self.cfg.init_b_dec,
                 len(sample), self.sae.extra_repr())
        if self.ema is not None:
            for n, p in self.sae.named_parameters():
                self.ema[n].copy_(p)
        self.initialized = True

    def _init_sample(self, rows: Tensor) -> Tensor:
        """The first :attr:`init_rows` rows of the stream from this rank's ``rows``: each rank's gathered in rank
        order under data parallelism."""
        sample = rows[: self.init_rows]
        if self.dist is not None:
            from .distributed import all_gather_rows

            sample = all_gather_rows(sample.to(self.sae.W_enc).contiguous())[: self.init_rows]
        return sample

    @property
    def dead_mask(self) -> Tensor:
        """Bool ``[n_latents]``: latents that have not fired for ``dead_threshold`` tokens."""
        return self.tokens_since_fired >= self.dead_threshold

    # ------------------------------------------------------------------ the step
    def _check_finite(self, what: str, t: Tensor) -> bool:
        if bool(torch.isfinite(t).all()):
            return True
        if self.cfg.nan_policy == "raise":
            raise NonFiniteError(f"non-finite {what} at step {self.step_count} for {self.name}")
        log.warning("%s: non-finite %s at step %d, skipped", self.name, what, self.step_count)
        self.skipped += 1
        return False

    def step(self, acts: Tensor) -> dict[str, float]:
        """One optimizer step on ``acts [N, d_in]``; returns float metrics: ``loss``, ``fvu``, ``l0``,
        ``dead_frac``, ``auxk_fvu``, ``multi_topk_fvu`` (when enabled), ``lr``, ``tokens``, ``step``, and
        ``cosine`` (mean of cos(x, x_hat)) and ``rel_error_median`` (of ||x - x_hat|| / ||x||) over this
        process's rows (see :func:`saehook.evaluate.evaluate`). It is :meth:`forward`, the backward of its
        loss, then :meth:`apply`."""
        fwd = self.forward(acts)
        if fwd is None:
            return self._metrics(None)
        self.opt.zero_grad(set_to_none=True)
        (fwd.loss * self._loss_scale()).backward()
        return self.apply(fwd)

    def _loss_scale(self) -> int:
        """What the loss is multiplied by before the backward: the world size under DDP (it averages gradients,
        the FVU's global denominator wants their sum), else 1."""
        return self.dist.world if self.dist else 1

    def _run(self, acts: Tensor, **kw) -> SAEOutput:
        """The autoencoder's forward on this rank's rows (through DDP under data parallelism)."""
        if self.dist is None:
            return self.sae(acts, **kw)
        from .distributed import all_gather_rows_at, global_variance  # N ranks equal one N-times batch

        if self.ddp is None:
            self.ddp = torch.nn.parallel.DistributedDataParallel(self.sae, broadcast_buffers=False)
        if getattr(self.sae, "batch_coupled", False):  # BatchTopK's selection, JumpReLU's target-L0 penalty
            kw["gather_fn"] = all_gather_rows_at
        return self.ddp(acts, variance_fn=global_variance, **kw)

    def forward(self, acts: Tensor, fvu_coef: float = 1.0) -> TrainForward | None:
        """The first half of :meth:`step`: check ``acts [N, d_in]`` (the first call initialises the
        autoencoder from them), run the autoencoder with AuxK on the dead latents, and return its output
        and loss ``fvu_coef * (fvu + multi_topk_coef * fvu_4k) + auxk_coef * auxk_fvu``. None when the step
        is skipped (non-finite rows or loss under ``nan_policy="skip"``). ``acts`` may carry autograd
        history (end-to-end training, :mod:`saehook.e2e`); ``out.x_hat`` then depends on it."""
        sae, cfg = self.sae, self.cfg
        acts = acts.reshape(-1, sae.train_width).to(sae.W_enc.device)
        if not self._check_finite("activations", acts):
            acts = acts[torch.isfinite(acts).all(-1)]
            if len(acts) < 2:
                return None
        if not self.initialized:
            self.initialize(acts)
        dead = self.dead_mask if cfg.auxk else None
        kw = dict(dead_mask=dead, k_aux=self.k_aux, matmul_dtype=getattr(torch, self.matmul_dtype))
        out = self._run(acts, **kw)
        loss = fvu_coef * (out.fvu if out.recon_loss is None else out.recon_loss)  # recon_loss: a variant's own
        if out.auxk_fvu is not None:
            loss = loss + cfg.auxk_coef * out.auxk_fvu
        if out.multi_topk_fvu is not None:
            loss = loss + fvu_coef * cfg.multi_topk_coef * out.multi_topk_fvu
        if out.penalty is not None:  # a variant's own term (JumpReLU's L0 penalty), unweighted
            if self.dist is not None:  # a mean over this rank's rows: the ranks' sum is the mean over all of them
                out = out._replace(penalty=out.penalty / self.dist.world)
            loss = loss + out.penalty
        if not self._check_finite("loss", loss.detach()):
            return None
        return TrainForward(acts, out, loss)

    def apply(self, fwd: TrainForward, loss: Tensor | None = None) -> dict[str, float]:
        """The second half of :meth:`step`, once a backward has put the gradients in ``.grad``: the
        learning-rate schedule, the projection of the decoder gradient, clipping, the Adam step, decoder
        renormalisation, EMA, dead-latent counters and the metrics. ``loss``: the loss the gradients came
        from when it is more than ``fwd.loss`` (end-to-end training); a non-finite one skips the step (or
        raises, per ``nan_policy``)."""
        sae, cfg = self.sae, self.cfg
        acts, out = fwd.acts, fwd.out
        if loss is None:
            loss = fwd.loss
        elif not self._check_finite("loss", loss.detach()):
            return self._metrics(None)
        self.lr = self.peak_lr * cfg.lr_factor(self.step_count, self.total_steps)
        for group in self.opt.param_groups:
            group["lr"] = self.lr * group.get("lr_scale", 1.0)  # a group's own multiplier (JumpReLU's thresholds)
        self._reduce_grads()
        sae.remove_parallel_decoder_grad_()
        if cfg.grad_clip is not None:
            self._clip_grads(cfg.grad_clip)
        self.opt.step()
        sae.unit_norm_decoder_()
        self._update_ema()
        with torch.no_grad():
            fired, n_rows, n_active, out, loss = self._firings(out, len(acts), loss)
            self.tokens_since_fired += n_rows
            self.tokens_since_fired[fired > 0] = 0
        self.step_count += 1
        self.tokens += n_rows
        return self._metrics(out, loss, n_active / n_rows, acts)

    def _reduce_grads(self) -> None:
        """Combine the gradients of ranks that share the parameters before the optimizer step (DDP already did)."""

    def _clip_grads(self, max_norm: float) -> None:
        """Scale the gradients to a global norm of at most ``max_norm``."""
        torch.nn.utils.clip_grad_norm_(self.sae.parameters(), max_norm)

    def _firings(self, out: SAEOutput, n_rows: int, loss: Tensor):
        """``(fired [n_latents], n_rows, n_active, out, loss)`` of a step: firings per latent and counts summed over
        the ranks, and the losses as the whole batch's (every rank agrees on dead latents and on what it reports)."""
        fired = torch.zeros_like(self.tokens_since_fired)
        active = out.codes.indices[out.codes.values > 0]
        fired.index_add_(0, active, torch.ones_like(active))
        n_active = len(active)
        if self.dist is not None:
            from .distributed import all_reduce

            counts = torch.tensor([n_rows, n_active], dtype=torch.long, device=fired.device)
            all_reduce(fired)
            all_reduce(counts)
            n_rows, n_active = int(counts[0]), int(counts[1])
            out = out._replace(**{f: all_reduce(getattr(out, f).detach().clone())
                                  for f in ("fvu", "auxk_fvu", "multi_topk_fvu", "recon_loss", "penalty")
                                  if getattr(out, f) is not None})
            loss = all_reduce(loss.detach().clone())
        return fired, n_rows, n_active, out, loss

    def dead_fraction(self) -> float:
        """Fraction of the latents that are dead (:attr:`dead_mask`)."""
        return float(self.dead_mask.float().mean())

    @torch.no_grad()
    def _update_ema(self) -> None:
        if self.ema is None:
            return
        for n, p in self.sae.named_parameters():
            self.ema[n].lerp_(p, 1 - self.cfg.ema)

    def _metrics(self, out, loss=None, l0: float | None = None, acts: Tensor | None = None) -> dict[str, float]:
        m = {"step": float(self.step_count), "tokens": float(self.tokens), "lr": self.lr,
             "dead_frac": self.dead_fraction(), "skipped": float(self.skipped)}
        if out is not None:
            m.update(loss=float(loss.detach()), fvu=float(out.fvu.detach()), l0=float(l0))
            if out.auxk_fvu is not None:
                m["auxk_fvu"] = float(out.auxk_fvu.detach())
            if out.multi_topk_fvu is not None:
                m["multi_topk_fvu"] = float(out.multi_topk_fvu.detach())
            if out.penalty is not None:
                m["penalty"] = float(out.penalty.detach())
            if out.recon_loss is not None:
                m["recon_loss"] = float(out.recon_loss.detach())
        if out is not None and acts is not None:  # per token, so one dominant channel cannot hide the error
            with torch.no_grad():  # three row norms; cos from them: (|x|^2 + |x_hat|^2 - |x - x_hat|^2) / 2|x||x_hat|
                x = acts.float()[..., acts.shape[-1] - self.sae.d_in:]  # a transcoder's target: its output half
                x_hat, norm = out.x_hat.detach().reshape(x.shape).float(), torch.linalg.vector_norm
                n, n_hat, e = (norm(v, dim=-1).double() for v in (x, x_hat, x - x_hat))
                m["cosine"] = float(((n * n + n_hat * n_hat - e * e) / (2 * n * n_hat).clamp_min(1e-300)).mean())
                m["rel_error_median"] = float((e / n).nan_to_num(nan=0.0).quantile(0.5))
        return m

    def ema_sae(self) -> TopKSAE:
        """A copy of the autoencoder holding the EMA weights (the trained one if EMA is off)."""
        import copy

        sae = copy.deepcopy(self.sae)
        if self.ema is not None:
            with torch.no_grad():
                for n, p in sae.named_parameters():
                    p.copy_(self.ema[n])
            sae.unit_norm_decoder_()
        return sae

    # ------------------------------------------------------------------ resume
    def state_tensors(self) -> dict[str, Tensor]:
        """Everything but the autoencoder's weights, as named tensors (for safetensors)."""
        t = {"tokens_since_fired": self.tokens_since_fired}
        names = {id(p): n for n, p in self.sae.named_parameters()}
        for p, st in self.opt.state.items():
            for k, v in st.items():
                t[f"opt.{names[id(p)]}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
        if self.ema is not None:
            t.update({f"ema.{n}": v for n, v in self.ema.items()})
        return {k: v.detach().contiguous().cpu() for k, v in t.items()}

    def state_scalars(self) -> dict:
        """Step, tokens and flags of this trainer, JSON-serialisable (for checkpoints)."""
        return {"step": self.step_count, "tokens": self.tokens, "skipped": self.skipped,
                "initialized": self.initialized, "dead_threshold": self.dead_threshold}

    def load_state(self, tensors: dict[str, Tensor], scalars: dict) -> None:
        """Restore what :meth:`state_tensors` and :meth:`state_scalars` saved (resume)."""
        dev = self.sae.W_enc.device
        self.tokens_since_fired = tensors["tokens_since_fired"].to(dev)
        params = dict(self.sae.named_parameters())
        self.opt.state.clear()
        for key, v in tensors.items():
            if key.startswith("opt."):
                pname, field = key[4:].rsplit(".", 1)
                self.opt.state[params[pname]][field] = v.to(dev) if field != "step" else v.clone()
            elif key.startswith("ema.") and self.ema is not None:
                self.ema[key[4:]] = v.to(dev)
        self.step_count, self.tokens = scalars["step"], scalars["tokens"]
        self.skipped, self.initialized = scalars.get("skipped", 0), scalars["initialized"]
        self.dead_threshold = scalars.get("dead_threshold", self.dead_threshold)
