"""Evaluation metrics checked on identities: an exact autoencoder, keep-error splices, planted probe latents,
a logit change confined to one entry, and direct recomputation of every loss with plain torch hooks."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, tiny_model

import saehook
from saehook import TopKSAE
from saehook.ablation import ablation_sparsity, sparsity_score
from saehook.evaluate import EvalReport, constant_sae, evaluate
from saehook.probe import binary_tasks, fit_single_features, probe_loss, probe_tasks

DOCS = Path(__file__).resolve().parent.parent / "docs" / "metrics"


def exact_sae(d=32):
    """d_in=d, n_latents=2d, k=d; rows +e_i and -e_i: TopK keeps |x_i| of each pair, ReLU the positive part,
    so the decoder returns sum ReLU(x_i) e_i - ReLU(-x_i) e_i = x exactly."""
    sae = TopKSAE(d, 2 * d, d)
    W = torch.cat([torch.eye(d), -torch.eye(d)])
    with torch.no_grad():
        sae.W_dec.copy_(W)
        sae.W_enc.copy_(W)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def random_sae(seed=0, k=4):
    torch.manual_seed(seed)
    return TopKSAE(32, 64, k)


def peaked(arch):
    """A tiny model with confident predictions (lm_head x 30) and 16 sequences sampled from it: the clean
    model is then the true distribution, so any perturbation raises the expected loss (by its KL)."""
    model = tiny_model(arch)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30)
    torch.manual_seed(1)
    seqs = model.generate(torch.full((16, 1), 1), do_sample=True, max_new_tokens=23, min_new_tokens=23,
                          pad_token_id=0)
    return model, [seqs[:8], seqs[8:]]


@pytest.fixture(scope="module")
def llama_data():
    return peaked("llama")


WORDS = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(124)]


@pytest.fixture(scope="module")
def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


def batches(seed=0, n=2, shape=(4, 16)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, shape, generator=g) for _ in range(n)]


def test_exact_autoencoder_reconstructs_exactly():
    sae = exact_sae()
    x = torch.randn(500, 32)
    x[:3] = 0.0  # ties at zero do not matter
    x[5, 7] = 0.0
    assert torch.equal(sae.decode(sae.encode(x)), x)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_exact_autoencoder_identities(arch):
    model = tiny_model(arch)
    r = evaluate(model, {1: exact_sae(), 2: exact_sae()}, batches(), tokens=10**6)
    for key in (1, 2):
        m = r[key]
        assert m["fvu"] == 0.0 and m["delta_lm_loss"] == 0.0 and m["kl"] == 0.0
        assert m["spliced_loss"] == m["clean_loss"]
        assert m["ce_recovered_zero"] == 1.0 and m["ce_recovered_mean"] == 1.0
        assert m["zero_ablation_loss"] != m["clean_loss"]
        assert m["l0"] == 32.0 and m["tokens"] == 2 * 4 * 15 and m["loss_tokens"] == 2 * 4 * 14
        assert m["density"].shape == (64,) and m["dead_frac"] == 0.0
    assert r.joint["delta_lm_loss"] == 0.0 and r.joint["kl"] == 0.0


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_random_autoencoder_raises_loss_and_keep_error_does_not(arch):
    model, data = (peaked(arch))
    r = evaluate(model, {1: random_sae()}, data, tokens=10**6)[1]
    assert r["fvu"] > 0.3 and r["kl"] > 0.5 and r["delta_lm_loss"] > 0.5 and r["ce_recovered_mean"] < 1
    assert r["l0"] <= 4
    kept = evaluate(model, {1: random_sae()}, data, tokens=10**6, keep_error=True)[1]
    assert abs(kept["kl"]) < 1e-5 and abs(kept["delta_lm_loss"]) < 1e-5
    assert kept["fvu"] == pytest.approx(r["fvu"])  # statistics come from the clean pass either way


def loss_with_hook(model, data, module, edit, skip):
    """Mean next-token CE at the predictions made at positions >= skip, with ``edit(out)`` applied to the
    module's output at positions >= skip by a plain torch hook."""
    def hook(mod, args, out):
        x = out if isinstance(out, torch.Tensor) else out[0]
        x = x.clone()
        x[:, skip:] = edit(x[:, skip:])
        return x if isinstance(out, torch.Tensor) else (x, *out[1:])

    h = module.register_forward_hook(hook) if edit is not None else None
    try:
        total, n = 0.0, 0
        for ids in data:
            with torch.no_grad():
                logits = model(ids).logits[:, skip:-1]
            ce = F.cross_entropy(logits.reshape(-1, VOCAB).double(), ids[:, skip + 1:].reshape(-1), reduction="sum")
            ce = ce.detach()
            total, n = total + float(ce), n + logits.shape[0] * logits.shape[1]
    finally:
        if h is not None:
            h.remove()
    return total / n


def test_losses_match_plain_torch_recomputation(llama_data):
    model, data = llama_data
    sae, layer = random_sae(), model.model.layers[1]
    r = evaluate(model, {1: sae}, data[:1], tokens=1)[1]  # one batch: the running mean is this batch's mean
    grab = []
    h = layer.register_forward_hook(lambda m, a, o: grab.append(o if isinstance(o, torch.Tensor) else o[0]))
    model(data[0])
    h.remove()
    x = grab[0][:, 1:].reshape(-1, 32)
    with torch.no_grad():
        assert r["fvu"] == pytest.approx(float(saehook.fvu(x, sae(x).x_hat)), rel=1e-5)
    fires = torch.zeros(64)
    codes = sae.encode(x)
    for v, i in zip(codes.values.flatten(), codes.indices.flatten()):
        fires[i] += float(v > 0)
    torch.testing.assert_close(r["density"], fires / x.shape[0])
    assert r["clean_loss"] == pytest.approx(loss_with_hook(model, data[:1], layer, None, 1), rel=1e-6)
    reconstruct = lambda v: sae.decode(sae.encode(v))  # noqa: E731
    assert r["spliced_loss"] == pytest.approx(loss_with_hook(model, data[:1], layer, reconstruct, 1), rel=1e-5)
    assert r["zero_ablation_loss"] == pytest.approx(loss_with_hook(model, data[:1], layer, torch.zeros_like, 1),
                                                    rel=1e-5)
    mean = x.mean(0)
    assert r["mean_ablation_loss"] == pytest.approx(
        loss_with_hook(model, data[:1], layer, lambda v: mean.expand_as(v), 1), rel=1e-5)
    rec = 1 - (r["spliced_loss"] - r["clean_loss"]) / (r["zero_ablation_loss"] - r["clean_loss"])
    assert r["ce_recovered_zero"] == pytest.approx(rec)
    # without skipped positions, the clean loss is the model's own loss
    r0 = evaluate(model, {1: sae}, data, tokens=10**6, skip_positions=0)[1]
    hf = sum(float(model(ids, labels=ids).loss) for ids in data) / len(data)
    assert r0["clean_loss"] == pytest.approx(hf, rel=1e-5) and r0["tokens"] == 16 * 24


def test_joint_splice_and_exact_partner(llama_data):
    model, data = llama_data
    r = evaluate(model, {0: exact_sae(), 2: random_sae()}, data, tokens=10**6)
    assert r[0]["delta_lm_loss"] == 0.0
    # splicing the exact autoencoder too changes nothing: the joint splice equals the random one's alone
    assert r.joint["spliced_loss"] == r[2]["spliced_loss"] and r.joint["kl"] == r[2]["kl"]
    assert evaluate(model, {2: random_sae()}, data, tokens=1).joint is None


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_is_excluded_everywhere(side):
    """A padded batch gives the same metrics as its rows evaluated one by one without padding."""
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(3)
    a, b = torch.randint(3, VOCAB, (1, 12), generator=g), torch.randint(3, VOCAB, (1, 7), generator=g)
    ids = torch.zeros(2, 12, dtype=torch.long)
    mask = torch.zeros(2, 12, dtype=torch.long)
    ids[0], mask[0] = a[0], 1
    if side == "right":
        ids[1, :7], mask[1, :7] = b[0], 1
    else:
        ids[1, 5:], mask[1, 5:] = b[0], 1
    saes = lambda: {1: random_sae()}  # noqa: E731
    padded = evaluate(model, saes(), [{"input_ids": ids, "attention_mask": mask}], tokens=10**6)[1]
    alone = evaluate(model, saes(), [a, b], tokens=10**6)[1]
    assert padded["tokens"] == alone["tokens"] == 11 + 6 and padded["loss_tokens"] == 10 + 5
    for name in ("fvu", "l0", "clean_loss", "spliced_loss", "kl", "zero_ablation_loss"):
        assert padded[name] == pytest.approx(alone[name], rel=1e-4, abs=1e-6), name
    torch.testing.assert_close(padded["density"], alone["density"])


def test_corpus_source_uses_the_held_out_split(word_tokenizer):
    model = tiny_model("gpt2")
    g = torch.Generator().manual_seed(0)
    docs = [" ".join(f"w{i}" for i in torch.randint(0, 124, (60,), generator=g).tolist()) for _ in range(30)]
    corpus = saehook.Corpus([saehook.corpus.Document(t, id=f"d{i}") for i, t in enumerate(docs)], word_tokenizer,
                            context=16, holdout=0.3)
    r = evaluate(model, {1: random_sae()}, corpus, tokens=10**6, batch_size=2)
    test = evaluate(model, {1: random_sae()}, list(corpus.windows("test", batch_size=2)), tokens=10**6)
    train = evaluate(model, {1: random_sae()}, list(corpus.windows("train", batch_size=2)), tokens=10**6)
    assert r[1]["tokens"] == test[1]["tokens"] < train[1]["tokens"]
    assert r[1]["spliced_loss"] == test[1]["spliced_loss"] and r[1]["fvu"] == test[1]["fvu"]


def test_report_round_trip(tmp_path, llama_data):
    model, data = llama_data
    r = evaluate(model, {1: random_sae(), "model.layers.2": random_sae(1)}, data, tokens=10)
    assert r.tokens == 8 * 23 and set(r) == {1, "model.layers.2"} and len(r) == 2
    path = r.save(tmp_path / "report.json")
    raw = json.loads(path.read_text())
    assert set(raw["hookpoints"]) == {"1", "model.layers.2"} and raw["hookpoints"]["1"]["key"] == 1
    assert len(raw["hookpoints"]["1"]["density"]) == 64 and raw["joint"]["keys"] == [1, "model.layers.2"]
    back = EvalReport.load(path)
    assert back[1]["fvu"] == r[1]["fvu"] and torch.equal(back[1]["density"], r[1]["density"])
    assert "model.layers.2" in r.table() and "joint" in r.table()
    with pytest.raises(KeyError, match="has \\[1, 'model.layers.2'\\]"):
        r[3]


def test_constant_sae_and_errors():
    v = torch.randn(32)
    c = constant_sae(32, v)
    assert torch.equal(c.decode(c.encode(torch.randn(5, 32))), v.expand(5, 32))
    with pytest.raises(ValueError, match="tokens must be positive"):
        evaluate(tiny_model("llama"), {1: random_sae()}, batches(), tokens=0)
    with pytest.raises(ValueError, match="no evaluated positions"):
        evaluate(tiny_model("llama"), {1: random_sae()}, [torch.ones(2, 1, dtype=torch.long)], tokens=5)


def test_tokens_none_evaluates_a_finite_source_whole(llama_data):
    """No token count: every position of a list of batches (2 x 8 rows x 23 evaluated positions = 368), the
    same numbers as with the exact count; an endless source (a generator) is refused with what to pass."""
    model, data = llama_data
    whole = evaluate(model, {1: random_sae()}, data, control=False)
    counted = evaluate(model, {1: random_sae()}, data, tokens=368, control=False)
    assert whole.tokens == 368 == counted.tokens and whole.settings["tokens_requested"] is None
    assert whole[1]["fvu"] == counted[1]["fvu"] and whole[1]["delta_lm_loss"] == counted[1]["delta_lm_loss"]
    with pytest.raises(ValueError, match="a generator has no len\\(\\) and may never end: pass tokens="):
        evaluate(model, {1: random_sae()}, (b for b in data))


# ---------------------------------------------------------------------------------------------- probe loss
def lbfgs_fit(x, y, l2):
    """The same 1-D penalised logistic regression by torch's LBFGS, for reference."""
    p = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([p], max_iter=100, tolerance_grad=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        obj = F.binary_cross_entropy_with_logits(x.double() * p[0] + p[1], y.double()) + 0.5 * l2 * p[0] ** 2
        obj.backward()
        return obj

    opt.step(closure)
    return p.detach()


def test_single_feature_fit_matches_lbfgs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(80, 3, generator=g)
    y = (x[:, 0] + 0.7 * torch.randn(80, generator=g) > 0).float()
    w, b, loss, done = fit_single_features(x, y, l2=1e-3)
    assert bool(done.all())
    for j in range(3):
        torch.testing.assert_close(torch.stack([w[j], b[j]]), lbfgs_fit(x[:, j], y, 1e-3), atol=1e-5, rtol=1e-5)


def test_probe_finds_a_planted_latent_and_random_ones_are_near_chance():
    g = torch.Generator().manual_seed(0)
    y = torch.rand(300, generator=g) < 0.5
    feats = torch.rand(300, 500, generator=g) * (torch.rand(300, 500, generator=g) < 0.2)
    feats[:, 321] = y.float() * 1.7
    r = probe_tasks(feats, {"t": y})
    assert r["tasks"]["t"]["index"] == 321 and r["loss"] < 0.01
    noise = probe_tasks(torch.randn(300, 500, generator=g), {"t": y})
    assert math.log(2) - 0.05 < noise["loss"] < math.log(2) + 0.15 and noise["tasks"]["t"]["index"] != 321
    assert set(binary_tasks(["a", "b", "c", "a"])) == {"a", "b", "c"}
    assert list(binary_tasks(["neg", "pos", "pos"])) == ["pos"]


def token_detector(model, sae, latent, token):
    """Make ``latent`` fire (value > 0) exactly on embeddings of ``token``: encoder row = that embedding,
    bias halfway between its squared norm and its largest dot product with another token's embedding.
    With k = n_latents every latent survives TopK and the ReLU does the thresholding."""
    E = model.model.embed_tokens.weight
    others = torch.cat([E[:token], E[token + 1:]]) @ E[token]
    assert float(others.max()) < float(E[token] @ E[token])
    with torch.no_grad():
        sae.W_enc[latent] = E[token]
        sae.b_enc[latent] = -(float(E[token] @ E[token]) + float(others.max())) / 2
    return sae


def test_probe_loss_end_to_end_on_token_documents():
    """At the embeddings, a latent that fires only on token 5 equals the label 'contains token 5'."""
    model = tiny_model("llama")
    sae = token_detector(model, TopKSAE(32, 16, 16), 7, 5)
    g = torch.Generator().manual_seed(0)
    docs = []
    for i in range(60):
        ids = [1] + torch.randint(6, VOCAB, (int(torch.randint(6, 14, (1,), generator=g)),), generator=g).tolist()
        if i % 2:
            ids[3] = 5
        docs.append((ids, "five" if i % 2 else "other"))
    r = probe_loss(model, {"model.embed_tokens": sae}, docs)["model.embed_tokens"]
    assert r["tasks"]["other"]["latent"] == 7 and r["sae_loss"] < 0.01
    assert r["n_fit"] == r["n_test"] == 30 and r["documents"] == 60 and r["chance"] == pytest.approx(math.log(2))
    assert 0 <= r["residual_loss"] < 1 and 0 <= r["tasks"]["other"]["channel"] < 32


def test_probe_loss_on_a_labelled_corpus(word_tokenizer):
    """One-vs-rest tasks per label; a latent reading token w7 at the embeddings finds the label marked by it."""
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(1)
    docs = []
    for i in range(90):
        label = ["alpha", "beta", "gamma"][i % 3]
        words = [f"w{int(j)}" for j in torch.randint(10, 124, (10,), generator=g)]
        if label == "beta":
            words[4] = "w7"
        docs.append(saehook.corpus.Document(" ".join(words), label=label, id=f"{label}/{i}"))
    corpus = saehook.Corpus(docs, word_tokenizer, context=16)
    sae = token_detector(model, TopKSAE(32, 8, 8), 3, WORDS.index("w7"))
    r = probe_loss(model, {"model.embed_tokens": sae}, corpus, split="all")["model.embed_tokens"]
    assert list(r["tasks"]) == ["alpha", "beta", "gamma"] and r["documents"] == 90
    assert r["tasks"]["beta"]["latent"] == 3 and r["tasks"]["beta"]["sae_loss"] < 0.01
    assert r["chance"] == pytest.approx(-(math.log(1 / 3) / 3 + 2 / 3 * math.log(2 / 3)))


# ---------------------------------------------------------------------------------------------- ablation sparsity
def test_sparsity_score_bounds():
    one = torch.zeros(16, 128)
    one[3, 9] = -2.5
    assert sparsity_score(one) == 1 / (128 * 16)
    assert sparsity_score(torch.full((16, 128), 0.3)) == pytest.approx(1.0)
    assert math.isnan(sparsity_score(torch.zeros(4, 4)))


def test_ablation_confined_to_one_logit_and_zero_rows_unchanged():
    """At lm_head's input, a latent decoding to e_0 while only logit 0 reads coordinate 0: ablating it at p
    changes one logit of the T x V block, the minimum 1/(V T); latents with zero decoder rows change nothing."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[0, 0] = 1.0
    sae = TopKSAE(32, 4, 4)
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.b_enc.fill_(1.0)  # every latent active with value 1
        sae.W_dec.zero_()
        sae.W_dec[0, 0] = 1.0
    ids = batches(shape=(2, 24))[0]
    r = ablation_sparsity(model, {"lm_head:input": sae}, ids, T=16, positions=[2, 7])["lm_head:input"]
    assert r["n_scored"] == 4 and r["n_unchanged"] == 12 and r["V"] == VOCAB
    assert r["score"] == 1 / (VOCAB * 16)
    assert r["latents"][:, 2].tolist() == [0, 0, 0, 0]


def test_ablation_sparsity_of_a_real_layer(llama_data):
    model, data = llama_data
    sae = random_sae()
    with torch.no_grad():
        sae.W_dec[5] = 0.0
    r = ablation_sparsity(model, {1: sae}, data[0][:1], T=8, positions=[3, 9])[1]
    assert r["n_scored"] + r["n_unchanged"] == 8
    assert all(1 / (VOCAB * 8) <= s <= 1 for s in r["scores"].tolist())
    assert 5 not in r["latents"][:, 2].tolist()
    with pytest.raises(ValueError, match="fewer than T=8"):
        ablation_sparsity(model, {1: sae}, data[0][:1], T=8, positions=[20])


# ---------------------------------------------------------------------------------------------- cli and docs
def test_eval_command(tmp_path, capsys, word_tokenizer):
    from saehook.cli import main
    from saehook.hookpoints import saved_key

    words = WORDS
    path = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(path)
    word_tokenizer.save_pretrained(path)
    text = tmp_path / "text"
    text.mkdir()
    g = torch.Generator().manual_seed(0)
    for d in range(20):
        (text / f"{d}.txt").write_text(" ".join(words[i] for i in torch.randint(4, 128, (100,), generator=g)))
    run = tmp_path / "run"
    exact_sae().save(run / "model.layers.1")  # no metadata: the folder name is the hookpoint
    sae = random_sae()
    sae.metadata["hookpoint"] = "model.layers.2"
    sae.save(run / "layer2")
    assert main(["eval", "--sae", str(run / "model.layers.1"), "--sae", str(run / "layer2"), "--model", str(path),
                 "--corpus", str(text), "--tokens", "200", "--context", "16", "--batch-size", "4",
                 "--holdout", "0.5", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "model.layers.1" in printed and "model.layers.2" in printed and "joint" in printed
    report = EvalReport.load(run / "report.json")
    assert report["model.layers.1"]["fvu"] == 0.0 and report["model.layers.1"]["delta_lm_loss"] == 0.0
    assert report["model.layers.2"]["tokens"] >= 200 and report.settings["model"] == str(path)
    assert "random_error_delta_lm_loss" in report["model.layers.2"] and "ce_recovered_zero" in report["model.layers.2"]
    assert main(["eval", "--sae", str(run / "layer2"), "--model", str(path), "--corpus", str(text), "--tokens", "200",
                 "--context", "16", "--batch-size", "4", "--holdout", "0.5", "--no-progress", "--no-control",
                 "--no-ablations", "--out", str(run / "fast.json")]) == 0
    fast = EvalReport.load(run / "fast.json")["model.layers.2"]
    assert "random_error_delta_lm_loss" not in fast and "ce_recovered_zero" not in fast
    assert fast["delta_lm_loss"] == report["model.layers.2"]["delta_lm_loss"]
    assert saved_key(Path("runs/x/lm_head_input"), {}) == "lm_head:input"
