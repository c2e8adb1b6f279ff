"""saehook's C kernels (saehook/csrc/cpu_kernels.c) against torch's operators, and their build/fallback."""

import os
import subprocess
import sys

import pytest
import torch

from saehook import TopKSAE, cpu_kernels, kernels


@pytest.fixture(autouse=True)
def _kernels_built():
    assert cpu_kernels.library() is not None, f"the C kernels must build on the test machine: {cpu_kernels.status()}"


def _rows(dtype, R, n, ties, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-6, 6, (R, n), generator=g).float() if ties else torch.randn(R, n, generator=g)
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k", [(4096, 32), (1000, 7), (100, 32), (64, 1), (33, 33)])
@pytest.mark.parametrize("ties", [False, True])
def test_topk_equals_torch_topk(dtype, n, k, ties):
    """Strided groups (n % 64 == 0, n / 64 >= k), blocks otherwise; heavy ties: equal values, sorted,
    distinct indices that point at them."""
    x = _rows(dtype, 37, n, ties)
    v = torch.full((37, k), float("nan"))
    i = torch.full((37, k), -1, dtype=torch.long)
    assert cpu_kernels.topk(x, k, v, i)
    ref = x.topk(k, dim=-1)
    assert torch.equal(v, ref.values.float())
    assert torch.equal(x.gather(1, i).float(), v)
    assert (i.sort(1).values.diff(dim=1) > 0).all()


def test_topk_reads_rows_with_a_stride_and_writes_into_slices():
    x = torch.randn(20, 3000)[:, 500:2548]  # row stride 3000, 2048 columns
    v, i = torch.zeros(20, 40), torch.zeros(20, 40, dtype=torch.long)
    assert cpu_kernels.topk(x, 8, v[:, 10:18], i[:, 10:18])
    ref = x.topk(8, dim=-1)
    assert torch.equal(v[:, 10:18], ref.values) and torch.equal(i[:, 10:18], ref.indices)
    assert (v[:, :10] == 0).all() and (v[:, 18:] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("frac,k", [(0.1, 60), (0.5, 1), (0.02, 20), (0.3, 288)])
def test_topk_over_a_column_subset_equals_torch(dtype, ties, frac, k):
    """AuxK's path: radix select over the dead columns; column indices back, values as torch.topk's."""
    x = _rows(dtype, 23, 4000, ties, seed=1)
    cols = (torch.rand(4000, generator=torch.Generator().manual_seed(2)) < frac).nonzero().squeeze(1)
    k = min(k, cols.numel())
    v, i = torch.empty(23, k), torch.empty(23, k, dtype=torch.long)
    assert cpu_kernels.topk(x, k, v, i, cols=cols, sorted=False)
    ref = x[:, cols].topk(k, dim=-1).values.float()
    assert torch.equal(v.sort(1, descending=True).values, ref)
    assert torch.isin(i, cols).all()
    assert torch.equal(x.gather(1, i).float(), v)
    assert (i.sort(1).values.diff(dim=1) > 0).all()


def test_topk_declines_what_it_does_not_handle():
    v, i = torch.empty(4, 2), torch.empty(4, 2, dtype=torch.long)
    assert not cpu_kernels.topk(torch.randn(4, 8, dtype=torch.float64), 2, v, i)  # dtype
    assert not cpu_kernels.topk(torch.randn(8, 4).t(), 2, v, i)  # columns not contiguous
    assert not cpu_kernels.topk(torch.randn(4, 8), 2, v.double(), i)  # output dtype
    with cpu_kernels.enabled(False):
        assert not cpu_kernels.topk(torch.randn(4, 8), 2, v, i)


def test_sampled_dots_equal_float64_reference():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(50, 600, generator=g)[:, :577]  # strided rows, d not a multiple of the 16 lanes
    b = torch.randn(300, 577, generator=g)
    idx = torch.randint(0, 300, (50, 9), generator=g)
    got = cpu_kernels.sampled_dots(a, b, idx)
    ref = (a.double()[:, None, :] * b.double()[idx]).sum(-1)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-4)


def test_scatter_rows_equals_index_add_with_repeats_and_empty_latents():
    g = torch.Generator().manual_seed(4)
    N, K, n, d = 70, 12, 500, 33
    idx = torch.randint(0, n // 2, (N, K), generator=g)  # latents n/2.. get nothing; many repeats
    idx[:, 0] = 7
    w = torch.randn(N, K, generator=g)
    w[w < -1] = 0  # ReLU'd entries: skipped, exactly
    dense = torch.randn(N, d, generator=g)
    got = cpu_kernels.scatter_rows(idx, w, n, dense)
    ref = torch.zeros(n, d, dtype=torch.float64).index_add_(
        0, idx.reshape(-1), (w.double()[:, :, None] * dense.double()[:, None, :]).reshape(-1, d))
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    assert (got[n // 2:] == 0).all()


def test_scatter_rows_rejects_an_out_of_range_latent():
    idx = torch.tensor([[0, 1], [2, 9]])
    with pytest.raises(IndexError, match=r"\[0, 5\)"):
        cpu_kernels.scatter_rows(idx, torch.ones(2, 2), 5, torch.ones(2, 3))


def _step(flag, x, dead, matmul_dtype=None):
    torch.manual_seed(7)
    sae = TopKSAE(48, 1024, 16, multi_topk=True)
    with cpu_kernels.enabled(flag):
        out = sae(x, dead_mask=dead, k_aux=24, matmul_dtype=matmul_dtype)
        loss = out.fvu + out.auxk_fvu / 32 + out.multi_topk_fvu / 8
        return sae, out, torch.autograd.grad(loss, list(sae.parameters()))


def test_training_gradients_equal_with_and_without_the_kernels():
    """A whole fp32 forward + backward with AuxK and Multi-TopK: the C kernels give torch's gradients."""
    torch.manual_seed(6)
    x = torch.randn(300, 48)
    dead = torch.zeros(1024, dtype=torch.bool)
    dead[::7] = True
    (_, o1, g1), (_, o0, g0) = _step(True, x, dead), _step(False, x, dead)
    assert torch.equal(o1.codes.indices, o0.codes.indices)
    torch.testing.assert_close(o1.codes.values, o0.codes.values, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(o1.auxk_fvu, o0.auxk_fvu, rtol=1e-5, atol=1e-7)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-7)


def test_bf16_selection_equals_torch_up_to_ties():
    """bf16 pre-activations tie often; both paths pick the same bf16 values (possibly other tied latents)."""
    torch.manual_seed(6)
    x = torch.randn(300, 48)
    dead = torch.zeros(1024, dtype=torch.bool)
    dead[::7] = True
    (sae, o1, _), (_, o0, _) = _step(True, x, dead, torch.bfloat16), _step(False, x, dead, torch.bfloat16)
    xc = (x * sae.input_scale - sae.b_dec).bfloat16()
    pre = (xc @ sae.W_enc.bfloat16().T + sae.b_enc.bfloat16()).float()
    for a, b in ((o1.codes.indices, o0.codes.indices),):
        assert torch.equal(pre.gather(1, a).sort(1).values, pre.gather(1, b).sort(1).values)
    same_set = (o1.codes.indices.sort(1).values == o0.codes.indices.sort(1).values).all(1).float().mean()
    assert same_set > 0.9, same_set  # a tie at the k-th place is the exception
    torch.testing.assert_close(o1.auxk_fvu, o0.auxk_fvu, rtol=2e-2, atol=0)


def test_chunked_encode_uses_the_kernels_on_every_chunk(monkeypatch):
    monkeypatch.setattr(kernels, "CPU_CHUNK_BYTES", 9 * 512 * 4)  # 9-row chunks, the last one shorter
    torch.manual_seed(8)
    sae = TopKSAE(32, 512, 8)
    x = torch.randn(40, 32)
    got = sae.encode(x)
    pre = sae.pre_acts(x)
    assert torch.equal(got.values, pre.topk(8).values.relu())


def _python(code: str, **env) -> subprocess.CompletedProcess:
    full = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=300)


STEP = """
import torch, saehook
from saehook import cpu_kernels
t = saehook.SAETrainer(saehook.TopKSAE(16, 256, 4), saehook.TrainConfig(batch_tokens=64))
m = t.step(torch.randn(64, 16))
print(cpu_kernels.status()); print(m["fvu"] > 0)
"""


def test_disabled_by_environment_and_training_still_works():
    out = _python(STEP, SAEHOOK_CPU_KERNELS="0")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["disabled (SAEHOOK_CPU_KERNELS=0 or set_enabled(False)): torch operators in use",
                                       "True"]


def test_a_failing_compiler_falls_back_to_torch_with_a_reason(tmp_path):
    out = _python(STEP, CC="false", SAEHOOK_CACHE=str(tmp_path))
    assert out.returncode == 0, out.stderr
    status, ok = out.stdout.splitlines()
    assert status.startswith("build or load failed, torch operators in use: false could not build") and ok == "True"
    assert "CPU kernels build or load failed" in out.stderr  # logged as a warning
    assert list(tmp_path.iterdir()) == []  # no half-written library left behind


def test_built_once_into_the_cache_then_reused(tmp_path):
    code = "from saehook import cpu_kernels; print(cpu_kernels.status()); print(cpu_kernels.library()._name)"
    first = _python(code, SAEHOOK_CACHE=str(tmp_path))
    assert first.returncode == 0, first.stderr
    libs = list(tmp_path.iterdir())
    assert len(libs) == 1 and libs[0].name.startswith("cpu_kernels-") and libs[0].suffix == ".so"
    mtime = libs[0].stat().st_mtime_ns
    second = _python(code, SAEHOOK_CACHE=str(tmp_path))
    assert second.stdout == first.stdout and second.stdout.startswith("loaded")
    assert libs[0].stat().st_mtime_ns == mtime and list(tmp_path.iterdir()) == libs


def test_ranks_building_at_once_share_one_library(tmp_path):
    """torchrun on a fresh machine: every rank builds at the same moment into the same empty cache."""
    code = "from saehook import cpu_kernels; print(cpu_kernels.status())"
    env = {**os.environ, "SAEHOOK_CACHE": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert all(o.startswith("loaded") for o, _ in outs), outs
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix == ".so"  # one library, no temporary left behind


def test_an_unwritable_cache_falls_back_to_torch(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    out = _python(STEP, SAEHOOK_CACHE=str(blocker / "kernels"))
    assert out.returncode == 0, out.stderr
    status, ok = out.stdout.splitlines()
    assert status.startswith("build or load failed, torch operators in use") and ok == "True"


def _special(kind: str, R: int, n: int) -> torch.Tensor:
    if kind == "randn":
        return torch.randn(R, n)
    if kind == "ints":
        return torch.randint(-3, 3, (R, n)).float()
    if kind == "signed_zeros":
        return torch.where(torch.rand(R, n) < 0.5, -0.0, 0.0)
    if kind == "inf":
        x = torch.randn(R, n).masked_fill(torch.rand(R, n) < 0.05, float("inf"))
        return x.masked_fill(torch.rand(R, n) < 0.05, float("-inf"))
    return torch.full((R, n), 2.5)


def test_topk_randomised_shapes_and_special_values():
    """400 random cases: any n (strided and block paths), k up to 300, column subsets, ties, signed
    zeros, infinities, constant rows; values equal torch.topk's, indices distinct and pointing at them."""
    import random

    rnd = random.Random(0)
    torch.manual_seed(0)
    for _ in range(400):
        dtype = rnd.choice([torch.float32, torch.bfloat16])
        n = rnd.choice([1, 7, 64, 65, 640, 1000, 4096, rnd.randint(1, 5000)])
        R = rnd.randint(1, 5)
        kind = rnd.choice(["randn", "ints", "signed_zeros", "inf", "const"])
        x = _special(kind, R, n).to(dtype)
        cols = torch.randperm(n)[: rnd.randint(1, n)].sort().values if rnd.random() < 0.3 else None
        width = n if cols is None else cols.numel()
        k = rnd.randint(1, min(width, rnd.choice([1, 4, 32, 300])))
        v, i = torch.empty(R, k), torch.empty(R, k, dtype=torch.long)
        assert cpu_kernels.topk(x, k, v, i, cols=cols, sorted=cols is None)
        ref = (x if cols is None else x[:, cols]).topk(k, dim=-1).values.float()
        got = v if cols is None else v.sort(1, descending=True).values
        case = (dtype, n, k, R, kind, cols is not None)
        assert torch.equal(got, ref), case
        assert torch.equal(x.gather(1, i).float(), v), case
        assert (i.sort(1).values.diff(dim=1) > 0).all(), case
