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
    dL/dx     = sum_j g_ij W_enc[idx_ij]                     (ops.decode; only if x needs it)

The pre-activations are computed in chunks of rows (about 16 MiB each on CPU, 1 GiB on CUDA) and
top-k'd while the chunk is still in cache: no ``[N, n]`` tensor is ever allocated, and the top-k costs
little beyond the matmul. The sparse parts (top-k, sampled dot products, the decoder from k indices and
the weight-gradient scatter) are the registered ops of :mod:`saehook.ops` (``saehook::*``): C kernels
on CPU (else torch's operators, same results), Triton kernels on CUDA, torch's operators elsewhere; each
has a fake implementation, so ``torch.compile(fullgraph=True)`` traces the whole step.

The decoder ``x_hat = sum_j vals_ij W_dec[idx_ij]`` (:class:`TopKDecode`) has the backward

    dL/dvals_ij = <dL/dx_hat_i, W_dec[idx_ij]>               (ops.sampled_dots: N K dot products)
    dL/dW_dec   = Z^T dL/dx_hat,  Z = sparse [N, n]          (ops.scatter_rows, N K d)

Together these equal the gradient of the dense formula, at about ``2 n d + 8 k d`` FLOPs per token
instead of ``~10 n d``. Selection in bf16 can differ from fp32 only for pre-activations tied within bf16 rounding
at the k-th place; the selected main values are recomputed exactly; AuxK values keep the matmul's precision.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import ops


def _sampled_dots(a: Tensor, b: Tensor, idx: Tensor) -> Tensor:
    """``<a_i, b[idx_ij]>`` for ``a [N, d]``, ``b [n, d]``, ``idx [N, K]``, without a dense [N, n] product
    (the op ``saehook::sampled_dots``)."""
    return ops.sampled_dots(a, b, idx)


def _gather_pre(xc: Tensor, W_enc: Tensor, b_enc: Tensor, idx: Tensor) -> Tensor:
    """``<xc_i, W_enc[idx_ij]> + b_enc[idx_ij]`` for ``idx [N, K]``: the exact pre-activations of the winners."""
    return ops.sampled_dots(xc, W_enc, idx) + b_enc[idx]


def _sparse_t_matmul(flat_idx: Tensor, flat_w: Tensor, N: int, K: int, n: int, dense: Tensor) -> Tensor:
    """``G @ dense`` for the sparse ``G [n, N]`` holding ``flat_w`` at ``(flat_idx, row)`` (K entries per
    row): sums ``w * dense[row]`` into each latent's row (the op ``saehook::scatter_rows``)."""
    return ops.scatter_rows(flat_idx.view(N, K), flat_w.view(N, K), n, dense)


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
    """``torch.topk(pre, k, dim=-1, sorted=True)`` into ``out`` (values in ``out[0]``'s dtype), through the
    op ``saehook::topk_rows`` (on CPU the C kernel, else grouped column maxima: :mod:`saehook.ops`)."""
    v, i = ops.topk_rows(pre, k, out[0].dtype)
    out[0].copy_(v)
    out[1].copy_(i)


def _cat(parts: list[tuple[Tensor, Tensor]], N: int, k: int, dtype: torch.dtype,
         device: torch.device) -> tuple[Tensor, Tensor]:
    """The (values, indices) of the row chunks stacked: ``([N, k]``, ``[N, k])``; empty when there are none."""
    if not parts or k == 0:
        return torch.empty(N, k, dtype=dtype, device=device), torch.empty(N, k, dtype=torch.long, device=device)
    if len(parts) == 1:
        return parts[0]
    return torch.cat([v for v, _ in parts]), torch.cat([i for _, i in parts])


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
        rows = _chunk_rows(n, bm.element_size(), xc.device)
        tops, auxs = [], []
        for s in range(0, N, rows):  # a chunk of pre-activations, top-k'd while in cache
            pre = torch.addmm(bm, xm[s:s + rows], Wm.t())
            # Selected values in the master dtype (exact for a bf16 matmul: bf16 -> fp32 is lossless).
            tops.append(ops.topk_rows(pre, k, W_enc.dtype))
            if dead_mask is not None:  # AuxK: top-k_aux over the dead columns only (order irrelevant)
                auxs.append(ops.topk_masked(pre, dead_mask, k_aux, W_enc.dtype))
            del pre
        top_v, idx = _cat(tops, N, k, W_enc.dtype, xc.device)
        # Main values exact in the master dtype: from an fp32 pre, or recomputed from k rows.
        vals = _gather_pre(xc, W_enc, b_enc, idx) if low else top_v
        # AuxK values: the matmul's precision
        aux_v, aux_idx = _cat(auxs, N, k_aux if dead_mask is not None else 0, W_enc.dtype, xc.device)
        idx_all = torch.cat([idx, aux_idx], 1)
        vals_all = torch.cat([vals, aux_v], 1).relu_()
        ctx.save_for_backward(xc, W_enc, idx_all, vals_all)
        ctx.k = k
        ctx.mark_non_differentiable(idx, aux_idx)
        return vals_all[:, :k], idx, vals_all[:, k:], aux_idx

    @staticmethod
    def backward(ctx, g_vals, _g_idx, g_aux, _g_aux_idx):
        """Gradients from the k (+ k_aux) selected entries per row only: scatter-add, ``ops.scatter_rows``, one
        matvec, ``ops.decode`` for ``dL/dx``."""
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
            grad_x = ops.decode(g, idx, W_enc)
        return grad_x, grad_W_enc, grad_b_enc if ctx.needs_input_grad[2] else None, grad_b_dec, \
            None, None, None, None


class TopKDecode(torch.autograd.Function):
    """``(vals [N, K], idx [N, K], W_dec [n, d]) -> x_hat [N, d] = sum_j vals_ij W_dec[idx_ij]`` (no bias).

    Forward is the op ``saehook::decode`` (``embedding_bag`` on CPU, a Triton kernel on CUDA); the backward is
    the sparse one of the module docstring. At K = 288 (an AuxK batch) it takes 240 ms on CPU where
    ``embedding_bag``'s own backward takes 350 ms (8192 rows, d = 576)."""

    @staticmethod
    def forward(ctx, vals, idx, W_dec):
        """The K rows of ``W_dec`` each row selects, weighted by ``vals`` and summed (``ops.decode``)."""
        ctx.save_for_backward(vals, idx, W_dec)
        return ops.decode(vals, idx, W_dec)

    @staticmethod
    def backward(ctx, grad_out):
        """``dvals = <grad_i, W_dec[idx_ij]>`` (``ops.sampled_dots``), ``dW_dec = Z^T grad`` (``ops.scatter_rows``)."""
        vals, idx, W_dec = ctx.saved_tensors
        N, K = idx.shape
        grad_out = grad_out.contiguous()
        g_vals = _sampled_dots(grad_out, W_dec, idx) if ctx.needs_input_grad[0] else None
        g_W = None
        if ctx.needs_input_grad[2]:
            g_W = _sparse_t_matmul(idx.reshape(-1), vals.reshape(-1), N, K, W_dec.shape[0], grad_out)
        return g_vals, None, g_W
