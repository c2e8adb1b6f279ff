"""Errors, not tracebacks (issue 17, kind 4): each mistake a newcomer makes gets one sentence saying what is wrong
and what to do; the CLI prints it as one line `saehook: error: ...` (exit 2 for wrong input, 1 for a failure)."""

import os
import subprocess
import sys
import time

import pytest
import torch
from conftest import source, tiny_model
from test_cli import local_model  # noqa: F401  (fixture: a tiny Llama + word tokenizer + text folder on disk)

import saehook
from saehook import Corpus, TopKSAE, TrainConfig
from saehook.cli import main, report_error
from saehook.counts import as_count

CFG = TrainConfig(batch_tokens=256, shuffle_buffer=512, init_samples=256, e2e_fraction=0.0)  # steps counted


def one_sentence(e) -> str:
    """The message of ``e`` if it is one sentence on one line (no '. ' inside, no line break), else fail."""
    text = e.args[0] if isinstance(e, KeyError) else str(e)
    assert "\n" not in text and ". " not in text.replace("e.g. ", "").rstrip("."), text
    assert 20 < len(text) < 400, text
    return text


def test_latents_before_any_forward_say_what_to_do():
    with saehook.attach(tiny_model("llama"), {1: TopKSAE(32, 64, 4)}) as hooked:
        with pytest.raises(KeyError) as e:  # was: a bare KeyError: 1
            hooked.latents[1]
        text = one_sentence(e.value)
        assert "no latents for 1 yet" in text and "run the model first" in text
        assert str(e.value) == text  # printed without the quotes of a KeyError
        with pytest.raises(KeyError) as e:
            hooked.latents[7]
        assert "no autoencoder is attached at 7; the attached keys are [1]" in one_sentence(e.value)
        hooked.model(torch.tensor([[1, 5, 6]]))
        assert hooked.latents[1].indices.shape == (1, 3, 4)
        assert hooked.latents.get(7) is None and 7 not in hooked.latents


def test_human_token_counts_in_python():
    assert as_count("200k") == 200_000 and as_count("2M") == 2_000_000 and as_count(2e5) == 200_000
    assert as_count(torch.tensor(5).item()) == 5
    with pytest.raises(ValueError) as e:
        as_count("lots")
    assert "tokens must be a count like 200_000, '200k' or '2M', got 'lots'" in one_sentence(e.value)
    with pytest.raises(TypeError):
        as_count(True)
    with saehook.attach(tiny_model("llama"), {1: TopKSAE(32, 64, 4)}) as hooked:
        report = hooked.train(source(20), tokens="1k", config=CFG, progress=False)  # was: TypeError (str * int)
        assert report.tokens >= 1000 and report.steps == 4
        with pytest.raises(ValueError, match="got 'ten'"):
            hooked.train(source(2), tokens="ten", config=CFG, progress=False)
    rep = saehook.evaluate(tiny_model("llama"), {1: TopKSAE(32, 64, 4)}, source(4), tokens="0.5k")
    assert rep.tokens >= 500


def test_attach_without_a_dict_says_how_to_write_it():
    sae = TopKSAE(32, 64, 4)
    with pytest.raises(TypeError) as e:  # was: AttributeError: 'TopKSAE' object has no attribute 'items'
        saehook.attach(tiny_model("llama"), sae)
    assert "attach takes a dict {hookpoint: TopKSAE}, e.g. attach(model, {20: sae}), not a TopKSAE" in \
        one_sentence(e.value)


def test_load_model_of_a_missing_folder_fails_fast(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    t0 = time.perf_counter()
    with pytest.raises(FileNotFoundError) as e:  # was: 23 s of hub retries, then a generic OSError
        saehook.load_model("models/smollm")
    assert time.perf_counter() - t0 < 5
    assert "'models/smollm' is not a local folder nor a downloaded Hugging Face model" in one_sentence(e.value)
    (tmp_path / "models").mkdir()  # now models/smollm can only be a path
    with pytest.raises(FileNotFoundError) as e:
        saehook.load_model("models/smollm")
    assert "there is no model folder at models/smollm" in one_sentence(e.value)
    with pytest.raises(FileNotFoundError, match="no model folder at ./nowhere"):
        saehook.load_model("./nowhere")
    with pytest.raises(FileNotFoundError) as e:
        saehook.load_model("models")
    assert "models is a folder but holds no model (no config.json)" in one_sentence(e.value)


def test_an_empty_corpus_fails_before_anything_is_written(local_model, tmp_path):  # noqa: F811
    path, _ = local_model
    _, tok = saehook.load_model(str(path))
    for docs in ([], ["", "  "]):
        with pytest.raises(ValueError) as e:
            Corpus(docs, tok)
        assert "the corpus has no text" in one_sentence(e.value)
    short = Corpus(["w5 w6 w7"], tok, context=16, holdout=0.0)
    out = tmp_path / "run"
    with saehook.attach(tiny_model("llama"), {1: TopKSAE(32, 64, 4)}) as hooked:
        with pytest.raises(ValueError) as e:
            hooked.train(short, tokens=1000, config=CFG, out=out, progress=False)
        assert "has no full batch of 8 windows of 16 tokens (3 tokens in all)" in one_sentence(e.value)
        with pytest.raises(ValueError, match="gave no batch to train on"):
            hooked.train([], tokens=1000, config=CFG, out=out, progress=False)
    assert not out.exists()  # was: an output folder left behind


def test_cli_errors_are_one_line(local_model, tmp_path, capsys):  # noqa: F811
    path, text = local_model
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    out = tmp_path / "run"
    cases = [
        (["train", "--model", str(path), "--corpus", str(empty), "--out", str(out)], "the corpus has no text"),
        (["eval", "--sae", str(tmp_path / "nothing")], "does not exist"),
        (["train", "--model", str(tmp_path / "models" / "smollm"), "--out", str(out)], "no model folder at"),
        (["train", "--out", str(text / "0.txt")], "is a file, not a folder"),
        (["dashboard", str(tmp_path / "nothing")], "does not exist"),
    ]
    (tmp_path / "models").mkdir()
    for argv, expected in cases:
        assert main([*argv, "--no-progress"]) == 2, argv
        err = capsys.readouterr().err  # (transformers' own "Loading weights" bar may come first)
        line = err.rstrip("\n").split("\n")[-1]
        assert "Traceback" not in err and line.startswith("saehook: error: ") and err.count("saehook:") == 1, err
        assert expected in line and one_sentence(line), (argv, err)
    assert not out.exists()
    assert report_error(RuntimeError("the device ran out of memory"), False) == 1
    assert capsys.readouterr().err == "saehook: error: the device ran out of memory (saehook -v shows the traceback)\n"


def test_cli_process_exit_codes_and_verbose(tmp_path):
    """A real process: one line and exit code 2; with -v (before or after the subcommand) the traceback too."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "saehook", "eval", "--sae", str(tmp_path / "nothing")]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert r.returncode == 2 and r.stderr.startswith(f"saehook: error: {tmp_path / 'nothing'} does not exist: give")
    assert r.stderr.count("\n") == 1
    r = subprocess.run([*cmd, "-v"], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "Traceback" in r.stderr
    assert r.stderr.rstrip().endswith("autoencoder folder (e.g. runs/demo/model.layers.20)")
    r = subprocess.run([sys.executable, "-m", "saehook", "train", "--tokens", "lots"], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "like 8192, 500k or 2M" in r.stderr
