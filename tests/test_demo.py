"""The demo's find-and-steer step (saehook.demo) on the planted topic latent of tests/test_features.py.

A tiny random Llama whose token ``w50`` has its own direction, read only by latent 37 of the autoencoder at
layer 0 (about 5 where it fires); label "a" documents contain ``w50``, label "b" ones never do. The step must
find latent 37 for "a", state its typical activation and the multiple, and change the greedy text.
"""

import json

import pytest
from test_features import PLANTED, corpus, make_tokenizer, planted

from saehook.cli import main
from saehook.demo import find_and_steer


@pytest.fixture(scope="module")
def setup():
    model, sae = planted()
    texts, labels = corpus()
    return model, {0: sae}, make_tokenizer(), texts, labels


def test_find_and_steer_finds_the_planted_latent_and_changes_the_text(setup):
    model, saes, tok, texts, labels = setup
    said = []
    res = find_and_steer(model, tok, saes, texts, labels, label="a", multiple=8, prompt="w7 w9 w11",
                         max_new_tokens=12, say=said.append)
    assert res.found.latent == PLANTED and res.found.rate_out == 0.0 and res.documents == 48
    assert res.typical == pytest.approx(5.0, abs=0.1)  # 10 * |u|^2 - 5 on w50, as planted
    assert res.value == pytest.approx(8 * res.typical) and res.multiple == 8
    assert len(res.clean.split()) == 12 and res.steered != res.clean
    assert [s.split()[0] for s in said] == ["finding", "generating"]  # each phase named as it starts
    text = "\n".join(res.lines())
    assert f"latent {PLANTED} at 0" in text and "8 x typical" in text and f"8 x latent {PLANTED}" in text
    assert f"effect {res.found.effect:.3f}" in text and repr(res.steered) in text and repr(res.clean) in text
    # multiple 0 is the unsteered text: the steering, nothing else, makes the difference
    zero = find_and_steer(model, tok, saes, texts, labels, label="a", multiple=0, prompt="w7 w9 w11",
                          max_new_tokens=12)
    assert zero.steered == zero.clean == res.clean and zero.value == 0.0


def test_find_and_steer_refuses_a_missing_label_before_running(setup):
    model, saes, tok, texts, labels = setup
    calls = []
    handle = model.model.layers[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match=r"label 'sports' is not among the labels of the documents \['a', 'b'\]"):
            find_and_steer(model, tok, saes, texts, labels, label="sports", multiple=8)
        with pytest.raises(ValueError, match="multiple must be a finite number"):
            find_and_steer(model, tok, saes, texts, labels, label="a", multiple=float("nan"))
        with pytest.raises(KeyError, match="no autoencoder at 3"):
            find_and_steer(model, tok, saes, texts, labels, label="a", multiple=8, key=3)
    finally:
        handle.remove()
    assert calls == []


def test_demo_refuses_an_unknown_steer_label_before_training(tmp_path, capsys):
    texts, labels = corpus(4)
    path = tmp_path / "labelled.jsonl"
    path.write_text("\n".join(json.dumps({"text": t, "label": lab}) for t, lab in zip(texts, labels)))
    out = tmp_path / "demo"
    assert main(["demo", "--model", str(tmp_path / "no-model"), "--steer-texts", str(path), "--steer-label", "c",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"saehook: error: --steer-label 'c' is not a label of {path} (a, b); pass one of those")
    assert not out.exists()
