"""Every recipe runs end to end on the embedded SmolLM2 with a tiny budget; the scaling fit is checked."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from saehook.scaling import fit_scaling_law

RECIPES = Path(__file__).parent.parent / "recipes"
ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}


def run(script, *args, timeout=300):
    r = subprocess.run([sys.executable, str(RECIPES / script), *args], capture_output=True, text=True, env=ENV,
                       timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_scaling_law_fit_recovers_known_parameters():
    true = dict(a=-0.5, b_k=0.26, b_n=-0.017 * 10, g=-0.042, z=-1.32 * 2, h=-0.085)
    def law(n, k):
        lk, ln = math.log(k), math.log(n)
        return (math.exp(true["a"] + true["b_k"] * lk + true["b_n"] * ln + true["g"] * lk * ln)
                + math.exp(true["z"] + true["h"] * lk))
    ns, ks = [256, 512, 1024, 2048, 4096, 8192] * 3, [8] * 6 + [16] * 6 + [32] * 6
    fit = fit_scaling_law(ns, ks, [law(n, k) for n, k in zip(ns, ks)])
    assert fit.rmse_log < 1e-3
    for n, k in [(300, 10), (6000, 24), (16384, 32)]:
        assert abs(fit(n, k) / law(n, k) - 1) < 0.02


@pytest.mark.integration
def test_recipes_run(tmp_path):
    small = ["--batch-tokens", "512", "--shuffle-buffer", "512"]
    out = run("train_one_layer.py", "--tokens", "1k", "--latents", "256", "--out", str(tmp_path / "one"), *small)
    assert "fvu" in out and (tmp_path / "one" / "model.layers.20" / "sae.safetensors").is_file()
    out = run("train_many_layers.py", "--layers", "4", "10", "--tokens", "1k", "--latents", "256",
              "--out", str(tmp_path / "many"), *small)
    assert "layer  4" in out and "layer 10" in out
    out = run("train_while_generating.py", "--rounds", "2", "--new-tokens", "8", "--latents", "256")
    assert "[1] steps" in out
    out = run("scaling_sweep.py", "--base-tokens", "4096", "--eval-tokens", "1024", "--batch-tokens", "512",
              "--latents", "256", "512", "--ks", "8", "16", "--out", str(tmp_path / "sweep"))
    res = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert len(res["results"]) == 4 and all(0 < r["fvu"] < 2 for r in res["results"])
    assert (tmp_path / "sweep" / "scaling_law.png").stat().st_size > 10_000
