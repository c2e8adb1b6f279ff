"""End-to-end training (saehook.e2e): gradients against a hand-written splice, the model left untouched,
a run that lowers the spliced KL, and resume through the end-to-end phase."""

import copy
import json
import types

import pytest
import torch
import torch.nn.functional as F
from conftest import Interrupt, dying, source, tiny_model

import saehook
from saehook import SAETrainer, TopKSAE, TrainConfig
from saehook.e2e import e2e_step


def padded_batch():
    """Three rows of 12 tokens; the second left-padded by 3, the third by 1."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 128, (3, 12), generator=g)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, :3] = 0
    mask[2, :1] = 0
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask}


def manual_loss(model, refs: dict, dead: dict, batch: dict, cfg: TrainConfig, k_aux: int):
    """The end-to-end loss written out independently: plain forward hooks that put the dense TopK formulas'
    reconstruction in at the evaluated positions; returns (e2e loss, {layer: own loss})."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    real = mask.bool()
    pos = real.long().cumsum(-1) - 1
    evaluated = real & (pos >= cfg.skip_positions)
    kw = {"attention_mask": mask, "position_ids": pos.clamp_min(0)}
    lmask = evaluated[:, :-1] & real[:, 1:]
    with torch.no_grad():
        clean = model(ids, **kw).logits[:, :-1][lmask]
    own, handles = {}, []

    def hook_for(layer):
        sae = refs[layer]

        def hook(module, args, output):
            x = output[0] if isinstance(output, tuple) else output
            s = sae.input_scale
            xn = x[evaluated] * s
            pre = F.linear(xn - sae.b_dec, sae.W_enc, sae.b_enc)
            vals, idx = pre.topk(sae.k, dim=-1)
            xn_hat = (vals.relu().unsqueeze(-1) * sae.W_dec[idx]).sum(-2) + sae.b_dec
            fvu = (xn - xn_hat).pow(2).sum() / (xn - xn.mean(0)).pow(2).sum()
            e = (xn - xn_hat).detach()
            aux_vals, aux_idx = pre.masked_fill(~dead[layer], float("-inf")).topk(k_aux, dim=-1)
            e_hat = (aux_vals.relu().unsqueeze(-1) * sae.W_dec[aux_idx]).sum(-2)
            auxk = (e - e_hat).pow(2).sum() / (e - e.mean(0)).pow(2).sum()
            own[layer] = cfg.e2e_fvu_coef * fvu + cfg.auxk_coef * auxk
            y = x.clone()
            y[evaluated] = xn_hat / s
            return (y, *output[1:]) if isinstance(output, tuple) else y

        return hook

    try:
        for layer in refs:
            handles.append(model.model.layers[layer].register_forward_hook(hook_for(layer)))
        logits = model(ids, **kw).logits[:, :-1][lmask]
    finally:
        for h in handles:
            h.remove()
    if cfg.e2e_loss == "kl":
        loss = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(clean, -1), reduction="batchmean", log_target=True)
    else:
        loss = F.cross_entropy(logits, ids[:, 1:][lmask])
    return loss, own


@pytest.mark.parametrize("layers", [(1,), (0, 2)], ids=["one", "two"])
@pytest.mark.parametrize("loss", ["kl", "ce"])
def test_e2e_gradient_matches_manual_splice(layers, loss):
    model = tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # sharper predictions: a larger, less degenerate KL gradient
    torch.manual_seed(0)
    saes = {layer: TopKSAE(32, 64, 4) for layer in layers}
    cfg = TrainConfig(batch_tokens=64, e2e_loss=loss, e2e_fvu_coef=0.5, k_aux=8)
    batch = padded_batch()
    with saehook.attach(model, saes) as hooked:
        trainers = {k: SAETrainer(sae, cfg, total_tokens=10_000, name=str(k)) for k, sae in saes.items()}
        e2e_step(hooked, trainers, batch, cfg)  # initialises the autoencoders, takes a first step
        for tr in trainers.values():  # 16 dead latents, so that AuxK is part of the loss
            tr.tokens_since_fired[:16] = 10**9
        dead = {k: tr.dead_mask.clone() for k, tr in trainers.items()}
        refs = copy.deepcopy(saes)
        metrics = e2e_step(hooked, trainers, batch, cfg)
    assert all(tr.step_count == 2 for tr in trainers.values())
    e2e, own = manual_loss(model, refs, dead, batch, cfg, k_aux=8)
    assert metrics[layers[0]]["e2e_loss"] == pytest.approx(float(e2e.detach()), rel=1e-5)
    assert metrics[layers[0]][loss] == pytest.approx(float(e2e.detach()), rel=1e-5)
    assert "auxk_fvu" in metrics[layers[0]]
    all_params = [p for ref in refs.values() for p in ref.parameters()]
    grads = dict(zip(all_params, torch.autograd.grad(e2e, all_params, retain_graph=True)))
    for layer, ref in refs.items():  # each autoencoder's own terms train only itself
        params = list(ref.parameters())
        for p, g in zip(params, torch.autograd.grad(own[layer], params, retain_graph=True)):
            grads[p] = grads[p] + g
    for layer, ref in refs.items():
        for p in ref.parameters():
            p.grad = grads[p]
        ref.remove_parallel_decoder_grad_()  # as the trainer does before its Adam step
        for (name, p), q in zip(ref.named_parameters(), saes[layer].parameters()):
            assert q.grad is not None and p.grad.abs().max() > 0, name
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-7, msg=f"layer {layer} {name}")


def test_e2e_step_leaves_model_untouched():
    model = tiny_model("llama")
    model.model.layers[2].requires_grad_(True)  # some trainable model parameters: they must get no .grad
    model.lm_head.requires_grad_(True)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    clean = model(ids).logits.detach()
    sae = TopKSAE(32, 64, 4)
    cfg = TrainConfig(batch_tokens=64)
    with saehook.attach(model, {1: sae}) as hooked:
        tr = SAETrainer(sae, cfg, total_tokens=1000)
        w0 = sae.W_enc.detach().clone()
        m = e2e_step(hooked, {1: tr}, {"input_ids": ids}, cfg)
        assert m[1]["step"] == 1 and m[1]["kl"] > 0 and not torch.equal(sae.W_enc, w0)
        assert all(p.grad is None for p in model.parameters())
        assert {n: p.requires_grad for n, p in model.named_parameters()} == flags

        def boom(module, args, output):  # fails in the spliced (grad-enabled) forward only
            if torch.is_grad_enabled():
                raise RuntimeError("boom")

        handle = model.model.norm.register_forward_hook(boom)
        with pytest.raises(RuntimeError, match="boom"):
            e2e_step(hooked, {1: tr}, {"input_ids": ids}, cfg)
        handle.remove()
        assert tr.step_count == 1 and hooked.record  # no step taken; the user's record flag is back
        assert all(p.grad is None for p in model.parameters())
        assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, clean)  # no replacement left behind
        with hooked.replacing(lambda key, hp, x: None), pytest.raises(RuntimeError, match="already active"):
            with hooked.replacing(lambda key, hp, x: None):
                pass
    assert not hooked.attached


def sharp_model():
    """The tiny Llama with its output weights x20: peaked predictions, so a splice changes them measurably."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    return model


def test_e2e_training_lowers_spliced_kl(tmp_path):
    results = {}
    for frac in (0.0, 0.5):
        model = sharp_model()
        torch.manual_seed(0)
        sae = TopKSAE(32, 64, 4)
        cfg = TrainConfig(batch_tokens=256, shuffle_buffer=512, e2e_fraction=frac, log_every=1)
        with saehook.attach(model, {1: sae}) as hooked:
            report = hooked.train(source(60), tokens=8000, config=cfg, out=tmp_path / str(frac), progress=False)
        ev = saehook.evaluate(model, {1: sae}, source(8, seed=1), tokens=1984, ablations=False, control=False)
        results[frac] = (report, ev[1])
    report, ev = results[0.5]
    # 8 local steps of 256 rows reach 2048 >= 4000 tokens, then 16 steps of 8 x 31 rows reach 8000
    assert report.steps == 32 and report.tokens >= 8000
    lines = [json.loads(s) for s in (tmp_path / "0.5" / "metrics.jsonl").read_text().splitlines()]
    e2e_lines = [m for m in lines if "kl" in m]
    assert len(e2e_lines) >= 16 and all(m["e2e_loss"] == m["kl"] > 0 and "ce" in m for m in e2e_lines)
    assert "kl" not in results[0.0][0][1]
    # measured: spliced KL 0.808 (FVU only) vs 0.623 (half end-to-end); FVU 0.323 vs 0.391
    assert ev["kl"] < 0.85 * results[0.0][1]["kl"], (ev["kl"], results[0.0][1]["kl"])
    assert ev["fvu"] > results[0.0][1]["fvu"]  # the price: a worse reconstruction


def test_e2e_resume_equals_uninterrupted(tmp_path):
    cfg = TrainConfig(batch_tokens=256, shuffle_buffer=512, log_every=1, checkpoint_every=5, e2e_fraction=0.5,
                      e2e_loss="ce", e2e_fvu_coef=0.25, ema=0.99)

    def run(out, src, resume=False):
        torch.manual_seed(0)
        sae = TopKSAE(32, 128, 4)
        with saehook.attach(sharp_model(), {1: sae}) as hooked:
            hooked.train(src, tokens=4000, config=cfg, out=out, resume=resume, progress=False)
        return sae

    full = run(tmp_path / "a", source(60))

    with pytest.raises(Interrupt):
        run(tmp_path / "b", dying(16))
    ck = tmp_path / "b" / "checkpoints" / (tmp_path / "b" / "checkpoints" / "LATEST").read_text()
    state = json.loads((ck / "state.json").read_text())
    assert ck.name == "step-0000010" and state["position"] > 11  # inside the end-to-end phase
    assert TrainConfig.from_dict(state["config"]) == cfg
    resumed = run(tmp_path / "b", source(60), resume=True)
    for (n, p), q in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=n)


def test_e2e_config_validation_and_round_trip():
    cfg = TrainConfig(e2e_fraction=0.25, e2e_loss="ce", e2e_fvu_coef=0.0)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert TrainConfig().e2e_fraction is None and TrainConfig().e2e_fraction_for(live=True) == 0.02
    assert TrainConfig().e2e_fraction_for(live=False) == 0.0
    assert TrainConfig(e2e_fraction=0.0).e2e_fraction_for(live=True) == 0
    assert TrainConfig().e2e_loss == "kl" and TrainConfig().e2e_fvu_coef == 1
    with pytest.raises(ValueError, match="e2e_fraction must be in"):
        TrainConfig(e2e_fraction=1.5)
    with pytest.raises(ValueError, match="e2e_loss must be 'kl' or 'ce'"):
        TrainConfig(e2e_loss="mse")
    with pytest.raises(ValueError, match="e2e_fvu_coef must be"):
        TrainConfig(e2e_fvu_coef=-1.0)


def test_e2e_refuses_several_processes(monkeypatch):
    monkeypatch.setattr(saehook.training.D, "setup", lambda device: types.SimpleNamespace(rank=0, world=2))
    with saehook.attach(tiny_model("llama"), {1: TopKSAE(32, 64, 4)}) as hooked:
        with pytest.raises(ValueError, match="runs in one process"):
            hooked.train(source(2), tokens=500, config=TrainConfig(e2e_fraction=0.5), progress=False)


def test_default_runs_the_last_two_percent_end_to_end(tmp_path):
    """TrainConfig() leaves e2e_fraction None: hooked.train (one process, known length) trains the last
    AUTO_E2E_FRACTION of its tokens end-to-end on KL, and says so in train_config.json."""
    torch.manual_seed(0)
    sae = TopKSAE(32, 64, 4)
    cfg = TrainConfig(batch_tokens=256, shuffle_buffer=512, init_samples=512, log_every=1)
    with saehook.attach(sharp_model(), {1: sae}) as hooked:
        report = hooked.train(source(60), tokens=12_000, config=cfg, out=tmp_path / "run", progress=False)
    lines = [json.loads(s) for s in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    local, e2e = [m for m in lines if "kl" not in m], [m for m in lines if "kl" in m]
    # 11,760 local tokens: 46 steps of 256 rows (11,776), then one end-to-end step per model batch to 12,000
    assert len(local) == 46 and len(e2e) >= 1 and lines[-len(e2e):] == e2e, (len(local), len(e2e))
    assert report.tokens >= 12_000
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert saved["e2e_fraction"] is None and saved["e2e_fraction_used"] == 0.02
