"""Transcoders and skip-transcoders: a sparse map from a module's input to its output.

A transcoder (Dunefsky et al. 2024, "Transcoders Find Interpretable LLM Feature Circuits") replaces a module,
usually an MLP, by a TopK dictionary that reads the module's input ``x`` and predicts its output ``y``; a
skip-transcoder (Paulo et al. 2025, "Transcoders Beat Sparse Autoencoders for Interpretability") adds a dense
linear skip path. With input and output scales ``s_in`` and ``s_out`` (scalars, fitted like
:class:`~saehook.TopKSAE`'s ``input_scale``):

    x' = s_in x,  y' = s_out y
    z  = ReLU(TopK(W_enc x' + b_enc))              (no b_dec subtracted: the input and output spaces differ)
    y_hat' = W_dec^T z + b_dec  (+ W_skip x')      (skip-transcoder)
    y_hat  = y_hat' / s_out
    fvu    = sum ||y' - y_hat'||^2 / sum ||y' - mean(y')||^2

This is sparsify's ``transcode=True`` (and ``skip_connection=True``) math, with saehook's scales on top.

Attached at a module (``saehook.attach(model, {"model.layers.3.mlp": Transcoder(d, n, k)})``), the hook reads the
module's input and output in one forward: the latents are the code of the input, :meth:`~saehook.Hooked.splice`
replaces the output by ``y_hat`` (with ``keep_error``: plus ``y - y_hat``, which gives the clean output back), and
steering adds ``v W_dec[j] / s_out`` to the output. Training feeds the trainer rows ``[x, y]`` side by side
(``train_width = 2 d``), so the one forward pass, the shuffle buffer and :class:`~saehook.SAETrainer` are those of
every other autoencoder. Input and output have the same width (an MLP in a residual stream).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .sae import Codes, SAEOutput, TopKSAE, fvu, geometric_median, total_variance


class TranscoderCodes(Codes):
    """:class:`~saehook.Codes` plus a skip-transcoder's skip term ``W_skip x'`` (``[..., d]``, normalised output
    units) of the rows they encode, which :meth:`Transcoder.decode` adds; None for a plain transcoder."""

    skip: Tensor | None = None

    def __new__(cls, values: Tensor, indices: Tensor, skip: Tensor | None = None):
        self = super().__new__(cls, values, indices)
        self.skip = skip
        return self

    def __getnewargs__(self):
        return (self.values, self.indices, self.skip)


class Transcoder(TopKSAE):
    """A TopK transcoder from a module's input to its output (module docstring: the math).

    Args: as :class:`~saehook.TopKSAE` (``d_in``: the width of the module's input and of its output).
    Parameters: those of ``TopKSAE`` (``W_dec [n, d]`` writes the output, ``b_dec [d]`` is the output's bias) and
    buffer ``output_scale`` (scalar ``s_out``); :class:`SkipTranscoder` adds ``W_skip [d, d]``.
    """

    architecture = "transcoder"
    transcoder = True
    """Read by :func:`saehook.attach`: the hook reads the module's input and its output."""

    def __init__(self, d_in: int, n_latents: int, k: int, **kw) -> None:
        super().__init__(d_in, n_latents, k, **kw)
        self.register_buffer("output_scale", torch.ones((), dtype=self.W_enc.dtype, device=self.W_enc.device))

    @property
    def train_width(self) -> int:
        """``2 d``: training rows hold the module's input and output side by side, ``[x, y]``."""
        return 2 * self.d_in

    def split(self, xy: Tensor) -> tuple[Tensor, Tensor]:
        """``[x, y] [..., 2d] -> (x, y)``; raises ``ValueError`` for another width."""
        if xy.shape[-1] != 2 * self.d_in:
            raise ValueError(f"a transcoder trains on rows [input, output] of width 2 x {self.d_in}, got width "
                             f"{xy.shape[-1]} (shape {tuple(xy.shape)})")
        return xy[..., : self.d_in], xy[..., self.d_in:]

    # ------------------------------------------------------------------ the math
    def _skip(self, xn: Tensor) -> Tensor | None:
        return None

    def _input(self, x: Tensor) -> Tensor:
        """The module's input from ``x`` (the input ``[..., d]``, or training rows ``[x, y]``), normalised."""
        if x.shape[-1] == 2 * self.d_in:
            x = self.split(x)[0]
        return self.normalise(x)[0]

    def pre_acts(self, x: Tensor) -> Tensor:
        """``W_enc s_in x + b_enc``: dense ``[..., n_latents]`` pre-activations of the module's input."""
        return F.linear(self._input(x), self.W_enc, self.b_enc)

    def encode(self, x: Tensor, k: int | None = None) -> TranscoderCodes:
        """The module's input ``x [..., d]`` (or training rows ``[x, y]``) -> its code (with the skip term)."""
        xn = self._input(x)
        top = self._topk(F.linear(xn, self.W_enc, self.b_enc), k or self.k)
        return TranscoderCodes(top.values, top.indices, self._skip(xn))

    def codes_state(self, codes: Codes) -> Tensor | None:
        """The skip term a code carries (None for a plain transcoder or a bare ``Codes``)."""
        return getattr(codes, "skip", None)

    def decode(self, codes: Codes) -> Tensor:
        """``Codes -> y_hat [..., d] = (W_dec^T z + b_dec + skip) / s_out``, the predicted module output. A
        skip-transcoder's ``Codes`` must come from :meth:`encode` (they carry the skip term)."""
        out = self._decode_normalised(codes)
        skip = self.codes_state(codes)
        if skip is None and isinstance(self, SkipTranscoder):
            raise ValueError("a skip-transcoder decodes the codes its encode returned (they carry W_skip x); a bare "
                             "Codes(values, indices) has no input to take the skip path from")
        return (out if skip is None else out + skip) / self.output_scale

    def unscale(self, delta: Tensor, codes: Codes | None = None) -> Tensor:
        """A change of the normalised output (e.g. ``v * W_dec[j]``) in the output's units: ``/ s_out``."""
        return delta / self.output_scale

    def forward(self, x: Tensor, dead_mask: Tensor | None = None, k_aux: int | None = None,
                matmul_dtype: torch.dtype | None = None, variance_fn=None) -> SAEOutput:
        """Training rows ``x = [input, output] [..., 2d]`` -> the predicted output and the FVU of the output (and
        AuxK, Multi-TopK as :meth:`saehook.TopKSAE.forward`, on the output's residual). ``x_hat`` is the predicted
        output ``[..., d]``."""
        from .kernels import TopKEncode

        lead = x.shape[:-1]
        x_in, y = self.split(x.reshape(-1, x.shape[-1]))
        xn = self.normalise(x_in)[0]
        yn = y.to(self.W_enc.dtype) * self.output_scale
        k_big = min(4 * self.k, self.n_latents) if self.multi_topk else self.k
        dm, n_aux = None, 0
        if dead_mask is not None and int(dead_mask.sum()) > 0:
            dm, n_aux = dead_mask.to(xn.device), min(k_aux or self.d_in // 2, int(dead_mask.sum()))
        no_shift = torch.zeros_like(self.b_dec, requires_grad=False)  # the encoder reads x' itself
        vals, idx, aux_vals, aux_idx = TopKEncode.apply(xn, self.W_enc, self.b_enc, no_shift, k_big, dm, n_aux,
                                                        matmul_dtype)
        codes = Codes(vals[:, : self.k], idx[:, : self.k])
        skip = self._skip(xn)
        extra = self.b_dec if skip is None else self.b_dec + skip
        yn_hat = self._decode_normalised(codes, bias=False) + extra
        var = variance_fn or total_variance
        var_y = var(yn)
        main = fvu(yn, yn_hat, var_y)
        multi = (fvu(yn, self._decode_normalised(Codes(vals, idx), bias=False) + extra, var_y)
                 if self.multi_topk else None)
        auxk = None
        if dm is not None:
            e = (yn - yn_hat).detach()
            auxk = fvu(e, self._decode_normalised(Codes(aux_vals, aux_idx), bias=False), var(e))
        y_hat = (yn_hat / self.output_scale).reshape(*lead, self.d_in)
        out_codes = TranscoderCodes(codes.values.reshape(*lead, self.k), codes.indices.reshape(*lead, self.k),
                                    None if skip is None else skip.reshape(*lead, self.d_in))
        return SAEOutput(y_hat, out_codes, main, auxk, multi)

    # ------------------------------------------------------------------ fitted from data
    @torch.no_grad()
    def set_input_scale_(self, x: Tensor, mode: str = "scalar") -> float:
        """Both scales from training rows ``[x, y] [N, 2d]``: ``s_in`` with ``E ||s_in x||^2 = d`` and ``s_out``
        with ``E ||s_out y||^2 = d``; returns ``s_in``. Only ``mode="scalar"``: a per-channel scale is refused."""
        if mode != "scalar":
            raise ValueError(f"a transcoder takes scalar input and output scales (normalize='scalar' or 'none'), "
                             f"got mode {mode!r}")
        x_in, y = self.split(x.reshape(-1, x.shape[-1]))
        s_out = TopKSAE.set_input_scale_(self, y, mode)
        self.output_scale.fill_(s_out)
        return TopKSAE.set_input_scale_(self, x_in, mode)

    @torch.no_grad()
    def init_b_dec_(self, x: Tensor, max_iter: int = 100, tol: float = 1e-5, *,
                    method: str = "geometric_median") -> Tensor:
        """``b_dec`` (the output's bias) from training rows ``[x, y] [N, 2d]``: the geometric median (or the mean) of
        ``s_out y``."""
        if method not in ("geometric_median", "mean"):
            raise ValueError(f"init_b_dec_ method must be 'geometric_median' or 'mean', got {method!r}")
        yn = self.split(x.reshape(-1, x.shape[-1]))[1].float() * float(self.output_scale)
        self.b_dec.copy_(yn.mean(0) if method == "mean" else geometric_median(yn, max_iter=max_iter, tol=tol))
        return self.b_dec

    def extra_repr(self) -> str:
        """Sizes and both scales."""
        return (f"d={self.d_in}, n_latents={self.n_latents}, k={self.k}, input_scale={float(self.input_scale):.4g}, "
                f"output_scale={float(self.output_scale):.4g}")


class SkipTranscoder(Transcoder):
    """A :class:`Transcoder` with a dense skip path ``W_skip [d, d]`` from the input to the output (Paulo et al.
    2025), initialised to zero: ``y_hat' = W_dec^T z + b_dec + W_skip x'``."""

    architecture = "skip_transcoder"

    def __init__(self, d_in: int, n_latents: int, k: int, **kw) -> None:
        super().__init__(d_in, n_latents, k, **kw)
        self.W_skip = nn.Parameter(torch.zeros(d_in, d_in, dtype=self.W_enc.dtype, device=self.W_enc.device))

    def _skip(self, xn: Tensor) -> Tensor:
        return F.linear(xn, self.W_skip)

