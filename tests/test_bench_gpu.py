"""benchmarks/bench_gpu.py, the accelerator benchmark, runs end to end (on the CPU, at a toy size), so a
session that is lent a GPU can take its figures with one command."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "benchmarks" / "bench_gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_gpu_smoke_run_on_cpu(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    assert _bench().main(["--device", "cpu", "--sizes", "1024", "--tokens", "256", "--d", "32", "--k", "8",
                          "--reps", "2", "--warmup", "1", "--dead-fracs", "0", "0.1", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["device"] == "cpu" and [r["dead_frac"] for r in res["results"]] == [0.0, 0.1]
    for r in res["results"]:
        assert r["matmul_bf16_gflops"] > 0
        for impl in ("saehook-bf16", "saehook-fp32"):
            row = r["impls"][impl]
            # a ratio of two timings: positive and finite (its size depends on the machine's load, not a test)
            assert row["tokens_per_s"] > 0 and 0 < row["fraction_of_bf16_matmul"] < float("inf")
    assert "| 10% | 1,024 | saehook-bf16 |" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU machine's `make bench` path")
def test_bench_gpu_without_cuda_measures_nothing(capsys):
    assert _bench().main([]) == 0
    assert "no CUDA device" in capsys.readouterr().out
