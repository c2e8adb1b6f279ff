"""The TopK encoder as one autograd function: dense forward matmul, sparse everything else.

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

which equals the gradient of the dense formula, at about ``2 n d + 8 k d`` FLOPs per token instead of
``~10 n d``. Selection in bf16 can differ from fp32 only for pre-activations tied within bf16 rounding
at the k-th place; the selected main values are recomputed exactly; AuxK values keep the matmul's precision.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor


def _gather_pre(xc: Tensor, W_enc: Tensor, b_enc: Tensor, idx: Tensor) -> Tensor:
    """``<xc_i, W_enc[idx_ij]> + b_enc[idx_ij]`` for ``idx [N, K]``, without a dense [N, n] product.

    ``torch.sparse.sampled_addmm`` evaluates ``xc W_enc^T`` only at the N K positions of a CSR pattern
    (K entries per row): about 13x faster on CPU than gathering the ``[N, K, d]`` rows of ``W_enc``."""
    N, K = idx.shape
    if N == 0 or K == 0:
        return b_enc[idx]
    crow = torch.arange(0, N * K + 1, K, device=idx.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        pattern = torch.sparse_csr_tensor(crow, idx.reshape(-1), torch.zeros(N * K, dtype=xc.dtype, device=xc.device),
                                          (N, W_enc.shape[0]))
        dots = torch.sparse.sampled_addmm(pattern, xc, W_enc.t(), beta=0.0)
    return dots.values().view(N, K) + b_enc[idx]


def _sparse_t_matmul(flat_idx: Tensor, flat_w: Tensor, N: int, K: int, n: int, dense: Tensor) -> Tensor:
    """``G @ dense`` for the sparse ``G [n, N]`` holding ``flat_w`` at ``(flat_idx, row)`` (K entries per
    row): sums ``w * dense[row]`` into each latent's row. Built as CSR (one sort by latent), about twice
    as fast on CPU as a coalesced COO product."""
    order = flat_idx.argsort()
    crow = torch.zeros(n + 1, dtype=torch.long, device=flat_idx.device)
    crow[1:] = torch.bincount(flat_idx, minlength=n).cumsum(0)
    cols = torch.div(order, K, rounding_mode="floor")  # the row of each sorted entry
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        G = torch.sparse_csr_tensor(crow, cols, flat_w[order], (n, N))
    return G @ dense


class TopKEncode(torch.autograd.Function):
    """``(x, W_enc, b_enc, b_dec) -> (values [N, k], indices [N, k], aux_values [N, k_aux], aux_indices)``
    with the sparse backward described in the module docstring. Use through :meth:`saehook.TopKSAE.forward`."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, k: int, dead_mask, k_aux: int, matmul_dtype):
        """Dense pre-activations, top-k (and top-k_aux over ``dead_mask``), exact values of the winners."""
        xc = x - b_dec
        low = matmul_dtype is not None and matmul_dtype != W_enc.dtype
        if low:
            pre = F.linear(xc.to(matmul_dtype), W_enc.to(matmul_dtype)).add_(b_enc.to(matmul_dtype))
        else:
            pre = torch.addmm(b_enc, xc, W_enc.t())
        top = pre.topk(k, dim=-1, sorted=True)
        # Main values exact in the master dtype: gathered from an fp32 pre, or recomputed from k rows.
        vals = _gather_pre(xc, W_enc, b_enc, top.indices) if low else top.values
        idx, aux_idx, aux_vals = top.indices, top.indices.new_empty(len(xc), 0), vals.new_empty(len(xc), 0)
        if dead_mask is not None:  # top-k_aux over the dead columns only (no masked copy of the whole [N, n])
            cols = dead_mask.nonzero().squeeze(1)
            aux = pre.index_select(1, cols).topk(k_aux, dim=-1, sorted=True)
            aux_idx, aux_vals = cols[aux.indices], aux.values.to(vals.dtype)  # AuxK: pre-activation precision
        del pre
        idx_all = torch.cat([idx, aux_idx], 1)
        vals_all = torch.cat([vals, aux_vals], 1).relu_()
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
