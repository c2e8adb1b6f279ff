"""TopKSAE against the paper's equations: encode, decode, gradients, init, persistence, bad input."""

import json

import pytest
import torch
import torch.nn.functional as F

from saehook import Codes, SAEConfigError, TopKSAE, cpu_kernels, fvu, geometric_median, kernels


def dense_reference(sae: TopKSAE, x: torch.Tensor, k: int):
    """The dense formula: z = ReLU(TopK(W_enc(s x - b_dec) + b_enc)), x_hat = (z W_dec + b_dec) / s."""
    xn = x * sae.input_scale
    pre = (xn - sae.b_dec) @ sae.W_enc.T + sae.b_enc
    thresh = pre.topk(k, dim=-1).values[..., -1:]
    z = torch.where(pre >= thresh, pre, torch.zeros_like(pre)).relu()
    xn_hat = z @ sae.W_dec + sae.b_dec
    return z, xn_hat / sae.input_scale, xn, xn_hat


def make_sae(d=24, n=96, k=6, seed=0, **kw):
    torch.manual_seed(seed)
    sae = TopKSAE(d, n, k, dtype=torch.float64, **kw)
    with torch.no_grad():  # move away from the symmetric init so every term matters
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.5)
        sae.W_enc.add_(0.3 * torch.randn_like(sae.W_enc))
        sae.input_scale.fill_(0.7)
    return sae


def test_init_is_tied_unit_norm_and_zero_bias():
    sae = TopKSAE(32, 128, 8)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(128), atol=1e-6)
    assert torch.equal(sae.W_enc, sae.W_dec)
    assert sae.W_enc.data_ptr() != sae.W_dec.data_ptr()  # parallel, not shared
    assert sae.b_enc.abs().sum() == 0 and sae.b_dec.abs().sum() == 0
    assert float(sae.input_scale) == 1.0  # a fresh autoencoder applies no normalisation
    assert sae.W_enc.shape == (128, 32) and sae.b_enc.shape == (128,) and sae.b_dec.shape == (32,)
    assert (sae.d_in, sae.n_latents, sae.k) == (32, 128, 8)


def test_encode_decode_match_dense_formula_any_batch_shape():
    sae = make_sae()
    x = torch.randn(3, 5, 24, dtype=torch.float64)
    codes = sae.encode(x)
    assert isinstance(codes, Codes) and codes.values.shape == (3, 5, 6) and codes.indices.shape == (3, 5, 6)
    z, x_hat_ref, _, _ = dense_reference(sae, x, 6)
    dense_from_codes = torch.zeros_like(z).scatter(-1, codes.indices, codes.values)
    torch.testing.assert_close(dense_from_codes, z)
    assert (codes.values >= 0).all()
    torch.testing.assert_close(sae.decode(codes), x_hat_ref)
    torch.testing.assert_close(sae(x).x_hat, x_hat_ref)


def test_relu_after_topk_zeroes_negative_survivors():
    sae = make_sae()
    with torch.no_grad():
        sae.b_enc.fill_(-100.0)  # every pre-activation negative
    codes = sae.encode(torch.randn(4, 24, dtype=torch.float64))
    assert codes.values.abs().sum() == 0
    assert codes.indices.shape == (4, 6)


def test_fvu_definition():
    x = torch.randn(50, 8, dtype=torch.float64)
    x_hat = x + 0.1 * torch.randn_like(x)
    expected = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    torch.testing.assert_close(fvu(x, x_hat), expected)
    assert fvu(x, x).item() == 0.0
    assert abs(fvu(x, x.mean(0).expand_as(x)).item() - 1.0) < 1e-12


@pytest.mark.parametrize("multi_topk,chunk_rows", [(False, None), (True, None), (False, 7), (True, 7)])
def test_gradients_equal_dense_autograd(multi_topk, chunk_rows, monkeypatch):
    if chunk_rows:  # pre-activations in chunks of 7 rows (the last one shorter), as on CPU at large n
        monkeypatch.setattr(kernels, "CPU_CHUNK_BYTES", chunk_rows * 96 * 8)
    sae = make_sae(multi_topk=multi_topk)
    x = torch.randn(40, 24, dtype=torch.float64)
    dead = torch.zeros(96, dtype=torch.bool)
    dead[::3] = True
    out = sae(x, dead_mask=dead, k_aux=10)
    loss = out.fvu + out.auxk_fvu / 32 + (out.multi_topk_fvu / 8 if multi_topk else 0)
    grads = torch.autograd.grad(loss, list(sae.parameters()))

    ref = make_sae(multi_topk=multi_topk)
    z, _, xn, xn_hat = dense_reference(ref, x, 6)
    ref_loss = ((xn - xn_hat) ** 2).sum() / ((xn - xn.mean(0)) ** 2).sum()
    pre = (xn - ref.b_dec) @ ref.W_enc.T + ref.b_enc
    dead_pre = pre.masked_fill(~dead, float("-inf"))
    th = dead_pre.topk(10, dim=-1).values[..., -1:]
    z_aux = torch.where((dead_pre >= th) & dead, pre, torch.zeros_like(pre)).relu()
    e = (xn - xn_hat).detach()
    e_hat = z_aux @ ref.W_dec
    ref_loss = ref_loss + (((e - e_hat) ** 2).sum() / ((e - e.mean(0)) ** 2).sum()) / 32
    if multi_topk:
        _, _, _, xn_hat4 = dense_reference(ref, x, 24)
        ref_loss = ref_loss + (((xn - xn_hat4) ** 2).sum() / ((xn - xn.mean(0)) ** 2).sum()) / 8
    ref_grads = torch.autograd.grad(ref_loss, list(ref.parameters()))
    torch.testing.assert_close(loss, ref_loss)
    for (name, _), g, r in zip(sae.named_parameters(), grads, ref_grads):
        torch.testing.assert_close(g, r, msg=lambda m, name=name: f"{name}: {m}")


def test_bf16_matmul_selects_in_bf16_but_values_and_gradients_are_exact():
    """matmul_dtype=bfloat16: the top-k is chosen from bf16 pre-activations, the chosen values and every
    gradient are those of the fp32 formula restricted to that selection."""
    torch.manual_seed(3)
    sae = TopKSAE(32, 256, 8)
    x = torch.randn(300, 32)
    out = sae(x, matmul_dtype=torch.bfloat16)
    grads = torch.autograd.grad(out.fvu, list(sae.parameters()))
    idx = out.codes.indices
    xn = x * sae.input_scale
    pre = (xn - sae.b_dec) @ sae.W_enc.T + sae.b_enc
    torch.testing.assert_close(out.codes.values, pre.gather(1, idx).relu(), rtol=0, atol=2e-6)
    bf16_top = ((xn - sae.b_dec).bfloat16() @ sae.W_enc.bfloat16().T + sae.b_enc.bfloat16()).float().topk(8).values
    assert (pre.gather(1, idx) >= bf16_top[:, -1:] - 0.05).all()  # chosen by the bf16 ranking
    same = (idx.sort(1).values == pre.topk(8).indices.sort(1).values).all(1).float().mean()
    assert same > 0.9  # and mostly the fp32 ranking too
    ref = TopKSAE(32, 256, 8)
    ref.load_state_dict(sae.state_dict())
    mask = torch.zeros_like(pre, dtype=torch.bool).scatter_(1, idx, True)
    xr = x * ref.input_scale
    pre_r = (xr - ref.b_dec) @ ref.W_enc.T + ref.b_enc
    z = torch.where(mask, pre_r, torch.zeros_like(pre_r)).relu()
    loss = fvu(xr, z @ ref.W_dec + ref.b_dec)
    for (name, _), g, r in zip(sae.named_parameters(), grads, torch.autograd.grad(loss, list(ref.parameters()))):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_sparse_decoder_backward_equals_embedding_bag_autograd():
    torch.manual_seed(4)
    W = torch.randn(500, 16, dtype=torch.float64, requires_grad=True)
    vals = torch.rand(64, 40, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(0, 500, (64, 40))  # repeated latents within and across rows
    dy = torch.randn(64, 16, dtype=torch.float64)
    got = torch.autograd.grad(kernels.TopKDecode.apply(vals, idx, W), [vals, W], dy)
    ref = torch.autograd.grad(F.embedding_bag(idx, W, per_sample_weights=vals, mode="sum"), [vals, W], dy)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r)


def test_auxk_only_uses_dead_latents_and_absent_without_mask():
    sae = make_sae()
    x = torch.randn(10, 24, dtype=torch.float64)
    assert sae(x).auxk_fvu is None
    assert sae(x, dead_mask=torch.zeros(96, dtype=torch.bool)).auxk_fvu is None
    dead = torch.zeros(96, dtype=torch.bool)
    dead[5] = True
    out = sae(x, dead_mask=dead)
    out.auxk_fvu.backward()
    # only the dead latent's encoder row and decoder row receive AuxK gradient
    assert sae.W_dec.grad[5].abs().sum() > 0
    assert sae.W_dec.grad[torch.arange(96) != 5].abs().sum() == 0


def test_multi_topk_progressive_code():
    sae = make_sae(multi_topk=True)
    x = torch.randn(30, 24, dtype=torch.float64)
    out = sae(x)
    _, x_hat4, _, _ = dense_reference(sae, x, 24)  # Multi-TopK term: the same SAE decoded at 4k
    torch.testing.assert_close(out.multi_topk_fvu, fvu(x, x_hat4))
    codes24 = sae.encode(x, k=24)
    assert codes24.values.shape == (30, 24)
    torch.testing.assert_close(codes24.indices[:, :6], out.codes.indices)  # the k code is a prefix


def test_unit_norm_and_parallel_grad_removal():
    sae = make_sae()
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(96, 1, dtype=torch.float64) * 3 + 0.1)
    sae.unit_norm_decoder_()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(96, dtype=torch.float64))
    sae(torch.randn(20, 24, dtype=torch.float64)).fvu.backward()
    g_before = sae.W_dec.grad.clone()
    sae.remove_parallel_decoder_grad_()
    parallel = (sae.W_dec.grad * sae.W_dec).sum(1)
    assert parallel.abs().max() < 1e-12
    # the perpendicular part is untouched
    perp = g_before - (g_before * sae.W_dec).sum(1, keepdim=True) * sae.W_dec
    torch.testing.assert_close(sae.W_dec.grad, perp)


def test_geometric_median_robust_to_outliers():
    torch.manual_seed(0)
    x = torch.randn(501, 3) * 0.01 + torch.tensor([1.0, 2.0, 3.0])
    x[:50] = 1e4  # 10% far outliers pull the mean, not the median
    m = geometric_median(x)
    assert (m - torch.tensor([1.0, 2.0, 3.0])).norm() < 0.05
    assert (x.mean(0) - torch.tensor([1.0, 2.0, 3.0])).norm() > 100
    sae = TopKSAE(3, 8, 2)
    sae.init_b_dec_(x)
    torch.testing.assert_close(sae.b_dec, m)


def test_input_scale_travels_with_sae(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(256, 16) * 40.0
    sae = TopKSAE(16, 64, 4)
    s = sae.set_input_scale_(x)
    assert abs((x * s).pow(2).sum(-1).mean().item() - 16) < 1e-3
    codes = sae.encode(x[:8])
    # encode applies the scale: identical to an unscaled SAE fed the scaled input
    plain = TopKSAE(16, 64, 4)
    plain.load_state_dict({**sae.state_dict(), "input_scale": torch.tensor(1.0)})
    torch.testing.assert_close(codes.values, plain.encode(x[:8] * s).values)
    # decode undoes it: the reconstruction is in the input's units
    torch.testing.assert_close(sae.decode(codes), plain.decode(codes) / s)
    sae.save(tmp_path / "a")
    loaded = TopKSAE.load(tmp_path / "a")
    assert abs(float(loaded.input_scale) - s) < 1e-6
    torch.testing.assert_close(loaded.decode(loaded.encode(x)), sae.decode(sae.encode(x)))


def test_save_load_round_trip(tmp_path):
    sae = make_sae(multi_topk=True)
    sae.metadata = {"hookpoint": "model.layers.3", "tokens": 1000}
    sae.save(tmp_path / "s")
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["cfg.json", "sae.safetensors"]
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    assert cfg["d_in"] == 24 and cfg["n_latents"] == 96 and cfg["k"] == 6 and cfg["multi_topk"] is True
    loaded = TopKSAE.load(tmp_path / "s")
    assert loaded.W_enc.dtype == torch.float64 and loaded.multi_topk and loaded.metadata["tokens"] == 1000
    for (n, a), (_, b) in zip(sae.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n
    f32 = TopKSAE.load(tmp_path / "s", dtype=torch.float32)
    assert f32.W_dec.dtype == torch.float32


def test_save_overwrites_atomically_and_leaves_no_temp(tmp_path):
    a, b = make_sae(seed=0), make_sae(seed=1)
    a.save(tmp_path)
    b.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.json", "sae.safetensors"]
    assert torch.equal(TopKSAE.load(tmp_path).W_dec, b.W_dec)


def test_crash_mid_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    a = make_sae(seed=0)
    a.save(tmp_path)
    import saehook.atomic as mod

    real = mod._write_new

    def exploding_write(path, data):  # the weights file half written, then the process interrupted
        real(path, b"partial garbage" if path.name == "sae.safetensors" else data)
        if path.name == "sae.safetensors":
            raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(mod, "_write_new", exploding_write)
    with pytest.raises(KeyboardInterrupt):
        make_sae(seed=1).save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.json", "sae.safetensors"]
    assert torch.equal(TopKSAE.load(tmp_path).W_dec, a.W_dec)


@pytest.mark.parametrize(
    "args, match",
    [
        ((16, 8, 9), "k=9 is larger than n_latents=8"),
        ((0, 8, 2), "d_in must be a positive integer"),
        ((16, -1, 2), "n_latents must be a positive integer"),
        ((16, 8, 0), "k must be a positive integer"),
        ((16.0, 8, 2), "d_in must be a positive integer"),
    ],
)
def test_bad_configs(args, match):
    with pytest.raises(SAEConfigError, match=match):
        TopKSAE(*args)


def test_wrong_input_width_names_both_widths():
    sae = TopKSAE(16, 32, 4)
    with pytest.raises(ValueError, match=r"input width 20 .* d_in=16"):
        sae.encode(torch.randn(3, 20))
    with pytest.raises(ValueError, match=r"input width 20 .* d_in=16"):
        sae(torch.randn(3, 20))


def test_truncated_checkpoint(tmp_path):
    make_sae().save(tmp_path)
    w = tmp_path / "sae.safetensors"
    w.write_bytes(w.read_bytes()[:200])
    with pytest.raises(SAEConfigError, match="unreadable or truncated"):
        TopKSAE.load(tmp_path)


def test_mismatched_checkpoint(tmp_path):
    make_sae().save(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg["n_latents"] = 128
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SAEConfigError, match=r"does not match .*n_latents=128.*W_enc.*\(128, 24\).*\(96, 24\)"):
        TopKSAE.load(tmp_path)


def test_missing_files_and_bad_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="cfg.json is missing"):
        TopKSAE.load(tmp_path)
    make_sae().save(tmp_path)
    (tmp_path / "cfg.json").write_text("{not json")
    with pytest.raises(SAEConfigError, match="not valid JSON"):
        TopKSAE.load(tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps({"d_in": 24}))
    with pytest.raises(SAEConfigError, match=r"lacks \['n_latents', 'k'\]"):
        TopKSAE.load(tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps({"d_in": 24, "n_latents": 96, "k": 200}))
    with pytest.raises(SAEConfigError, match="k=200 is larger"):
        TopKSAE.load(tmp_path)


def test_decoder_never_builds_dense_latents():
    """decode touches only the k active rows: gradients on W_dec are zero elsewhere."""
    sae = make_sae()
    codes = Codes(torch.tensor([[1.0, 2.0]], dtype=torch.float64), torch.tensor([[3, 7]]))
    out = sae.decode(codes)
    torch.testing.assert_close(out, (sae.W_dec[3] + 2 * sae.W_dec[7] + sae.b_dec)[None] / sae.input_scale)
    out.sum().backward()
    rows = sae.W_dec.grad.abs().sum(1).nonzero().flatten().tolist()
    assert rows == [3, 7]
    assert F.embedding_bag  # the implementation path used


def test_import_sets_passive_openmp_wait_unless_user_chose():
    import os
    import subprocess
    import sys

    code = "import saehook, os; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "PASSIVE"
    out = subprocess.run([sys.executable, "-c", code], env={**env, "OMP_WAIT_POLICY": "ACTIVE"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ACTIVE"


def test_trainer_keeps_freed_cpu_memory_unless_user_chose():
    """SAETrainer raises glibc's mmap/trim thresholds once (a fresh [16384, 576] tensor then costs no page
    faults); SAEHOOK_TUNE_MALLOC=0 or any MALLOC_* variable leaves the allocator alone."""
    import os
    import platform
    import subprocess
    import sys

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt thresholds are a glibc feature")
    code = ("import saehook, saehook.allocator as a; saehook.SAETrainer(saehook.TopKSAE(8, 16, 2)); "
            "print(a._done, a.tune_cpu_allocator())")
    env = {k: v for k, v in os.environ.items() if not (k.startswith("MALLOC_") or k == "SAEHOOK_TUNE_MALLOC")}

    def run(**extra):
        out = subprocess.run([sys.executable, "-c", code], env={**env, **extra}, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return out.stdout.split()

    assert run() == ["True", "True"]
    assert run(SAEHOOK_TUNE_MALLOC="0") == ["False", "False"]
    assert run(MALLOC_MMAP_THRESHOLD_="65536") == ["False", "False"]
    assert run(MALLOC_ARENA_MAX="2") == ["False", "False"]


@pytest.mark.parametrize("c_kernels", [True, False], ids=["c-kernel", "torch-grouped"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_topk_values_equal_torch_topk_even_with_ties(dtype, c_kernels):
    if c_kernels:
        assert cpu_kernels.library() is not None, cpu_kernels.status()
    torch.manual_seed(5)
    for pre in (torch.randn(64, 4096, dtype=dtype), torch.randint(-20, 20, (64, 4096)).to(dtype)):  # many ties
        v = torch.empty(64, 32, dtype=dtype)
        i = torch.empty(64, 32, dtype=torch.long)
        with cpu_kernels.enabled(c_kernels):
            kernels._topk_rows(pre, 32, (v, i))
        assert torch.equal(v, pre.topk(32, dim=-1).values)
        assert torch.equal(pre.gather(1, i), v)  # indices point at those values
        assert (i.sort(1).values.diff(dim=1) > 0).all()  # and are distinct


def test_training_step_never_allocates_a_dense_tokens_by_latents_tensor():
    """The whole step (AuxK acting, bf16 matmul) allocates at most one pre-activation chunk at a time:
    every allocation the profiler sees is at most CPU_CHUNK_BYTES, an eighth of one dense [N, n] fp32."""
    from torch.profiler import ProfilerActivity, profile

    from saehook import SAETrainer, TrainConfig

    torch.manual_seed(0)
    N, n, d = 4096, 8192, 64
    trainer = SAETrainer(TopKSAE(d, n, 8), TrainConfig(batch_tokens=N, matmul_dtype="bfloat16"))
    x = torch.randn(N, d)
    trainer.initialize(x)
    trainer.tokens_since_fired[: n // 10] = trainer.dead_threshold  # 10% dead: AuxK runs
    trainer.step(x)  # the first step allocates Adam's state
    trainer.tokens_since_fired[: n // 10] = trainer.dead_threshold
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        metrics = trainer.step(x)
    assert metrics["auxk_fvu"] > 0
    biggest = max(e.cpu_memory_usage for e in prof.events())
    assert 0 < biggest <= kernels.CPU_CHUNK_BYTES <= N * n * 4 // 8
