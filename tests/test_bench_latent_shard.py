"""benchmarks/bench_latent_shard.py's communication part at a toy size: the bytes the shard group's collectives
count (``Traffic``) equal the formula docs/distributed.md states, step by step, with and without AuxK; and, where
the ranks can have a network namespace of their own, the loopback interface carries that much (plus TCP/IP)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_bytes_sent_per_step_equal_the_documented_formula(tmp_path):
    out = tmp_path / "ls.json"
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_latent_shard.py"), "--parts", "comm",
                        "--comm-n", "11", "--comm-rows", "256", "--comm-shards", "2", "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    rows = json.loads(out.read_text())["comm"]
    assert [(x["S"], x["auxk"]) for x in rows] == [(2, False), (2, True)]  # AuxK ran once latents died
    N, d, k, S = 256, 576, 32, 2
    plain = 2 * 4 * N * k * (S - 1) + 2 * (S - 1) * 4 * N * d // S + 2 * (S - 1) * 4 * d // S + 8
    assert rows[0]["formula"] == plain == rows[0]["traffic"]
    # AuxK: k_aux = min(d / 2, dead latents) candidates per shard, on the steps with dead latents
    assert rows[1]["formula"] > plain + 2 * (S - 1) * 4 * N * d // S
    assert rows[1]["traffic"] == pytest.approx(rows[1]["formula"], rel=1e-12)
    for x in rows:
        if x["isolated"]:  # only these ranks on lo: payload plus headers and acknowledgements
            assert 1.0 <= x["loopback"] / (x["formula"] + x["trainer"]) < 1.05, x
