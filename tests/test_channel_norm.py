"""Per-channel input standardisation (TrainConfig(normalize="channel")): training, persistence, exports to the
peers' formats, splicing and steering on a live model, checkpoints and resume."""

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model
from safetensors.torch import load_file

import saehook
from saehook import SAETrainer, TopKSAE, TrainConfig
from saehook.formats import LayerNormTopKSAE, load, save_saelens, save_sparsify
from saehook.hub import model_card
from saehook.sae import SAEConfigError

D, N, K = 16, 64, 4
STD = torch.logspace(-2, 2, D)  # channel stds from 0.01 to 100: variances 1e-4 .. 1e4
MEAN = torch.linspace(-5.0, 5.0, D)


def wild_rows(n=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g) * STD + MEAN


def trained(steps=4, **kw):
    torch.manual_seed(0)
    sae = TopKSAE(D, N, K, **kw)
    tr = SAETrainer(sae, TrainConfig(batch_tokens=512, normalize="channel"))
    x = wild_rows()
    for i in range(steps):
        tr.step(x[512 * i: 512 * (i + 1)])
    return sae


# ---------------------------------------------------------------------- config
def test_train_config_normalize_values_and_round_trip():
    assert TrainConfig().normalize == "scalar"
    assert TrainConfig(normalize=True) == TrainConfig()  # older configs: True -> "scalar", False -> "none"
    assert TrainConfig(normalize=False).normalize == "none"
    cfg = TrainConfig(normalize="channel", batch_tokens=512)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg and cfg.to_dict()["normalize"] == "channel"
    old = {**TrainConfig().to_dict(), "normalize": False}  # a dict written before the option existed
    assert TrainConfig.from_dict(json.loads(json.dumps(old))).normalize == "none"
    with pytest.raises(ValueError, match=r"normalize must be 'scalar', 'channel' or 'none' \(or True / False\), "
                                         r"got 'layer'"):
        TrainConfig(normalize="layer")


# ---------------------------------------------------------------------- the scale and the loss
def test_training_sets_a_per_channel_scale():
    sae = trained()
    assert sae.per_channel_scale and sae.input_scale.shape == (D,)
    first = wild_rows()[:512]  # the first batch is the init sample: s_c = 1 / std_c over it
    torch.testing.assert_close(sae.input_scale, 1 / first.double().std(0, unbiased=False).float())
    torch.testing.assert_close((first * sae.input_scale).var(0, unbiased=False), torch.ones(D))
    torch.testing.assert_close(sae.input_scale, 1 / STD, rtol=0.15, atol=0)
    x = wild_rows(seed=1)
    assert "per-channel in [" in repr(sae)
    # the scalar mode (default) on the same rows: one number, E||s x||^2 = d_in
    scalar = TopKSAE(D, N, K)
    s = scalar.set_input_scale_(x)
    assert scalar.input_scale.shape == () and abs((x * s).pow(2).sum(-1).mean().item() - D) < 1e-2
    # switching back and forth swaps the buffer's shape
    scalar.set_input_scale_(x, mode="channel")
    assert scalar.input_scale.shape == (D,)
    scalar.set_input_scale_(x)
    assert scalar.input_scale.shape == () and float(scalar.input_scale) == pytest.approx(s)


def test_loss_is_the_fvu_in_normalised_space():
    """fvu = sum_c s_c^2 err_c / sum_c s_c^2 var_c: every channel weighed by 1/var_c, not dominated by the
    channel of std 100."""
    sae = trained()
    x = wild_rows(seed=2)
    out = sae(x)
    s = sae.input_scale
    err = (x - out.x_hat).pow(2).sum(0)
    var = (x - x.mean(0)).pow(2).sum(0)
    torch.testing.assert_close(out.fvu, (s**2 * err).sum() / (s**2 * var).sum(), rtol=1e-4, atol=0)
    raw = err.sum() / var.sum()  # the FVU in the input's units (what saehook.evaluate reports)
    assert not torch.allclose(out.fvu, raw, rtol=1e-2)


def test_unknown_mode_and_layernorm_refusals():
    x = wild_rows(64)
    with pytest.raises(ValueError, match=r"input scale mode must be 'scalar' or 'channel', got 'rows'"):
        TopKSAE(D, N, K).set_input_scale_(x, mode="rows")
    ln = LayerNormTopKSAE(D, N, K)
    with pytest.raises(ValueError, match="cannot also take a per-channel input scale"):
        ln.set_input_scale_(x, mode="channel")
    with pytest.raises(ValueError, match="cannot also take a per-channel input scale"):
        SAETrainer(LayerNormTopKSAE(D, N, K), TrainConfig(batch_tokens=64, normalize="channel")).step(x)
    with pytest.raises(ValueError, match="needs at least 2 rows"):
        TopKSAE(D, N, K).set_input_scale_(x[:1], mode="channel")


def test_constant_channel_gets_a_finite_scale():
    x = wild_rows(256)
    x[:, 3] = 7.0  # a channel that never varies
    sae = TopKSAE(D, N, K)
    s = sae.set_input_scale_(x, mode="channel")
    rms_std = float(x.double().var(0, unbiased=False).mean().sqrt())
    assert torch.isfinite(s).all() and float(s[3]) == pytest.approx(1e4 / rms_std, rel=1e-5)  # the 1e-4 floor


# ---------------------------------------------------------------------- persistence
def test_save_load_bit_identical(tmp_path):
    sae = trained()
    sae.save(tmp_path / "c")
    cfg = json.loads((tmp_path / "c" / "cfg.json").read_text())
    assert cfg["input_scale"] == "per_channel"
    assert load_file(str(tmp_path / "c" / "sae.safetensors"))["input_scale"].shape == (D,)
    back = TopKSAE.load(tmp_path / "c")
    assert back.input_scale.shape == (D,) and torch.equal(back.input_scale, sae.input_scale)
    x = wild_rows(seed=3)
    with torch.no_grad():
        assert torch.equal(back(x).x_hat, sae(x).x_hat)
        assert torch.equal(saehook.load(tmp_path / "c")(x).x_hat, sae(x).x_hat)  # format detection too
    assert "per-channel input scale s [16]" in model_card(back)
    # a fresh (scalar) module takes the saved per-channel shape from a state dict (resume does this)
    fresh = TopKSAE(D, N, K)
    fresh.load_state_dict(sae.state_dict())
    assert fresh.input_scale.shape == (D,) and torch.equal(fresh.decode(fresh.encode(x)), sae.decode(sae.encode(x)))


def test_load_checks_the_scale_kind(tmp_path):
    sae = trained()
    sae.save(tmp_path / "c")
    cfg_file = tmp_path / "c" / "cfg.json"
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**cfg, "input_scale": 0.5}))  # cfg says scalar, file holds [d_in]
    with pytest.raises(SAEConfigError, match=r"'input_scale': \(\(\), \(16,\)\)"):
        TopKSAE.load(tmp_path / "c")
    cfg_file.write_text(json.dumps({**cfg, "input_scale": "per_row"}))
    with pytest.raises(SAEConfigError, match="expected a number or 'per_channel'"):
        TopKSAE.load(tmp_path / "c")
    # an older scalar checkpoint still loads as a scalar
    old = TopKSAE(D, N, K)
    old.input_scale.fill_(0.25)
    old.save(tmp_path / "old")
    assert json.loads((tmp_path / "old" / "cfg.json").read_text())["input_scale"] == 0.25
    assert TopKSAE.load(tmp_path / "old").input_scale.shape == ()


# ---------------------------------------------------------------------- the peers' formats
def peer_reference(W_enc, b_enc, W_dec, b_dec, x, k):
    """sparsify's and SAELens's (apply_b_dec_to_input, no normalisation) shared formula, W_enc as [n, d]."""
    pre = F.linear(x - b_dec, W_enc, b_enc)
    vals, idx = pre.topk(k, dim=-1)
    z = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
    return z, z @ W_dec + b_dec


@pytest.mark.parametrize("fmt", ["sparsify", "saelens"])
def test_export_folds_the_scale_and_reimports_the_same(tmp_path, fmt):
    # float64 so that no k-th / (k+1)-th pre-activation tie flips in the folded arithmetic
    sae = trained().double()
    x = wild_rows(seed=4).double()
    if fmt == "sparsify":
        save_sparsify(sae, tmp_path / "p")
        t = load_file(str(tmp_path / "p" / "sae.safetensors"))
        W_enc, b_enc = t["encoder.weight"], t["encoder.bias"]
        assert json.loads((tmp_path / "p" / "cfg.json").read_text())["normalize_decoder"] is False
    else:
        save_saelens(sae, tmp_path / "p")
        t = load_file(str(tmp_path / "p" / "sae_weights.safetensors"))
        W_enc, b_enc = t["W_enc"].T, t["b_enc"]
        assert json.loads((tmp_path / "p" / "cfg.json").read_text())["normalize_activations"] == "none"
    # the file alone, read with the peer's own formula, gives our latents and reconstructions
    z_ref, recon_ref = peer_reference(W_enc, b_enc, t["W_dec"], t["b_dec"], x, K)
    codes = sae.encode(x)
    dense = torch.zeros_like(z_ref).scatter(-1, codes.indices, codes.values)
    torch.testing.assert_close(dense, z_ref)
    torch.testing.assert_close(sae.decode(codes), recon_ref)
    back = load(tmp_path / "p")
    assert back.input_scale.shape == () and float(back.input_scale) == 1.0  # folded into the weights
    b = back.encode(x)
    assert torch.equal(b.indices, codes.indices)
    torch.testing.assert_close(b.values, codes.values)
    torch.testing.assert_close(back(x).x_hat, sae(x).x_hat)


# ---------------------------------------------------------------------- a live model
def layer1_rows(model, ids):
    rows = []

    def grab(m, a, o):
        y = o[0] if isinstance(o, tuple) else o
        rows.append(y.detach().reshape(-1, y.shape[-1]))

    h = model.model.layers[1].register_forward_hook(grab)
    try:
        model(ids)
    finally:
        h.remove()
    return rows[0]


def model_sae():
    """A tiny Llama whose layer-1 channels are rescaled by 1e-2 .. 1e2, and an autoencoder trained there."""
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (24, 32), generator=g)  # 768 rows: three batches of 256
    with torch.no_grad():  # wildly different channel variances at the hookpoint's output
        mlp = model.model.layers[1].mlp.down_proj
        mlp.weight.mul_(torch.logspace(-2, 2, 32)[:, None])
    x = layer1_rows(model, ids)
    torch.manual_seed(0)
    sae = TopKSAE(32, 128, 4)
    tr = SAETrainer(sae, TrainConfig(batch_tokens=256, normalize="channel"))
    for i in range(3):
        tr.step(x[256 * i: 256 * (i + 1)])
    assert sae.input_scale.shape == (32,)
    return model, sae, ids[:2, :12]


def test_splice_and_steer_per_channel_on_a_live_model():
    model, sae, ids = model_sae()
    layer = model.model.layers[1]

    def insert(fn):
        def hook(m, a, o):
            if isinstance(o, tuple):
                return (fn(o[0]), *o[1:])
            return fn(o)
        return layer.register_forward_hook(hook)

    h = insert(lambda x: sae(x).x_hat)  # a hand-made splice: x_hat = (W_dec^T z + b_dec) / s per channel
    try:
        manual = model(ids).logits
    finally:
        h.remove()
    h = insert(lambda x: x + 8.0 * sae.W_dec[5] / sae.input_scale)  # add 8 x latent 5's direction, in units
    try:
        manual_steer = model(ids).logits
    finally:
        h.remove()
    clean = model(ids).logits
    with saehook.attach(model, {1: sae}) as hooked:
        with hooked.splice():
            spliced = model(ids).logits
        with hooked.steer({1: {5: 8.0}}):
            steered = model(ids).logits
        with hooked.splice(keep_error=True):
            kept = model(ids).logits
    torch.testing.assert_close(spliced, manual)
    torch.testing.assert_close(steered, manual_steer)
    torch.testing.assert_close(kept, clean, atol=1e-4, rtol=1e-4)
    assert (spliced - clean).abs().max() > 1e-3 and (steered - clean).abs().max() > 1e-3


def test_channel_config_survives_checkpoint_and_resume(tmp_path):
    """As tests/test_training.py's resume test, with normalize="channel": the per-channel scale is restored
    into a fresh (scalar) autoencoder and the resumed run equals the uninterrupted one."""
    # init_samples: the scale comes from the first 1024 rows, so the run killed after 12 batches has stepped
    cfg = TrainConfig(batch_tokens=256, shuffle_buffer=512, log_every=1, checkpoint_every=4, normalize="channel",
                      init_samples=1024)

    def source(n=30, seed=0):
        g = torch.Generator().manual_seed(seed)
        return [torch.randint(3, 128, (8, 32), generator=g) for _ in range(n)]

    def run(out, src, resume=False):
        torch.manual_seed(0)
        sae = TopKSAE(32, 128, 4)
        with saehook.attach(tiny_model("llama"), {1: sae}) as hooked:
            hooked.train(src, tokens=4000, config=cfg, out=out, resume=resume, progress=False)
        return sae

    full = run(tmp_path / "a", source())
    assert full.input_scale.shape == (32,)

    class Interrupt(Exception):
        pass

    def dying(n):
        for i, b in enumerate(source()):
            if i == n:
                raise Interrupt
            yield b

    with pytest.raises(Interrupt):
        run(tmp_path / "b", dying(12))
    ck = tmp_path / "b" / "checkpoints"
    state = json.loads((ck / (ck / "LATEST").read_text() / "state.json").read_text())
    # a checkpoint keeps the config that ran: e2e_fraction None resolved (0.02 in one process)
    assert TrainConfig.from_dict(state["config"]) == dataclasses.replace(cfg, e2e_fraction=0.02)
    resumed = run(tmp_path / "b", source(), resume=True)
    assert resumed.input_scale.shape == (32,)
    for (n, p), q in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=n)
    assert TopKSAE.load(tmp_path / "b" / "model.layers.1").input_scale.shape == (32,)
