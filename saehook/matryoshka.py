"""The Matryoshka BatchTopK autoencoder of Bussmann et al. (2025), "Learning Multi-Level Features with Matryoshka
Sparse Autoencoders".

A :class:`~saehook.batchtopk.BatchTopKSAE` whose dictionary is nested: prefixes ``m_1 < m_2 < ... < m_P = n``
of the latents (default ``n/16, n/8, n/4, n/2, n``, sizes below 1 dropped; ``prefixes`` in ``cfg.json``) must
each reconstruct the input alone. With ``z`` the BatchTopK code of the whole dictionary (the same selection as
BatchTopK, over all ``n`` latents) and ``x'`` the normalised rows:

    x_hat'_p = b_dec + sum_{j < m_p} z_j W_dec[j]                   (prefix p: its own latents among the selected)
    FVU_p    = sum ||x' - x_hat'_p||^2 / sum ||x' - mean(x')||^2     (one denominator for all prefixes)
    loss     = (1 / P) sum_p FVU_p                                   (SAEOutput.recon_loss)

Normalisation: the sum over prefixes is divided by ``P``, so the reconstruction term stays on the FVU scale (for
``P = 1`` it is BatchTopK's FVU) and ``auxk_coef`` weighs AuxK against it as it does for TopK. It is the
authors' mean of the prefixes' MSEs up to the constant denominator (their code also averages over prefixes;
one version adds a bias-only term, left out here). ``SAEOutput.fvu`` stays the FVU of the full dictionary
(``FVU_P``), the metric every other variant reports; the trainer minimises ``recon_loss`` when it is given.

The decoder runs once per prefix group ``[m_{p-1}, m_p)`` (P sparse decodes of the same ``k_max`` slots, the
others masked to 0), and ``x_hat'_p`` is their running sum: P times the decoder cost of BatchTopK. Encoding,
the inference threshold and everything else are BatchTopK's.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from .batchtopk import BatchTopKSAE
from .sae import Codes, SAEConfigError, fvu


def default_prefixes(n_latents: int) -> list[int]:
    """``[n/16, n/8, n/4, n/2, n]`` (integer division), without sizes below 1 or repeats."""
    return sorted({n_latents // d for d in (16, 8, 4, 2, 1)} - {0})


class MatryoshkaBatchTopKSAE(BatchTopKSAE):
    """A Matryoshka BatchTopK autoencoder (see the module docstring for the math and the loss).

    Arguments ``d_in``, ``n_latents``, ``k``, ``k_max``, ``multi_topk``, ``dtype`` and ``device`` are as for
    :class:`~saehook.batchtopk.BatchTopKSAE`.

    Args:
        prefixes: the nested dictionary sizes, strictly increasing positive integers ending at ``n_latents``
            (default :func:`default_prefixes`); raises ``SAEConfigError`` otherwise.
    """

    architecture = "matryoshka_batchtopk"

    def __init__(self, d_in: int, n_latents: int, k: int, *, prefixes: list[int] | None = None,
                 k_max: int | None = None, multi_topk: bool = False, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__(d_in, n_latents, k, k_max=k_max, multi_topk=multi_topk, dtype=dtype, device=device)
        self.prefixes = _check_prefixes(default_prefixes(n_latents) if prefixes is None else prefixes, n_latents)

    def decode_prefix(self, codes: Codes, m: int) -> Tensor:
        """``x_hat [..., d_in]`` from the latents ``< m`` of ``codes`` alone (the prefix's reconstruction), in the
        input's units."""
        part = Codes(codes.values * (codes.indices < m), codes.indices)
        return self.unnormalise(self._decode_normalised(part), self.codes_state(codes))

    @torch.no_grad()
    def prefix_fvus(self, x: Tensor) -> list[float]:
        """The FVU of each prefix's reconstruction of ``x [..., d_in]`` with the inference code (:meth:`encode`),
        in normalised units (the training loss's terms), smallest prefix first."""
        xn = self.normalise(x)[0].reshape(-1, self.d_in)
        codes = self.encode(x)
        codes = Codes(codes.values.reshape(-1, codes.values.shape[-1]), codes.indices.reshape(-1, self.k_max))
        return [float(v) for v in self._prefix_fvus(xn, codes, None)[1]]

    def _prefix_fvus(self, xn: Tensor, codes: Codes, var_x: Tensor | None) -> tuple[Tensor, list[Tensor]]:
        """``(x_hat' of the full dictionary, [FVU_p for each prefix])`` for normalised rows ``xn [N, d_in]``."""
        x_hat, out, lo = self.b_dec.expand_as(xn), [], 0
        for m in self.prefixes:
            group = (codes.indices >= lo) & (codes.indices < m)
            x_hat = x_hat + self._decode_normalised(Codes(codes.values * group, codes.indices), bias=False)
            out.append(fvu(xn, x_hat, var_x))
            lo = m
        return x_hat, out

    def _reconstruct(self, xn: Tensor, codes: Codes, var_x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(x_hat' of the full dictionary, its FVU, mean_p FVU_p)``."""
        x_hat, fvus = self._prefix_fvus(xn, codes, var_x)
        return x_hat, fvus[-1], torch.stack(fvus).mean()

    # ------------------------------------------------------------------ persistence
    def config(self) -> dict:
        """:meth:`BatchTopKSAE.config` plus ``prefixes``."""
        return {**super().config(), "prefixes": list(self.prefixes)}

    def _read_config(self, cfg: dict, cfg_file: str | os.PathLike) -> None:
        super()._read_config(cfg, cfg_file)
        try:
            self.prefixes = _check_prefixes(cfg.get("prefixes", default_prefixes(self.n_latents)), self.n_latents)
        except SAEConfigError as e:
            raise SAEConfigError(f"{cfg_file}: {e}") from None

    def extra_repr(self) -> str:
        """The parent's, plus the prefixes."""
        return f"{super().extra_repr()}, prefixes={self.prefixes}"


def _check_prefixes(prefixes, n_latents: int) -> list[int]:
    p = list(prefixes) if isinstance(prefixes, (list, tuple)) else None
    if (not p or any(isinstance(m, bool) or not isinstance(m, int) for m in p) or p[0] < 1
            or any(a >= b for a, b in zip(p, p[1:])) or p[-1] != n_latents):
        raise SAEConfigError(f"prefixes must be strictly increasing positive integers ending at n_latents="
                             f"{n_latents}, got {prefixes!r}")
    return p
