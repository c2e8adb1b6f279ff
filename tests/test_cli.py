"""The command line: counts, help, and a real `saehook train` run on a tiny local model."""

import argparse
import json
import subprocess
import sys

import pytest
import torch
from conftest import tiny_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import saehook
from saehook.cli import main, parse_count


def test_parse_count():
    assert parse_count("2M") == 2_000_000 and parse_count("500k") == 500_000 and parse_count("8192") == 8192
    assert parse_count("1.5k") == 1500
    with pytest.raises(argparse.ArgumentTypeError, match="like 8192, 500k or 2M"):
        parse_count("lots")


def test_help_is_complete():
    out = subprocess.run([sys.executable, "-m", "saehook", "--help"], capture_output=True, text=True, check=True)
    assert "train" in out.stdout and "demo" in out.stdout
    out = subprocess.run([sys.executable, "-m", "saehook", "train", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for flag in ("--model", "--layers", "--latents", "--k", "--tokens", "--batch-tokens", "--context", "--out",
                 "--resume", "--corpus"):
        assert flag in out


@pytest.fixture
def local_model(tmp_path):
    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(124)]
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<pad>")
    path = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(path)
    tok.save_pretrained(path)
    g = torch.Generator().manual_seed(0)
    text = tmp_path / "text"
    text.mkdir()
    for d in range(30):
        ids = torch.randint(4, 128, (200,), generator=g).tolist()
        (text / f"{d}.txt").write_text(" ".join(words[i] for i in ids))
    return path, text


def test_train_command_runs_and_resumes(local_model, tmp_path, capsys):
    path, text = local_model
    out = tmp_path / "run"
    args = ["train", "--model", str(path), "--corpus", str(text), "--layers", "1", "model.layers.2",
            "--latents", "64", "--k", "4", "--tokens", "3k", "--batch-tokens", "256", "--context", "16",
            "--batch-size", "4", "--shuffle-buffer", "256", "--dtype", "float32", "--out", str(out),
            "--checkpoint-every", "4", "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "model.layers.1" in printed and "model.layers.2" in printed and "fvu" in printed
    sae = saehook.TopKSAE.load(out / "model.layers.1")
    assert (sae.n_latents, sae.k, sae.d_in) == (64, 4, 32) and sae.metadata["tokens"] >= 3000
    steps = sae.metadata["steps"]
    # resume with a larger budget continues from the checkpoint instead of starting over
    args[args.index("3k")] = "4k"
    assert main(args + ["--resume"]) == 0
    again = saehook.TopKSAE.load(out / "model.layers.1")
    assert again.metadata["steps"] > steps and again.metadata["tokens"] >= 4000
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(x["step"] for x in lines) == again.metadata["steps"]


def test_demo_command_trains_evaluates_finds_and_steers(local_model, tmp_path, capsys):
    path, text = local_model
    out = tmp_path / "demo"
    labelled = tmp_path / "labelled.jsonl"  # label "a" documents repeat w50, label "b" ones never hold it
    g = torch.Generator().manual_seed(1)
    docs = [(" ".join(f"w{i}" for i in torch.randint(0, 124, (30,), generator=g).tolist() if i != 50)
             + " w50" * 10 * (lab == "a"), lab) for lab in ("a", "b") for _ in range(6)]
    labelled.write_text("\n".join(json.dumps({"text": t, "label": lab}) for t, lab in docs))
    args = ["demo", "--model", str(path), "--corpus", str(text), "--layers", "1", "--latents", "64", "--k", "4",
            "--tokens", "1k", "--batch-tokens", "256", "--context", "16", "--batch-size", "4",
            "--shuffle-buffer", "0", "--dtype", "float32", "--out", str(out), "--no-progress",
            "--eval-tokens", "64", "--steer-texts", str(labelled), "--steer-label", "a", "--steer-multiple", "7.5"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    phases = [line for line in printed.splitlines() if line.startswith("== demo ")]
    assert [p.split()[2] for p in phases] == ["1/3:", "2/3:", "3/3:"] and "held-out: fvu" in printed
    latent = int(printed.split("\nlatent ")[1].split()[0])
    assert "steering at 7.5 x typical" in printed and f"steered (7.5 x latent {latent}): " in printed
    assert "unsteered: " in printed and "the most specific to 'a' of 12 labelled documents" in printed
    report = json.loads((out / "report.json").read_text())
    entry = next(iter(report["hookpoints"].values()))
    assert 0 < entry["fvu"] < 2 and entry["tokens"] >= 64 and entry["delta_lm_loss"] is not None
    assert saehook.TopKSAE.load(out / "model.layers.1").metadata["tokens"] >= 1000


def test_train_summary_quotes_the_smoothed_fvu(local_model, tmp_path, capsys):
    """The summary table's FVU is the mean of the last 50 steps' (metrics.jsonl, one line per step here),
    not the last batch's."""
    path, text = local_model
    out = tmp_path / "run"
    assert main(["train", "--model", str(path), "--corpus", str(text), "--layers", "1", "--latents", "64", "--k", "4",
                 "--tokens", "6k", "--batch-tokens", "64", "--init-samples", "256", "--context", "16",
                 "--batch-size", "4", "--shuffle-buffer", "256", "--dtype", "float32", "--out", str(out),
                 "--log-every", "1", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    fvus = [json.loads(x)["fvu"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(fvus) >= 90
    smoothed, last = sum(fvus[-50:]) / 50, fvus[-1]
    assert abs(smoothed - last) > 1e-4  # the two differ, so the test tells them apart
    row = next(line for line in printed.splitlines() if line.startswith("model.layers.1 "))
    assert row.split()[1] == f"{smoothed:.4f}"
    assert "* train fvu: mean of the last 50 training steps" in printed


def test_every_subcommand_help_shows_its_defaults_and_examples():
    """Issue 17 kind 3: every option with a default shows it in --help, and each subcommand has examples."""
    from saehook.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        text = " ".join(p.format_help().split())
        assert "examples: saehook " + name in text, name
        for action in p._actions:
            if action.default in (None, False, [], argparse.SUPPRESS) or not action.option_strings:
                continue
            help_ = " ".join(p._get_formatter()._expand_help(action).split()) if action.help else ""
            assert "(default" in help_, (name, action.option_strings)
            assert help_ in text, (name, action.option_strings)


def test_train_architecture_transcoder_at_a_layers_mlp(local_model, tmp_path, capsys):
    """--architecture transcoder --layers 1: a Transcoder of model.layers.1.mlp, trained, saved and loaded."""
    from saehook.transcoder import Transcoder

    path, text = local_model
    out = tmp_path / "run"
    assert main(["train", "--model", str(path), "--corpus", str(text), "--architecture", "transcoder",
                 "--layers", "1", "--latents", "64", "--k", "4", "--tokens", "1k", "--batch-tokens", "64",
                 "--init-samples", "128", "--context", "16", "--batch-size", "4", "--shuffle-buffer", "128",
                 "--dtype", "float32", "--out", str(out), "--no-progress"]) == 0
    assert "training 1 Transcoder(s) at ['model.layers.1.mlp']" in capsys.readouterr().out
    tc = saehook.load(out / "model.layers.1.mlp")
    assert type(tc) is Transcoder and tc.metadata["hookpoint"] == "model.layers.1.mlp"
