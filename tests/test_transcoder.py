"""Transcoders and skip-transcoders (saehook.transcoder): math against a dense reference, on a live model's MLP."""

import pytest
import torch
from conftest import module_output, source, tiny_model

import saehook
from saehook.transcoder import SkipTranscoder, Transcoder

MLP = "model.layers.1.mlp"


def dense_reference(tc, x, y):
    """The transcoder's output and FVU from its parameters by the formula, in float64, with a dense code."""
    p = {n: t.double() for n, t in tc.state_dict().items()}
    xn, yn = x.double() * p["input_scale"], y.double() * p["output_scale"]
    pre = xn @ p["W_enc"].T + p["b_enc"]
    top = pre.topk(tc.k, dim=-1)
    z = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    yn_hat = z @ p["W_dec"] + p["b_dec"]
    if "W_skip" in p:
        yn_hat = yn_hat + xn @ p["W_skip"].T
    fvu = (yn - yn_hat).pow(2).sum() / (yn - yn.mean(0)).pow(2).sum()
    return yn_hat / p["output_scale"], fvu


@pytest.mark.parametrize("cls", [Transcoder, SkipTranscoder])
def test_forward_and_gradients_equal_the_dense_formula(cls):
    torch.manual_seed(0)
    tc = cls(12, 48, 4, dtype=torch.float64)
    x, y = torch.randn(40, 12, dtype=torch.float64), torch.randn(40, 12, dtype=torch.float64) * 3 + 1
    with torch.no_grad():
        tc.set_input_scale_(torch.cat([x, y], -1))
        tc.init_b_dec_(torch.cat([x, y], -1), method="mean")
        tc.b_enc.normal_()
        if cls is SkipTranscoder:
            tc.W_skip.normal_(std=0.1)
    assert float(tc.output_scale) == pytest.approx((12 / y.pow(2).sum(-1).mean()).sqrt().item())
    out = tc(torch.cat([x, y], -1))
    ref_y, ref_fvu = dense_reference(tc, x, y)
    torch.testing.assert_close(out.x_hat, ref_y, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(out.fvu, ref_fvu, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(tc.decode(tc.encode(x)), ref_y, atol=1e-10, rtol=1e-10)  # encode + decode agree
    out.fvu.backward()
    grads = {n: p.grad.clone() for n, p in tc.named_parameters()}
    tc.zero_grad()  # the reference again, differentiable through the parameters
    p = dict(tc.named_parameters())
    xn, yn = x * tc.input_scale, y * tc.output_scale
    pre = xn @ p["W_enc"].T + p["b_enc"]
    idx = pre.topk(tc.k, dim=-1).indices
    z = torch.zeros_like(pre).scatter(-1, idx, pre.gather(-1, idx).relu())
    yn_hat = z @ p["W_dec"] + p["b_dec"] + (xn @ p["W_skip"].T if "W_skip" in p else 0)
    ((yn - yn_hat).pow(2).sum() / (yn - yn.mean(0)).pow(2).sum()).backward()
    for n, g in grads.items():
        torch.testing.assert_close(g, p[n].grad, atol=1e-10, rtol=1e-8, msg=n)


def test_spliced_with_keep_error_gives_the_clean_logits_and_plainly_changes_them():
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    clean = model(ids).logits
    torch.manual_seed(0)
    tc = SkipTranscoder(32, 64, 4)
    with torch.no_grad():
        tc.W_skip.normal_(std=0.1)
    with saehook.attach(model, {MLP: tc}) as hooked:
        recorded = model(ids).logits
        codes = hooked.latents[MLP]
        with hooked.splice(keep_error=True):
            kept = model(ids).logits
        with hooked.splice():
            spliced = model(ids).logits
    torch.testing.assert_close(recorded, clean, atol=0, rtol=0)  # recording changes nothing
    torch.testing.assert_close(kept, clean, atol=1e-5, rtol=1e-5)  # y_hat + (y - y_hat) = y
    assert (spliced - clean).abs().max() > 1e-2  # the MLP's output replaced by the transcoder's prediction
    assert codes.indices.shape == (2, 10, 4) and bool((codes.values >= 0).all())
    # the code is the code of the MLP's input: the same as encoding the input read separately
    with saehook.attach(model, {f"{MLP}:input": saehook.TopKSAE(32, 8, 2)}) as probe:
        mlp_in = probe.run(ids, stop_early=False).acts[f"{MLP}:input"]
    torch.testing.assert_close(tc.encode(mlp_in).indices, codes.indices)


def test_trained_online_from_the_single_forward_pass(tmp_path):
    """hooked.train feeds the MLP's [input, output] rows; the FVU of the output falls, the run saves and loads,
    and steering a latent changes the output by v W_dec[j] / s_out."""
    model = tiny_model("llama")
    torch.manual_seed(0)
    tc = Transcoder(32, 64, 4)
    cfg = saehook.TrainConfig(batch_tokens=128, shuffle_buffer=256, init_samples=256, log_every=1, e2e_fraction=0.25)
    with saehook.attach(model, {MLP: tc}) as hooked:
        report = hooked.train(source(40), tokens=4096, config=cfg, out=tmp_path / "run", progress=False)
        fvus = [m["fvu"] for m in report.history if "fvu" in m and "kl" not in m]
        assert fvus[-1] < 0.6 * fvus[0]  # the transcoder learned the MLP
        assert sum("kl" in m for m in report.history) >= 3  # the end-to-end quarter trained through the splice
        ids = source(1)[0][:1, :8]
        mlp = model.get_submodule(MLP)  # its output as the rest of the model receives it
        seen = module_output(mlp, lambda: model(ids))
        with hooked.steer({MLP: {5: 3.0}}):
            seen += module_output(mlp, lambda: model(ids))
    torch.testing.assert_close(seen[1] - seen[0], (3.0 * tc.W_dec[5] / tc.output_scale).expand_as(seen[0]),
                               atol=1e-5, rtol=1e-5)
    # saehook.evaluate measures it on the MLP's output: its FVU is the one computed here from the output rows
    held = source(2, seed=5)
    rep = saehook.evaluate(model, {MLP: tc}, held, ablations=False)[MLP]
    with saehook.attach(model, {MLP: tc}) as hooked:
        pairs = [hooked.run(ids, skip_positions=1) for ids in held]
    xy = torch.cat([r.acts[MLP][r.valid] for r in pairs])
    y = xy[:, 32:]
    with torch.no_grad():
        fvu = float((y - tc.decode(tc.encode(xy))).pow(2).sum() / (y - y.mean(0)).pow(2).sum())
    assert rep["fvu"] == pytest.approx(fvu, rel=1e-4) and rep["fvu"] < 0.9  # held out: 0.786
    assert rep["tokens"] == len(y) and rep["delta_lm_loss"] is not None
    loaded = saehook.load(tmp_path / "run" / MLP)
    assert type(loaded) is Transcoder and float(loaded.output_scale) == float(tc.output_scale) != 1.0
    torch.testing.assert_close(loaded.W_dec, tc.W_dec)


def test_attached_at_an_input_site_is_refused():
    with pytest.raises(ValueError, match="attached at the module \\('model.layers.1.mlp'\\)"):
        saehook.attach(tiny_model("llama"), {f"{MLP}:input": Transcoder(32, 64, 4)})


def test_sparsify_transcoder_files_load_and_save(tmp_path):
    """sparsify's transcode / skip_connection layout, written by hand: saehook.load gives sparsify's output
    (pre = ReLU(encoder(x)), no b_dec subtracted; z W_dec + b_dec + x W_skip^T); save_sparsify of a transcoder
    with fitted scales writes weights that give the same output again."""
    import json

    from safetensors.torch import save_file

    from saehook.formats.sparsify import save_sparsify

    g = torch.Generator().manual_seed(0)
    d, n, k = 12, 48, 4
    t = {"encoder.weight": torch.randn(n, d, generator=g), "encoder.bias": torch.randn(n, generator=g) * 0.1,
         "W_dec": torch.randn(n, d, generator=g), "b_dec": torch.randn(d, generator=g),
         "W_skip": torch.randn(d, d, generator=g) * 0.1}
    (tmp_path / "tc").mkdir()
    save_file(t, str(tmp_path / "tc" / "sae.safetensors"))
    (tmp_path / "tc" / "cfg.json").write_text(json.dumps({"d_in": d, "num_latents": n, "k": k, "transcode": True,
                                                          "skip_connection": True}))
    tc = saehook.load(tmp_path / "tc")
    assert type(tc) is SkipTranscoder
    x = torch.randn(20, d, generator=g)
    pre = torch.relu(x @ t["encoder.weight"].T + t["encoder.bias"])
    vals, idx = pre.topk(k, dim=-1)
    ref = (vals.unsqueeze(-1) * t["W_dec"][idx]).sum(-2) + t["b_dec"] + x @ t["W_skip"].T
    torch.testing.assert_close(tc.decode(tc.encode(x)), ref, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # fitted scales, folded on save
        tc.input_scale.fill_(2.5)
        tc.output_scale.fill_(0.4)
    before = tc.decode(tc.encode(x))
    save_sparsify(tc, tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "cfg.json").read_text())
    assert cfg["transcode"] is True and cfg["skip_connection"] is True
    again = saehook.load(tmp_path / "out")
    torch.testing.assert_close(again.decode(again.encode(x)), before, atol=1e-4, rtol=1e-4)

