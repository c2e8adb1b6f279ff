"""Training configuration: every knob of the paper's recipe, with the paper's defaults."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Literal

AUTO_E2E_FRACTION = 0.02
"""``e2e_fraction`` of a run through the live model when ``TrainConfig.e2e_fraction`` is None: the last 2% of
the tokens trained on KL against the clean model (docs/quality.md: 0.207 -> 0.176 nats delta LM loss on
SmolLM2 layer 20 at 1M tokens, 0.2-0.3% dead)."""


@dataclass(frozen=True)
class TrainConfig:
    """How to train a :class:`~saehook.TopKSAE` (Gao et al. 2024, section 2 and appendix A)."""

    batch_tokens: int | None = None
    """Activation rows per optimizer step; None = chosen from the run's length (:meth:`batch_for`): about
    ``target_steps`` steps, a power of two in ``[512, 8192]`` (8192 when the length is unknown). The paper
    used 131,072 rows per step over billions of tokens; a short run needs more, smaller steps."""
    lr: float | None = None
    """Adam learning rate; None = ``lr_scale * 2e-4 / sqrt(n_latents / 2**14)`` (the paper's 1/sqrt(n)
    scaling, times ``lr_scale``)."""
    lr_scale: float = 4.0
    """Multiplier on the paper's learning-rate rule when ``lr`` is None (1.0 = the paper's rule). The paper's
    rule was fitted to 131k-row batches trained to convergence; short runs with a decaying schedule train
    further at a higher rate (see docs/quality.md for the measurements)."""
    lr_schedule: Literal["wsd", "cosine", "constant"] = "wsd"
    """``"wsd"`` (linear warm-up over ``warmup_fraction``, constant, then linear decay to 0 over the last
    ``decay_fraction`` of the run), ``"cosine"`` (warm-up, then cosine decay to 0), or ``"constant"``
    (warm-up, then constant: the paper). Decay needs the run's length; without it the rate stays constant."""
    warmup_fraction: float = 0.02
    """Fraction of the run's steps over which the learning rate rises linearly from 0 (with an unknown run
    length: of ``target_steps``)."""
    decay_fraction: float = 0.2
    """``"wsd"``: fraction of the run's steps at its end over which the learning rate falls linearly to 0."""
    target_steps: int = 2000
    """Steps the automatic ``batch_tokens`` aims for (see :meth:`batch_for`)."""
    betas: tuple[float, float] = (0.9, 0.99)
    """Adam betas. The paper used (0.9, 0.999); over a run of ~2,000 steps a second-moment average of
    ~100 steps trains further (docs/quality.md)."""
    eps: float = 6.25e-10
    """Adam epsilon (tiny, because batch-averaged gradients are tiny)."""
    auxk: bool = True
    """Train dead latents with the AuxK loss."""
    k_aux: int | None = None
    """Latents used by AuxK; None = ``d_in // 2``."""
    auxk_coef: float = 1 / 4
    """Weight of the AuxK loss: ``L + auxk_coef * L_aux`` (the paper: 1/32; small batches kill more latents,
    and 1/4 revives them, docs/quality.md)."""
    dead_tokens: int = 10_000_000
    """A latent is dead after this many tokens without firing (paper: 10M)..."""
    dead_fraction: float = 0.0025
    """...or after this fraction of the run's tokens, whichever is smaller (scales the threshold for small
    runs; only when the run length is known; never below one batch, nor below ``dead_firings``). 0.25% of a
    1M-token run: 2,500 tokens, so AuxK starts on a latent after ~5 silent steps of 512 rows."""
    dead_firings: float = 20.0
    """Floor of the run-length threshold, in expected firings: a latent is not called dead before
    ``dead_firings * n_latents / k`` tokens, the tokens in which a latent firing at the average rate
    ``k / n_latents`` fires ``dead_firings`` times (n = 4,096, k = 32: 2,560 tokens; n = 16,384: 10,240). Without
    it, 0.25% of a 1M-token run left 26.7% of a 16,384-latent dictionary dead (docs/quality.md)."""
    multi_topk_coef: float = 1 / 8
    """Weight of the 4k reconstruction when the autoencoder has ``multi_topk``: ``L(k) + L(4k)/8``."""
    normalize: Literal["scalar", "channel", "none"] = "scalar"
    """Input scale estimated from the first ``init_samples`` rows and stored in the SAE: ``"scalar"`` (one ``s`` with
    ``E||s x||^2 = d_in``), ``"channel"`` (``s_c = 1 / std_c`` per channel, so the loss weighs every channel by
    ``1 / var_c``) or ``"none"``. ``True`` / ``False`` (older configs) mean ``"scalar"`` / ``"none"``."""
    init_b_dec: Literal["geometric_median", "mean", "none"] = "geometric_median"
    """``"geometric_median"`` (paper), ``"mean"`` or ``"none"``: how ``b_dec`` is set from the first ``init_samples``
    rows, in the autoencoder's normalised units (``s x``; a ``LayerNormTopKSAE``'s layer-normed rows)."""
    init_samples: int = 32768
    """Rows the input scale and ``b_dec`` are fitted on: the first ``init_samples`` rows of the stream (all
    ranks together), or the whole run when it is shorter (its local phase with ``e2e_fraction``). Training
    takes its first step once they are in (the paper's code uses 32,768)."""
    ema: float | None = None
    """Decay of an exponential moving average of the weights (e.g. 0.999), None = off."""
    grad_clip: float | None = None
    """Max global gradient norm, None = no clipping."""
    skip_positions: int = 1
    """Leading positions of every window excluded from training and statistics (BOS / first token, whose
    residual norm is 10-100x the rest)."""
    shuffle_buffer: int = 65536
    """Rows mixed across windows before they form batches (consecutive tokens are correlated); at most a
    quarter of the run's tokens when its length is known, so a short run does not read more text to fill the
    buffer than it trains on (20k tokens: 5,000 rows, not 65,536)."""
    seed: int = 0
    """Seed of the activation shuffling."""
    checkpoint_every: int = 500
    """Steps between checkpoints (and always at the end)."""
    log_every: int = 10
    """Steps between metric lines in ``metrics.jsonl``."""
    matmul_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Dtype of the encoder's dense pre-activation matmul: ``"auto"`` (bfloat16 where the autoencoder's device
    multiplies it natively: CUDA with bf16, CPUs with AVX512-BF16 or AMX; else float32; resolved per autoencoder
    when training starts and logged, ``saehook.hardware.auto_dtype``), ``"float32"`` or ``"bfloat16"``
    (2-4x faster where native, ~60x slower where emulated). Master weights, the selected latent values and all
    gradients stay in float32; only which latents win the top k can differ, for pre-activations tied within
    bf16 rounding."""
    nan_policy: Literal["raise", "skip"] = "raise"
    """Non-finite activations or loss: ``"raise"`` (error naming step and hookpoint) or ``"skip"`` (drop
    the offending rows / step and count them in the metrics)."""
    e2e_fraction: float | None = None
    """Fraction of the run's tokens, at its end, trained end-to-end through the live model (None: 0.02 in
    ``hooked.train`` in one process, else 0). Each such step splices the reconstructions in and minimises
    ``e2e_loss`` of the model's next-token predictions (:mod:`saehook.e2e`); 0 = off, 1 = the whole run.
    None (the default) = ``AUTO_E2E_FRACTION`` (0.02)
    where it can run, in ``hooked.train`` in one process, and 0 elsewhere (``SAETrainer`` on cached rows,
    several ranks, ``hooked.training()``): on SmolLM2 at 1M tokens it took delta LM loss from 0.207 to 0.176
    nats for about +6% wall time (docs/quality.md). Costs a full forward without early stop, a second (clean)
    forward for KL, and a backward through every layer after the hookpoint."""
    e2e_loss: Literal["kl", "ce"] = "kl"
    """End-to-end loss: ``"kl"``, the mean ``KL(p_clean || p_spliced)`` over the evaluated positions, or
    ``"ce"``, the next-token cross-entropy of the spliced model."""
    e2e_fvu_coef: float = 1.0
    """Weight of the local FVU term (and of Multi-TopK's with it) kept next to the end-to-end loss, as Braun
    et al.'s e2e+ds variant keeps reconstruction terms; 0 = pure KL, like sparsify's ``loss_fn="kl"``.
    AuxK keeps ``auxk_coef``."""

    def __post_init__(self) -> None:
        if isinstance(self.normalize, bool):  # older configs and checkpoints: True / False
            object.__setattr__(self, "normalize", "scalar" if self.normalize else "none")
        if self.normalize not in ("scalar", "channel", "none"):
            raise ValueError(f"normalize must be 'scalar', 'channel' or 'none' (or True / False), got "
                             f"{self.normalize!r}")
        if self.batch_tokens is not None and self.batch_tokens <= 0:
            raise ValueError(f"batch_tokens must be positive or None (automatic), got {self.batch_tokens}")
        if not (self.lr_scale > 0 and math.isfinite(self.lr_scale)):
            raise ValueError(f"lr_scale must be a positive number, got {self.lr_scale}")
        if self.lr_schedule not in ("wsd", "cosine", "constant"):
            raise ValueError(f"lr_schedule must be 'wsd', 'cosine' or 'constant', got {self.lr_schedule!r}")
        if not (0 <= self.warmup_fraction < 1 and 0 <= self.decay_fraction <= 1
                and self.warmup_fraction + self.decay_fraction <= 1):
            raise ValueError(f"warmup_fraction ({self.warmup_fraction}) and decay_fraction ({self.decay_fraction}) "
                             "must be in [0, 1] and sum to at most 1")
        if self.target_steps <= 0:
            raise ValueError(f"target_steps must be positive, got {self.target_steps}")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if self.init_b_dec not in ("geometric_median", "mean", "none"):
            raise ValueError(f"init_b_dec must be 'geometric_median', 'mean' or 'none', got {self.init_b_dec!r}")
        if self.matmul_dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"matmul_dtype must be 'auto', 'float32', 'bfloat16' or 'float16', got "
                             f"{self.matmul_dtype!r}")
        if self.nan_policy not in ("raise", "skip"):
            raise ValueError(f"nan_policy must be 'raise' or 'skip', got {self.nan_policy!r}")
        if self.ema is not None and not 0 < self.ema < 1:
            raise ValueError(f"ema must be in (0, 1), got {self.ema}")
        if self.shuffle_buffer < 0 or self.skip_positions < 0:
            raise ValueError("shuffle_buffer and skip_positions must be >= 0")
        if not 0 < self.dead_fraction <= 1 or self.dead_tokens <= 0:
            raise ValueError("dead_tokens must be positive and dead_fraction in (0, 1]")
        if not (self.dead_firings >= 0 and math.isfinite(self.dead_firings)):
            raise ValueError(f"dead_firings must be a finite number >= 0, got {self.dead_firings}")
        if self.e2e_fraction is not None and not 0 <= self.e2e_fraction <= 1:
            raise ValueError(f"e2e_fraction must be in [0, 1], got {self.e2e_fraction}")
        if self.e2e_loss not in ("kl", "ce"):
            raise ValueError(f"e2e_loss must be 'kl' or 'ce', got {self.e2e_loss!r}")
        if not (self.e2e_fvu_coef >= 0 and math.isfinite(self.e2e_fvu_coef)):
            raise ValueError(f"e2e_fvu_coef must be a finite number >= 0, got {self.e2e_fvu_coef}")

    def e2e_fraction_for(self, live: bool) -> float:
        """The end-to-end fraction of a run: ``e2e_fraction`` if set, else ``AUTO_E2E_FRACTION`` when the run
        trains through the live model in one process with a known length (``live``), else 0."""
        if self.e2e_fraction is not None:
            return self.e2e_fraction
        return AUTO_E2E_FRACTION if live else 0.0

    def lr_for(self, n_latents: int) -> float:
        """The peak learning rate for ``n_latents`` latents: ``lr`` if set, else
        ``lr_scale * 2e-4 / sqrt(n_latents / 2**14)``."""
        return self.lr if self.lr is not None else self.lr_scale * 2e-4 / math.sqrt(n_latents / 2**14)

    def batch_for(self, total_tokens: int | None) -> int:
        """Rows per step: ``batch_tokens`` if set; else the power of two nearest ``total_tokens /
        target_steps``, clamped to ``[512, 8192]`` (8192 when ``total_tokens`` is None). E.g. 1M tokens ->
        512 rows per step (1,953 steps), 4M -> 2048, 16M -> 8192, 250k -> 512 (488 steps)."""
        if self.batch_tokens is not None:
            return self.batch_tokens
        if not total_tokens:
            return 8192
        return int(min(8192, max(512, 2 ** round(math.log2(max(total_tokens / self.target_steps, 1))))))

    def lr_factor(self, step: int, total_steps: int | None) -> float:
        """Multiplier of the peak learning rate at optimizer step ``step`` (0-based) of ``total_steps``.

        Warm-up ``w = warmup_fraction * total_steps`` steps: ``min(1, (step + 1) / w)``. Then ``"constant"``: 1;
        ``"wsd"``: 1 until the last ``decay_fraction * total_steps`` steps, then linear to 0 at the end;
        ``"cosine"``: ``(1 + cos(pi t)) / 2`` with ``t`` the fraction of the post-warm-up steps done.
        """
        span = total_steps if total_steps else self.target_steps
        warm = self.warmup_fraction * span
        if step + 1 < warm:
            return (step + 1) / warm
        if not total_steps or self.lr_schedule == "constant":
            return 1.0
        if self.lr_schedule == "cosine":
            t = min(1.0, (step - warm) / max(total_steps - warm, 1))
            return 0.5 * (1 + math.cos(math.pi * t))
        decay = self.decay_fraction * total_steps
        left = total_steps - step  # steps still to take, this one included
        return 1.0 if left > decay else max(left / max(decay, 1), 0.0)

    def to_dict(self) -> dict:
        """Every field as a JSON-serialisable dict (the inverse of :meth:`from_dict`)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """A config from :meth:`to_dict`'s output; unknown fields raise ``ValueError``."""
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {sorted(unknown)}; known: {sorted(known)}")
        d = dict(d)
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)
