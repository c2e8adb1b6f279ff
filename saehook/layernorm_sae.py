"""A TopK autoencoder whose inputs are layer-normalised row by row, as OpenAI's released autoencoders
(and SAELens's ``normalize_activations="layer_norm"``) expect.

For one activation row ``x [d]`` (the statistics are exactly those of ``openai/sparse_autoencoder``'s ``LN``):

    mu  = mean(x)
    std = std(x)                      (unbiased, over the d coordinates)
    x'  = (x - mu) / (std + eps)      eps = 1e-5                       normalise(x) -> (x', (mu, std))
    z   = ReLU(TopK(W_enc (x' - b_dec) + b_enc))
    x_hat = (W_dec^T z + b_dec) * std + mu                             unnormalise(x_hat', (mu, std))

Only :meth:`~LayerNormTopKSAE.normalise` / :meth:`~LayerNormTopKSAE.unnormalise` differ from
:class:`~saehook.TopKSAE`: its forward (sparse kernels, ``matmul_dtype``, AuxK, ``variance_fn``), ``init_b_dec_``
and training are the parent's, applied to ``x'``. The loss is the FVU of ``x'`` (what these autoencoders were
trained on). Decoding needs the ``mu`` and ``std`` of the row that was encoded: :meth:`LayerNormTopKSAE.encode`
returns :class:`LNCodes`, a :class:`~saehook.Codes` (still a 2-tuple ``(values, indices)``) that also carries
them as attributes, and :meth:`LayerNormTopKSAE.decode` reads them from there. This works unchanged with
``saehook.attach``: its hook decodes exactly the codes ``encode`` returned.
"""

from __future__ import annotations

import json
import os
from typing import NamedTuple

import torch
from torch import Tensor

from . import atomic
from .sae import CFG_NAME, FORMAT_VERSION, Codes, SAEConfigError, TopKSAE

LN_FORMAT = "saehook.topk-layernorm"
LN_EPS = 1e-5


class RowStats(NamedTuple):
    """The layer-norm state of rows ``[..., d_in]``: what :meth:`LayerNormTopKSAE.unnormalise` needs."""

    mu: Tensor
    """``[..., 1]`` each row's mean."""
    std: Tensor
    """``[..., 1]`` each row's (unbiased) standard deviation."""


class LNCodes(Codes):
    """:class:`~saehook.Codes` plus the per-row layer-norm statistics of the rows they encode.

    ``mu`` and ``std`` are ``[..., 1]`` (``None`` when built without them, e.g. by ``Codes._make``). It is a
    plain 2-tuple for unpacking and indexing; rebuilding a ``Codes(values, indices)`` drops the statistics.
    """

    mu: Tensor | None = None
    std: Tensor | None = None

    def __new__(cls, values: Tensor, indices: Tensor, mu: Tensor | None = None, std: Tensor | None = None):
        self = super().__new__(cls, values, indices)
        self.mu, self.std = mu, std
        return self

    def __getnewargs__(self):
        return (self.values, self.indices, self.mu, self.std)


class LayerNormTopKSAE(TopKSAE):
    """A :class:`~saehook.TopKSAE` that layer-normalises each input row (see the module docstring).

    Same parameters as :class:`~saehook.TopKSAE`; ``input_scale`` stays 1 (the per-row normalisation
    replaces it). ``encode`` returns :class:`LNCodes`; ``decode(codes)`` un-normalises with the statistics
    they carry, or with explicit ``mu=`` / ``std=``. ``forward`` reports ``fvu`` in the normalised space;
    ``x_hat`` is in the input's units.

    Saved by :meth:`save` with ``"format": "saehook.topk-layernorm"`` in ``cfg.json``, which
    :meth:`TopKSAE.load` refuses (rather than silently dropping the normalisation); load it with
    :meth:`LayerNormTopKSAE.load` or :func:`saehook.formats.load`.
    """

    format_name = LN_FORMAT
    per_row_scale = True
    normalize = "layernorm"
    ln_eps = LN_EPS

    # ------------------------------------------------------------------ the normalisation
    def normalise(self, x: Tensor) -> tuple[Tensor, RowStats]:
        """``x [..., d_in] -> (x' = (x - mu) / (std + eps), RowStats(mu [..., 1], std [..., 1]))`` in the
        autoencoder's dtype (differentiable in ``x``). Raises ``ValueError`` when the width is not ``d_in``."""
        self._check_width(x)
        x = x.to(self.W_enc.dtype)
        mu = x.mean(-1, keepdim=True)
        xc = x - mu
        std = xc.std(-1, keepdim=True)
        return xc / (std + self.ln_eps), RowStats(mu, std)

    def unnormalise(self, x_hat: Tensor, state: RowStats | None = None) -> Tensor:
        """``x_hat' [..., d_in] -> x_hat' * std + mu`` with the statistics of the rows that were encoded.
        Raises ``ValueError`` without them."""
        if state is None:
            raise ValueError("LayerNormTopKSAE needs the mean and std of the rows that were encoded to un-normalise: "
                             "pass the state returned by normalise(x) (or decode the LNCodes from encode())")
        return x_hat * state.std + state.mu

    def make_codes(self, values: Tensor, indices: Tensor, state: RowStats | None = None) -> LNCodes:
        """:class:`LNCodes` carrying the rows' mean and std for :meth:`decode`."""
        mu, std = (None, None) if state is None else state
        return LNCodes(values, indices, mu, std)

    def codes_state(self, codes: Codes) -> RowStats:
        """The ``RowStats`` that ``codes`` carry; raises ``ValueError`` for codes without them."""
        mu, std = getattr(codes, "mu", None), getattr(codes, "std", None)
        if mu is None or std is None:
            raise ValueError(
                "LayerNormTopKSAE.decode needs the mean and std of the rows that were encoded: pass the codes "
                "returned by encode() (an LNCodes), or decode(codes, mu=..., std=...) with [..., 1] tensors"
            )
        return RowStats(mu, std)

    def layer_norm(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``x [..., d_in] -> (x', mu [..., 1], std [..., 1])``: :meth:`normalise`, unpacked."""
        xn, (mu, std) = self.normalise(x)
        return xn, mu, std

    def decode(self, codes: Codes, *, mu: Tensor | None = None, std: Tensor | None = None) -> Tensor:
        """``(W_dec^T z + b_dec) * std + mu`` with the row statistics carried by ``codes`` (from :meth:`encode`)
        unless given here."""
        if mu is not None or std is not None:
            codes = LNCodes(codes.values, codes.indices, getattr(codes, "mu", None) if mu is None else mu,
                            getattr(codes, "std", None) if std is None else std)
        return super().decode(codes)

    def unscale(self, delta: Tensor, codes: Codes) -> Tensor:
        """A change ``delta [..., d_in]`` of the normalised reconstruction, in the input's units:
        ``delta * std`` of each row (the plain TopKSAE equivalent is ``delta / input_scale``). What a steering
        or ablation edit should add per row; see "Layer norm in saehook" in docs/formats.md."""
        return delta * self.codes_state(codes).std

    # ------------------------------------------------------------------ training helpers
    @torch.no_grad()
    def set_input_scale_(self, x: Tensor, mode: str = "scalar") -> float:
        """No-op: layer norm already gives every row unit variance. Returns 1. ``mode="channel"`` is refused:
        a per-channel scale cannot be combined with the per-row layer norm."""
        if mode == "channel":
            raise ValueError("a LayerNormTopKSAE normalises each row by its own layer norm, so it cannot also take a "
                             "per-channel input scale; train it with normalize='scalar' (a no-op for it) or 'none'")
        if mode != "scalar":
            raise ValueError(f"input scale mode must be 'scalar' or 'channel', got {mode!r}")
        self._check_width(x)
        return 1.0

    # ------------------------------------------------------------------ persistence
    def config(self) -> dict:
        """:meth:`TopKSAE.config` plus the layer-norm format name and ``ln_eps``."""
        cfg = super().config()
        cfg.update(format=LN_FORMAT, normalize=self.normalize, ln_eps=self.ln_eps)
        return cfg

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str | None = None,
             dtype: torch.dtype | None = None) -> LayerNormTopKSAE:
        """Load a folder written by :meth:`save` (``"format": "saehook.topk-layernorm"``); the checks of
        :meth:`TopKSAE.load`, plus ``ln_eps`` and ``format_version`` from ``cfg.json``."""
        sae = super().load(path, device=device, dtype=dtype)
        cfg_file = atomic.committed(path) / CFG_NAME  # as TopKSAE.load: a killed save's aside copy
        cfg = json.loads(cfg_file.read_text())  # valid: TopKSAE.load has read it
        if cfg.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
            raise SAEConfigError(f"{cfg_file} has format_version {cfg['format_version']}; this saehook reads up to "
                                 f"{FORMAT_VERSION}")
        sae.ln_eps = float(cfg.get("ln_eps", LN_EPS))
        return sae

    def extra_repr(self) -> str:
        """The sizes and the layer-norm epsilon, shown in ``repr(sae)``."""
        return (f"d_in={self.d_in}, n_latents={self.n_latents}, k={self.k}, multi_topk={self.multi_topk}, "
                f"normalize=layernorm (eps={self.ln_eps:g})")
