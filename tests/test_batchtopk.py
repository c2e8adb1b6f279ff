"""BatchTopK and Matryoshka BatchTopK autoencoders (issue 20): the training forward and its gradients equal a dense
reference written out here; the inference threshold gives held-out rows the training L0; the per-row cap is
measured; every Matryoshka prefix reconstructs, the full dictionary best; save/load, attach (recording, steering),
evaluate and hooked.train on a tiny model."""

import json

import pytest
import torch
from conftest import module_output, source, tiny_model

import saehook
from saehook import BatchTopKSAE, MatryoshkaBatchTopKSAE, SAEConfigError, SAETrainer, TrainConfig

CLASSES = [BatchTopKSAE, MatryoshkaBatchTopKSAE]


def sparse_rows(n, d=32, n_feat=96, seed=0):
    """Rows made of a variable number of planted unit directions (feature i fires with probability
    0.2 / (1 + i / 10), about 4.6 per row, magnitudes in [0.5, 2.5]) plus 1% noise; the directions are the same for
    every seed (seed 123), so held-out rows share them. Returns (rows [n, d], features per row [n])."""
    D = torch.randn(n_feat, d, generator=torch.Generator().manual_seed(123), dtype=torch.float64)
    D /= D.norm(dim=1, keepdim=True)
    g = torch.Generator().manual_seed(seed)
    p = 0.2 / (1 + torch.arange(n_feat, dtype=torch.float64) / 10)
    active = torch.rand(n, n_feat, generator=g, dtype=torch.float64) < p
    mags = 0.5 + 2 * torch.rand(n, n_feat, generator=g, dtype=torch.float64)
    x = (active * mags) @ D + 0.01 * torch.randn(n, d, generator=g, dtype=torch.float64)
    return x.float(), active.sum(1)


def dense_reference(sae, x, dead=None, k_aux=None):
    """The batch formulas in float64, independently of saehook: pre = W_enc (s x - b_dec) + b_enc, a = ReLU(pre),
    z = a on the k B largest of the batch (each row capped at its k_max largest first); x_hat_p from the latents
    < m_p (Matryoshka prefixes; one prefix n for BatchTopK); FVUs against sum ||s x - mean||^2; AuxK: the residual
    from the top k_aux dead pre-activations of each row. Returns (z, fvu of the full dictionary, [FVU_p], auxk)."""
    W_enc, b_enc, W_dec, b_dec, s = (t.double() for t in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, sae.input_scale))
    xn = x.double() * s
    a = ((xn - b_dec) @ W_enc.T + b_enc).relu()
    v, i = a.topk(sae.k_max, dim=-1)
    capped = torch.zeros_like(a).scatter(-1, i, v)  # each row's k_max largest
    flat = capped.reshape(-1)
    keep = torch.zeros_like(flat).scatter(0, flat.topk(sae.k * len(x)).indices, 1.0).view_as(a)
    z = capped * keep
    var = (xn - xn.mean(0)).pow(2).sum()
    prefixes = getattr(sae, "prefixes", [sae.n_latents])
    fvus = [((xn - (z[:, :m] @ W_dec[:m] + b_dec)).pow(2).sum() / var) for m in prefixes]
    auxk = None
    if dead is not None:
        e = (xn - (z @ W_dec + b_dec)).detach()
        pre_dead = ((xn - b_dec) @ W_enc.T + b_enc).masked_fill(~dead, float("-inf"))
        dv, di = pre_dead.topk(k_aux, dim=-1)
        e_hat = torch.zeros_like(a).scatter(-1, di, dv.relu()) @ W_dec
        auxk = (e - e_hat).pow(2).sum() / (e - e.mean(0)).pow(2).sum()
    return z, fvus[-1], fvus, auxk


def trained(cls, steps=150, seed=0, batch=256, **kw):
    """``cls(32, 128, k=4)`` trained by SAETrainer on ``steps`` batches of ``batch`` :func:`sparse_rows`; returns
    (sae, the trainer's per-step metrics)."""
    torch.manual_seed(seed)
    sae = cls(32, 128, 4, **kw)
    tr = SAETrainer(sae, TrainConfig(batch_tokens=batch, matmul_dtype="float32", init_samples=2048),
                    total_tokens=batch * steps)
    x, _ = sparse_rows(batch * steps, seed=seed)
    return sae, [tr.step(b) for b in x.split(batch)]


# ---------------------------------------------------------------------- the training forward
@pytest.mark.parametrize("cls", CLASSES)
def test_training_forward_and_gradients_equal_the_dense_reference(cls):
    torch.manual_seed(0)
    sae = cls(16, 64, 4, k_max=12, dtype=torch.float64)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
        sae.b_dec.normal_(0, 0.2)
        sae.input_scale.fill_(0.7)
    x = torch.randn(24, 16, dtype=torch.float64) * torch.linspace(0.5, 2.0, 16)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::3] = True
    out = sae(x, dead_mask=dead, k_aux=5)
    z, full, fvus, auxk = dense_reference(sae, x, dead, 5)
    got = torch.zeros(24, 64, dtype=torch.float64).scatter_add(-1, out.codes.indices, out.codes.values.detach())
    torch.testing.assert_close(got, z.detach(), rtol=1e-12, atol=1e-12)
    assert int((z > 0).sum()) == 4 * 24 and out.codes.values.shape == (24, 12)
    assert ((z > 0).sum(1).min(), (z > 0).sum(1).max()) != (4, 4)  # rows really differ: not a per-row TopK
    torch.testing.assert_close(out.fvu, full)
    torch.testing.assert_close(out.auxk_fvu, auxk)
    want_loss = torch.stack(fvus).mean()
    loss = (out.fvu if out.recon_loss is None else out.recon_loss) + 0.25 * out.auxk_fvu
    torch.testing.assert_close(loss, want_loss + 0.25 * auxk)
    if cls is MatryoshkaBatchTopKSAE:
        assert sae.prefixes == [4, 8, 16, 32, 64] and out.recon_loss is not None
        assert len({round(float(f.detach()), 6) for f in fvus}) == 5  # the prefixes' terms really differ
    params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
    got_g = torch.autograd.grad(loss, params)
    want_g = torch.autograd.grad(want_loss + 0.25 * auxk, params)
    for name, a, b in zip(("W_enc", "b_enc", "W_dec", "b_dec"), got_g, want_g):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)
    # the threshold starts at this batch's cut-off: its smallest kept activation
    assert float(sae.threshold) == pytest.approx(float(z[z > 0].min().detach()), rel=1e-12)


def test_a_row_over_the_cap_keeps_its_k_max_largest_and_the_budget_goes_to_other_rows():
    torch.manual_seed(1)
    sae = BatchTopKSAE(16, 64, 4, k_max=6, dtype=torch.float64)
    x = torch.randn(20, 16, dtype=torch.float64)
    x[:3] *= 8  # three loud rows would take far more than 6 of the batch's 80 slots
    a = (x @ sae.W_enc.T.detach()).relu()
    uncapped = a.reshape(-1).topk(80).indices // 64
    over = (torch.bincount(uncapped, minlength=20) > 6).float().mean()
    out = sae(x)
    assert float(over) == pytest.approx(3 / 20)  # exactly the three loud rows
    assert sae.capped_fraction >= float(over)  # in training an upper bound: one activation past the cap is seen
    train_over = sae.capped_fraction
    sae.eval()
    sae.threshold.fill_(float(a.reshape(-1).topk(80).values[-1]))  # the uncapped cut-off: inference is exact
    sae.encode(x)
    assert sae.capped_fraction == pytest.approx(3 / 20)
    print(f"rows over the cap: {float(over):.3f}; training estimate {train_over:.3f}")
    z, *_ = dense_reference(sae, x)
    got = torch.zeros(20, 64, dtype=torch.float64).scatter_add(-1, out.codes.indices, out.codes.values.detach())
    torch.testing.assert_close(got, z)
    assert int((got > 0).sum()) == 80 and int((got[:3] > 0).sum(1).max()) == 6  # the budget is spent elsewhere


def test_eval_mode_and_no_grad_use_the_threshold_not_the_batch():
    torch.manual_seed(0)
    sae = BatchTopKSAE(16, 64, 4)
    x = torch.randn(32, 16)
    sae(x)  # one training batch: sets the threshold
    theta = float(sae.threshold)
    with torch.no_grad():
        a = sae(x).codes
    sae.eval()
    b = sae(x).codes
    c = sae.encode(x)
    for codes in (a, b, c):
        dense = torch.zeros(32, 64).scatter_add(-1, codes.indices, codes.values)
        pre = (x @ sae.W_enc.T.detach()).relu()  # b_enc, b_dec are still 0
        torch.testing.assert_close(dense, pre * (pre > theta))
    assert float(sae.threshold) == theta  # inference never moves it
    # a token's code does not depend on its batch
    torch.testing.assert_close(sae.encode(x[:1]).values, c.values[:1])


def test_untrained_autoencoder_encodes_with_the_per_row_topk():
    torch.manual_seed(0)
    sae = BatchTopKSAE(16, 64, 4)
    x = torch.randn(8, 16)
    codes = sae.encode(x)
    ref = saehook.TopKSAE.encode(sae, x)
    torch.testing.assert_close(codes.values[:, :4], ref.values)
    assert torch.equal(codes.indices[:, :4], ref.indices) and not codes.values[:, 4:].any()


def test_bad_sizes_are_refused_in_one_sentence():
    with pytest.raises(SAEConfigError, match="k_max"):
        BatchTopKSAE(8, 16, 4, k_max=3)
    with pytest.raises(SAEConfigError, match="multi_topk=False"):
        BatchTopKSAE(8, 16, 4, multi_topk=True)
    with pytest.raises(SAEConfigError, match="prefixes"):
        MatryoshkaBatchTopKSAE(8, 16, 4, prefixes=[8, 4, 16])
    with pytest.raises(SAEConfigError, match="ending at n_latents=16"):
        MatryoshkaBatchTopKSAE(8, 16, 4, prefixes=[4, 8])


# ---------------------------------------------------------------------- trained on planted features
def test_the_threshold_gives_held_out_rows_the_training_l0():
    sae, hist = trained(BatchTopKSAE, steps=500, batch=128)
    train_l0 = sum(m["l0"] for m in hist[-20:]) / 20
    held, n_true = sparse_rows(4096, seed=99)
    codes = sae.encode(held)
    l0 = (codes.values > 0).sum(-1).double()
    print(f"training L0 {train_l0:.3f}, held-out L0 at the moving-average threshold {float(l0.mean()):.3f}")
    assert train_l0 == pytest.approx(4.0, rel=0.02)
    assert float(l0.mean()) == pytest.approx(train_l0, rel=0.10), (float(l0.mean()), train_l0)
    # the budget follows the data: rows with more planted features get more latents
    assert float(torch.corrcoef(torch.stack([l0, n_true.double()]))[0, 1]) > 0.5
    assert sae.capped_fraction < 0.01
    x_hat = sae.decode(codes).detach()
    assert float(((held - x_hat).pow(2).sum() / (held - held.mean(0)).pow(2).sum())) < 0.3
    assert hist[-1]["fvu"] < 0.5 * hist[5]["fvu"]


def test_a_short_run_trails_and_fit_threshold_sets_the_cut_off():
    sae, _ = trained(BatchTopKSAE, steps=60, batch=128)
    held, _ = sparse_rows(4096, seed=99)
    trailing = float((sae.encode(held).values > 0).sum(-1).float().mean())
    theta = sae.fit_threshold_(sparse_rows(4096, seed=7)[0])
    fitted = float((sae.encode(held).values > 0).sum(-1).float().mean())
    print(f"60 steps: held-out L0 {trailing:.3f} at the moving average, {fitted:.3f} after fit_threshold_")
    assert float(sae.threshold) == theta and fitted == pytest.approx(4.0, rel=0.03) and trailing < 0.9 * 4


def test_every_matryoshka_prefix_reconstructs_and_the_full_dictionary_best():
    sae, hist = trained(MatryoshkaBatchTopKSAE)
    assert "recon_loss" in hist[-1] and hist[-1]["recon_loss"] > hist[-1]["fvu"]
    held, _ = sparse_rows(4096, seed=99)
    fvus = sae.prefix_fvus(held)
    assert len(fvus) == 5 and max(fvus) < 1.0, fvus
    assert fvus[-1] == min(fvus) and fvus[-1] < 0.5 * fvus[0], fvus
    # the first prefix is worth more than its share: 8 of 128 latents alone explain a real part of the variance
    assert fvus[0] < 0.9, fvus
    codes = sae.encode(held)
    full = sae.decode(codes)
    torch.testing.assert_close(sae.decode_prefix(codes, 128), full)


# ---------------------------------------------------------------------- saves, hooks, training online
@pytest.mark.parametrize("cls", CLASSES)
def test_save_and_saehook_load_round_trip(cls, tmp_path):
    kw = {"prefixes": [16, 48, 128]} if cls is MatryoshkaBatchTopKSAE else {}
    sae, _ = trained(cls, steps=20, k_max=10, **kw)
    sae.save(tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    assert cfg["architecture"] == cls.architecture and cfg["k_max"] == 10
    back = saehook.load(tmp_path / "s")
    assert type(back) is cls and back.k_max == 10 and float(back.threshold) == float(sae.threshold) > 0
    if kw:
        assert back.prefixes == [16, 48, 128]
    x, _ = sparse_rows(64, seed=5)
    a, b = sae.encode(x), back.encode(x)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.values, b.values)
    with pytest.raises(SAEConfigError, match="saehook.load"):
        saehook.TopKSAE.load(tmp_path / "s")


@pytest.mark.parametrize("cls", CLASSES)
def test_attach_records_steers_and_evaluates(cls):
    model = tiny_model("llama")
    torch.manual_seed(0)
    sae = cls(32, 64, 4)
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    x = module_output(model.model.layers[1], lambda: model(ids))[0]
    sae.set_input_scale_(x.reshape(-1, 32))
    sae.train()(x.reshape(-1, 32))  # one training batch: a threshold
    assert float(sae.threshold) > 0
    with saehook.attach(model, {1: sae}) as hooked:
        model(ids)
        rec = hooked.latents[1]
        with hooked.steer({1: {5: 8.0}}):
            steered = module_output(model.model.layers[1], lambda: model(ids))
    want = sae.encode(x)
    assert rec.values.shape == (2, 12, sae.k_max)
    torch.testing.assert_close(rec.values, want.values)
    assert torch.equal(rec.indices, want.indices)
    l0 = float((rec.values > 0).sum(-1).float().mean())
    assert 1.0 < l0 < 12.0  # the threshold's code, not a per-row TopK of 4 nor the full width
    torch.testing.assert_close(steered[0].detach(), x + 8.0 * sae.W_dec[5].detach() / sae.input_scale)
    report = saehook.evaluate(model, {1: sae}, source(2), ablations=False, control=False)
    assert report[1]["l0"] == pytest.approx(l0, rel=0.5) and 0.0 < report[1]["fvu"] < 5.0


@pytest.mark.parametrize("cls", CLASSES)
def test_hooked_train_on_a_tiny_model(cls, tmp_path):
    model = tiny_model("llama")
    torch.manual_seed(0)
    sae = cls(32, 64, 4)
    cfg = TrainConfig(batch_tokens=256, shuffle_buffer=512, log_every=1, init_samples=1024, matmul_dtype="float32")
    with saehook.attach(model, {1: sae}) as hooked:
        report = hooked.train(source(40), tokens=6000, config=cfg, out=tmp_path, progress=False)
    fvu = [m["fvu"] for m in report.history]
    assert len(fvu) == report.steps >= 20 and fvu[-1] < 0.8 * fvu[0], fvu
    assert all(m["l0"] == pytest.approx(4.0, rel=0.05) for m in report.history)
    saved = saehook.load(tmp_path / "model.layers.1")
    assert type(saved) is cls and float(saved.threshold) > 0 and torch.equal(saved.W_dec, sae.W_dec)


@pytest.mark.parametrize("cls", CLASSES)
def test_saelens_export_is_a_jumprelu_at_the_threshold_and_sparsify_refuses(cls, tmp_path):
    from saehook.formats import FormatError, save_saelens, save_sparsify

    sae, _ = trained(cls, steps=20, k_max=10)
    sae.fit_threshold_(sparse_rows(256, seed=5)[0])
    x, _ = sparse_rows(256, seed=6)  # other rows: none sits exactly at theta (log / exp would round it either way)
    assert abs(float(sae.input_scale) - 1) > 0.1  # a scale to fold: the pre-activations, so theta, must not change
    save_saelens(sae, tmp_path / "lens")
    back = saehook.load(tmp_path / "lens")
    assert type(back) is saehook.JumpReLUSAE and back.k == 10
    a, b = sae.encode(x), back.encode(x)
    dense = [torch.zeros(256, 128).scatter_add(-1, c.indices, c.values.detach()) for c in (a, b)]
    torch.testing.assert_close(dense[1], dense[0], rtol=1e-4, atol=1e-4)
    assert float((dense[0] > 0).sum(-1).float().mean()) > 2.5  # real codes (L0 near k = 4), not empty ones
    with pytest.raises(FormatError, match="sparsify has no thresholded"):
        save_sparsify(sae, tmp_path / "sp")
    with pytest.raises(FormatError, match="fit_threshold_"):
        save_saelens(cls(8, 16, 2), tmp_path / "untrained")
