"""The TopK encoder and the sparse decoder as autograd functions: dense forward matmul, sparse everything else.

Forward, for rows ``x [N, d]`` (already scaled) and K = k (+ k_aux for AuxK):

    xc   = x - b_dec                                         [N, d]
    pre  = xc W_enc^T + b_enc                                [N, n]  the only dense product (bf16 allowed)
    idx  = TopK(pre)  (and TopK over dead latents for AuxK)  [N, K]
    vals = ReLU(<xc_i, W_enc[idx_ij]> + b_enc[idx_ij])       [N, K]  recomputed exactly in the master dtype

Backward, with g = dL/dvals masked by ReLU (N x K entries):

    dL/db_enc = scatter_add over idx of g                    (n)
    dL/dW_enc = G xc,  G = sparse [n, N] with g at (idx_ij, i)   (a sparse-dense product, N K d)
    dL/db_dec = -(dL/db_enc) W_enc                           (reduced over the batch first, one matvec)
    dL/dx     = sum_j g_ij W_enc[idx_ij]                     (embedding_bag; only if x needs it)

The pre-activations are computed in chunks of rows (about 16 MiB each on CPU, 1 GiB on CUDA) and
top-k'd while the chunk is still in cache: no ``[N, n]`` tensor is ever allocated, and the top-k costs
little beyond the matmul. On CPU the top-k, the sampled dot products and the scatters run in
:mod:`saehook.cpu_kernels` (C, built on first use) when it is available, else in torch's operators;
both give the same results.

The decoder ``x_hat = sum_j vals_ij W_dec[idx_ij]`` (:class:`TopKDecode`) has the backward

    dL/dvals_ij = <dL/dx_hat_i, W_dec[idx_ij]>               (sampled_addmm: N K dot products)
    dL/dW_dec   = Z^T dL/dx_hat,  Z = sparse [N, n]          (a CSR product, N K d)

Together these equal the gradient of the dense formula, at about ``2 n d + 8 k d`` FLOPs per token
instead of ``~10 n d``. Selection in bf16 can differ from fp32 only for pre-activations tied within bf16 rounding
at the k-th place; the selected main values are recomputed exactly; AuxK values keep the matmul's precision.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from . import cpu_kernels


def _csr_pattern(idx: Tensor, n: int, dtype: torch.dtype) -> Tensor:
    """The sparse ``[N, n]`` CSR matrix with zeros at the K positions ``idx [N, K]`` of each row."""
    N, K = idx.shape
    crow = torch.arange(0, N * K + 1, K, device=idx.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(crow, idx.reshape(-1), torch.zeros(N * K, dtype=dtype, device=idx.device),
                                       (N, n))


def _sampled_dots(a: Tensor, b: Tensor, idx: Tensor) -> Tensor:
    """``<a_i, b[idx_ij]>`` for ``a [N, d]``, ``b [n, d]``, ``idx [N, K]``, without a dense [N, n] product.

    ``torch.sparse.sampled_addmm`` evaluates ``a b^T`` only at the N K positions of a CSR pattern: about
    13x faster on CPU than gathering the ``[N, K, d]`` rows of ``b`` for a batched product."""
    N, K = idx.shape
    if N == 0 or K == 0:
        return a.new_zeros(N, K)
    out = cpu_kernels.sampled_dots(a, b, idx)
    if out is not None:
        return out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dots = torch.sparse.sampled_addmm(_csr_pattern(idx, b.shape[0], a.dtype), a, b.t(), beta=0.0)
    return dots.values().view(N, K)


def _gather_pre(xc: Tensor, W_enc: Tensor, b_enc: Tensor, idx: Tensor) -> Tensor:
    """``<xc_i, W_enc[idx_ij]> + b_enc[idx_ij]`` for ``idx [N, K]``: the exact pre-activations of the winners."""
    return _sampled_dots(xc, W_enc, idx) + b_enc[idx]


def _sparse_t_matmul(flat_idx: Tensor, flat_w: Tensor, N: int, K: int, n: int, dense: Tensor) -> Tensor:
    """``G @ dense`` for the sparse ``G [n, N]`` holding ``flat_w`` at ``(flat_idx, row)`` (K entries per
    row): sums ``w * dense[row]`` into each latent's row. On CPU the C kernel (a counting sort by latent);
    else built as CSR (one sort by latent), about twice as fast on CPU as a coalesced COO product."""
    out = cpu_kernels.scatter_rows(flat_idx.view(N, K), flat_w.view(N, K), n, dense)
    if out is not None:
        return out
    order = flat_idx.argsort()
    crow = torch.zeros(n + 1, dtype=torch.long, device=flat_idx.device)
    crow[1:] = torch.bincount(flat_idx, minlength=n).cumsum(0)
    cols = torch.div(order, K, rounding_mode="floor")  # the row of each sorted entry
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        G = torch.sparse_csr_tensor(crow, cols, flat_w[order], (n, N))
    return G @ dense


CPU_CHUNK_BYTES = 1 << 24
"""Pre-activation bytes computed at once on CPU: they stay in cache for the top-k (measured 15% faster
than one ``[N, n]`` product at n = 16384, 8192 rows, bf16)."""
DEVICE_CHUNK_BYTES = 1 << 30
"""The same on accelerators, where big products keep the device busy."""


def _chunk_rows(n: int, itemsize: int, device: torch.device) -> int:
    """Rows of pre-activations per chunk (at least one)."""
    budget = CPU_CHUNK_BYTES if device.type == "cpu" else DEVICE_CHUNK_BYTES
    return max(1, budget // max(1, n * itemsize))


def _topk_rows(pre: Tensor, k: int, out: tuple[Tensor, Tensor]) -> None:
    """``torch.topk(pre, k, dim=-1, sorted=True)`` into ``out`` (values in ``out[0]``'s dtype).

    On CPU, the C kernel (:mod:`saehook.cpu_kernels`) when it is built; else G strided column groups
    ``{j, j + G, j + 2G, ...}`` (a cheap vectorised max over a ``[R, n/G, G]`` view). Any element above
    the k-th largest group maximum lies in one of the k groups with the largest maxima, and those groups
    hold at least k elements at or above it: the top-k of their ``k n / G`` candidates has exactly the
    values of the top-k of the row (ties may pick other indices). Measured 3.8 ms instead of 4.9 ms for a
    [512, 16384] bf16 chunk; the C kernel takes 0.84 ms."""
    R, n = pre.shape
    if pre.device.type == "cpu" and cpu_kernels.topk(pre, k, out[0], out[1]):
        return
    G = n // 8
    if pre.device.type != "cpu" or n % 8 or G < 4 * k:
        top = torch.topk(pre, k, dim=-1, sorted=True)
        out[0].copy_(top.values)
        out[1].copy_(top.indices)
        return
    view = pre.view(R, 8, G)
    groups = view.amax(1).topk(k, dim=-1, sorted=False).indices  # [R, k]
    cand = view.gather(2, groups[:, None, :].expand(R, 8, k)).reshape(R, 8 * k)
    top = cand.topk(k, dim=-1, sorted=True)
    out[0].copy_(top.values)
    out[1].copy_(torch.div(top.indices, k, rounding_mode="floor") * G + groups.gather(1, top.indices % k))


def _topk_cols(pre: Tensor, cols: Tensor, k: int, out: tuple[Tensor, Tensor]) -> None:
    """Unsorted top-k of each row of ``pre`` over the columns ``cols`` only (AuxK's dead latents), into
    ``out`` as (values, column indices)."""
    if pre.device.type == "cpu" and cpu_kernels.topk(pre, k, out[0], out[1], cols=cols, sorted=False):
        return
    top = torch.topk(pre.index_select(1, cols), k, dim=-1, sorted=False)
    out[0].copy_(top.values)
    out[1].copy_(cols[top.indices])


class TopKEncode(torch.autograd.Function):
    """``(x, W_enc, b_enc, b_dec) -> (values [N, k], indices [N, k], aux_values [N, k_aux], aux_indices)``
    with the sparse backward described in the module docstring. Use through :meth:`saehook.TopKSAE.forward`."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, k: int, dead_mask, k_aux: int, matmul_dtype):
        """Dense pre-activations, top-k (and top-k_aux over ``dead_mask``), exact values of the winners."""
        xc = x - b_dec
        low = matmul_dtype is not None and matmul_dtype != W_enc.dtype
        xm, Wm, bm = (xc, W_enc, b_enc)
        if low:
            xm, Wm, bm = xm.to(matmul_dtype), Wm.to(matmul_dtype), bm.to(matmul_dtype)
        N, n = xc.shape[0], W_enc.shape[0]
        # Selected values in the master dtype (exact for a bf16 matmul: bf16 -> fp32 is lossless).
        top_v = torch.empty(N, k, dtype=W_enc.dtype, device=xc.device)
        idx = torch.empty(N, k, dtype=torch.long, device=xc.device)
        cols = dead_mask.nonzero().squeeze(1) if dead_mask is not None else None
        if cols is not None:
            aux_v = torch.empty(N, k_aux, dtype=W_enc.dtype, device=xc.device)
            aux_idx = torch.empty(N, k_aux, dtype=torch.long, device=xc.device)
        rows = _chunk_rows(n, bm.element_size(), xc.device)
        for s in range(0, N, rows):  # a chunk of pre-activations, top-k'd while in cache
            pre = torch.addmm(bm, xm[s:s + rows], Wm.t())
            _topk_rows(pre, k, (top_v[s:s + rows], idx[s:s + rows]))
            if cols is not None:  # AuxK: top-k_aux over the dead columns only (order irrelevant)
                _topk_cols(pre, cols, k_aux, (aux_v[s:s + rows], aux_idx[s:s + rows]))
            del pre
        # Main values exact in the master dtype: from an fp32 pre, or recomputed from k rows.
        vals = _gather_pre(xc, W_enc, b_enc, idx) if low else top_v
        if cols is None:
            aux_idx, aux_v = idx.new_empty(N, 0), vals.new_empty(N, 0)  # AuxK values: the matmul's precision
        idx_all = torch.cat([idx, aux_idx], 1)
        vals_all = torch.cat([vals, aux_v], 1).relu_()
        ctx.save_for_backward(xc, W_enc, idx_all, vals_all)
        ctx.k = k
        ctx.mark_non_differentiable(idx, aux_idx)
        return vals_all[:, :k], idx, vals_all[:, k:], aux_idx

    @staticmethod
    def backward(ctx, g_vals, _g_idx, g_aux, _g_aux_idx):
        """Gradients from the k (+ k_aux) selected entries per row only: scatter-add, a CSR product, one matvec."""
        xc, W_enc, idx, vals = ctx.saved_tensors
        N, K = idx.shape
        if g_vals is None:
            g_vals = torch.zeros(N, ctx.k, dtype=vals.dtype, device=vals.device)
        g = torch.cat([g_vals, g_aux], 1) if K > ctx.k and g_aux is not None else g_vals
        if g.shape[1] < K:
            g = torch.cat([g, torch.zeros(N, K - g.shape[1], dtype=g.dtype, device=g.device)], 1)
        g = g * (vals > 0)
        n = W_enc.shape[0]
        flat_idx, flat_g = idx.reshape(-1), g.reshape(-1)
        grad_b_enc = torch.zeros(n, dtype=g.dtype, device=g.device).index_add_(0, flat_idx, flat_g)
        grad_W_enc = None
        if ctx.needs_input_grad[1]:
            grad_W_enc = _sparse_t_matmul(flat_idx, flat_g, N, K, n, xc)
        grad_b_dec = -(grad_b_enc @ W_enc) if ctx.needs_input_grad[3] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(idx, W_enc, per_sample_weights=g, mode="sum")
        return grad_x, grad_W_enc, grad_b_enc if ctx.needs_input_grad[2] else None, grad_b_dec, \
            None, None, None, None


class TopKDecode(torch.autograd.Function):
    """``(vals [N, K], idx [N, K], W_dec [n, d]) -> x_hat [N, d] = sum_j vals_ij W_dec[idx_ij]`` (no bias).

    Forward is ``embedding_bag``; the backward is the sparse one of the module docstring. At K = 288 (an
    AuxK batch) it takes 240 ms where ``embedding_bag``'s own backward takes 350 ms (8192 rows, d = 576)."""

    @staticmethod
    def forward(ctx, vals, idx, W_dec):
        """``embedding_bag`` over the K rows of ``W_dec`` each row selects, weighted by ``vals``."""
        ctx.save_for_backward(vals, idx, W_dec)
        return F.embedding_bag(idx, W_dec, per_sample_weights=vals, mode="sum")

    @staticmethod
    def backward(ctx, grad_out):
        """``dvals = <grad_i, W_dec[idx_ij]>`` (sampled_addmm), ``dW_dec = Z^T grad`` (CSR product)."""
        vals, idx, W_dec = ctx.saved_tensors
        N, K = idx.shape
        grad_out = grad_out.contiguous()
        g_vals = _sampled_dots(grad_out, W_dec, idx) if ctx.needs_input_grad[0] else None
        g_W = None
        if ctx.needs_input_grad[2]:
            g_W = _sparse_t_matmul(idx.reshape(-1), vals.reshape(-1), N, K, W_dec.shape[0], grad_out)
        return g_vals, None, g_W
