"""Real multi-process training: 2 CPU processes (gloo) launched by torchrun."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from saehook import TopKSAE
from saehook.plots import read_metrics

SCRIPT = Path(__file__).parent / "scripts" / "dist_train.py"
ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1", "SAEHOOK_DIST_TIMEOUT": "30"}


def torchrun(out, *args, nproc=2, check=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(SCRIPT), str(out), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=240)
    if check:
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def single(out, *args):
    env = {k: v for k, v in ENV.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    r = subprocess.run([sys.executable, str(SCRIPT), str(out), *args], capture_output=True, text=True, env=env,
                       timeout=240)
    assert r.returncode == 0, r.stderr[-4000:]


def weights(path):
    return TopKSAE.load(path).state_dict()


def assert_same(a, b, atol=0.0):
    for name in a:
        if atol:
            torch.testing.assert_close(a[name], b[name], atol=atol, rtol=atol, msg=name)
        else:
            assert torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    torchrun(root / "data2")
    single(root / "ref1")  # one process, the same global batch (512 = 2 ranks x 256)
    return root


def test_data_parallel_ranks_agree_and_checkpoint_is_rank0(runs):
    r0, r1 = (weights(runs / "data2" / f"final.rank{r}" / "model.layers.1") for r in (0, 1))
    assert_same(r0, r1)  # both ranks hold identical autoencoders
    assert_same(weights(runs / "data2" / "model.layers.1"), r0)  # what is on disk is rank 0's
    rows = read_metrics(runs / "data2")["model.layers.1"]
    assert rows[-1]["tokens"] == 4096 and rows[-1]["step"] == 8  # global tokens, 512 per step
    assert rows[-1]["fvu"] < 0.9 * rows[0]["fvu"]  # the loss went down (0.675 -> 0.591 in 8 steps)
    assert not (runs / "data2" / "metrics.rank1.jsonl").exists()  # only rank 0 logs


def test_two_ranks_equal_one_rank_with_twice_the_batch(runs):
    two = weights(runs / "data2" / "model.layers.1")
    one = weights(runs / "ref1" / "model.layers.1")
    assert_same(two, one, atol=1e-4)
    fvu2 = [m["fvu"] for m in read_metrics(runs / "data2")["model.layers.1"]]
    fvu1 = [m["fvu"] for m in read_metrics(runs / "ref1")["model.layers.1"]]
    assert len(fvu1) == len(fvu2) == 8
    assert max(abs(a - b) for a, b in zip(fvu1, fvu2)) < 1e-4


def test_data_parallel_resume_with_same_ranks(runs, tmp_path):
    out = tmp_path / "resumed"
    torchrun(out, "--tokens", "2048")  # a shorter run: 4 steps, checkpointed
    torchrun(out, "--resume")  # continue to 4096 tokens with the same 2 ranks
    assert_same(weights(out / "model.layers.1"), weights(runs / "data2" / "model.layers.1"), atol=1e-5)


def test_layer_sharded_four_layers(tmp_path):
    out = tmp_path / "layers"
    t = time.perf_counter()
    torchrun(out, "--shard", "layers", "--layers", "0", "1", "2", "3")
    elapsed = time.perf_counter() - t
    s0, s1 = (json.loads((out / f"summary.rank{r}.json").read_text()) for r in (0, 1))
    # any rank count and layer count: layer i lives on rank i % 2
    assert s0["trained"] == ["model.layers.0", "model.layers.2"]
    assert s1["trained"] == ["model.layers.1", "model.layers.3"]
    assert s0["tokens"] == s1["tokens"] == 4096
    for layer, rank in ((0, 0), (1, 1), (2, 0), (3, 1)):
        name = f"model.layers.{layer}"
        assert (s0 if rank == 0 else s1)["changed"][name]
        # the owner wrote it; its weights equal a 1-process run on the same global batches
        assert_same(weights(out / name), weights(out / f"final.rank{rank}" / name))
    ref = tmp_path / "ref"
    single(ref, "--layers", "0", "1", "2", "3")
    for layer in range(4):
        assert_same(weights(out / f"model.layers.{layer}"), weights(ref / f"model.layers.{layer}"), atol=1e-5)
    assert {p.name for p in (out / "checkpoints" / (out / "checkpoints" / "LATEST").read_text()).iterdir()} >= {
        "state.json", "model.layers.0", "model.layers.1", "model.layers.2", "model.layers.3"}
    assert elapsed < 200


def test_dead_rank_makes_the_other_fail_fast_and_checkpoint_survives(tmp_path):
    out = tmp_path / "dies"
    t = time.perf_counter()
    r = torchrun(out, "--tokens", str(512 * 40), "--die-after", "6", check=False)
    elapsed = time.perf_counter() - t
    assert r.returncode != 0
    assert elapsed < 120  # no hang: collectives time out (SAEHOOK_DIST_TIMEOUT=30) or see the closed peer
    latest = (out / "checkpoints" / "LATEST").read_text()
    sae = TopKSAE.load(out / "checkpoints" / latest / "model.layers.1")
    assert sae.n_latents == 128 and int(latest.split("-")[1]) >= 2
