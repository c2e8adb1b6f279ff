"""A run folder is never overwritten unasked (issue 17, kind 1): a second run into it is refused before anything is
written, --overwrite starts a consistent new run, a second demo or evaluation takes a fresh name."""

import json

import pytest
import torch
from conftest import source, tiny_model
from test_cli import local_model  # noqa: F401  (fixture: a tiny Llama + word tokenizer + text folder on disk)

import saehook
from saehook import TopKSAE, TrainConfig
from saehook.cli import main
from saehook.runs import RunExistsError, next_free, prepare_run, run_files

# e2e_fraction=0: these tests count steps and checkpoints of the local phase only
CFG = TrainConfig(batch_tokens=256, shuffle_buffer=512, log_every=1, init_samples=256, checkpoint_every=4,
                  e2e_fraction=0.0)


def train(out, tokens, **kw):
    torch.manual_seed(0)
    sae = TopKSAE(32, 64, 4)
    with saehook.attach(tiny_model("llama"), {1: sae}) as hooked:
        hooked.train(source(60), tokens=tokens, config=CFG, out=out, progress=False, **kw)
    return sae


def snapshot(folder):
    """Every file under ``folder`` with its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_sentence(text):
    text = " ".join(str(text).split())
    return text.count(". ") == 0 and "\n" not in str(text).strip() and len(text) < 400


def test_a_second_run_into_a_run_folder_is_refused_and_changes_nothing(tmp_path):
    out = tmp_path / "run"
    train(out, 4000)
    (out / "report.json").write_text("{}")
    before = snapshot(out)
    with pytest.raises(RunExistsError) as e:
        train(out, 600)  # before: replaced the autoencoder, appended to metrics.jsonl, moved LATEST back
    assert snapshot(out) == before
    msg = str(e.value)
    assert one_sentence(msg) and str(out) in msg and "resume=True" in msg and "overwrite=True" in msg
    assert isinstance(e.value, FileExistsError)
    with pytest.raises(ValueError, match="pass one of them"):
        train(out, 600, resume=True, overwrite=True)
    assert snapshot(out) == before


def test_overwrite_starts_a_consistent_run_and_keeps_other_files(tmp_path):
    out = tmp_path / "run"
    train(out, 6000)  # 24 steps: checkpoints at 4, 8, ..., 24
    (out / "report.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    assert (out / "checkpoints" / "LATEST").read_text() == "step-0000024"
    sae = train(out, 1024, overwrite=True)  # 4 steps
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # only the new run's lines
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["LATEST", "step-0000004"]
    assert (out / "checkpoints" / "LATEST").read_text() == "step-0000004"
    assert not (out / "report.json").exists()  # it described the old autoencoder
    assert (out / "notes.txt").read_text() == "mine"
    saved = TopKSAE.load(out / "model.layers.1")
    assert saved.metadata["steps"] == 4 and torch.equal(saved.W_enc, sae.W_enc)
    assert json.loads((out / "train_config.json").read_text())["tokens"] == 1024


def test_resume_and_empty_folders_are_allowed(tmp_path):
    (tmp_path / "empty").mkdir()
    prepare_run(tmp_path / "empty")
    prepare_run(tmp_path / "missing")
    prepare_run(None)
    with pytest.raises(FileNotFoundError, match="no checkpoint in .* to continue from"):
        prepare_run(tmp_path / "empty", resume=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "a.txt").write_text("x")
    with pytest.raises(RunExistsError, match="already holds files"):
        prepare_run(tmp_path / "other")
    assert run_files(tmp_path / "other") == []


def test_next_free():
    from pathlib import Path

    assert next_free(Path("/nonexistent/report.json")) == Path("/nonexistent/report.json")


def test_next_free_counts_up(tmp_path):
    (tmp_path / "report.json").write_text("{}")
    (tmp_path / "report-2.json").write_text("{}")
    assert next_free(tmp_path / "report.json") == tmp_path / "report-3.json"
    (tmp_path / "demo").mkdir()
    assert next_free(tmp_path / "demo") == tmp_path / "demo-2"


def cli_train(path, text, out, *extra):
    return ["train", "--model", str(path), "--corpus", str(text), "--layers", "1", "--latents", "64", "--k", "4",
            "--tokens", "1k", "--batch-tokens", "256", "--context", "16", "--batch-size", "4", "--shuffle-buffer", "0",
            "--dtype", "float32", "--e2e-fraction", "0", "--out", str(out), "--no-progress", *extra]


def test_cli_train_refuses_a_run_folder_without_a_traceback(local_model, tmp_path, capsys):  # noqa: F811
    path, text = local_model
    out = tmp_path / "run"
    assert main(cli_train(path, text, out)) == 0
    before = snapshot(out)
    capsys.readouterr()
    assert main(cli_train(path, text, out, "--tokens", "512")) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("saehook: error: ")
    assert f"{out} already holds a training run" in err and "--resume" in err and "--overwrite" in err
    assert snapshot(out) == before
    assert main(cli_train(path, text, out, "--tokens", "512", "--overwrite")) == 0
    assert TopKSAE.load(out / "model.layers.1").metadata["tokens"] == 512


def test_demo_twice_keeps_the_first_run(local_model, tmp_path, monkeypatch, capsys):  # noqa: F811
    """The second `saehook demo` (no --out) trains into runs/demo-2; runs/demo stays as it was."""
    path, text = local_model
    monkeypatch.chdir(tmp_path)
    args = cli_train(path, text, "x", "--eval-tokens", "64")
    args = ["demo"] + args[1:args.index("--out")] + args[args.index("--out") + 2:]
    assert main(args) == 0
    first = snapshot(tmp_path / "runs" / "demo")
    assert "report.json" in first and "model.layers.1/sae.safetensors" in first
    assert main(args) == 0
    assert "run folder: runs/demo-2" in capsys.readouterr().out
    assert snapshot(tmp_path / "runs" / "demo") == first
    assert (tmp_path / "runs" / "demo-2" / "report.json").is_file()


def test_eval_keeps_an_existing_report(local_model, tmp_path, capsys):  # noqa: F811
    """`saehook eval --sae <run>` accepts a run folder (as dashboard does), writes report.json, then report-2.json;
    an explicit existing --out is refused unless --overwrite."""
    path, text = local_model
    out = tmp_path / "run"
    assert main(cli_train(path, text, out)) == 0
    args = ["eval", "--sae", str(out), "--model", str(path), "--corpus", str(text), "--tokens", "128",
            "--context", "16", "--batch-size", "4", "--holdout", "0.5", "--no-progress"]
    assert main(args) == 0
    first = (out / "report.json").read_bytes()
    assert main(args) == 0
    assert (out / "report.json").read_bytes() == first and (out / "report-2.json").is_file()
    printed = capsys.readouterr().out
    assert f"report written to {out / 'report-2.json'}" in printed
    assert main([*args, "--out", str(out / "report.json")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "--overwrite" in err and (out / "report.json").read_bytes() == first
    assert main([*args, "--out", str(out / "report.json"), "--overwrite"]) == 0
    report = json.loads((out / "report.json").read_text())
    entry = report["hookpoints"]["model.layers.1"]
    assert entry["windows"] >= 8 and entry["delta_lm_loss_se"] > 0


def test_dashboard_refuses_a_folder_it_did_not_build(tmp_path, capsys):
    """An existing --out is refused (exit 2, files kept) unless --overwrite, and --overwrite replaces only a
    dashboard folder (one with summary.json), never another folder's files; nothing is loaded first."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):
        assert main(["dashboard", str(tmp_path / "run"), "--out", str(out), *extra]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and f"--out {out} is not empty: choose another --out" in err
    assert (out / "notes.txt").read_text() == "mine"
