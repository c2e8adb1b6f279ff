"""Finding latents (saehook.features) and steering strengths (saehook.strength) on a planted topic latent.

A tiny random Llama gets one token, TOPIC (``w50``), whose embedding is a unit vector ``u`` (every other
embedding has norm ~0.1); the autoencoder at layer 0 gets latent PLANTED with encoder row ``10 u`` and
bias -5, so it fires (about 5) exactly on TOPIC, and every other encoder row is made orthogonal to ``u``.
Documents of label "a" contain the phrase ``w40 w50``; those of label "b" contain ``w40`` but never ``w50``.
"""

import json
import math
import random

import pytest
import torch
from conftest import tiny_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import saehook
from saehook.cli import main
from saehook.examples import top_examples
from saehook.features import find_by_labels, find_by_text, labelled_texts, search_contexts
from saehook.strength import steering_values, typical_activations

TOPIC, PLANTED = 50, 37
WORDS = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(4, 128)]


def make_tokenizer():
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


def planted():
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(1)
    u = torch.randn(32, generator=g)
    u /= u.norm()
    model.get_input_embeddings().weight[TOPIC] = u
    torch.manual_seed(0)
    sae = saehook.TopKSAE(d_in=32, n_latents=64, k=4)
    with torch.no_grad():
        sae.W_enc -= (sae.W_enc @ u).unsqueeze(1) * u  # no other latent reads u
        sae.W_enc[PLANTED] = 10 * u
        sae.b_enc[PLANTED] = -5.0
    sae.metadata["hookpoint"] = 0
    return model, sae


def corpus(n=24, seed=0):
    """``n`` texts per label: "a" texts hold "w40 w50" twice, "b" texts hold "w40" twice and no w50."""
    rng = random.Random(seed)
    filler = [w for w in WORDS[4:] if w not in ("w40", "w50")]
    texts, labels = [], []
    for label in ("a", "b"):
        for _ in range(n):
            words = [rng.choice(filler) for _ in range(20)]
            for at in sorted(rng.sample(range(20), 2), reverse=True):
                words[at:at] = ["w40", "w50"] if label == "a" else ["w40"]
            texts.append(" ".join(words))
            labels.append(label)
    return texts, labels


@pytest.fixture(scope="module")
def setup():
    model, sae = planted()
    return model, sae, make_tokenizer()


def test_planted_latent_fires_only_on_the_topic_token(setup):
    model, sae, tok = setup
    ids = torch.arange(3, 128).unsqueeze(0)
    with saehook.attach(model, {0: sae}) as hooked:
        model(ids)
        codes = hooked.latents[0]
    fires = ((codes.indices == PLANTED) & (codes.values > 0)).any(-1)[0]
    assert ids[0, fires].tolist() == [TOPIC]


def test_find_by_labels_ranks_the_planted_latent_first(setup):
    model, sae, tok = setup
    texts, labels = corpus()
    table = find_by_labels(model, {0: sae}, texts, labels, tokenizer=tok)[0]
    assert table.labels == ["a", "b"]
    a = table.top("a", 5)
    assert a[0].latent == PLANTED
    # "a" documents: 24 words (20 filler + 2 x "w40 w50"), BOS skipped; w50 is 2 of 24 tokens
    assert table.tokens.tolist() == [24 * 24, 24 * 22]
    assert a[0].rate_in == pytest.approx(2 / 24) and a[0].rate_out == 0.0
    assert a[0].mean_in == pytest.approx(float(10 * model.get_input_embeddings().weight[TOPIC].norm() - 5), abs=1.5)
    f_in, n_in, n_out = 48, 576, 528
    lo = math.log((f_in + .5) / (n_in - f_in + .5)) - math.log(.5 / (n_out + .5))
    assert a[0].log_odds == pytest.approx(lo, rel=1e-6)
    # the effect by hand: the planted latent's activation on every evaluated token of each label
    dense = {"a": [], "b": []}
    with saehook.attach(model, {0: sae}) as hooked:
        for text, label in zip(texts, labels):
            model(torch.tensor([[1] + tok(text, add_special_tokens=False)["input_ids"]]))
            c = hooked.latents[0]
            dense[label].append(((c.indices[0, 1:] == PLANTED) * c.values[0, 1:]).sum(-1))
    x_a, x_b = torch.cat(dense["a"]).double(), torch.cat(dense["b"]).double()
    d = (x_a.mean() - x_b.mean()) / ((x_a.var(unbiased=False) + x_b.var(unbiased=False)) / 2).sqrt()
    assert a[0].effect == pytest.approx(float(d), rel=1e-5)
    assert a[0].effect > 2 * a[1].effect  # well ahead of the next latent
    assert table.top("a", 1, by="log_odds")[0].latent == PLANTED
    assert all(r.latent != PLANTED for r in table.top("b", 10))
    assert "a (576 tokens)" in table.table(3) and f"{PLANTED:>7}" in table.table(3)


def test_find_by_text_finds_the_positions(setup):
    model, sae, tok = setup
    found = find_by_text(model, {0: sae}, "w7 w9 w50 w11 w12 w13 w50 w8", tokenizer=tok)[0]
    assert found.ids[0] == 1 and found.ids[3] == TOPIC and found.tokens[3] == "w50"
    hit = next(h for h in found.hits if h.latent == PLANTED)
    assert hit.positions == (3, 7)
    assert found.hits[0].latent == PLANTED  # the largest total activation
    assert hit.total == pytest.approx(sum(hit.values)) and hit.peak == max(hit.values) > 3


def test_search_contexts_finds_the_latent_by_a_phrase(setup):
    model, sae, tok = setup
    texts, _ = corpus()
    batches = [{"input_ids": torch.tensor([[1] + tok(t, add_special_tokens=False)["input_ids"]])} for t in texts]
    ex = top_examples(model, {0: sae}, batches, tokens=10_000, n_examples=8, context=(4, 2))
    found = search_contexts(ex, "W40 w50", tok)
    assert found[0].latent == PLANTED and found[0].hits == found[0].examples == 8
    assert "w40 [[w50]]" in found[0].context
    # the phrase must cover the activating token: latents firing elsewhere in those windows do not match
    assert all(m.hits / m.examples < 1 for m in found[1:])
    assert len(search_contexts(ex, "w40 w50", tok, anywhere=True)) > len(found)
    assert search_contexts(ex, "W40 w50", tok, case_sensitive=True) == []


def test_labelled_texts_jsonl_and_errors(tmp_path):
    path = tmp_path / "l.jsonl"
    texts, labels = corpus(5)
    path.write_text("\n".join(json.dumps({"text": t, "label": lab}) for t, lab in zip(texts, labels)))
    got_t, got_l = labelled_texts(path, per_label=3)
    assert got_l == ["a"] * 3 + ["b"] * 3 and set(got_t) <= set(texts)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        labelled_texts(tmp_path / "missing.jsonl")
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"text": "w5", "label": "x"}))
    with pytest.raises(ValueError, match="at least two labels"):
        labelled_texts(one)
    with pytest.raises(ValueError, match="one label per text"):
        find_by_labels(None, {0: saehook.TopKSAE(4, 8, 2)}, ["a"], ["x", "y"])


def test_steering_in_multiples_of_typical_activation(setup):
    model, sae, tok = setup
    texts, _ = corpus()
    batches = [torch.tensor([[1] + tok(t, add_special_tokens=False)["input_ids"]]) for t in texts]
    typ = typical_activations(model, {0: sae}, batches, tokens=10_000)[0]
    med = typical_activations(model, {0: sae}, batches, tokens=10_000, quantile=0.5)[0]
    hit = find_by_text(model, {0: sae}, " ".join(texts[:24]), tokenizer=tok)[0]  # the "a" texts, joined
    acts = [v for h in hit.hits if h.latent == PLANTED for v in h.values]
    assert float(typ[PLANTED]) == pytest.approx(sum(acts) / len(acts), rel=0.05)
    assert float(med[PLANTED]) == pytest.approx(sorted(acts)[len(acts) // 2], rel=0.05)
    never = int(torch.isnan(typ).nonzero()[0, 0]) if torch.isnan(typ).any() else None
    values = steering_values({0: {PLANTED: 2.5}}, {0: typ})
    assert values == {0: {PLANTED: pytest.approx(2.5 * float(typ[PLANTED]))}}
    if never is not None:
        with pytest.raises(ValueError, match="never fired"):
            steering_values({0: {never: 1.0}}, {0: typ})
    with pytest.raises(KeyError, match="no typical activations"):
        steering_values({1: {PLANTED: 1.0}}, {0: typ})
    # the values are what hooked.steer takes
    prompt = torch.tensor([[1, 7, 9, 11]])
    with saehook.attach(model, {0: sae}) as hooked, hooked.steer(values):
        steered = model(prompt).logits
    assert not torch.allclose(steered, model(prompt).logits)


def test_find_command(setup, tmp_path, capsys):
    model, sae, tok = setup
    model_dir, sae_dir, data = tmp_path / "tiny", tmp_path / "run" / "model.layers.0", tmp_path / "l.jsonl"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    sae.save(sae_dir)
    texts, labels = corpus()
    data.write_text("\n".join(json.dumps({"text": t, "label": lab}) for t, lab in zip(texts, labels)))
    assert main(["find", str(sae_dir), "--model", str(model_dir), "--labels", str(data), "--top", "3",
                 "--text", "w7 w50 w9", "--search", "w40 w50", "--corpus", str(data), "--holdout", "0.5",
                 "--tokens", "2k", "--context", "16", "--batch-size", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    rows = out.splitlines()
    first_a = rows[rows.index(next(r for r in rows if "/ a (" in r)) + 2]
    assert first_a.split()[0] == str(PLANTED)
    assert f"{PLANTED:>7}" in out and "2:'w50'=" in out and "w40 [[w50]]" in out
    with pytest.raises(SystemExit) as e:
        main(["find", str(sae_dir), "--model", str(model_dir)])
    assert e.value.code == 2 and "at least one of --labels, --text or --search" in capsys.readouterr().err


def test_only_tokens_that_can_overlap_the_phrase_are_decoded():
    from saehook.features import _may_overlap

    assert _may_overlap(" minister", "prime minister", False) and _may_overlap("Prim", "prime minister", False)
    assert _may_overlap("ster.", "minister", False) and _may_overlap("ministerial", "minister", False)
    assert _may_overlap("\ufffd", "é", False)  # part of a UTF-8 sequence: cannot tell, decode it
    assert not _may_overlap(" dog", "prime minister", False) and not _may_overlap("Prim", "prime", True)


def test_find_help_shows_defaults_and_examples(capsys):
    with pytest.raises(SystemExit) as e:
        main(["find", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # help lines wrap at the terminal width
    assert e.value.code == 0
    for text in ("--per-label PER_LABEL", "(default: 50)", "(default: 10000)", "(default: effect)", "(default: off)",
                 'saehook find runs/demo --labels bbc', 'saehook find runs/demo --search "prime minister"'):
        assert text in out
    assert "(default: None)" not in out and "(default: False)" not in out
