"""The sparse step's registered ops (saehook.ops): each against an fp64 reference on CPU (C kernels and the
torch fallback), torch.library.opcheck on each, the training step through torch.compile(fullgraph=True)
with the eager numbers, and every Triton kernel under Triton's CPU interpreter (in its own process)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from saehook import TopKSAE, cpu_kernels, ops
from saehook.kernels import TopKDecode, TopKEncode
from saehook.sae import fvu

ROOT = Path(__file__).resolve().parents[1]


def _inputs(N=24, K=5, n=64, d=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(n, generator=g)[:K] for _ in range(N)])
    idx[:, 0] = 3  # one latent in every row: a long segment in the scatter
    return (torch.randn(N, d, generator=g), torch.randn(n, d, generator=g), torch.randn(N, K, generator=g), idx)


@pytest.mark.parametrize("c_kernels", [True, False], ids=["c-kernel", "torch"])
def test_cpu_ops_equal_the_fp64_formulas(c_kernels):
    a, W, v, idx = _inputs()
    a64, W64, v64 = a.double(), W.double(), v.double()
    with cpu_kernels.enabled(c_kernels):
        dots = ops.sampled_dots(a, W, idx)
        dec = ops.decode(v, idx, W)
        sc = ops.scatter_rows(idx, v, W.shape[0], a)
        sc_t = ops.scatter_rows(idx, v, W.shape[0], a.t().contiguous().t())  # dense with a column stride
    assert (dots.double() - (a64[:, None] * W64[idx]).sum(-1)).abs().max() < 1e-5
    assert (dec.double() - (v64[..., None] * W64[idx]).sum(1)).abs().max() < 1e-5
    ref = torch.zeros_like(W64).index_add_(0, idx.reshape(-1), (v64[..., None] * a64[:, None]).reshape(-1, a.shape[1]))
    assert (sc.double() - ref).abs().max() < 1e-5 and (sc_t.double() - ref).abs().max() < 1e-5
    unused = ~torch.isin(torch.arange(W.shape[0]), idx)  # latents no row picked: zero rows, written
    assert unused.any() and sc[unused].abs().sum() == 0 and sc[3].abs().sum() > 0


@pytest.mark.parametrize("c_kernels", [True, False], ids=["c-kernel", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk_ops_values_equal_torch_topk_with_ties(c_kernels, dtype):
    g = torch.Generator().manual_seed(1)
    n, k = 256, 7
    pre = (torch.randint(0, 12, (9, n), generator=g).float() / 4).to(dtype)  # many ties at the k-th place
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=g)[:40]] = True
    with cpu_kernels.enabled(c_kernels):
        v, i = ops.topk_rows(pre, k, torch.float32)
        mv, mi = ops.topk_masked(pre, mask, k, torch.float32)
    want = torch.topk(pre.float(), k, dim=-1).values
    assert torch.equal(v, want) and torch.equal(pre.float().gather(1, i), v)  # sorted, the values at the indices
    assert v.dtype == torch.float32 and i.dtype == torch.int64
    want_m = torch.topk(pre.float()[:, mask], k, dim=-1).values
    assert torch.equal(mv.sort(1, descending=True).values, want_m)
    assert mask[mi].all() and torch.equal(pre.float().gather(1, mi), mv)


def test_opcheck_every_op():
    a, W, v, idx = _inputs(N=6, K=3, n=16, d=5)
    pre = torch.randn(4, 16)
    mask = torch.arange(16) % 3 == 0
    cases = {ops.topk_rows: (pre, 3, torch.float32), ops.topk_masked: (pre, mask, 3, torch.float32),
             ops.sampled_dots: (a, W, idx), ops.decode: (v, idx, W), ops.scatter_rows: (idx, v, 16, a)}
    for op, args in cases.items():
        result = torch.library.opcheck(op, args)
        assert set(result.values()) == {"SUCCESS"}, (op, result)


def _grads(sae):
    return {name: p.grad.clone() for name, p in sae.named_parameters()}


def test_training_step_compiles_fullgraph_and_gives_the_eager_numbers():
    """TopKSAE.forward's loss through torch.compile(fullgraph=True) (aot_eager: the same ATen graph inductor
    would get, no C++ build), then its compiled backward: loss and every gradient equal eager's."""
    torch.manual_seed(0)
    sae = TopKSAE(16, 128, 4)
    x = torch.randn(48, 16)

    def loss(x):
        return sae(x).fvu

    eager = loss(x)
    eager.backward()
    want = _grads(sae)
    sae.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    got = torch.compile(loss, fullgraph=True, backend="aot_eager")(x)
    got.backward()
    assert float(got.detach()) == float(eager.detach()) and 0.2 < float(eager.detach()) < 2
    for name, g in _grads(sae).items():
        torch.testing.assert_close(g, want[name], rtol=1e-6, atol=1e-7, msg=name)
        assert g.abs().sum() > 0, name


def test_auxk_step_compiles_fullgraph_and_gives_the_eager_numbers():
    """The AuxK path (dead mask, k_aux over the dead columns, bf16 matmul with exact values) as TopKSAE.forward
    composes it from TopKEncode and TopKDecode, through torch.compile(fullgraph=True): eager's loss and grads."""
    torch.manual_seed(1)
    sae = TopKSAE(16, 96, 4)
    x = torch.randn(40, 16)
    dead = torch.zeros(96, dtype=torch.bool)
    dead[::4] = True

    def loss(x):
        vals, idx, aux_v, aux_i = TopKEncode.apply(x, sae.W_enc, sae.b_enc, sae.b_dec, 4, dead, 8, torch.bfloat16)
        x_hat = TopKDecode.apply(vals, idx, sae.W_dec) + sae.b_dec
        e = (x - x_hat).detach()
        return fvu(x, x_hat) + fvu(e, TopKDecode.apply(aux_v, aux_i, sae.W_dec)) / 32

    eager = loss(x)
    eager.backward()
    want = _grads(sae)
    sae.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    got = torch.compile(loss, fullgraph=True, backend="aot_eager")(x)
    got.backward()
    assert float(got.detach()) == float(eager.detach())
    for name, g in _grads(sae).items():
        torch.testing.assert_close(g, want[name], rtol=1e-6, atol=1e-7, msg=name)


def test_the_cpu_path_never_loads_the_triton_kernels():
    """A CPU step (AuxK included) runs without saehook.triton_kernels: triton stays optional on CPU machines."""
    sae = TopKSAE(8, 32, 2)
    sae(torch.randn(4, 8), dead_mask=torch.arange(32) < 8).fvu.backward()
    assert ops._triton is None and sae.W_dec.grad.abs().sum() > 0


@pytest.fixture(scope="module")
def interpreted():
    """{case: [max abs error vs fp64, tolerance]} from tests/scripts/triton_interpret.py (TRITON_INTERPRET=1)."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install triton; it is in saehook's dev extra)")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "scripts" / "triton_interpret.py")], env=env,
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kernel", ["decode", "sampled_dots", "scatter_rows"])
def test_triton_kernel_under_the_interpreter_equals_fp64(interpreted, kernel):
    runs = {name: err for name, err in interpreted.items() if name.startswith(kernel + "-")}
    # 3 shapes (K = 1, 4, 8; distinct, repeated and hot latents) x fp32, fp16 x contiguous, strided
    assert len(runs) == 12
    bad = {name: err for name, err in runs.items() if not err[0] <= err[1]}
    assert not bad, bad
