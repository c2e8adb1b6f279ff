"""saehook's training step on an accelerator: tokens/s and the fraction of the device's own bf16 matmul rate.

The issue's GPU measurement (run it whenever an H100/H200 is lent): one ``SAETrainer.step`` with the bf16
encoder matmul at d = 576 and 4096, k = 32, 8192 rows per step, n = 65,536 and 262,144, against the device's
rate for the encoder's product ``addmm(b, x, W^T)`` alone in bf16 (whole, and in the row chunks saehook uses;
the faster is the roofline), counting ``2dn + 8kd`` FLOPs per token. With ``--peers``, eai-sparsify's
``SparseCoder`` (its Triton decoder on CUDA) is timed in the same rounds, on the same rows and weights.
On CUDA the sparse parts run saehook's Triton kernels (``saehook.ops``). First, the agreement of the
device's step with the CPU reference (the C kernels): ``TopKSAE.forward`` with AuxK and its backward on the
same rows and weights on both (fp32, n = ``--check-n``), as the FVU difference, the share of rows that
select the same latents, and each gradient's relative error.

    python benchmarks/bench_gpu.py                                  # cuda if available
    python benchmarks/bench_gpu.py --sizes 65536 262144 --d 576 4096 --dead-fracs 0 0.1 --peers
    python benchmarks/bench_gpu.py --device cpu --sizes 4096 --d 64 --tokens 2048 --reps 2   # a smoke run

Timing: ``torch.cuda.synchronize()`` around each step (a no-op on CPU), rounds in rotating order,
medians; peak memory from ``torch.cuda.max_memory_allocated`` around one step. Results: stdout and
``benchmarks/results/gpu.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from saehook import SAETrainer, TopKSAE, TrainConfig  # noqa: E402
from saehook.kernels import _chunk_rows  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "gpu.json"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def setup_saehook(x, dead, w, matmul_dtype: str):
    sae = TopKSAE(x.shape[1], dead.numel(), 32, device=x.device)
    sae.load_state_dict(w)
    trainer = SAETrainer(sae, TrainConfig(batch_tokens=len(x), matmul_dtype=matmul_dtype))
    trainer.initialize(x)
    counts = torch.where(dead, trainer.dead_threshold, 0).to(trainer.tokens_since_fired.dtype)

    def step():
        trainer.tokens_since_fired.copy_(counts)
        return trainer.step(x)["loss"]

    return step


def setup_sparsify(x, dead, w, k: int):
    """eai-sparsify's SparseCoder and the body of its trainer's step (as in bench_step.py)."""
    from sparsify import SparseCoder, SparseCoderConfig

    d, n = x.shape[1], dead.numel()
    sc = SparseCoder(d, SparseCoderConfig(num_latents=n, k=k), device=x.device, dtype=torch.float32)
    with torch.no_grad():
        sc.encoder.weight.copy_(w["W_enc"])
        sc.encoder.bias.copy_(w["b_enc"])
        sc.W_dec.copy_(w["W_dec"])
        sc.b_dec.copy_(w["b_dec"])
    opt = torch.optim.Adam(sc.parameters(), lr=2e-4 / (n / 2**14) ** 0.5)

    def step():
        sc.set_decoder_norm_to_unit_norm()
        out = sc(x, dead_mask=dead if dead.any() else None)
        loss = out.fvu + (out.auxk_loss / 32 if dead.any() else 0)
        loss.backward()
        sc.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def setup_matmul(x, n: int, chunked: bool):
    g = torch.Generator(device=x.device).manual_seed(0)
    W = (torch.randn(n, x.shape[1], generator=g, device=x.device) / x.shape[1] ** 0.5).bfloat16()
    b, xb = torch.zeros(n, device=x.device, dtype=torch.bfloat16), x.bfloat16()
    rows = _chunk_rows(n, 2, x.device) if chunked else len(x)

    def step():
        for s in range(0, len(xb), rows):
            torch.addmm(b, xb[s:s + rows], W.t())
        return 0.0

    return step


def agreement(args, device: torch.device) -> dict:
    """The device's forward + backward (with AuxK, fp32) against the CPU's on the same rows and weights."""
    torch.manual_seed(0)
    n, d, N = args.check_n, args.d[0], args.check_tokens
    x = torch.randn(N, d)
    dead = torch.zeros(n, dtype=torch.bool)
    dead[torch.randperm(n)[: n // 10]] = True
    ref = TopKSAE(d, n, args.k)
    runs = {}
    for key, dev in (("cpu", torch.device("cpu")), ("device", device)):
        sae = TopKSAE(d, n, args.k, device=dev)
        sae.load_state_dict(ref.state_dict())
        out = sae(x.to(dev), dead_mask=dead.to(dev))
        (out.fvu + out.auxk_fvu / 32).backward()
        sync(dev)
        runs[key] = (out, {name: p.grad.cpu() for name, p in sae.named_parameters()})
    (o_c, g_c), (o_d, g_d) = runs["cpu"], runs["device"]
    o_c, o_d = (o._replace(fvu=o.fvu.detach(), auxk_fvu=o.auxk_fvu.detach()) for o in (o_c, o_d))
    same = (o_c.codes.indices.sort(-1).values == o_d.codes.indices.cpu().sort(-1).values).all(-1)
    return {"n": n, "d": d, "tokens": N, "fvu_cpu": float(o_c.fvu),
            "fvu_abs_diff": abs(float(o_c.fvu) - float(o_d.fvu)),
            "auxk_abs_diff": abs(float(o_c.auxk_fvu) - float(o_d.auxk_fvu)),
            "rows_same_latents": float(same.float().mean()),
            "grad_rel_err": {k: float((g_d[k] - g_c[k]).norm() / g_c[k].norm().clamp_min(1e-30)) for k in g_c}}


def run_size(n: int, d: int, dead_frac: float, args, device: torch.device) -> dict:
    torch.manual_seed(0)
    N = args.tokens
    x = torch.randn(N, d, device=device)
    dead = torch.zeros(n, dtype=torch.bool, device=device)
    dead[torch.randperm(n, device=device)[: int(round(dead_frac * n))]] = True
    w = {k: v.to(device) for k, v in TopKSAE(d, n, args.k).state_dict().items()}
    fns = {impl: setup_saehook(x, dead, w, impl.split("-")[1].replace("bf16", "bfloat16").replace("fp32", "float32"))
           for impl in args.impls}
    fns.update({"matmul-bf16": setup_matmul(x, n, False), "matmul-bf16-chunked": setup_matmul(x, n, True)})
    if args.peers:
        fns["sparsify"] = setup_sparsify(x, dead, w, args.k)
    names = list(fns)
    for name in names:
        for _ in range(args.warmup):
            fns[name]()
    times = {name: [] for name in names}
    for r in range(args.reps):
        for name in names[r % len(names):] + names[: r % len(names)]:
            sync(device)
            t = time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append(time.perf_counter() - t)
    flops, mm_flops = N * (2 * d * n + 8 * args.k * d), 2 * N * d * n
    mm = [min(a, b) for a, b in zip(times["matmul-bf16"], times["matmul-bf16-chunked"])]
    out = {"n": n, "d": d, "dead_frac": dead_frac, "matmul_bf16_gflops": mm_flops / statistics.median(mm) / 1e9,
           "impls": {}}
    for name in names:
        if name.startswith("matmul"):
            continue
        st = times[name]
        row = {"ms_per_step": 1e3 * statistics.median(st), "tokens_per_s": N / statistics.median(st),
               "fraction_of_bf16_matmul": statistics.median((flops / s) / (mm_flops / m) for s, m in zip(st, mm))}
        if "sparsify" in times and name != "sparsify":
            row["speed_vs_sparsify"] = statistics.median(sp / s for s, sp in zip(st, times["sparsify"]))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            fns[name]()
            sync(device)
            row["step_peak_over_baseline_mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        out["impls"][name] = row
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default=None, help="cuda (the default when available) or cpu (a smoke run)")
    p.add_argument("--sizes", type=int, nargs="+", default=[65536, 262144])
    p.add_argument("--dead-fracs", type=float, nargs="+", default=[0.0, 0.1])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--d", type=int, nargs="+", default=[576, 4096], help="input widths (SmolLM2's, a 7B model's)")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--peers", action="store_true", help="also time eai-sparsify (must be importable)")
    p.add_argument("--impls", nargs="+", choices=["saehook-bf16", "saehook-fp32"],
                   default=["saehook-bf16", "saehook-fp32"], help="saehook's matmul dtypes to time")
    p.add_argument("--check-n", type=int, default=16384, help="latents of the device-vs-CPU agreement check")
    p.add_argument("--check-tokens", type=int, default=2048, help="rows of the agreement check")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.device is None:
        if not torch.cuda.is_available():  # `make bench` on a CPU machine: nothing to measure here
            print("bench_gpu: no CUDA device, nothing measured (bench_step.py covers the CPU; "
                  "--device cpu runs this script as a smoke test)")
            return 0
        args.device = "cuda"
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"saehook step on {name}, torch {torch.__version__}: d={args.d}, k={args.k}, {args.tokens} tokens/step")
    agree = agreement(args, device)
    print(f"agreement with the CPU reference (n={agree['n']:,}, d={agree['d']}, {agree['tokens']} rows, 10% dead, "
          f"fp32): |FVU diff| {agree['fvu_abs_diff']:.2e} (FVU {agree['fvu_cpu']:.4f}), |AuxK diff| "
          f"{agree['auxk_abs_diff']:.2e}, rows selecting the same latents {100 * agree['rows_same_latents']:.2f}%, "
          "gradient relative errors " + ", ".join(f"{k} {v:.1e}" for k, v in agree["grad_rel_err"].items()),
          flush=True)
    print("| dead | d | n | impl | ms/step | tokens/s | fraction of bf16 matmul rate | bf16 matmul rate "
          "| vs sparsify |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for dead_frac in args.dead_fracs:
        for d in args.d:
            for n in args.sizes:
                res = run_size(n, d, dead_frac, args, device)
                rows.append(res)
                for impl, r in res["impls"].items():
                    vs = f"{r['speed_vs_sparsify']:.2f}x" if "speed_vs_sparsify" in r else "—"
                    print(f"| {dead_frac:.0%} | {d} | {n:,} | {impl} | {r['ms_per_step']:.1f} | "
                          f"{r['tokens_per_s']:,.0f} | {100 * r['fraction_of_bf16_matmul']:.0f}% | "
                          f"{res['matmul_bf16_gflops']:,.0f} GFLOP/s | {vs} |", flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()  # d = 4096, n = 262,144: 4 GiB a weight matrix, with Adam's states
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": name, "torch": torch.__version__, "config": {
        k: v for k, v in vars(args).items() if k != "out"}, "agreement": agree, "results": rows}, indent=1,
        default=str))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
