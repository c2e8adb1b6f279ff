"""The TopK sparse autoencoder of Gao et al. (2024), "Scaling and Evaluating Sparse Autoencoders".

With ``s`` the stored input scale (1 until training sets one) and ``x`` a row of activations:

    x' = s * x                                        (input normalisation, travels with the SAE)
    z  = ReLU(TopK(W_enc (x' - b_dec) + b_enc))       (only the k largest pre-activations survive)
    x_hat' = W_dec^T z + b_dec                        (decoded from the k active rows only)
    x_hat  = x_hat' / s

``s`` is either a scalar (``E ||s x||^2 = d_in``) or a vector ``[d_in]`` applied channel by channel
(standardisation: ``s_c = 1 / std_c``; products and quotients above are then elementwise).
``b_dec`` is the paper's ``b_pre``: subtracted before encoding and added back after decoding.
The loss is the fraction of variance unexplained (normalised MSE, no L1 term), in normalised space:

    fvu = sum ||x' - x_hat'||^2 / sum ||x' - mean(x')||^2      (sums over the batch)

With a scalar ``s`` this equals the same ratio in the original units. With a per-channel ``s`` it is

    fvu = sum_c s_c^2 sum_i (x_ic - x_hat_ic)^2 / sum_c s_c^2 sum_i (x_ic - mean_c)^2

so each channel's error is weighed by ``1 / var_c``: when the batch's variances match the estimated ones,
``fvu = mean_c fvu_c``, the average of the per-channel FVUs, and no high-variance channel dominates the loss.
It is no longer the FVU in the input's units, which :func:`saehook.evaluate` reports.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from . import atomic

CFG_NAME = "cfg.json"
WEIGHTS_NAME = "sae.safetensors"
FORMAT = "saehook.topk"
FORMAT_VERSION = 1


class Codes(NamedTuple):
    """The sparse code of a batch: k active latents per row."""

    values: Tensor
    """``[..., k]`` non-negative activations (ReLU applied after TopK)."""
    indices: Tensor
    """``[..., k]`` int64 latent indices, in descending order of pre-activation."""


class SAEOutput(NamedTuple):
    """Everything one forward pass of a :class:`TopKSAE` produces."""

    x_hat: Tensor
    """``[..., d_in]`` reconstruction in the input's units."""
    codes: Codes
    """The k active latents per row."""
    fvu: Tensor
    """Scalar fraction of variance unexplained of the main TopK reconstruction."""
    auxk_fvu: Tensor | None = None
    """AuxK loss: FVU of reconstructing the residual ``x - x_hat`` from the top ``k_aux`` dead latents
    (None when no dead mask was given or no latent is dead)."""
    multi_topk_fvu: Tensor | None = None
    """FVU of the reconstruction from the top ``4k`` latents (Multi-TopK; None when disabled)."""
    penalty: Tensor | None = None
    """A scalar the variant adds to its training loss beyond reconstruction (e.g. :class:`~saehook.JumpReLUSAE`'s
    L0 penalty ``sparsity_coef * mean L0``), added as is by :class:`~saehook.SAETrainer`; None: nothing."""
    recon_loss: Tensor | None = None
    """The reconstruction term training minimises in place of ``fvu``, for a variant that trains on more than its
    final reconstruction (e.g. :class:`~saehook.matryoshka.MatryoshkaBatchTopKSAE`: the mean of its prefixes'
    FVUs); None: ``fvu`` itself."""


class SAEConfigError(ValueError):
    """An autoencoder configuration or checkpoint that cannot be used, with the reason."""


def _check_sizes(d_in: int, n_latents: int, k: int) -> None:
    for name, v in (("d_in", d_in), ("n_latents", n_latents), ("k", k)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise SAEConfigError(f"{name} must be a positive integer, got {v!r}")
    if k > n_latents:
        raise SAEConfigError(f"k={k} is larger than n_latents={n_latents}: TopK needs k <= n_latents")


def total_variance(x: Tensor) -> Tensor:
    """``sum_i ||x_i - mean(x)||^2`` over the rows of ``x [..., d]``."""
    x2 = x.reshape(-1, x.shape[-1])
    return (x2 - x2.mean(0)).pow(2).sum()


def fvu(x: Tensor, x_hat: Tensor, variance: Tensor | None = None) -> Tensor:
    """Fraction of variance unexplained: ``sum ||x - x_hat||^2 / sum ||x - mean(x)||^2`` over rows
    (``variance`` replaces the denominator, e.g. the variance of the whole batch across ranks)."""
    x2 = x.reshape(-1, x.shape[-1])
    err = (x2 - x_hat.reshape(x2.shape)).pow(2).sum()
    var = total_variance(x2) if variance is None else variance
    return err / var.clamp_min(torch.finfo(var.dtype).tiny)


def shard_weights_name(shard: int, shards: int | str) -> str:
    """``sae.shard-<s>-of-<S>.safetensors``: the file of shard ``s``'s weights in a sharded save."""
    return f"sae.shard-{shard}-of-{shards}.safetensors"


def read_sharded_weights(path: Path, cfg: dict) -> dict[str, Tensor]:
    """The whole autoencoder's tensors from the ``latent_shards`` files of a sharded save: ``W_enc``, ``b_enc``,
    ``W_dec`` concatenated in shard order, ``b_dec`` and ``input_scale`` from shard 0. Raises ``SAEConfigError``
    naming a missing or unreadable shard."""
    S = cfg["latent_shards"]
    if isinstance(S, bool) or not isinstance(S, int) or S < 1:
        raise SAEConfigError(f"{path / CFG_NAME} has latent_shards={S!r}; expected a positive integer")
    parts = []
    for s in range(S):
        f = path / shard_weights_name(s, S)
        if not f.is_file():
            raise SAEConfigError(f"{f} is missing: a save split over {S} shards needs every "
                                 f"{shard_weights_name(0, S).replace('-0-', '-<s>-')}; found "
                                 f"{sorted(p.name for p in path.iterdir())}")
        try:
            parts.append(load_file(str(f)))
        except (SafetensorError, OSError) as e:
            raise SAEConfigError(f"{f} is unreadable or truncated ({e})") from None
    out = dict(parts[0])
    for name in ("W_enc", "b_enc", "W_dec"):
        out[name] = torch.cat([p[name] for p in parts])
    return out


class TopKSAE(nn.Module):
    """A TopK sparse autoencoder with tied (parallel) initialisation.

    Args:
        d_in: width of the activations it reads (the hookpoint's hidden size).
        n_latents: number of latents (dictionary size).
        k: number of active latents per row.
        multi_topk: also train the top ``4k`` reconstruction (loss ``L(k) + L(4k)/8``), which makes
            the code usable at other k at test time.
        dtype: of the parameters (default float32).
        device: of the parameters (default CPU).

    Parameters: ``W_enc [n_latents, d_in]``, ``b_enc [n_latents]``, ``W_dec [n_latents, d_in]``,
    ``b_dec [d_in]``; buffer ``input_scale``: a scalar (1 = no normalisation) or, after
    ``set_input_scale_(x, mode="channel")``, a ``[d_in]`` vector of per-channel scales.
    """

    def __init__(
        self,
        d_in: int,
        n_latents: int,
        k: int,
        *,
        multi_topk: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        _check_sizes(d_in, n_latents, k)
        self.d_in, self.n_latents, self.k, self.multi_topk = d_in, n_latents, k, bool(multi_topk)
        kw = dict(dtype=dtype or torch.float32, device=device)
        # Paper init: decoder rows are random unit vectors, the encoder starts parallel to them.
        W_dec = torch.randn(n_latents, d_in, **kw)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)
        self.W_enc = nn.Parameter(W_dec.clone())
        self.b_enc = nn.Parameter(torch.zeros(n_latents, **kw))
        self.b_dec = nn.Parameter(torch.zeros(d_in, **kw))
        self.register_buffer("input_scale", torch.ones((), **kw))
        self.metadata: dict = {}
        """Free-form JSON-serialisable facts saved in cfg.json (model, hookpoint, tokens trained...)."""

    # ------------------------------------------------------------------ the math
    def _check_width(self, x: Tensor) -> None:
        if x.shape[-1] != self.d_in:
            raise ValueError(
                f"input width {x.shape[-1]} does not match the autoencoder's d_in={self.d_in} "
                f"(input shape {tuple(x.shape)})"
            )

    @property
    def per_channel_scale(self) -> bool:
        """Whether ``input_scale`` is a ``[d_in]`` vector (per-channel standardisation) rather than a scalar."""
        return self.input_scale.dim() == 1

    # ------------------------------------------------------------------ the normalisation (what subclasses change)
    format_name = FORMAT
    """The ``"format"`` of this class's ``cfg.json``; :meth:`load` refuses any other."""
    architecture = "topk"
    """The ``"architecture"`` of this class's ``cfg.json`` (:mod:`saehook.architectures`): which dictionary variant
    it is; :meth:`load` refuses another, :func:`saehook.load` picks the class from it."""

    transcoder = False
    """Whether it maps a module's input to its output (:class:`~saehook.transcoder.Transcoder`): attach then reads
    both."""

    @property
    def train_width(self) -> int:
        """Width of the rows training feeds it: ``d_in`` (a transcoder's: its input and output side by side)."""
        return self.d_in
    per_row_scale = False
    """True for subclasses whose normalisation depends on each row (e.g. a layer norm), so that turning a
    latent-space change into activation units needs that row's code (see :meth:`unscale`)."""

    def normalise(self, x: Tensor) -> tuple[Tensor, object]:
        """``x [..., d_in] -> (x' [..., d_in], state)``: the input in normalised units, in the autoencoder's
        dtype, and what :meth:`unnormalise` needs to undo it. Here ``x' = s x`` and ``state`` is None (``s`` is
        the ``input_scale`` buffer). Every other method (encode, decode, forward, training) goes through this
        pair, so a subclass with another normalisation overrides only them (and :meth:`make_codes` /
        :meth:`codes_state` when the state travels with the codes). Raises ``ValueError`` when the width is not
        ``d_in``."""
        self._check_width(x)
        return x.to(self.W_enc.dtype) * self.input_scale, None

    def unnormalise(self, x_hat: Tensor, state: object = None) -> Tensor:
        """``x_hat' [..., d_in]`` in normalised units -> the input's units: ``x_hat' / s`` (``state`` unused)."""
        return x_hat / self.input_scale

    def make_codes(self, values: Tensor, indices: Tensor, state: object = None) -> Codes:
        """The :class:`Codes` that :meth:`encode` and :meth:`forward` return for rows normalised with ``state``;
        here plain ``Codes(values, indices)`` (a subclass whose :meth:`unnormalise` needs the state attaches it)."""
        return Codes(values, indices)

    def codes_state(self, codes: Codes) -> object:
        """The normalisation state :meth:`decode` hands to :meth:`unnormalise` for ``codes``; here None."""
        return None

    def pre_acts(self, x: Tensor) -> Tensor:
        """``W_enc (x' - b_dec) + b_enc`` with ``x'`` = :meth:`normalise` ``(x)`` (``s x`` here): the dense
        ``[..., n_latents]`` pre-activations."""
        return F.linear(self.normalise(x)[0] - self.b_dec, self.W_enc, self.b_enc)

    def _topk(self, pre: Tensor, k: int) -> Codes:
        values, indices = pre.topk(k, dim=-1, sorted=True)
        return Codes(values.relu(), indices)  # ReLU on the k survivors only

    def encode(self, x: Tensor, k: int | None = None) -> Codes:
        """``x [..., d_in] -> Codes(values [..., k], indices [..., k])`` (:meth:`make_codes`, carrying the
        normalisation state when the class needs one to decode); ``k`` defaults to ``self.k``."""
        xn, state = self.normalise(x)
        codes = self._topk(F.linear(xn - self.b_dec, self.W_enc, self.b_enc), k or self.k)
        return self.make_codes(codes.values, codes.indices, state)

    def _decode_normalised(self, codes: Codes, bias: bool = True) -> Tensor:
        # sum_j values[j] * W_dec[indices[j]] via embedding_bag: touches only the k active rows. Under
        # autograd, TopKDecode's backward stays sparse too (sampled dot products and a CSR product).
        shape = codes.indices.shape
        idx = codes.indices.reshape(-1, shape[-1])
        vals = codes.values.reshape(-1, shape[-1]).to(self.W_dec.dtype)
        if torch.is_grad_enabled() and (vals.requires_grad or self.W_dec.requires_grad):
            from .kernels import TopKDecode

            out = TopKDecode.apply(vals, idx, self.W_dec)
        else:  # the op saehook::decode: embedding_bag on CPU, a Triton kernel on CUDA
            from .ops import decode

            out = decode(vals, idx, self.W_dec)
        out = out.reshape(*shape[:-1], self.d_in)
        return out + self.b_dec if bias else out

    def unscale(self, delta: Tensor, codes: Codes | None = None) -> Tensor:
        """Turn a change made in normalised units (e.g. ``v * W_dec[j]``) into activation units: ``/ s``
        (channel by channel when ``s`` is per-channel)."""
        return delta / self.input_scale

    def decode(self, codes: Codes) -> Tensor:
        """``Codes -> x_hat [..., d_in]`` = :meth:`unnormalise` ``(W_dec^T z + b_dec)`` (``/ s`` here), from the
        k active rows only."""
        return self.unnormalise(self._decode_normalised(codes), self.codes_state(codes))

    def forward(self, x: Tensor, dead_mask: Tensor | None = None, k_aux: int | None = None,
                matmul_dtype: torch.dtype | None = None, variance_fn=None) -> SAEOutput:
        """Encode, decode and measure. With ``dead_mask [n_latents]`` (bool), also the AuxK loss:

        ``e = x' - x_hat'`` (detached), ``e_hat = W_dec^T TopK_{k_aux}(dead pre-activations)``,
        ``auxk_fvu = ||e - e_hat||^2 / ||e - mean(e)||^2``. ``k_aux`` defaults to ``d_in // 2``.

        The encoder runs as one autograd function (:mod:`saehook.kernels`): only the pre-activation
        matmul is dense (in ``matmul_dtype`` if given, e.g. bfloat16); the backward touches the k selected
        latents per row. Gradients equal those of the dense formula. ``variance_fn`` maps rows to the
        FVU denominator (default :func:`total_variance`; data-parallel training passes a global one).
        Everything is measured on ``x' = normalise(x)``; ``x_hat`` is :meth:`unnormalise`'d to the input's units.
        """
        from .kernels import TopKEncode

        lead = x.shape[:-1]
        xn_lead, state = self.normalise(x)
        xn = xn_lead.reshape(-1, self.d_in)
        k_big = min(4 * self.k, self.n_latents) if self.multi_topk else self.k
        dm, n_aux = None, 0
        if dead_mask is not None:
            n_dead = int(dead_mask.sum())
            if n_dead > 0:
                dm, n_aux = dead_mask.to(xn.device), min(k_aux or self.d_in // 2, n_dead)
        vals, idx, aux_vals, aux_idx = TopKEncode.apply(xn, self.W_enc, self.b_enc, self.b_dec, k_big, dm, n_aux,
                                                        matmul_dtype)
        codes = Codes(vals[:, : self.k], idx[:, : self.k])
        xn_hat = self._decode_normalised(codes)
        var = (variance_fn or total_variance)
        var_x = var(xn)
        main = fvu(xn, xn_hat, var_x)
        multi = fvu(xn, self._decode_normalised(Codes(vals, idx)), var_x) if self.multi_topk else None
        auxk = None
        if dm is not None:
            e = (xn - xn_hat).detach()
            auxk = fvu(e, self._decode_normalised(Codes(aux_vals, aux_idx), bias=False), var(e))
        x_hat = self.unnormalise(xn_hat.reshape(*lead, self.d_in), state)
        return SAEOutput(x_hat, self.make_codes(codes.values.reshape(*lead, self.k),
                                                codes.indices.reshape(*lead, self.k), state), main, auxk, multi)

    # ------------------------------------------------------------------ in-place maintenance
    @torch.no_grad()
    def unit_norm_decoder_(self) -> None:
        """Rescale every decoder row to unit L2 norm."""
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(torch.finfo(self.W_dec.dtype).eps)

    @torch.no_grad()
    def remove_parallel_decoder_grad_(self) -> None:
        """Project out of ``W_dec.grad`` the component parallel to each (unit) decoder row:
        ``g_i <- g_i - (g_i . w_i) w_i``, so the Adam step does not fight the renormalisation."""
        if self.W_dec.grad is None:
            return
        w, g = self.W_dec, self.W_dec.grad
        # the n dot products as a batched [1, d] x [d, 1] product, then one in-place addcmul: no [n, d] temporary
        # (1/8 of a training step's state) and 4.6x faster than (g * w).sum(1) * w at n = 65,536, d = 576 on CPU
        dots = torch.bmm(g.unsqueeze(1), w.unsqueeze(2)).squeeze(2)  # [n, 1]: g_i . w_i
        g.addcmul_(w, dots, value=-1)

    @torch.no_grad()
    def set_input_scale_(self, x: Tensor, mode: str = "scalar") -> float | Tensor:
        """Set the input scale from a sample ``x [N, d_in]``; returns it.

        ``mode="scalar"``: one ``s`` with ``E ||s x||^2 = d_in`` (rows then have RMS 1 per dimension, whatever
        the model's residual norm); returns a float.
        ``mode="channel"``: ``s_c = 1 / std_c`` per channel (a ``[d_in]`` buffer, returned), so every channel of
        ``s x`` has variance 1 and ``E ||s x - mean(s x)||^2 = d_in``; the channel means are left to ``b_dec``.
        A channel whose std is below ``1e-4`` of the RMS std (e.g. a constant one) gets that floor instead.
        """
        if mode not in ("scalar", "channel"):
            raise ValueError(f"input scale mode must be 'scalar' or 'channel', got {mode!r}")
        self._check_width(x)
        x = x.reshape(-1, self.d_in)
        if mode == "scalar":
            x = x.float()
            s = math.sqrt(self.d_in / x.pow(2).sum(-1).mean().item())
            if not math.isfinite(s) or s <= 0:
                raise ValueError(f"cannot set an input scale from this sample (got scale {s})")
            self._set_scale_shape(())
            self.input_scale.fill_(s)
            return s
        if len(x) < 2:
            raise ValueError(f"a per-channel input scale needs at least 2 rows to estimate stds, got {len(x)}")
        std = x.double().std(0, unbiased=False)
        rms = std.pow(2).mean().sqrt()
        if not (math.isfinite(rms.item()) and rms.item() > 0):
            raise ValueError(f"cannot set a per-channel input scale from this sample (RMS channel std {rms.item()})")
        self._set_scale_shape((self.d_in,))
        self.input_scale.copy_(1.0 / std.clamp_min(1e-4 * rms))
        return self.input_scale

    def _set_scale_shape(self, shape: tuple[int, ...]) -> None:
        # A scalar and a per-channel scale are one buffer of shape [] or [d_in]; swap it when the shape changes.
        if tuple(self.input_scale.shape) != tuple(shape):
            old = self.input_scale
            self.input_scale = torch.ones(shape, dtype=old.dtype, device=old.device)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # Loading a per-channel scale into a scalar one (or back), e.g. on resume, takes the saved shape.
        t = state_dict.get(prefix + "input_scale")
        if isinstance(t, Tensor) and tuple(t.shape) in ((), (self.d_in,)):
            self._set_scale_shape(tuple(t.shape))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    @torch.no_grad()
    def init_b_dec_(self, x: Tensor, max_iter: int = 100, tol: float = 1e-5, *,
                    method: str = "geometric_median") -> Tensor:
        """Set ``b_dec`` from a sample ``x [N, d_in]`` in normalised units (``x' = normalise(x)``, ``s x`` here):
        ``method="geometric_median"`` (Weiszfeld iterations, the paper) or ``"mean"`` (the mean of ``x'``).
        Call it after the input scale is set. Returns ``b_dec``; raises ``ValueError`` for another method."""
        if method not in ("geometric_median", "mean"):
            raise ValueError(f"init_b_dec_ method must be 'geometric_median' or 'mean', got {method!r}")
        xn = self.normalise(x.reshape(-1, x.shape[-1]))[0]
        if method == "mean":
            self.b_dec.copy_(xn.float().mean(0))
        else:
            self.b_dec.copy_(geometric_median(xn, max_iter=max_iter, tol=tol))
        return self.b_dec

    # ------------------------------------------------------------------ persistence
    def config(self) -> dict:
        """The JSON-serialisable configuration written to ``cfg.json``."""
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "architecture": self.architecture,
            "d_in": self.d_in,
            "n_latents": self.n_latents,
            "k": self.k,
            "multi_topk": self.multi_topk,
            "dtype": str(self.W_enc.dtype).removeprefix("torch."),
            # a per-channel scale lives in sae.safetensors only; cfg.json says which kind it is
            "input_scale": "per_channel" if self.per_channel_scale else float(self.input_scale),
            "metadata": self.metadata,
        }

    def to_files(self) -> dict[str, bytes]:
        """``{"cfg.json": ..., "sae.safetensors": ...}``: everything :meth:`save` writes, serialised in memory.
        Raises ``TypeError`` / ``ValueError`` when ``metadata`` holds a value JSON cannot encode."""
        text = atomic.json_bytes(self.config(), indent=2, sort_keys=True)
        weights = atomic.safetensors_bytes(self.state_dict(), metadata={"format": FORMAT})
        return {CFG_NAME: text, WEIGHTS_NAME: weights}

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path/cfg.json`` and ``path/sae.safetensors`` (nothing pickled) as one unit.

        Both files are serialised in memory, written into a temporary sibling folder and swapped in together
        (:func:`saehook.atomic.write_folder`): a failure or a crash at any point leaves the previous save
        loadable, never new weights under an old config. Other files already in ``path`` are kept.
        """
        return atomic.write_folder(path, self.to_files())

    @classmethod
    def load(
        cls, path: str | os.PathLike, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> TopKSAE:
        """Load a directory written by :meth:`save`, validating the config and every tensor shape."""
        path = atomic.committed(path)
        cfg_file, w_file = path / CFG_NAME, path / WEIGHTS_NAME
        if not w_file.is_file() and path.is_dir():  # a save split by latents (saehook.latent_shard): shard 0's file
            w_file = next(iter(sorted(path.glob(shard_weights_name(0, "*")))), w_file)
        for f in (cfg_file, w_file):
            if not f.is_file():
                found = sorted(p.name for p in path.iterdir()) if path.is_dir() else "no such directory"
                raise FileNotFoundError(f"{f} is missing; found in {path}: {found}")
        try:
            cfg = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise SAEConfigError(f"{cfg_file} is not valid JSON ({e})") from None
        missing = [key for key in ("d_in", "n_latents", "k") if key not in cfg]
        if missing:
            raise SAEConfigError(f"{cfg_file} lacks {missing}; it has {sorted(cfg)}")
        if cfg.get("format", FORMAT) != cls.format_name:
            raise SAEConfigError(f"{cfg_file} has format {cfg.get('format', FORMAT)!r}, expected {cls.format_name!r} "
                                 f"for {cls.__name__}; saehook.formats.load reads either")
        if cfg.get("architecture", "topk") != cls.architecture:
            raise SAEConfigError(f"{cfg_file} holds a {cfg.get('architecture')!r} autoencoder, not "
                                 f"{cls.architecture!r} ({cls.__name__}): read it with saehook.load, which picks its "
                                 "class")
        try:
            tensors = read_sharded_weights(path, cfg) if "latent_shards" in cfg else load_file(w_file)
        except (SafetensorError, OSError) as e:
            raise SAEConfigError(f"{w_file} is unreadable or truncated ({e})") from None
        file_dtype = getattr(torch, cfg.get("dtype", "float32"), torch.float32)
        sae = cls(cfg["d_in"], cfg["n_latents"], cfg["k"], multi_topk=cfg.get("multi_topk", False),
                  dtype=dtype or file_dtype, device="meta")
        scale = cfg.get("input_scale")
        if isinstance(scale, str) and scale != "per_channel":
            raise SAEConfigError(f"{cfg_file} has input_scale {scale!r}; expected a number or 'per_channel'")
        if scale == "per_channel":
            sae._set_scale_shape((sae.d_in,))
        expected = {n: tuple(t.shape) for n, t in sae.state_dict().items()}
        got = {n: tuple(t.shape) for n, t in tensors.items()}
        if expected != got:
            diff = {n: (expected.get(n), got.get(n)) for n in expected.keys() | got.keys()
                    if expected.get(n) != got.get(n)}
            raise SAEConfigError(
                f"{w_file} does not match {cfg_file} (d_in={cfg['d_in']}, n_latents={cfg['n_latents']}): "
                f"tensor (expected shape, file shape): {diff}"
            )
        sae = sae.to_empty(device=device or "cpu")
        sae.load_state_dict({n: t.to(dtype or file_dtype) for n, t in tensors.items()})
        sae.metadata = dict(cfg.get("metadata", {}))
        return sae

    def extra_repr(self) -> str:
        """The sizes and input scale, shown in ``repr(sae)``."""
        s = self.input_scale
        scale = (f"per-channel in [{float(s.min()):.4g}, {float(s.max()):.4g}]" if self.per_channel_scale
                 else f"{float(s):.4g}")
        return (f"d_in={self.d_in}, n_latents={self.n_latents}, k={self.k}, multi_topk={self.multi_topk}, "
                f"input_scale={scale}")


@torch.no_grad()
def geometric_median(x: Tensor, max_iter: int = 100, tol: float = 1e-5) -> Tensor:
    """The point minimising ``sum_i ||x_i - m||`` (Weiszfeld iterations from the mean), ``x [N, d]``."""
    x = x.float()
    m = x.mean(0)
    for _ in range(max_iter):
        w = 1.0 / (x - m).norm(dim=1).clamp_min(1e-8)
        new = (w[:, None] * x).sum(0) / w.sum()
        done = (new - m).norm() <= tol * m.norm().clamp_min(1.0)
        m = new
        if done:
            break
    return m
