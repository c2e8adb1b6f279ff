"""LayerNormTopKSAE trains through every path TopKSAE does (issue 16, kinds 2 and 4): its forward is TopKSAE's
(sparse kernels, matmul_dtype, AuxK, variance_fn) around its own normalise / unnormalise; b_dec is fitted in
its normalised space; single process, data parallel (2-rank torchrun, gloo) and layer sharded runs lower the
loss and save autoencoders that splice the per-token formula; the scale and b_dec come from init_samples rows."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import source, tiny_model

import saehook
from saehook import LayerNormTopKSAE, SAETrainer, TopKSAE, TrainConfig
from saehook.formats import load
from saehook.plots import read_metrics
from saehook.training import collect_activations

SCRIPT = Path(__file__).parent / "scripts" / "dist_train.py"
ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1", "SAEHOOK_DIST_TIMEOUT": "30"}
EPS = 1e-5


def ln_reference(sae, x, k=None):
    """The per-token formula, in float64, written out independently of saehook:
    x' = (x - mean) / (std + eps) (unbiased std), z = ReLU(TopK(W_enc (x' - b_dec) + b_enc)),
    x_hat = (W_dec^T z + b_dec) * std + mean. Returns (x_hat, x', z)."""
    W_enc, b_enc, W_dec, b_dec = (t.detach().double() for t in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))
    x = x.detach().double()
    mu = x.mean(-1, keepdim=True)
    std = ((x - mu).pow(2).sum(-1, keepdim=True) / (x.shape[-1] - 1)).sqrt()
    xn = (x - mu) / (std + EPS)
    pre = (xn - b_dec) @ W_enc.T + b_enc
    v, i = pre.topk(k or sae.k, dim=-1)
    z = torch.zeros_like(pre).scatter(-1, i, v.relu())
    return (z @ W_dec + b_dec) * std + mu, xn, z


def assert_splices_exactly(sae, layer, model):
    """Attached at ``layer``, the spliced output equals :func:`ln_reference` of the clean output, token by token."""
    ids = torch.randint(3, 128, (3, 17), generator=torch.Generator().manual_seed(5))
    outs = []
    with saehook.attach(model, {layer: sae}, record=False) as hooked:
        h = model.model.layers[layer].register_forward_hook(lambda m, a, o: outs.append(
            (o[0] if isinstance(o, tuple) else o).detach().clone()))
        try:
            model(ids)
            with hooked.splice():
                model(ids)
        finally:
            h.remove()
    clean, spliced = outs
    assert not torch.allclose(spliced, clean, atol=1e-3)  # the splice replaced something
    torch.testing.assert_close(spliced.double(), ln_reference(sae, clean)[0], rtol=2e-5, atol=2e-5)


def rows(n=512, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * torch.linspace(0.5, 4.0, d) + torch.linspace(-3.0, 3.0, d)


# ---------------------------------------------------------------------- one forward, the parent's
def test_layernorm_forward_is_topksae_forward_on_the_normalised_rows():
    """No forward of its own; TopKSAE's forward on LN(x) gives the formula's x_hat, codes carrying each row's
    (mu, std), and gradients (parameters and x, for end-to-end training) equal to dense autograd of the formula.
    ``variance_fn`` is accepted (data-parallel training passes it: a TypeError before)."""
    assert "forward" not in LayerNormTopKSAE.__dict__ and "init_b_dec_" not in LayerNormTopKSAE.__dict__
    torch.manual_seed(0)
    sae = LayerNormTopKSAE(32, 64, 4)
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(32) * 0.1)
        sae.b_enc.copy_(torch.randn(64) * 0.1)
    x = rows(96).reshape(4, 24, 32).requires_grad_(True)
    calls = []

    def variance(v):
        calls.append(v.shape)
        return saehook.sae.total_variance(v)

    dead = torch.zeros(64, dtype=torch.bool)
    dead[::3] = True
    out = sae(x, dead_mask=dead, k_aux=6, variance_fn=variance)
    x_hat, xn, z = ln_reference(sae, x)
    torch.testing.assert_close(out.x_hat.double(), x_hat, rtol=1e-5, atol=1e-5)
    assert out.x_hat.shape == (4, 24, 32) and out.codes.values.shape == (4, 24, 4) and len(calls) == 2
    assert isinstance(out.codes, saehook.LNCodes) and out.codes.std.shape == (4, 24, 1)
    torch.testing.assert_close(sae.decode(out.codes), out.x_hat)
    (out.fvu + out.auxk_fvu / 4).backward()
    got = {n: p.grad.clone() for n, p in sae.named_parameters()} | {"x": x.grad.clone()}
    # dense reference in float32 autograd: the same loss written out
    ref = LayerNormTopKSAE(32, 64, 4)
    ref.load_state_dict(sae.state_dict())
    x2 = x.detach().clone().requires_grad_(True)
    mu = x2.mean(-1, keepdim=True)
    std = (x2 - mu).std(-1, keepdim=True)
    xn2 = ((x2 - mu) / (std + EPS)).reshape(-1, 32)
    pre = (xn2 - ref.b_dec) @ ref.W_enc.T + ref.b_enc
    v, i = pre.topk(4, dim=-1)
    xn_hat = torch.zeros_like(pre).scatter(-1, i, v.relu()) @ ref.W_dec + ref.b_dec

    def fvu(a, b):
        return (a - b).pow(2).sum() / (a - a.mean(0)).pow(2).sum()

    e = (xn2 - xn_hat).detach()
    va, ia = pre.masked_fill(~dead, float("-inf")).topk(6, dim=-1)
    e_hat = torch.zeros_like(pre).scatter(-1, ia, va.relu()) @ ref.W_dec
    (fvu(xn2, xn_hat) + fvu(e, e_hat) / 4).backward()
    want = {n: p.grad for n, p in ref.named_parameters()} | {"x": x2.grad}
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-6, msg=n)


def test_layernorm_forward_honours_matmul_dtype():
    """With matmul_dtype=bfloat16 the top k are those of the bf16 product W_enc (x' - b_dec) + b_enc (the
    parent's kernel), not of the float32 one: the old dense forward of the subclass ignored the option."""
    torch.manual_seed(1)
    sae = LayerNormTopKSAE(32, 256, 8)
    x = rows(2048, seed=3)
    with torch.no_grad():
        codes = sae(x, matmul_dtype=torch.bfloat16).codes
        xn = sae.normalise(x)[0]
        pre16 = torch.addmm(sae.b_enc.bfloat16(), (xn - sae.b_dec).bfloat16(), sae.W_enc.bfloat16().t()).float()
        pre32 = sae.pre_acts(x)
    top16 = pre16.topk(9, dim=-1).values
    clear = top16[:, 7] > top16[:, 8]  # rows without a bf16 tie at the k-th place
    want16 = pre16.topk(8, dim=-1).indices.sort(-1).values
    want32 = pre32.topk(8, dim=-1).indices.sort(-1).values
    got = codes.indices.sort(-1).values
    assert clear.sum() > 1500
    assert torch.equal(got[clear], want16[clear])
    assert (got != want32).any(-1).sum() > 0  # bf16 rounding changed some choice, so the option was used


def test_init_b_dec_mean_uses_the_normalised_rows():
    """init_b_dec="mean": b_dec = mean over rows of (x - mu) / (std + eps), not of x times input_scale (=1),
    which the trainer computed before (off by the rows' mean, ~3 here)."""
    x = rows(600, seed=4)
    for method in ("mean", "geometric_median"):
        sae = LayerNormTopKSAE(32, 64, 4)
        tr = SAETrainer(sae, TrainConfig(init_b_dec=method, init_samples=512))
        tr.initialize(x)
        xn = ln_reference(sae, x[:512])[1]
        want = xn.mean(0) if method == "mean" else saehook.geometric_median(xn)
        torch.testing.assert_close(sae.b_dec.double(), want.double(), rtol=1e-5, atol=1e-5)
        assert float(sae.input_scale) == 1.0
    assert float((x[:512].mean(0) - want.float()).abs().max()) > 1.0  # the old value was far from it


# ---------------------------------------------------------------------- every training path
def test_trainer_steps_lower_the_loss():
    torch.manual_seed(0)
    sae = LayerNormTopKSAE(32, 64, 4)
    tr = SAETrainer(sae, TrainConfig(batch_tokens=256, matmul_dtype="bfloat16"), total_tokens=256 * 30)
    x = rows(256 * 30, seed=6)
    fvus = [tr.step(b)["fvu"] for b in x.split(256)]
    assert fvus[-1] < 0.8 * fvus[0], fvus


def test_single_process_train_lowers_loss_and_saves_a_splicing_layernorm_sae(tmp_path):
    model = tiny_model("llama")
    torch.manual_seed(0)
    sae = LayerNormTopKSAE(32, 64, 4)
    cfg = TrainConfig(batch_tokens=256, shuffle_buffer=512, log_every=1, init_samples=1024)
    with saehook.attach(model, {1: sae}) as hooked:
        report = hooked.train(source(60), tokens=8000, config=cfg, out=tmp_path, progress=False)
    fvu = [m["fvu"] for m in report.history]
    assert len(fvu) == report.steps >= 31 and fvu[-1] < 0.8 * fvu[0], fvu
    saved = load(tmp_path / "model.layers.1")
    assert type(saved) is LayerNormTopKSAE and torch.equal(saved.W_dec, sae.W_dec)
    assert_splices_exactly(saved, 1, model)


def torchrun(out, *args, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(SCRIPT), str(out), "--layernorm", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]


def single(out, *args):
    env = {k: v for k, v in ENV.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    r = subprocess.run([sys.executable, str(SCRIPT), str(out), "--layernorm", *args], capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]


def test_data_parallel_two_ranks_train_a_layernorm_sae(tmp_path):
    """2-rank torchrun (gloo), shard="data": it failed on both ranks with TypeError 'variance_fn'. Both ranks
    hold the same autoencoder, equal to one process with twice the batch; the loss falls; what is saved is a
    LayerNormTopKSAE that splices the formula."""
    torchrun(tmp_path / "dp")
    single(tmp_path / "ref")
    name = "model.layers.1"
    r0, r1 = (load(tmp_path / "dp" / f"final.rank{r}" / name) for r in (0, 1))
    saved, ref = load(tmp_path / "dp" / name), load(tmp_path / "ref" / name)
    assert type(saved) is LayerNormTopKSAE and type(ref) is LayerNormTopKSAE
    for n, p in saved.state_dict().items():
        assert torch.equal(p, r0.state_dict()[n]) and torch.equal(p, r1.state_dict()[n]), n
        torch.testing.assert_close(p, ref.state_dict()[n], atol=1e-4, rtol=1e-4, msg=n)
    fvu = [m["fvu"] for m in read_metrics(tmp_path / "dp")[name]]
    assert len(fvu) == 8 and fvu[-1] < 0.9 * fvu[0], fvu
    assert_splices_exactly(saved, 1, tiny_model("llama", layers=4))


def test_layer_sharded_two_ranks_train_layernorm_saes(tmp_path):
    torchrun(tmp_path / "ls", "--shard", "layers", "--layers", "0", "1")
    model = tiny_model("llama", layers=4)
    for layer, rank in ((0, 0), (1, 1)):
        name = f"model.layers.{layer}"
        summary = json.loads((tmp_path / "ls" / f"summary.rank{rank}.json").read_text())
        assert summary["trained"] == [name] and summary["changed"][name] and summary["tokens"] == 4096
        metrics = tmp_path / "ls" / ("metrics.jsonl" if rank == 0 else f"metrics.rank{rank}.jsonl")
        fvu = [json.loads(line)["fvu"] for line in metrics.read_text().splitlines()]
        assert len(fvu) == 8 and fvu[-1] < 0.9 * fvu[0], (name, fvu)
        saved = load(tmp_path / "ls" / name)
        assert type(saved) is LayerNormTopKSAE
        assert_splices_exactly(saved, layer, model)


# ---------------------------------------------------------------------- init_samples rows, not one batch
def test_scale_is_fitted_on_init_samples_rows_across_batches():
    """TrainConfig(batch_tokens=128, init_samples=512, shuffle_buffer=0): the scale is the one of the first 512
    rows of the stream (before: of the first batch of 128 rows only)."""
    model = tiny_model("llama")
    src = source(12)
    cfg = TrainConfig(batch_tokens=128, init_samples=512, shuffle_buffer=0)
    sae = TopKSAE(32, 64, 4)
    with saehook.attach(model, {1: sae}) as hooked:
        first = collect_activations(hooked, src, tokens=512)[1]
        report = hooked.train(src, tokens=1024, config=cfg, progress=False)
    assert first.shape == (512, 32) and report.steps >= 8
    want = math.sqrt(32 / first.double().pow(2).sum(-1).mean().item())
    first_batch = math.sqrt(32 / first[:128].double().pow(2).sum(-1).mean().item())
    assert float(sae.input_scale) == pytest.approx(want, rel=1e-5)
    assert abs(first_batch / want - 1) > 1e-3  # the first batch alone gives another scale


def test_init_rows_is_init_samples_or_the_whole_shorter_run():
    assert SAETrainer(TopKSAE(8, 16, 2), TrainConfig()).init_rows == 32768
    assert SAETrainer(TopKSAE(8, 16, 2), TrainConfig(), total_tokens=4000).init_rows == 4000
    assert SAETrainer(TopKSAE(8, 16, 2), TrainConfig(init_samples=512), total_tokens=10**6).init_rows == 512
