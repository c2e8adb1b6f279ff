"""Triton kernels for the sparse parts of a training step on CUDA (behind the ops of :mod:`saehook.ops`).

Three kernels, each the dense-sparse product the paper and its peers (sparsify, Llamascopium) found worth a
kernel on GPUs; fp32 accumulation whatever the storage dtype (fp32, fp16, bf16):

- :func:`decode`: ``out[i] = sum_j vals_ij W[idx_ij]`` (the decoder from ``(values, indices)``, a weighted
  ``embedding_bag``), ``vals, idx [N, K]``, ``W [n, d]`` -> ``out [N, d]`` in ``W``'s dtype.
- :func:`sampled_dots`: ``out[i, j] = <a_i, b[idx_ij]>`` (``dL/dvalues`` at the selected latents),
  ``a [N, d]``, ``b [n, d]`` -> ``out [N, K]`` in ``a``'s dtype.
- :func:`scatter_rows`: ``out[r] = sum over idx_ij == r of w_ij dense_i`` (the weight gradients, a sparse
  ``[n, N]`` times dense ``[N, d]``) -> ``out [n, d]``. The entries are sorted by latent first (one
  ``torch.sort``), then one program per (latent, column block) sums its segment: no atomics, so the
  result is deterministic and every row, empty ones included, is written once.

Importing this module needs ``triton`` (an optional dependency: :mod:`saehook.ops` imports it only on the
first CUDA call). ``TRITON_INTERPRET=1``, set before the import, runs the same kernels on CPU tensors
(``tests/scripts/triton_interpret.py``); the interpreter handles fp32 and fp16 but not bf16 (measured
with triton 3.9: a bf16 load-scale-store kernel returned zeros), so bf16 runs on GPUs only. Indices must be in
``[0, n)`` (the callers' top-k guarantees it); inputs may have any strides.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


def _block(size: int, lo: int, hi: int) -> int:
    """A power of two in ``[lo, hi]`` covering ``size`` when it can."""
    return max(lo, min(hi, triton.next_power_of_2(max(1, size))))


@triton.jit
def _decode_kernel(vals, vs0, vs1, idx, is0, is1, W, ws0, ws1, out, os0, N, K, D,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask, cmask = rows < N, cols < D
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for j in range(0, K):
        lat = tl.load(idx + rows * is0 + j * is1, mask=rmask, other=0).to(tl.int64)
        v = tl.load(vals + rows * vs0 + j * vs1, mask=rmask, other=0.0).to(tl.float32)
        w = tl.load(W + lat[:, None] * ws0 + cols[None, :] * ws1, mask=rmask[:, None] & cmask[None, :], other=0.0)
        acc += v[:, None] * w.to(tl.float32)
    tl.store(out + rows[:, None] * os0 + cols[None, :], acc.to(out.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _sampled_dots_kernel(a, as0, as1, b, bs0, bs1, idx, is0, is1, out, os0, N, D,
                         BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    j = tl.program_id(1)
    rmask = rows < N
    lat = tl.load(idx + rows * is0 + j * is1, mask=rmask, other=0).to(tl.int64)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for c0 in range(0, D, BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D)
        m = rmask[:, None] & (cols < D)[None, :]
        x = tl.load(a + rows[:, None] * as0 + cols[None, :] * as1, mask=m, other=0.0).to(tl.float32)
        y = tl.load(b + lat[:, None] * bs0 + cols[None, :] * bs1, mask=m, other=0.0).to(tl.float32)
        acc += tl.sum(x * y, axis=1)
    tl.store(out + rows * os0 + j, acc.to(out.dtype.element_ty), mask=rmask)


@triton.jit
def _scatter_rows_kernel(crow, src_row, w_sorted, dense, ds0, ds1, out, os0, D,
                         BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr):
    r = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    start = tl.load(crow + r)
    end = tl.load(crow + r + 1)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for e0 in range(start, end, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E)
        emask = e < end
        row = tl.load(src_row + e, mask=emask, other=0)
        w = tl.load(w_sorted + e, mask=emask, other=0.0).to(tl.float32)
        x = tl.load(dense + row[:, None] * ds0 + cols[None, :] * ds1, mask=emask[:, None] & cmask[None, :],
                    other=0.0).to(tl.float32)
        acc += tl.sum(w[:, None] * x, axis=0)
    tl.store(out + r * os0 + cols, acc.to(out.dtype.element_ty), mask=cmask)


def decode(vals: Tensor, idx: Tensor, W: Tensor) -> Tensor:
    """``sum_j vals_ij W[idx_ij]``: ``vals [N, K]`` (any float dtype), int ``idx [N, K]``, ``W [n, d]`` ->
    ``[N, d]`` in ``W``'s dtype, accumulated in fp32."""
    N, K = idx.shape
    D = W.shape[1]
    out = torch.empty(N, D, dtype=W.dtype, device=W.device)
    if N == 0 or D == 0:
        return out
    BN, BD = _block(N, 1, 16), _block(D, 16, 128)
    _decode_kernel[(triton.cdiv(N, BN), triton.cdiv(D, BD))](
        vals, vals.stride(0), vals.stride(1), idx, idx.stride(0), idx.stride(1), W, W.stride(0), W.stride(1),
        out, out.stride(0), N, K, D, BLOCK_N=BN, BLOCK_D=BD)
    return out


def sampled_dots(a: Tensor, b: Tensor, idx: Tensor) -> Tensor:
    """``<a_i, b[idx_ij]>``: ``a [N, d]``, ``b [n, d]``, int ``idx [N, K]`` -> ``[N, K]`` in ``a``'s dtype,
    accumulated in fp32."""
    N, K = idx.shape
    out = torch.empty(N, K, dtype=a.dtype, device=a.device)
    if N == 0 or K == 0:
        return out
    D = a.shape[1]
    BN, BD = _block(N, 1, 32), _block(D, 16, 128)
    _sampled_dots_kernel[(triton.cdiv(N, BN), K)](
        a, a.stride(0), a.stride(1), b, b.stride(0), b.stride(1), idx, idx.stride(0), idx.stride(1),
        out, out.stride(0), N, D, BLOCK_N=BN, BLOCK_D=BD)
    return out


def scatter_rows(idx: Tensor, w: Tensor, n: int, dense: Tensor) -> Tensor:
    """``out[r] = sum over idx_ij == r of w_ij dense_i``: int ``idx [N, K]``, ``w [N, K]``, ``dense [N, d]``
    -> ``[n, d]`` in ``dense``'s dtype (zero rows for latents no entry names), accumulated in fp32."""
    N, K = idx.shape
    D = dense.shape[1]
    out = torch.empty(n, D, dtype=dense.dtype, device=dense.device)
    if n == 0 or D == 0:
        return out
    flat = idx.reshape(-1)
    lat, order = torch.sort(flat, stable=True)  # entries grouped by latent, rows ascending within one
    # crow[r] = entries with latent < r (no bincount: on CUDA it syncs with the host for its size)
    crow = torch.searchsorted(lat, torch.arange(n + 1, dtype=lat.dtype, device=lat.device))
    src_row = torch.div(order, K, rounding_mode="floor")
    w_sorted = w.reshape(-1)[order]
    BD = _block(D, 16, 128)
    _scatter_rows_kernel[(n, triton.cdiv(D, BD))](crow, src_row, w_sorted, dense, dense.stride(0), dense.stride(1),
                                                  out, out.stride(0), D, BLOCK_E=16, BLOCK_D=BD)
    return out
