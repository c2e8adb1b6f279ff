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


def launch(out: Path, nproc: int, *args) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(WORKER),
           str(out), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]


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


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    """One launch of 4 ranks: 4 shards of 16 latents (R = 1), then a 2 x 2 grid (2 replicas of 2 shards), each 6
    steps with AuxK from step 3, Multi-TopK (4k = 16 candidates per shard) and global gradient clipping."""
    out = tmp_path_factory.mktemp("four")
    launch(out, 4, "--shards", "4", "2", "--dtype", "float32", "--multi-topk", "--grad-clip", "0.5")
    return out


def test_four_shards_equal_one_process(four_ranks):
    r = json.loads((four_ranks / "S4" / "result.json").read_text())
    assert (r["world"], r["shards"]) == (4, 4)
    assert "multi_topk_fvu" in r["steps"][0]["reference"]
    check_equal(r, four_ranks / "S4", 1e-5)
    assert sorted(p.name for p in (four_ranks / "S4" / "sharded").iterdir()) == [
        "cfg.json", *(f"sae.shard-{s}-of-4.safetensors" for s in range(4))]
    import saehook  # the one entry point reads it too, and finds it in a run folder

    assert saehook.formats.detect_format(four_ranks / "S4" / "sharded") == "saehook"
    whole = saehook.load(four_ranks / "S4" / "sharded")
    assert type(whole) is TopKSAE and whole.n_latents == 64
    assert "sharded" in saehook.formats.find_hookpoints(four_ranks / "S4")


def test_two_replicas_of_two_shards_equal_one_process(four_ranks):
    """Each replica trains on half of each step's rows; the summed gradients equal one process with all of them."""
    r = json.loads((four_ranks / "S2" / "result.json").read_text())
    assert (r["world"], r["shards"]) == (4, 2)
    check_equal(r, four_ranks / "S2", 1e-5)


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


# ------------------------------------------------------------------ through hooked.train (tests/scripts/dist_train.py)
TRAIN = Path(__file__).parent / "scripts" / "dist_train.py"


def train_run(out: Path, *args, nproc=2, check=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(TRAIN),
           str(out), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**ENV, "SAEHOOK_DIST_TIMEOUT": "30"}, timeout=300)
    if check:
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def assert_close_saes(a: TopKSAE, b: TopKSAE, atol: float) -> None:
    for name, t in b.state_dict().items():
        torch.testing.assert_close(a.state_dict()[name], t, atol=atol, rtol=atol, msg=name)


@pytest.fixture(scope="module")
def latent_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("latents")
    train_run(root / "sharded", "--shard", "latents")  # 2 ranks, 2 shards, 8 steps of 512 rows
    env = {k: v for k, v in ENV.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    r = subprocess.run([sys.executable, str(TRAIN), str(root / "one")], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    return root


def test_hooked_train_sharded_by_latents_equals_one_process(latent_runs):
    """Each rank runs the model on its own batches, the two ranks' rows are gathered, each trains its half of the
    latents: the result equals one process reading the same batches (to 1e-5)."""
    out = latent_runs / "sharded"
    hp = "model.layers.1"
    assert sorted(p.name for p in (out / hp).iterdir()) == ["cfg.json", "sae.shard-0-of-2.safetensors",
                                                            "sae.shard-1-of-2.safetensors"]
    sharded, one = TopKSAE.load(out / hp), TopKSAE.load(latent_runs / "one" / hp)
    assert_close_saes(sharded, one, 1e-5)
    # both ranks' attached autoencoders hold the whole trained autoencoder afterwards
    for rank in (0, 1):
        assert_close_saes(TopKSAE.load(out / f"final.rank{rank}" / hp), one, 1e-5)
    cfg = json.loads((out / "train_config.json").read_text())
    assert (cfg["shard"], cfg["shards"], cfg["world"]) == ("latents", 2, 2)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["tokens"] == 4096 and metrics[-1]["step"] == 8
    assert not (out / "metrics.rank1.jsonl").exists()


def test_latent_sharded_resume_equals_uninterrupted_and_refuses_another_layout(latent_runs, tmp_path):
    out = tmp_path / "resumed"
    train_run(out, "--shard", "latents", "--tokens", "2048")  # 4 steps, checkpointed at step 4
    from conftest import tiny_model

    import saehook  # another layout is refused naming both (here one process, shard="data": no launch needed)
    from saehook.session import TrainingSession

    with saehook.attach(tiny_model("llama", layers=4), {1: TopKSAE(32, 128, 4)}) as hooked:
        with pytest.raises(ValueError, match=r"was written by 2 rank\(s\) with shards=2, shard='latents'; resume "
                                             r"with the same layout \(now 1 rank\(s\) with shard='data'\)"):
            TrainingSession(hooked, saehook.TrainConfig(batch_tokens=512)).load(out)
    train_run(out, "--shard", "latents", "--resume")  # on to 4096 tokens
    assert_close_saes(TopKSAE.load(out / "model.layers.1"), TopKSAE.load(latent_runs / "sharded" / "model.layers.1"),
                      1e-5)


def test_dead_rank_fails_a_latent_sharded_run_fast_and_its_checkpoint_loads(tmp_path):
    """Also: autoencoders attached on the meta device (no rank ever holds a whole one) train, each rank building its
    own seeded shard."""
    import time

    out = tmp_path / "dies"
    t = time.perf_counter()
    r = train_run(out, "--shard", "latents", "--meta", "--tokens", str(512 * 40), "--die-after", "6", check=False)
    assert r.returncode != 0 and time.perf_counter() - t < 120
    assert "RankFailure" in r.stderr or "another rank probably died" in r.stderr
    latest = (out / "checkpoints" / "LATEST").read_text()
    sae = TopKSAE.load(out / "checkpoints" / latest / "model.layers.1")  # the shards, assembled
    assert sae.n_latents == 128 and int(latest.split("-")[1]) >= 2
    ck = json.loads((out / "checkpoints" / latest / "model.layers.1" / "trainer.json").read_text())
    assert ck["step"] >= 2 and float(sae.input_scale) != 1.0  # trained from data, not the seeded init alone


def test_cli_refuses_a_latent_layout_the_launch_cannot_run(tmp_path, capsys, monkeypatch):
    """One line, exit 2, before the model loads, and nothing written."""
    from saehook.cli import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    out = tmp_path / "run"
    assert main(["train", "--shard", "latents", "--out", str(out)]) == 2
    assert "--shard latents splits each autoencoder over several processes: launch with torchrun" in \
        capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert main(["train", "--shard", "latents", "--shards", "3", "--out", str(out)]) == 2
    assert "--shards 3 must be a positive divisor of the 4 ranks" in capsys.readouterr().err
    assert main(["train", "--shards", "2", "--out", str(out)]) == 2
    assert "pass --shard latents with it" in capsys.readouterr().err
    assert not out.exists()


def test_an_autoencoder_attached_on_meta_says_what_to_do_when_used():
    from conftest import tiny_model

    import saehook

    model = tiny_model("llama")
    d = model.config.hidden_size
    with saehook.attach(model, {1: TopKSAE(d, 64, 4, device="meta")}) as hooked:
        with pytest.raises(ValueError, match="is on the meta device and holds no weights .* load the trained one"):
            model(torch.tensor([[3, 4, 5]]))
        with pytest.raises(ValueError, match="only shard='latents' builds its weights itself"):
            hooked.train([torch.tensor([[3, 4, 5, 6]])], tokens=64, progress=False)
