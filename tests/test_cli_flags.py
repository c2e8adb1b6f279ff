"""`saehook train` flags come from TrainConfig: every field is a flag with the dataclass's default and docstring."""

import argparse
import dataclasses
import subprocess
import sys

import pytest

from saehook import TrainConfig
from saehook.cli import add_train_args
from saehook.dataclass_args import add_dataclass_args, dataclass_from_args, field_docs, first_sentence, plain


def train_parser(demo: bool = False) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_train_args(p, demo=demo)
    return p


@pytest.mark.parametrize("demo", [False, True])
def test_every_field_is_a_flag_with_the_dataclass_default(demo):
    args = train_parser(demo).parse_args([])
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        assert getattr(args, f.name) == getattr(defaults, f.name), f.name
    assert dataclass_from_args(TrainConfig, args) == defaults


def test_no_hand_written_flag_shadows_a_field():
    """A hand-written flag with a field's name would be a second default (argparse would refuse a duplicate
    option string, but not a differently spelled flag with the same dest)."""
    p = train_parser()
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    generated = {a.dest for g in p._action_groups if g.title == "training recipe" for a in g._group_actions}
    assert generated == names
    by_hand = [a.dest for a in p._actions if a.dest in names and a.dest not in generated]
    assert by_hand == []


def test_help_lists_every_field_with_its_docstring_and_default():
    out = subprocess.run([sys.executable, "-m", "saehook", "train", "--help"], capture_output=True, text=True,
                         check=True).stdout
    flat = " ".join(out.split()).replace("- ", "-")  # argparse wraps lines, sometimes inside hyphenated words
    docs = field_docs(TrainConfig)
    assert set(docs) == {f.name for f in dataclasses.fields(TrainConfig)}  # every field has a docstring
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        assert flag in out, flag
        sentence = " ".join(plain(first_sentence(docs[f.name])).split()).replace("- ", "-")
        assert sentence in flat, (f.name, sentence)
    assert "Steps between checkpoints (and always at the end). (default: 500)" in flat
    assert "--auxk, --no-auxk" in out and "(default: 0.9 0.99)" in flat
    assert "--lr-schedule {wsd,cosine,constant}" in out


def test_non_default_values_reach_the_config():
    argv = ["--auxk-coef", "0.125", "--no-auxk", "--betas", "0.9", "0.999", "--lr", "3e-4", "--lr-schedule",
            "cosine", "--batch-tokens", "4k", "--k-aux", "none", "--ema", "0.999", "--checkpoint-every", "7",
            "--matmul-dtype", "bfloat16", "--normalize", "channel", "--dead-tokens", "2M"]
    cfg = dataclass_from_args(TrainConfig, train_parser().parse_args(argv))
    assert cfg.auxk_coef == 0.125 and cfg.auxk is False and cfg.betas == (0.9, 0.999)
    assert cfg.lr == 3e-4 and cfg.lr_schedule == "cosine" and cfg.batch_tokens == 4000 and cfg.k_aux is None
    assert cfg.ema == 0.999 and cfg.checkpoint_every == 7 and cfg.matmul_dtype == "bfloat16"
    assert cfg.normalize == "channel" and cfg.dead_tokens == 2_000_000
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("argv", [["--lr-schedule", "linear"], ["--betas", "0.9"], ["--auxk-coef", "x"],
                                  ["--batch-tokens", "lots"]])
def test_bad_values_are_refused_by_the_parser(argv, capsys):
    with pytest.raises(SystemExit):
        train_parser().parse_args(argv)
    assert "error:" in capsys.readouterr().err


def test_unsupported_field_types_are_named():
    @dataclasses.dataclass
    class Odd:
        x: dict = dataclasses.field(default_factory=dict)

    with pytest.raises(TypeError, match="field 'x' of Odd has no default"):
        add_dataclass_args(argparse.ArgumentParser(), Odd)

    @dataclasses.dataclass
    class Odder:
        x: complex = 1j

    with pytest.raises(TypeError, match="field 'x': type <class 'complex'> has no command-line form"):
        add_dataclass_args(argparse.ArgumentParser(), Odder)
