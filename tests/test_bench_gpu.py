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
                          "--reps", "2", "--warmup", "1", "--dead-fracs", "0", "0.1", "--check-n", "512",
                          "--check-tokens", "64", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["device"] == "cpu" and [r["dead_frac"] for r in res["results"]] == [0.0, 0.1]
    for r in res["results"]:
        assert r["matmul_bf16_gflops"] > 0
        for impl in ("saehook-bf16", "saehook-fp32"):
            row = r["impls"][impl]
            # a ratio of two timings: positive and finite (its size depends on the machine's load, not a test)
            assert row["tokens_per_s"] > 0 and 0 < row["fraction_of_bf16_matmul"] < float("inf")
    text = capsys.readouterr().out
    assert "| 10% | 32 | 1,024 | saehook-bf16 |" in text and "agreement with the CPU reference" in text
    agree = res["agreement"]  # the CPU against itself here: exact; on CUDA, the Triton kernels against the C ones
    assert agree["rows_same_latents"] == 1.0 and agree["fvu_abs_diff"] == 0.0 and agree["fvu_cpu"] > 0
    assert set(agree["grad_rel_err"]) == {"W_enc", "b_enc", "W_dec", "b_dec"}
    assert max(agree["grad_rel_err"].values()) == 0.0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU machine's `make bench` path")
def test_bench_gpu_without_cuda_measures_nothing(capsys):
    assert _bench().main([]) == 0
    assert "no CUDA device" in capsys.readouterr().out
