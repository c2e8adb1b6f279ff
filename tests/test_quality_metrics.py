"""Reconstruction metrics that one dominant channel cannot hide (issue 14): a planted high-variance channel that
FVU rewards and the per-token and per-channel metrics flag, the random-error control, and the trainer's per-step
cosine and relative error. Every number is recomputed here from the activations with plain torch."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, tiny_model
from test_evaluate import batches, exact_sae, peaked, random_sae

from saehook import SAETrainer, TopKSAE, TrainConfig
from saehook.evaluate import EvalReport, evaluate

D, PLANTED = 32, 7


def planted_model(seed=0):
    """A tiny Llama whose embedding (the hookpoint) is the synthetic stream: channel PLANTED is +-100 on the
    embeddings of 6 of the 128 tokens (5%) and ~0.3 on the others, every other channel ~N(0, 1). Channel
    PLANTED then holds ~95% of the variance, while on most tokens it is small."""
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(seed)
    E = torch.randn(VOCAB, D, generator=g)
    E[:, PLANTED] = 0.3 * torch.randn(VOCAB, generator=g)
    loud = torch.randperm(VOCAB, generator=g)[:6]
    E[loud, PLANTED] = 100.0 * torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0])
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(E)
    return model


def channel_sae(channels, d=D):
    """Reconstructs exactly the given channels (rows +e_c and -e_c, k = number of channels) and outputs 0 on
    every other channel."""
    m = len(channels)
    sae = TopKSAE(d, 2 * m, m)
    W = torch.zeros(2 * m, d)
    for i, c in enumerate(channels):
        W[i, c], W[m + i, c] = 1.0, -1.0
    with torch.no_grad():
        sae.W_enc.copy_(W)
        sae.W_dec.copy_(W)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def direct_metrics(x, x_hat):
    """The metrics of saehook.evaluate recomputed from rows x [N, d], in float64 with plain torch."""
    x, x_hat = x.double(), x_hat.double()
    e = x - x_hat
    var = (x - x.mean(0)).pow(2).sum(0)  # per channel
    err = e.pow(2).sum(0)
    top = var.argsort(descending=True)[:5]
    keep = torch.ones(x.shape[1], dtype=torch.bool)
    keep[top] = False
    rel = e.norm(dim=-1) / x.norm(dim=-1)
    cos = F.cosine_similarity(x, x_hat, dim=-1, eps=1e-300)
    live = var > 0
    return {"fvu": float(err.sum() / var.sum()), "fvu_excl_top": float(err[keep].sum() / var[keep].sum()),
            "fvu_standardized": float((err[live] / var[live]).mean()), "top_channels": top.tolist(),
            "top_channel_share": float(var[top[0]] / var.sum()),
            "top5_channel_share": float(var[top].sum() / var.sum()),
            "rel_error_median": float(rel.quantile(0.5)), "rel_error_p90": float(rel.quantile(0.9)),
            "rel_error_p99": float(rel.quantile(0.99)), "cosine": float(cos.mean()),
            "cosine_median": float(cos.quantile(0.5))}


@pytest.fixture(scope="module")
def llama_data():
    return peaked("llama")


def test_planted_channel_fvu_hides_what_the_new_metrics_flag(caplog):
    model, data = planted_model(), batches(seed=1, n=4, shape=(8, 32))
    sae = channel_sae([PLANTED])  # exact on the planted channel, 0 everywhere else
    with caplog.at_level("WARNING", logger="saehook.evaluate"):
        r = evaluate(model, {"model.embed_tokens": sae}, data, tokens=10**6, ablations=False)["model.embed_tokens"]
    x = torch.cat([model.model.embed_tokens.weight[ids[:, 1:]].reshape(-1, D) for ids in data])
    with torch.no_grad():
        want = direct_metrics(x, sae.decode(sae.encode(x)))
    # FVU says the reconstruction is excellent ...
    assert r["fvu"] < 0.1
    # ... the per-channel and per-token metrics say it is useless on everything but one channel
    assert r["fvu_standardized"] > 0.9 and r["fvu_excl_top"] > 0.9 and r["rel_error_median"] > 0.9
    assert r["cosine_median"] < 0.3
    assert r["top_channels"][0] == PLANTED and r["top_channel_share"] > 0.9
    assert len(r["warnings"]) == 1 and r["warnings"][0].startswith(f"channel {PLANTED} holds 9")
    assert "fvu_standardized" in r["warnings"][0]
    assert any(f"channel {PLANTED} holds" in rec.getMessage() for rec in caplog.records)
    for name, value in want.items():
        assert r[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    assert r["tokens"] == len(x)
    assert "zero_ablation_loss" not in r and "ce_recovered_mean" not in r  # ablations=False
    # the warning is about the data, not the fit: an exact autoencoder on the same stream gets it too
    exact = evaluate(model, {"model.embed_tokens": exact_sae()}, data, tokens=10**6)["model.embed_tokens"]
    assert exact["fvu_standardized"] == 0.0 and exact["rel_error_p99"] == 0.0 and exact["cosine"] == 1.0
    assert len(exact["warnings"]) == 1


def test_no_warning_without_a_dominant_channel(llama_data):
    model, data = llama_data
    r = evaluate(model, {1: random_sae()}, data, tokens=10**6, control=False, ablations=False)[1]
    assert r["warnings"] == [] and r["top_channel_share"] < 0.5
    assert len(r["top_channels"]) == 5 and len(set(r["top_channels"])) == 5
    assert not any(n.startswith("random_error") or n == "error_vs_random" for n in r)  # control=False


def count_forwards(model):
    calls = []
    return calls, model.register_forward_pre_hook(lambda m, a: calls.append(1))


def test_random_error_control_is_seeded_finite_and_zero_when_exact(llama_data):
    model, data = llama_data
    calls, h = count_forwards(model)
    try:
        r = evaluate(model, {1: random_sae(), 2: exact_sae()}, data, tokens=10**6)
    finally:
        h.remove()
    assert len(calls) == 2 * (1 + 2 * 4 + 1)  # per batch: clean, 4 per hookpoint, joint
    m = r[1]
    assert math.isfinite(m["random_error_delta_lm_loss"]) and m["random_error_kl"] > 0
    assert m["error_vs_random"] == pytest.approx(m["delta_lm_loss"] / m["random_error_delta_lm_loss"])
    # the exact autoencoder has no error, so neither has its control
    assert r[2]["random_error_delta_lm_loss"] == 0.0 and r[2]["random_error_kl"] == 0.0
    assert math.isnan(r[2]["error_vs_random"])
    again = evaluate(model, {1: random_sae()}, data, tokens=10**6, joint=False)[1]
    other = evaluate(model, {1: random_sae()}, data, tokens=10**6, seed=1)[1]
    assert again["random_error_delta_lm_loss"] == m["random_error_delta_lm_loss"]
    assert again["random_error_kl"] == m["random_error_kl"]
    assert other["random_error_kl"] != m["random_error_kl"]
    # keep_error: the splice changes nothing, so the control (same per-token error norm: 0) neither
    kept = evaluate(model, {1: random_sae()}, data, tokens=10**6, keep_error=True)[1]
    assert kept["random_error_delta_lm_loss"] == 0.0 and kept["random_error_kl"] == 0.0
    calls, h = count_forwards(model)
    try:
        fast = evaluate(model, {1: random_sae()}, data, tokens=10**6, ablations=False, control=False)[1]
    finally:
        h.remove()
    assert len(calls) == 2 * 2 and fast["delta_lm_loss"] == pytest.approx(m["delta_lm_loss"])


def self_sampled(model):
    """16 sequences sampled from ``model`` itself (so it is the true distribution: any perturbation raises
    the expected loss), as two batches."""
    torch.manual_seed(1)
    seqs = model.generate(torch.full((16, 1), 1), do_sample=True, max_new_tokens=23, min_new_tokens=23,
                          pad_token_id=0)
    return [seqs[:8], seqs[8:]]


def random_error_loss(model, data, seed, rows_sae):
    """The control recomputed with a plain hook on lm_head's input: x + ||x - x_hat|| u at positions >= 1, with
    u drawn as evaluate draws it (one CPU float64 generator, rows in order)."""
    g = torch.Generator().manual_seed(seed)

    def hook(mod, args):
        x = args[0].clone()
        rows = x[:, 1:].reshape(-1, x.shape[-1])
        err = (rows - rows_sae.decode(rows_sae.encode(rows))).double().norm(dim=-1)
        u = torch.randn(len(rows), x.shape[-1], generator=g, dtype=torch.float64)
        rows = rows + (u / u.norm(dim=-1, keepdim=True) * err[:, None]).float()
        x[:, 1:] = rows.reshape(x[:, 1:].shape)
        return (x,)

    h = model.lm_head.register_forward_pre_hook(hook)
    try:
        total, n = 0.0, 0
        for ids in data:
            with torch.no_grad():
                logits = model(ids).logits[:, 1:-1]
            total += float(F.cross_entropy(logits.reshape(-1, VOCAB).double(), ids[:, 2:].reshape(-1), reduction="sum"))
            n += logits.shape[0] * logits.shape[1]
    finally:
        h.remove()
    return total / n


def test_error_in_an_ignored_direction_beats_a_random_one_and_a_read_one_loses(llama_data):
    """At lm_head's input, an autoencoder exact on every channel but c (which it zeroes). If lm_head ignores c,
    the splice costs nothing while a random error of the same norm does: error_vs_random ~ 0. If lm_head reads c
    strongly, the autoencoder's error is worse than chance: error_vs_random > 1."""
    base, _ = llama_data
    c = 5
    ignore, read = copy.deepcopy(base), copy.deepcopy(base)
    with torch.no_grad():
        ignore.lm_head.weight[:, c] = 0.0
        read.lm_head.weight[:, c] *= 20.0
    sae = channel_sae([i for i in range(D) if i != c])
    data = self_sampled(ignore)
    blind = evaluate(ignore, {"lm_head:input": sae}, data, tokens=10**6, ablations=False)["lm_head:input"]
    assert abs(blind["delta_lm_loss"]) < 1e-5 and blind["random_error_kl"] > 1e-3
    assert blind["random_error_delta_lm_loss"] > 0 and blind["error_vs_random"] < 0.01
    clean = blind["clean_loss"]
    assert blind["random_error_delta_lm_loss"] == pytest.approx(random_error_loss(ignore, data, 0, sae) - clean,
                                                                rel=1e-4)
    seen = evaluate(read, {"lm_head:input": sae}, self_sampled(read), tokens=10**6, ablations=False)["lm_head:input"]
    assert seen["error_vs_random"] > 1.5


def test_report_round_trip_keeps_the_new_metrics(tmp_path):
    model, data = planted_model(), batches(seed=1, n=2, shape=(4, 16))
    r = evaluate(model, {"model.embed_tokens": channel_sae([PLANTED])}, data, tokens=10)
    back = EvalReport.load(r.save(tmp_path / "report.json"))
    m, b = r["model.embed_tokens"], back["model.embed_tokens"]
    for name in ("top_channels", "warnings", "cosine", "rel_error_p99", "fvu_standardized", "error_vs_random",
                 "random_error_delta_lm_loss", "top5_channel_share", "fvu_excl_top"):
        assert b[name] == m[name] or math.isnan(b[name]) and math.isnan(m[name]), name  # NaN: null in JSON
    assert back.settings["control"] and back.settings["seed"] == 0
    table = r.table()
    assert "cos" in table and "relerr_med" in table and "ctrl_delta" in table and "fvu_std" in table
    assert f"warning: model.embed_tokens: channel {PLANTED} holds" in table


def test_dashboard_shows_the_reconstruction_metrics(tmp_path):
    from test_dashboard import make_tokenizer

    from saehook.dashboard import build_dashboard

    model, data = planted_model(), batches(seed=1, n=2, shape=(4, 16))
    saes = {"model.embed_tokens": channel_sae([PLANTED])}
    report = evaluate(model, saes, data, tokens=10)
    path = report.save(tmp_path / "report.json")
    tok, _ = make_tokenizer()
    index = build_dashboard(saes, tmp_path / "dash", model, tok, data, tokens=50, n_latents_shown=2, n_explained=0,
                            evaluation=path)
    page = index.read_text()
    assert "id='reconstruction'" in page and "FVU standardised" in page and f"channel {PLANTED} holds" in page
    s = json.loads((tmp_path / "dash" / "summary.json").read_text())["hookpoints"]["model.embed_tokens"]
    rec, m = s["reconstruction"], report["model.embed_tokens"]
    assert rec["fvu_standardized"] == m["fvu_standardized"] and rec["top_channel"] == PLANTED
    assert rec["rel_error_median"] == m["rel_error_median"] and len(rec["warnings"]) == 1


def test_trainer_logs_cosine_and_relative_error():
    torch.manual_seed(0)
    x = torch.randn(512, 16) * torch.linspace(0.1, 3, 16)
    trainer = SAETrainer(TopKSAE(16, 64, 4), TrainConfig(batch_tokens=512, matmul_dtype="float32"))
    trainer.step(x)  # the first step sets the input scale and b_dec
    before = copy.deepcopy(trainer.sae)  # the metrics describe the reconstruction before the update
    m = trainer.step(x)
    with torch.no_grad():
        x_hat = before(x).x_hat
    cos = F.cosine_similarity(x.double(), x_hat.double(), dim=-1)
    rel = (x - x_hat).double().norm(dim=-1) / x.double().norm(dim=-1)
    assert m["cosine"] == pytest.approx(float(cos.mean()), abs=1e-5)
    assert m["rel_error_median"] == pytest.approx(float(rel.quantile(0.5)), rel=1e-4)
    assert 0 < m["rel_error_median"] < 2 and -1 <= m["cosine"] <= 1
