"""Online training: the recipe on planted features, streaming from a live model, resume and checkpoints."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import Interrupt, dying, source, tiny_model

import saehook
import saehook.forward
from saehook import SAETrainer, TopKSAE, TrainConfig
from saehook.trainer import NonFiniteError

TESTS = Path(__file__).parent


def planted_batch(dirs, n, g, k_true=4):
    m = dirs.shape[0]
    idx = torch.rand(n, m, generator=g).argsort(1)[:, :k_true]
    mags = torch.rand(n, k_true, generator=g) * 2 + 0.5
    z = torch.zeros(n, m).scatter(1, idx, mags)
    return z @ dirs + 0.3


def test_planted_feature_recovery_with_defaults():
    """Sparse sums of 128 known unit directions superposed in d=64: the decoder finds them."""
    torch.manual_seed(0)
    dirs = torch.randn(128, 64)
    dirs /= dirs.norm(dim=1, keepdim=True)
    g = torch.Generator().manual_seed(1)
    sae = TopKSAE(64, 256, 8)
    tr = SAETrainer(sae, TrainConfig(), total_tokens=220 * 8192)
    start = (dirs @ sae.W_dec.T).max(1).values.mean()
    for _ in range(220):
        m = tr.step(planted_batch(dirs, 8192, g))
    mean_max_cos = (dirs @ sae.W_dec.T).max(1).values.mean()
    assert start < 0.5
    assert mean_max_cos > 0.9, float(mean_max_cos)
    assert m["fvu"] < 0.1 and m["l0"] > 7.99  # a rare selected latent can be ReLU'd to 0
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(256))  # unit-norm decoder kept


def test_first_step_sets_scale_and_geometric_median():
    torch.manual_seed(0)
    x = torch.randn(4096, 16) * 50 + 7.0
    sae = TopKSAE(16, 64, 4)
    tr = SAETrainer(sae, TrainConfig(batch_tokens=4096))
    tr.step(x)
    s = float(sae.input_scale)
    assert abs((x * s).pow(2).sum(-1).mean().item() - 16) < 1e-2
    # peak: lr_scale (4) x the paper's 2e-4 / sqrt(n / 2^14); the first step is 1/40 of the way up the warm-up
    # (2% of target_steps=2000 when the run's length is unknown)
    assert tr.peak_lr == pytest.approx(4 * 2e-4 / (64 / 2**14) ** 0.5)
    assert tr.lr == pytest.approx(tr.peak_lr / (0.02 * 2000))
    assert tr.opt.defaults["eps"] == 6.25e-10 and tr.opt.defaults["betas"] == (0.9, 0.99)
    # b_dec started at the geometric median (near 7*s per coordinate), then took one Adam step
    assert (sae.b_dec - 7.0 * s).abs().max() < 0.1


def test_dead_threshold_counts_expected_firings():
    """dead after max(dead_fraction * tokens, dead_firings * n / k) tokens (capped by dead_tokens, at least a
    batch): the 1M-token default gives 2,560 tokens at n = 4,096 and 10,240 at n = 16,384 (k = 32)."""
    def threshold(n, tokens, **kw):
        return SAETrainer(TopKSAE(8, n, 32), TrainConfig(**kw), total_tokens=tokens).dead_threshold
    assert threshold(4096, 10**6) == 2560 and threshold(16384, 10**6) == 10240
    assert threshold(4096, 4 * 10**6) == 10_000  # 0.25% of the run is the larger
    assert threshold(4096, 10**6, dead_firings=0) == 2500
    assert threshold(16384, 10**6, dead_tokens=5000) == 5000
    assert threshold(16384, 10**6, batch_tokens=16384) == 16384
    with pytest.raises(ValueError, match="dead_firings"):
        TrainConfig(dead_firings=-1)


def test_dead_latents_and_auxk():
    torch.manual_seed(0)
    x = torch.randn(2048, 1) @ torch.randn(1, 16)  # rank 1: few latents ever win the top 2
    sae = TopKSAE(16, 512, 2)
    tr = SAETrainer(sae, TrainConfig(batch_tokens=2048), total_tokens=2048 * 40)
    # 0.25% of the run is 205 tokens, but never below 20 expected firings (20 * 512 / 2) nor one batch
    assert tr.dead_threshold == 5120
    for _ in range(4):
        m = tr.step(x)
    assert m["dead_frac"] > 0.2 and "auxk_fvu" in m  # most latents never fired in 6k tokens (AuxK from step 4)
    tr2 = SAETrainer(TopKSAE(16, 512, 2), TrainConfig(batch_tokens=2048, auxk=False), total_tokens=2048 * 40)
    for _ in range(3):
        m2 = tr2.step(x)
    assert "auxk_fvu" not in m2 and m2["loss"] == m2["fvu"]


def test_nan_activations_raise_with_step_and_name():
    tr = SAETrainer(TopKSAE(8, 32, 2), TrainConfig(batch_tokens=64), name="model.layers.3")
    tr.step(torch.randn(64, 8))
    bad = torch.randn(64, 8)
    bad[5, 2] = float("nan")
    with pytest.raises(NonFiniteError, match=r"non-finite activations at step 1 for model.layers.3"):
        tr.step(bad)
    skip = SAETrainer(TopKSAE(8, 32, 2), TrainConfig(batch_tokens=64, nan_policy="skip"))
    m = skip.step(bad)
    assert m["skipped"] == 1 and m["step"] == 1  # the bad row was dropped, the step taken


def test_config_validation():
    with pytest.raises(ValueError, match="batch_tokens must be positive"):
        TrainConfig(batch_tokens=0)
    with pytest.raises(ValueError, match="nan_policy"):
        TrainConfig(nan_policy="ignore")
    with pytest.raises(ValueError, match="unknown TrainConfig fields"):
        TrainConfig.from_dict({"batch_size": 3})
    assert TrainConfig.from_dict(TrainConfig().to_dict()) == TrainConfig()


def small_cfg(**kw):
    # init_samples: the scale and b_dec wait for 1024 rows (~4 passes), not the whole of these short runs
    return TrainConfig(**{"batch_tokens": 256, "shuffle_buffer": 512, "log_every": 1, "init_samples": 1024, **kw})


def test_multi_layer_single_pass_with_early_stop(tmp_path):
    model = tiny_model("llama")
    before = {n: p.clone() for n, p in model.state_dict().items()}
    calls = {"last": 0, "head": 0, "first": 0}
    model.model.layers[2].register_forward_hook(lambda *a: calls.__setitem__("last", calls["last"] + 1))
    model.lm_head.register_forward_hook(lambda *a: calls.__setitem__("head", calls["head"] + 1))
    model.model.layers[0].register_forward_hook(lambda *a: calls.__setitem__("first", calls["first"] + 1))
    a, b = TopKSAE(32, 128, 4), TopKSAE(32, 128, 4)
    a0, b0 = a.W_enc.clone(), b.W_enc.clone()
    with saehook.attach(model, {0: a, 1: b}) as hooked:
        report = hooked.train(source(), tokens=4000, config=small_cfg(), out=tmp_path, progress=False)
    assert calls["last"] == 0 and calls["head"] == 0  # stopped after layer 1, the deepest hooked
    # one pass per source batch feeds both: 16 steps x 256 rows + 512 held for mixing, at 248 rows/pass
    assert calls["first"] == -(-(16 * 256 + 512) // 248) == 19
    assert report[0]["tokens"] == report[1]["tokens"] == report.tokens >= 4000
    assert report[0]["step"] == report[1]["step"] == report.steps
    assert not torch.equal(a.W_enc, a0) and not torch.equal(b.W_enc, b0)
    # rows per pass: 8 windows x 31 positions (first position excluded) = 248
    assert report.tokens == report.steps * 256
    for n, p in model.state_dict().items():  # the model never changes and never gets gradients
        assert torch.equal(p, before[n]), n
    assert all(p.grad is None for p in model.parameters())
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {x["hookpoint"] for x in lines} == {"model.layers.0", "model.layers.1"}
    assert {"fvu", "l0", "dead_frac", "tokens_per_s"} <= set(lines[-1])
    loaded = TopKSAE.load(tmp_path / "model.layers.1")
    torch.testing.assert_close(loaded.W_dec, b.W_dec)
    assert loaded.metadata["tokens"] == report.tokens and float(loaded.input_scale) != 1.0


def test_fvu_decreases_on_a_live_model(tmp_path):
    model = tiny_model("gpt2")
    with saehook.attach(model, {1: TopKSAE(32, 128, 4)}) as hooked:
        report = hooked.train(source(120), tokens=25000, config=small_cfg(), progress=False)
    fvus = [h["fvu"] for h in report.history]
    assert fvus[-1] < 0.6 * fvus[0], (fvus[0], fvus[-1])


def test_padding_and_first_positions_excluded():
    model = tiny_model("gpt_neox")
    ids = torch.randint(3, 128, (4, 10))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding in row 0
    with saehook.attach(model, {1: TopKSAE(32, 64, 4)}) as hooked:
        from saehook.training import TrainingSession

        s = TrainingSession(hooked, small_cfg(skip_positions=1))
        model(ids, attention_mask=mask)  # the forward whose rows valid_rows picks
        x = torch.arange(4 * 10).float().reshape(4, 10, 1).expand(4, 10, 32)
        rows = s.valid_rows(hooked.hookpoints[1], x)
    # row 0 keeps positions 5..9 (4 pads + its first real token dropped); others 1..9
    assert rows.shape == (5 + 9 * 3, 32)
    assert rows[:5, 0].tolist() == [5.0, 6.0, 7.0, 8.0, 9.0]


def test_shuffle_buffer_mixes_windows_and_batch_is_independent():
    from saehook.buffer import ShuffleBuffer

    buf = ShuffleBuffer(1, batch=100, capacity=300, seed=0)
    for w in range(13):  # thirteen "windows" of 31 rows each, tagged by window
        buf.add(torch.full((31, 1), float(w)))
    batches = buf.batches()
    assert [len(b) for b in batches] == [100] and buf.n == 303  # 403 rows, 300+ kept for mixing
    assert len(set(batches[0].flatten().tolist())) >= 8  # drawn from many windows, not one
    rest = buf.batches(flush=True)
    assert [len(b) for b in rest] == [100, 100, 100] and buf.n == 3


def test_train_while_generating():
    model = tiny_model("llama")
    sae = TopKSAE(32, 64, 4)
    w0 = sae.W_enc.clone()
    prompt = torch.randint(3, 128, (4, 8))
    # the first step waits for init_samples rows (the scale's sample), then every full batch steps
    cfg = small_cfg(batch_tokens=32, shuffle_buffer=0, init_samples=64)
    with saehook.attach(model, {1: sae}) as hooked, hooked.training(cfg) as session:
        model.generate(prompt, max_new_tokens=20, do_sample=False)
    assert session.trainers[1].step_count == 104 // 32  # 4 x 7 prompt rows (BOS position skipped) + 4 x 19 new
    assert not torch.equal(sae.W_enc, w0)
    assert not hooked.attached and not hooked._taps


def train_tiny(out, src, cfg, resume=False):
    """A fresh seeded autoencoder at layer 1 of a tiny Llama, trained on ``src`` for 8000 tokens."""
    torch.manual_seed(0)
    sae = TopKSAE(32, 128, 4)
    with saehook.attach(tiny_model("llama"), {1: sae}) as hooked:
        hooked.train(src, tokens=8000, config=cfg, out=out, resume=resume, progress=False)
    return sae


def assert_same_weights(a, b):
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=n)


def test_resume_equals_uninterrupted(tmp_path):
    cfg = small_cfg(checkpoint_every=7, ema=0.99)
    full = train_tiny(tmp_path / "a", source(60), cfg)
    with pytest.raises(Interrupt):
        train_tiny(tmp_path / "b", dying(17), cfg)
    assert (tmp_path / "b" / "checkpoints" / "LATEST").read_text() == "step-0000014"
    assert_same_weights(full, train_tiny(tmp_path / "b", source(60), cfg, resume=True))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train_tiny(tmp_path / "c", source(2), cfg, resume=True)


def test_nan_in_live_activations_names_hookpoint():
    model = tiny_model("llama")

    def poison(mod, args):
        return (args[0] * float("nan"),)

    model.model.layers[1].register_forward_pre_hook(poison)
    with saehook.attach(model, {1: TopKSAE(32, 64, 4)}) as hooked:
        with pytest.raises(FloatingPointError, match=r"non-finite activations at step 0 for model.layers.1"):
            hooked.train(source(3), tokens=500, config=small_cfg(), progress=False)


def test_checkpoint_survives_kill(tmp_path):
    """SIGKILL a real training process at random moments: the latest checkpoint always loads."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    rng = __import__("random").Random(0)
    kills = 0
    for attempt in range(4):
        p = subprocess.Popen([sys.executable, str(TESTS / "scripts" / "train_tiny.py"), str(out), str(TESTS)]
                             + (["resume"] if attempt else []), env=env)
        deadline = time.time() + 600  # a slow start under load is not a failure; a missing checkpoint is
        while not (out / "checkpoints" / "LATEST").exists() and time.time() < deadline and p.poll() is None:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.2, 1.0))
        p.send_signal(signal.SIGKILL)
        p.wait()
        kills += 1
        latest = (out / "checkpoints" / "LATEST").read_text()
        ck = out / "checkpoints" / latest
        sae = TopKSAE.load(ck / "model.layers.1")
        state = json.loads((ck / "model.layers.1" / "trainer.json").read_text())
        assert state["step"] == int(latest.split("-")[1])
        assert TopKSAE.load(out / "model.layers.1").n_latents == sae.n_latents == 256
    assert kills == 4


def test_training_curve_plot(tmp_path):
    from saehook.plots import plot_training, read_metrics

    model = tiny_model("llama")
    with saehook.attach(model, {1: TopKSAE(32, 128, 4)}) as hooked:
        hooked.train(source(30), tokens=3000, config=small_cfg(), out=tmp_path / "r", progress=False)
    runs = read_metrics(tmp_path / "r")
    steps = [m["step"] for m in runs["model.layers.1"]]
    assert steps == sorted(steps) and steps[0] == 1 and steps[-1] == 12
    png = plot_training({"auxk": tmp_path / "r"}, tmp_path / "curve.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_corpus_source_repeats_when_exhausted():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from saehook.training import iter_batches

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(20)]
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    docs = [saehook.corpus.Document(" ".join(f"w{(i * 7 + j) % 20}" for j in range(40)), id=str(i)) for i in range(6)]
    corpus = saehook.Corpus(docs, tok, context=8, holdout=0.0)
    one_pass = list(corpus.windows("train", batch_size=2))
    batches = [b["input_ids"] for b in islice_(iter_batches(corpus, batch_size=2), 3 * len(one_pass))]
    assert len(one_pass) > 3
    for i, b in enumerate(batches):
        assert torch.equal(b, one_pass[i % len(one_pass)])
    resumed = next(iter_batches(corpus, batch_size=2, start=len(one_pass) + 2))["input_ids"]
    assert torch.equal(resumed, one_pass[2])


def islice_(it, n):
    from itertools import islice

    return islice(it, n)


def test_lr_schedule_and_budget_aware_batch():
    cfg = TrainConfig()  # wsd: 2% warm-up, flat, linear decay to 0 over the last 20%
    f = [cfg.lr_factor(s, 100) for s in range(100)]
    assert f[0] == pytest.approx(0.5) and f[1] == 1.0  # warm-up over 2 steps
    assert f[79] == 1.0 and f[80] == pytest.approx(20 / 20) and f[90] == pytest.approx(10 / 20)
    assert f[99] == pytest.approx(1 / 20) and all(a >= b for a, b in zip(f[2:], f[3:]))
    cos = TrainConfig(lr_schedule="cosine", warmup_fraction=0.0)
    assert cos.lr_factor(0, 100) == 1.0 and cos.lr_factor(50, 100) == pytest.approx(0.5)
    assert TrainConfig(lr_schedule="constant").lr_factor(99, 100) == 1.0
    assert [cfg.lr_factor(s, 4) for s in range(4)] == [1.0, 1.0, 1.0, 1.0]  # warm-up under one step: never > 1
    assert cfg.lr_factor(10_000, None) == 1.0  # unknown length: no decay
    # ~2000 steps, a power of two in [512, 8192]
    assert [cfg.batch_for(t) for t in (None, 100_000, 250_000, 1_000_000, 4_000_000, 16_000_000, 10**9)] == \
        [8192, 512, 512, 512, 2048, 8192, 8192]
    assert TrainConfig(batch_tokens=300).batch_for(10**6) == 300
    tr = SAETrainer(TopKSAE(16, 64, 4), TrainConfig(warmup_fraction=0.0, target_steps=10), total_tokens=10_000)
    assert tr.batch_tokens == 1024 and tr.total_steps == 10
    lrs = []
    for _ in range(10):
        tr.step(torch.randn(1024, 16))
        lrs.append(tr.opt.param_groups[0]["lr"])
    assert lrs[:8] == [tr.peak_lr] * 8 and lrs[8] == pytest.approx(tr.peak_lr * 2 / 2)
    assert lrs[9] == pytest.approx(tr.peak_lr / 2)
    with pytest.raises(ValueError, match="lr_schedule must be"):
        TrainConfig(lr_schedule="linear")
    with pytest.raises(ValueError, match="sum to at most 1"):
        TrainConfig(warmup_fraction=0.5, decay_fraction=0.6)
    with pytest.raises(ValueError, match="lr_scale must be"):
        TrainConfig(lr_scale=0)


@pytest.mark.parametrize("kw", [dict(lr_schedule="cosine", warmup_fraction=0.1),
                                dict(batch_tokens=None, lr_scale=2.0, decay_fraction=0.5, checkpoint_every=2,
                                     dead_firings=5.0)])
def test_new_options_round_trip_through_checkpoint_and_resume(tmp_path, kw):
    cfg = small_cfg(**{"checkpoint_every": 7, **kw})
    full = train_tiny(tmp_path / "a", source(60), cfg)
    saved = json.loads((tmp_path / "a" / "train_config.json").read_text())
    run_keys = ("tokens", "world", "shard", "shards", "matmul_dtype_used", "e2e_fraction_used")
    assert TrainConfig.from_dict({k: v for k, v in saved.items() if k not in run_keys}) == cfg
    with pytest.raises(Interrupt):
        train_tiny(tmp_path / "b", dying(17), cfg)
    assert_same_weights(full, train_tiny(tmp_path / "b", source(60), cfg, resume=True))


def _fed_rows(session, key=1) -> torch.Tensor:
    buf = session.buffers[key]
    return torch.cat(buf.rows) if buf.rows else torch.zeros(0, buf.d)


def _layer_out(model, ids, mask, layer=1):
    """The clean output of decoder layer ``layer`` (rows as the row alone computes them)."""
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    return model(ids, attention_mask=mask, position_ids=pos, output_hidden_states=True).hidden_states[layer + 1]


@pytest.mark.parametrize("side", ["left", "right"])
def test_training_context_feeds_each_real_token_once(side):
    """Fault kind 2 (failed before: 14 rows, padding and a left-padded row's first real token, instead of
    11): ``hooked.training()`` around the user's own ``model(**batch)`` feeds exactly the rows ``train()``
    feeds: real tokens, each row's first ``skip_positions`` left out."""
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (2, 8), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0 if side == "left" else 1
    if side == "right":
        mask[1, 5:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    expected = _layer_out(model, ids, mask)[saehook.forward.position_masks(batch, 1)[0]]  # [11, d]
    cfg = small_cfg(batch_tokens=10**6, shuffle_buffer=0)
    with saehook.attach(model, {1: TopKSAE(32, 64, 4)}) as hooked, hooked.training(cfg) as session:
        model(**batch)
    assert len(expected) == 11
    torch.testing.assert_close(_fed_rows(session), expected, atol=1e-5, rtol=1e-5)
    with saehook.attach(model, {1: TopKSAE(32, 64, 4)}) as hooked:  # train() takes the same rows
        collected = saehook.training.collect_activations(hooked, [batch], tokens=100)[1]
    torch.testing.assert_close(collected, expected, atol=1e-5, rtol=1e-5)


def test_setting_the_removed_session_attention_mask_raises():
    """``TrainingSession.attention_mask`` is no longer read (padding comes from each forward's own inputs):
    setting it, as older code did, raises instead of silently doing nothing."""
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with saehook.attach(model, {1: TopKSAE(32, 64, 4)}) as hooked, hooked.training(small_cfg()) as session:
        with pytest.raises(AttributeError, match=r"attention_mask was removed.*model\(\*\*batch\)"):
            session.attention_mask = mask
        with pytest.raises(AttributeError, match="attention_mask was removed"):
            session.attention_mask  # noqa: B018
        assert not hasattr(session, "attention_mask")


@pytest.mark.parametrize("how", ["no_cache", "chunked_prefill"])
def test_training_while_generating_feeds_each_token_once(how):
    """Generation without the cache re-feeds the whole sequence at every step, chunked prefill feeds the
    prompt in pieces: either way every real token is fed once, as with the cache (failed before: without the
    cache the prompt was fed at every step)."""
    model = tiny_model("llama")
    prompt = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(prompt)
    mask[1, :2] = 0
    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, min_new_tokens=5)
    cfg = small_cfg(batch_tokens=10**6, shuffle_buffer=0)
    fed = {}
    for mode, extra in [("cache", {}), (how, {"use_cache": False} if how == "no_cache" else
                                         {"prefill_chunk_size": 2})]:
        with saehook.attach(model, {1: TopKSAE(32, 64, 4)}) as hooked, hooked.training(cfg) as session:
            out = model.generate(prompt, **kw, **extra)
        fed[mode] = _fed_rows(session)
    assert len(fed["cache"]) == (6 - 1) + (4 - 1) + 2 * 5 - 2  # real prompt rows minus BOS, new tokens but the last
    torch.testing.assert_close(fed[how].sum(0), fed["cache"].sum(0), atol=1e-4, rtol=1e-4)
    assert len(fed[how]) == len(fed["cache"])
    full_mask = torch.cat([mask, torch.ones(2, 4, dtype=mask.dtype)], 1)
    rows = _layer_out(model, out[:, :-1], full_mask)
    keep = full_mask.bool() & (full_mask.cumsum(-1) - 1 >= 1)
    torch.testing.assert_close(fed["cache"].sum(0), rows[keep].sum(0), atol=1e-4, rtol=1e-4)


def test_activation_checkpointing_does_not_feed_twice():
    """A forward re-run during backward (activation checkpointing) reaches the hooks again; its rows are
    not fed a second time."""
    model = tiny_model("llama")
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train().requires_grad_(True)
    ids = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(2))
    cfg = small_cfg(batch_tokens=10**6, shuffle_buffer=0)
    with saehook.attach(model, {1: TopKSAE(32, 64, 4)}) as hooked, hooked.training(cfg) as session:
        model(ids, labels=ids).loss.backward()
    assert len(_fed_rows(session)) == 2 * 7


def test_short_run_reads_no_more_text_than_a_quarter_of_it_to_fill_the_buffer():
    """The shuffle buffer is capped at a quarter of a run of known length: `saehook train --tokens 20k` read
    66,048 rows (the 65,536-row default buffer and a batch) before its first step."""
    from saehook.session import TrainingSession

    with saehook.attach(tiny_model("llama"), {1: TopKSAE(32, 64, 4)}) as hooked:
        short = TrainingSession(hooked, TrainConfig(), total_tokens=20_000)
        long = TrainingSession(hooked, TrainConfig(), total_tokens=10**7)
        unknown = TrainingSession(hooked, TrainConfig(), total_tokens=None)
        assert short.buffers[1].capacity == 5_000
        assert long.buffers[1].capacity == unknown.buffers[1].capacity == 65_536
        # the first step waits for max(buffer + batch, init rows) = max(5,512, 20,000): no row past the run
        assert short.fill_status() == (0, 20_000)
        assert long.fill_status() == (0, 65_536 + long.trainers[1].batch_tokens)
