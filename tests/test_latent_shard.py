"""Latent-sharded training (saehook.latent_shard): real gloo processes launched by torchrun, against the
one-process trainer on the same rows."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from saehook import TopKSAE
from saehook.latent_shard import ShardedTopKSAE, ShardLayout, latent_range
from saehook.sae import SAEConfigError

WORKER = Path(__file__).parent / "scripts" / "latent_shard_worker.py"
ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1", "SAEHOOK_DIST_TIMEOUT": "60"}


def launch(out: Path, nproc: int, *args) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(WORKER),
           str(out), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return json.loads((out / "result.json").read_text())


def check_equal(result: dict, out: Path, tol: float) -> None:
    steps = result["steps"]
    assert any("auxk_fvu" in s["reference"] for s in steps)  # AuxK ran on some steps (dead latents appeared)
    for s in steps:
        for key in ("loss", "fvu", "auxk_fvu", "multi_topk_fvu", "dead_frac", "l0"):
            assert (key in s["sharded"]) == (key in s["reference"]), key
            if key in s["reference"]:
                assert s["sharded"][key] == pytest.approx(s["reference"][key], abs=tol), (key, s)
        assert s["rows_same_selection"] == s["rows"]  # the same latents fire in every row
    assert max(result["max_weight_diff"].values()) < tol
    # the sharded save loads as one ordinary autoencoder, equal to the one-process one
    loaded, ref = TopKSAE.load(out / "sharded"), TopKSAE.load(out / "reference")
    assert loaded.n_latents == ref.n_latents and loaded.metadata == {"test": "latent_shard_worker"}
    for name, t in ref.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], t, atol=tol, rtol=0, msg=name)
    cfg = json.loads((out / "sharded" / "cfg.json").read_text())
    assert cfg["latent_shards"] == result["shards"] and cfg["format"] == "saehook.topk"


def test_two_shards_equal_one_process(tmp_path):
    """2 ranks, 2 shards, float32 and the C kernels: losses and weights to 1e-5 over 6 steps with AuxK."""
    r = launch(tmp_path, 2, "--shards", "2", "--dtype", "float32")
    assert (r["world"], r["shards"]) == (2, 2)
    check_equal(r, tmp_path, 1e-5)
    assert sorted(p.name for p in (tmp_path / "sharded").iterdir()) == [
        "cfg.json", "sae.shard-0-of-2.safetensors", "sae.shard-1-of-2.safetensors"]


def test_four_shards_with_multi_topk_and_clipping_equal_one_process(tmp_path):
    """4 ranks, 4 shards of 16 latents; Multi-TopK's 4k = 16 candidates per shard, global gradient clipping."""
    r = launch(tmp_path, 4, "--shards", "4", "--multi-topk", "--grad-clip", "0.5")
    assert (r["world"], r["shards"]) == (4, 4)
    assert "multi_topk_fvu" in r["steps"][0]["reference"]
    check_equal(r, tmp_path, 1e-8)  # float64: the same numbers up to summation order


def test_two_replicas_of_two_shards_equal_one_process(tmp_path):
    """2 x 2 grid: each replica trains on half of each step's rows; summed gradients equal one process with all."""
    r = launch(tmp_path, 4, "--shards", "2", "--grad-clip", "0.5")
    assert (r["world"], r["shards"]) == (4, 2)
    check_equal(r, tmp_path, 1e-8)


def test_sizes_that_do_not_split_are_refused():
    layout = ShardLayout(rank=1, world=4, shards=4)
    assert latent_range(64, 4, 1) == (16, 32)
    with pytest.raises(SAEConfigError, match="n_latents=66 does not split over 4 shards"):
        ShardedTopKSAE(8, 66, 4, layout)
    with pytest.raises(SAEConfigError, match="k=20 is larger than the 16 latents of one shard"):
        ShardedTopKSAE(8, 64, 20, layout)
    sae = ShardedTopKSAE(8, 64, 4, layout, seed=3)
    assert (sae.start, sae.stop, tuple(sae.W_enc.shape)) == (16, 32, (16, 8))
    again = ShardedTopKSAE(8, 64, 4, layout, seed=3)
    assert torch.equal(sae.W_dec, again.W_dec)  # a seeded shard init is reproducible
