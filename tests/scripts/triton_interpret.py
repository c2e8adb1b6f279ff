"""Run by tests/test_ops.py in its own process: every Triton kernel of saehook.triton_kernels under Triton's
interpreter (TRITON_INTERPRET=1 must be set before triton is imported, hence the separate process) on CPU
tensors, against an fp64 reference. Prints one JSON object: {case name: [max abs error, tolerance]}.

Cases: several K (1, 4, 8), repeated latents within a row and one latent chosen by every row (ties for
the scatter's segments), latents no row picks (zero rows), non-contiguous inputs (transposed views, a
column slice, strided index rows), fp32 and fp16 (a bf16 kernel under the interpreter returned zeros, so bf16 is not
run here), and d not a multiple of the column block.
"""

import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import importlib.util  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

# The module alone (it imports only torch and triton), not the saehook package: seconds less per run.
_spec = importlib.util.spec_from_file_location(
    "triton_kernels", Path(__file__).resolve().parents[2] / "saehook" / "triton_kernels.py")
tk = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tk)

TOL = {torch.float32: 2e-6, torch.float16: 2e-3}
"""Per unit of the reference's largest magnitude: fp32 accumulation, then rounding to the output dtype."""


def noncontig(t: torch.Tensor) -> torch.Tensor:
    """The same values as a transposed (column-major) view."""
    return t.t().contiguous().t()


def case(N: int, K: int, n: int, d: int, dtype: torch.dtype, layout: str, pattern: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, d, generator=g).to(dtype)
    a = torch.randn(N, d, generator=g).to(dtype)
    v = torch.randn(N, K, generator=g).to(dtype)
    if pattern == "hot":  # every row picks latent 0 (and latents n-1, ...): long segments, ties in the scatter
        idx = torch.randint(0, n, (N, K), generator=g)
        idx[:, 0] = 0
    elif pattern == "repeat":  # the same latent twice in a row
        idx = torch.randint(0, max(1, n // 4), (N, K), generator=g)
    else:
        idx = torch.stack([torch.randperm(n, generator=g)[:K] for _ in range(N)])
    if layout == "strided":
        W = torch.cat([W, W], 1)[:, ::2] if d > 1 else W  # column stride 2
        a, v = noncontig(a), noncontig(v)
        idx = torch.cat([idx, idx], 0)[::2]  # row stride 2K
        assert not (a.is_contiguous() or W.is_contiguous() or idx.is_contiguous())
    W64, a64, v64 = W.double(), a.double(), v.double()
    out = {}
    ref = (v64[:, :, None] * W64[idx]).sum(1)
    out["decode"] = (tk.decode(v, idx, W), ref)
    ref = (a64[:, None, :] * W64[idx]).sum(-1)
    out["sampled_dots"] = (tk.sampled_dots(a, W, idx), ref)
    ref = torch.zeros(n, d, dtype=torch.float64).index_add_(0, idx.reshape(-1),
                                                             (v64[:, :, None] * a64[:, None, :]).reshape(-1, d))
    out["scatter_rows"] = (tk.scatter_rows(idx, v, n, a), ref)
    res = {}
    for name, (got, want) in out.items():
        assert got.dtype == dtype and got.shape == want.shape, (name, got.dtype, got.shape, want.shape)
        tol = TOL[dtype] * max(1.0, float(want.abs().max()))
        res[f"{name}-N{N}-K{K}-n{n}-d{d}-{str(dtype)[6:]}-{layout}-{pattern}"] = [
            float((got.double() - want).abs().max()), tol]
    return res


def main() -> None:
    t0 = time.perf_counter()
    results = {}
    shapes = [(5, 1, 7, 3, "distinct"), (9, 4, 13, 40, "repeat"), (12, 8, 16, 130, "hot")]
    for seed, (N, K, n, d, pattern) in enumerate(shapes):
        for dtype in (torch.float32, torch.float16):
            for layout in ("contiguous", "strided"):
                results.update(case(N, K, n, d, dtype, layout, pattern, seed))
    print(f"interpreted in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
