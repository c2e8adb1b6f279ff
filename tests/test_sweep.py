"""A sweep in one pass (saehook.sweep): several dictionaries on one hookpoint from one stream of forward passes."""

import copy
import json

import pytest
import torch
from conftest import source, tiny_model

import saehook
from saehook.sweep import Sweep, train_sweep

CFG = saehook.TrainConfig(batch_tokens=128, shuffle_buffer=256, init_samples=256, e2e_fraction=0, log_every=1)


def test_each_member_equals_its_own_run_on_the_same_stream(tmp_path):
    """Three members (two sizes, two learning rates) in one pass; member 'a' ends exactly where hooked.train of the
    same autoencoder alone ends: every member saw the same rows in the same order."""
    model = tiny_model("llama")
    d = model.config.hidden_size
    torch.manual_seed(0)
    saes = {"a": saehook.TopKSAE(d, 64, 4), "b": saehook.TopKSAE(d, 128, 8), "c": saehook.TopKSAE(d, 64, 4)}
    alone = copy.deepcopy(saes["a"])
    with saehook.attach(model, {1: saes["b"]}) as hooked:
        sweep = train_sweep(hooked, 1, saes, source(40), tokens=1024, config=CFG, out=tmp_path / "sweep",
                            configs={"c": saehook.TrainConfig(**{**CFG.to_dict(), "lr": 1e-2})}, progress=False)
    with saehook.attach(model, {1: alone}) as hooked:
        report = hooked.train(source(40), tokens=1024, config=CFG, progress=False)
    # like hooked.train, the last forward's ready batches are all trained (here 1,152 rows: 9 steps)
    assert {name: tr.tokens for name, tr in sweep.trainers.items()} == {n: report.tokens for n in "abc"}
    for name, t in alone.state_dict().items():
        torch.testing.assert_close(saes["a"].state_dict()[name], t, atol=1e-6, rtol=1e-6, msg=name)
    assert not torch.equal(saes["a"].W_enc, saes["c"].W_enc)  # c: same init seed path but its own learning rate
    assert sweep.last["b"]["fvu"] < 1.0 and sweep.last["a"]["l0"] == 4.0 and sweep.last["b"]["l0"] == 8.0
    # saved: each member, a summary and every step's metrics
    assert saehook.load(tmp_path / "sweep" / "b").n_latents == 128
    summary = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert summary["members"]["c"]["config"]["lr"] == 1e-2 and summary["tokens"] == report.tokens
    lines = [json.loads(x) for x in (tmp_path / "sweep" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 3 * report.steps and {x["member"] for x in lines} == {"a", "b", "c"}
    with pytest.raises(saehook.runs.RunExistsError):  # a second sweep into the same folder is refused
        with saehook.attach(model, {1: saes["b"]}) as hooked:
            train_sweep(hooked, 1, saes, source(4), tokens=128, config=CFG, out=tmp_path / "sweep", progress=False)


def test_a_sweep_refuses_what_one_stream_cannot_feed():
    saes = {"a": saehook.TopKSAE(8, 16, 2), "b": saehook.TopKSAE(12, 16, 2)}
    with pytest.raises(ValueError, match="one d_in .* got {.a.: 8, .b.: 12}"):
        Sweep(saes)
    saes["b"] = saehook.TopKSAE(8, 16, 2)
    with pytest.raises(ValueError, match=r"the config of 'b' changes \['batch_tokens'\]"):
        Sweep(saes, CFG, configs={"b": saehook.TrainConfig(**{**CFG.to_dict(), "batch_tokens": 64})})
    with pytest.raises(ValueError, match=r"configs for \['z'\], which are not in the sweep"):
        Sweep(saes, CFG, configs={"z": CFG})
