"""A TopK autoencoder whose inputs are layer-normalised row by row, as OpenAI's released autoencoders
(and SAELens's ``normalize_activations="layer_norm"``) expect.

For one activation row ``x [d]`` (the statistics are exactly those of ``openai/sparse_autoencoder``'s ``LN``):

    mu  = mean(x)
    std = std(x)                      (unbiased, over the d coordinates)
    x'  = (x - mu) / (std + eps)      eps = 1e-5
    z   = ReLU(TopK(W_enc (x' - b_dec) + b_enc))
    x_hat = (W_dec^T z + b_dec) * std + mu

Decoding needs the ``mu`` and ``std`` of the row that was encoded. :meth:`LayerNormTopKSAE.encode` returns
:class:`LNCodes`, a :class:`~saehook.Codes` (still a 2-tuple ``(values, indices)``) that also carries them as
attributes, and :meth:`LayerNormTopKSAE.decode` reads them from there. This works unchanged with
``saehook.attach``: its hook decodes exactly the codes ``encode`` returned.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..sae import CFG_NAME, FORMAT, FORMAT_VERSION, WEIGHTS_NAME, Codes, SAEOutput, TopKSAE, fvu
from ._common import FormatError, build_sae, read_json, read_safetensors

LN_FORMAT = "saehook.topk-layernorm"
LN_EPS = 1e-5


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
    they carry, or with explicit ``mu=`` / ``std=``. ``forward`` reports ``fvu`` in the normalised space (the
    quantity these autoencoders were trained on); ``x_hat`` is in the input's units.

    Saved by :meth:`save` with ``"format": "saehook.topk-layernorm"`` in ``cfg.json``, which
    :meth:`TopKSAE.load` refuses (rather than silently dropping the normalisation); load it with
    :meth:`LayerNormTopKSAE.load` or :func:`saehook.formats.load`.
    """

    per_row_scale = True

    normalize = "layernorm"
    ln_eps = LN_EPS

    # ------------------------------------------------------------------ the math
    def layer_norm(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``x [..., d_in] -> (x', mu [..., 1], std [..., 1])`` in the autoencoder's dtype."""
        self._check_width(x)
        x = x.to(self.W_enc.dtype)
        mu = x.mean(-1, keepdim=True)
        xc = x - mu
        std = xc.std(-1, keepdim=True)
        return xc / (std + self.ln_eps), mu, std

    def _pre_normalised(self, xn: Tensor) -> Tensor:
        return F.linear(xn - self.b_dec, self.W_enc, self.b_enc)

    def pre_acts(self, x: Tensor) -> Tensor:
        """``W_enc (LN(x) - b_dec) + b_enc``: the dense ``[..., n_latents]`` pre-activations."""
        return self._pre_normalised(self.layer_norm(x)[0])

    def encode(self, x: Tensor, k: int | None = None) -> LNCodes:
        """The top-k code of ``LN(x)``, carrying each row's mean and std for :meth:`decode`."""
        xn, mu, std = self.layer_norm(x)
        codes = self._topk(self._pre_normalised(xn), k or self.k)
        return LNCodes(codes.values, codes.indices, mu, std)

    def decode(self, codes: Codes, *, mu: Tensor | None = None, std: Tensor | None = None) -> Tensor:
        """``(W_dec^T z + b_dec) * std + mu`` with the row statistics carried by ``codes`` (from :meth:`encode`)
        unless given here."""
        mu = getattr(codes, "mu", None) if mu is None else mu
        std = getattr(codes, "std", None) if std is None else std
        if mu is None or std is None:
            raise ValueError(
                "LayerNormTopKSAE.decode needs the mean and std of the rows that were encoded: pass the codes "
                "returned by encode() (an LNCodes), or decode(codes, mu=..., std=...) with [..., 1] tensors"
            )
        return self._decode_normalised(codes) * std + mu

    def unscale(self, delta: Tensor, codes: Codes) -> Tensor:
        """A change ``delta [..., d_in]`` of the normalised reconstruction, in the input's units:
        ``delta * std`` of each row (the plain TopKSAE equivalent is ``delta / input_scale``). What a steering
        or ablation edit should add per row; see "Layer norm in saehook" in docs/formats.md."""
        std = getattr(codes, "std", None)
        if std is None:
            raise ValueError("LayerNormTopKSAE.unscale needs codes from encode() (LNCodes carrying each row's std)")
        return delta * std

    def forward(self, x: Tensor, dead_mask: Tensor | None = None, k_aux: int | None = None,
                matmul_dtype: torch.dtype | None = None) -> SAEOutput:
        """As :meth:`TopKSAE.forward`, on ``LN(x)``: the FVUs are measured between ``LN(x)`` and its
        reconstruction; ``x_hat`` is un-normalised to the input's units."""
        xn, mu, std = self.layer_norm(x)
        pre = self._pre_normalised(xn)
        k_big = min(4 * self.k, self.n_latents) if self.multi_topk else self.k
        big = self._topk(pre, k_big)
        codes = LNCodes(big.values[..., : self.k], big.indices[..., : self.k], mu, std)
        xn_hat = self._decode_normalised(codes)
        main = fvu(xn, xn_hat)
        multi = fvu(xn, self._decode_normalised(big)) if self.multi_topk else None
        auxk = None
        if dead_mask is not None:
            n_dead = int(dead_mask.sum())
            if n_dead > 0:
                k_aux = min(k_aux or self.d_in // 2, n_dead)
                dead_pre = pre.masked_fill(~dead_mask.to(pre.device), float("-inf"))
                e = (xn - xn_hat).detach()
                auxk = fvu(e, self._decode_normalised(self._topk(dead_pre, k_aux), bias=False))
        return SAEOutput(xn_hat * std + mu, codes, main, auxk, multi)

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

    @torch.no_grad()
    def init_b_dec_(self, x: Tensor, max_iter: int = 100, tol: float = 1e-5) -> Tensor:
        """``b_dec`` <- the geometric median of ``LN(x)``."""
        from ..sae import geometric_median

        xn = self.layer_norm(x.reshape(-1, self.d_in))[0]
        self.b_dec.copy_(geometric_median(xn, max_iter=max_iter, tol=tol))
        return self.b_dec

    # ------------------------------------------------------------------ persistence
    def config(self) -> dict:
        """:meth:`TopKSAE.config` plus the layer-norm format name and ``ln_eps``."""
        cfg = super().config()
        cfg.update(format=LN_FORMAT, normalize=self.normalize, ln_eps=self.ln_eps)
        return cfg

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str | None = None,
             dtype: torch.dtype | None = None) -> LayerNormTopKSAE:
        """Load a folder written by :meth:`save` (``"format": "saehook.topk-layernorm"``)."""
        path = Path(path)
        cfg = read_json(path / CFG_NAME)
        if cfg.get("format") != LN_FORMAT:
            hint = " (a plain TopK autoencoder: use TopKSAE.load)" if cfg.get("format", FORMAT) == FORMAT else ""
            raise FormatError(f"{path / CFG_NAME} has format {cfg.get('format')!r}, expected {LN_FORMAT!r}{hint}")
        if cfg.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
            raise FormatError(f"{path / CFG_NAME} has format_version {cfg['format_version']}; this saehook reads "
                              f"up to {FORMAT_VERSION}")
        t = read_safetensors(path / WEIGHTS_NAME)
        names = {"W_enc", "b_enc", "W_dec", "b_dec", "input_scale"}
        if set(t) != names:
            raise FormatError(f"{path / WEIGHTS_NAME} has tensors {sorted(t)}, expected {sorted(names)}")
        for key in ("d_in", "n_latents"):
            if key in cfg and cfg[key] != {"d_in": t["W_enc"].shape[-1], "n_latents": t["W_enc"].shape[0]}[key]:
                raise FormatError(f"{path}: cfg.json says {key}={cfg[key]} but W_enc has shape "
                                  f"{tuple(t['W_enc'].shape)}")
        file_dtype = getattr(torch, str(cfg.get("dtype", "float32")), None)
        sae = build_sae(t["W_enc"], t["b_enc"], t["W_dec"], t["b_dec"], cfg.get("k"), where=str(path),
                        multi_topk=bool(cfg.get("multi_topk", False)), cls=cls,
                        dtype=dtype or (file_dtype if isinstance(file_dtype, torch.dtype) else None),
                        device=device, metadata=cfg.get("metadata", {}))
        sae.ln_eps = float(cfg.get("ln_eps", LN_EPS))
        return sae

    def extra_repr(self) -> str:
        """The sizes and the layer-norm epsilon, shown in ``repr(sae)``."""
        return (f"d_in={self.d_in}, n_latents={self.n_latents}, k={self.k}, multi_topk={self.multi_topk}, "
                f"normalize=layernorm (eps={self.ln_eps:g})")
