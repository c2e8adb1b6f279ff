"""Latent-sharded training (issue 18): memory per rank, bytes communicated, a 2^19-latent run.

Every measurement launches its own ranks with ``torchrun --standalone`` (gloo on CPU; this same file with
``--worker``), ``OMP_NUM_THREADS = max(1, cores // ranks)`` so that the ranks share the cores. One replica
(``R = 1``): all ranks form one shard group of ``S`` ranks, each holding ``n / S`` latents.

    python benchmarks/bench_latent_shard.py [--parts mem comm big] [--mem-n 15 16 17 18] [--big-steps 20]

**mem**: for S = 1, 2, 4 and n = 2^15 .. 2^18 (d = 576, k = 32, ``--mem-rows`` rows a step), one launch per
(S, n). Each rank warms up (one step of a tiny sharded autoencoder: the C kernels, gloo, the allocator
settings), takes its RSS, builds its shard and trainer, fits the init on the step's rows, resets ``VmHWM``
(``/proc/self/clear_refs`` = 5) and runs two steps. Measured: peak RSS minus the RSS before the build. The
model, from the code, with ``m = n / S`` latents on the rank and 4-byte floats:

    state = 4 * 4 * (2 m d + m + d)              W_enc, W_dec, b_enc, b_dec; their gradients; Adam's two moments
          + 8 m                                  the dead-latent counter (int64)
    step  = max(4 m d,                           the [m, d] temporary of the decoder-gradient projection
                                                 (g -= (g . w) w, in apply(), while the gradients are alive)
                16 MiB + 8 * 4 N d)              a pre-activation chunk and ~8 [N, d] rows (forward, while the
                                                 previous step's gradients are still alive)
    model = state + step

The goal (issue 18): the autoencoder's share falls as 1/S, within 10% of the model.

**comm**: S = 2, 4 at n = 2^16, N = ``--comm-rows`` rows, 6 steps with latents declared dead after two
(AuxK runs from step 3). Per rank and step: the formula (below), ``Traffic.bytes_sent`` (what the shard's
collectives count) and the loopback interface's transmitted bytes (``/proc/net/dev``, ``lo``) divided by
the ranks. The ranks run in a network namespace of their own (``unshare -n``, when allowed) so that ``lo``
carries only their traffic; barriers around each step are measured alone and subtracted. Per step and rank,
with ``ring(b) = 2 (S-1)/S b`` (a ring all-reduce) and ``gather(b) = (S-1) b`` (a ring all-gather):

    gather(4 N K) + gather(4 N K)                candidate values (fp32) and global indices (int32), K = k
    + ring(4 N d)                                the partial reconstructions
    + ring(4 d)                                  b_dec's encoder gradient
    + ring(8)                                    the global count of dead latents (every step, AuxK on)
    + [AuxK] gather(4 N k_aux) * 2 + ring(4 N d) the dead latents' candidates and their reconstruction
                                                 (k_aux clamped to the number of dead latents)
    + ring(8)                                    the dead fraction in the step's metrics (not in Traffic)

**big**: n = 2^19, d = 576, k = 32, 4 ranks (S = 4), ``--big-steps`` steps of ``--big-rows`` rows of SmolLM2
layer-20 activations: the cache ``runs/quality/cache/smollm2-float32-L20-ctx128-512000.safetensors`` of
``bench_quality.py`` (``--activations``), else a small cache collected here with saehook's hooks on the
embedded model. Tokens/s, step time, peak RSS per rank, the FVU of the first and last steps.

Tables are printed as markdown; ``benchmarks/results/latent_shard.json`` holds every rank's numbers, the
torch version, threads and load average.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_CACHE = ROOT / "runs" / "quality" / "cache" / "smollm2-float32-L20-ctx128-512000.safetensors"
MiB = 1 << 20
CHUNK = 1 << 24  # saehook.kernels.CPU_CHUNK_BYTES: one chunk of pre-activations


# ---------------------------------------------------------------------------------------------- the models
def state_bytes(n: int, d: int, S: int) -> int:
    """Weights, gradients and Adam's two moments of one shard (fp32), and its dead-latent counter."""
    m = n // S
    return 16 * (2 * m * d + m + d) + 8 * m


def step_bytes(n: int, d: int, S: int, rows: int) -> int:
    """The step's working set on top of the state: the larger of the projection's ``[n/S, d]`` temporary and a
    pre-activation chunk with ~8 ``[N, d]`` rows."""
    return max(4 * (n // S) * d, CHUNK + 8 * 4 * rows * d)


def ring(b: int, S: int) -> int:
    """Bytes one rank sends in a ring all-reduce of ``b`` bytes over ``S`` ranks (as Traffic counts it)."""
    return 2 * (S - 1) * b // S


def gather(b: int, S: int) -> int:
    """Bytes one rank sends in a ring all-gather of ``b`` bytes per rank."""
    return (S - 1) * b


def traffic_formula(N: int, d: int, k: int, S: int, k_aux: int, auxk: bool) -> tuple[int, int]:
    """``(shard collectives, trainer's scalar all-reduce)`` bytes one rank sends in one step (R = 1)."""
    b = 2 * gather(4 * N * k, S) + ring(4 * N * d, S) + ring(4 * d, S) + ring(8, S)
    if auxk:
        b += 2 * gather(4 * N * k_aux, S) + ring(4 * N * d, S)
    return b, ring(8, S)


# ---------------------------------------------------------------------------------------------- /proc readers
def status_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False when not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def lo_tx() -> int:
    """Bytes transmitted on the loopback interface so far."""
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name.strip() == "lo":
            return int(rest.split()[8])
    return 0


# ---------------------------------------------------------------------------------------------- the worker
def read_rows(path: Path, start: int, count: int, d: int):
    """Rows ``[start, start + count)`` of the safetensors cache's ``rows`` (fp32), read without mmap so that the
    file's pages never count in this rank's RSS."""
    import numpy as np
    import torch

    with open(path, "rb") as f:
        head = struct.unpack("<Q", f.read(8))[0]
        meta = json.loads(f.read(head))["rows"]
        total, width = meta["shape"]
        if meta["dtype"] != "F32" or width != d:
            raise ValueError(f"{path}: rows are {meta['dtype']} of width {width}, need F32 of width {d}")
        count = min(count, total - start)
        f.seek(8 + head + meta["data_offsets"][0] + 4 * start * d)
        buf = np.fromfile(f, dtype=np.float32, count=count * d)
    return torch.from_numpy(buf.reshape(count, d))


def worker(a) -> None:
    import torch
    import torch.distributed as dist

    from saehook import distributed as D
    from saehook.allocator import tune_cpu_allocator
    from saehook.config import TrainConfig
    from saehook.latent_shard import ShardedTopKSAE, Traffic, make_layout
    from saehook.latent_trainer import ShardedTrainer

    D.setup()
    if not dist.is_initialized():  # one rank: D.setup() leaves it alone, make_layout wants a group
        dist.init_process_group("gloo")
    layout = make_layout(a.shards)
    S, rank, d, k = layout.shards, layout.rank, a.d, a.k
    g = torch.Generator().manual_seed(0)
    out: dict = {"rank": rank, "shards": S, "n": a.n, "threads": torch.get_num_threads()}

    def trainer_for(n, rows, steps, init=None, **cfg):
        sae = ShardedTopKSAE(d, n, k, layout, seed=0)
        cfg = TrainConfig(batch_tokens=rows, init_samples=init or rows, **cfg)
        tr = ShardedTrainer(sae, cfg, total_tokens=rows * steps)
        return sae, tr

    if a.part == "mem":  # one rank process for every n, smallest first; freed memory handed back in between
        import ctypes
        import gc

        trim = ctypes.CDLL("libc.so.6").malloc_trim
        tune_cpu_allocator()
        warm = torch.randn(64, d, generator=g)
        _, tr = trainer_for(S * 64, 64, 2)
        tr.step(warm)
        del tr, warm
        out["sizes"] = []
        for n in a.n:
            batches = [torch.randn(a.rows, d, generator=g) for _ in range(2)]
            gc.collect()
            trim(0)
            base = status_kib("VmRSS")
            sae, tr = trainer_for(n, a.rows, 2)
            tr.initialize(batches[0])
            reset_ok = reset_peak()
            for x in batches:
                tr.step(x)
            out["sizes"].append({"n": n, "base_kib": base, "peak_kib": status_kib("VmHWM"), "reset_ok": reset_ok,
                                 "rss_end_kib": status_kib("VmRSS")})
            del sae, tr, batches, x
            D.barrier()
    elif a.part == "comm":
        batches = [torch.randn(a.rows, d, generator=g) for _ in range(a.steps)]
        sae, tr = trainer_for(a.n[0], a.rows, a.steps, dead_tokens=2 * a.rows, dead_firings=0)
        tr.initialize(batches[0])
        D.barrier()
        lo0 = lo_tx()
        for _ in range(20):
            D.barrier()
        out["barrier_lo_bytes"] = (lo_tx() - lo0) / 20  # what one barrier adds to lo (all ranks together)
        steps, n_dead = [], 0  # the step's dead latents: the previous step's dead_frac (exact: a count / n)
        for x in batches:
            D.barrier()
            lo, Traffic.bytes_sent = lo_tx(), 0
            m = tr.step(x)
            sent = Traffic.bytes_sent
            D.barrier()
            steps.append({"traffic": sent, "lo": lo_tx() - lo, "auxk": "auxk_fvu" in m, "fvu": m["fvu"],
                          "n_dead": n_dead})
            n_dead = round(m["dead_frac"] * a.n[0])
        out.update(steps=steps, k_aux=tr.k_aux)
    else:  # big
        sample = read_rows(a.activations, 0, min(a.rows * a.steps, 32768), d)  # the init's rows: the run's
        base = status_kib("VmRSS")  # before the build: the share is everything the autoencoder and its steps add
        sae, tr = trainer_for(a.n[0], a.rows, a.steps, init=len(sample))
        tr.initialize(sample)
        del sample
        steps = []
        D.barrier()
        t0 = time.perf_counter()
        for i in range(a.steps):
            x = read_rows(a.activations, i * a.rows, a.rows, d)
            t = time.perf_counter()
            m = tr.step(x)
            steps.append({"s": time.perf_counter() - t, "fvu": m["fvu"], "l0": m["l0"], "dead_frac": m["dead_frac"]})
        D.barrier()
        out.update(steps=steps, wall_s=time.perf_counter() - t0, rows=a.rows, base_kib=base,
                   peak_kib=status_kib("VmHWM"), rss_end_kib=status_kib("VmRSS"))
    (a.out / f"rank{rank}.json").write_text(json.dumps(out))
    D.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- the launcher
def launch(part: str, S: int, ns: list[int], d: int, k: int, rows: int, steps: int, tmp: Path, isolate: bool = False,
           extra: list[str] = (), env: dict | None = None) -> list[dict]:
    """Run ``S`` ranks of this file's worker on ``ns`` latents; every rank's JSON, in rank order."""
    out = tmp / f"{part}-S{S}"
    out.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 2
    env = {**os.environ, **(env or {}), "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": str(max(1, cores // S)),
           "SAEHOOK_DIST_TIMEOUT": "1200"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={S}", __file__,
           "--worker", "--part", part, "--shards", str(S), "--latents", *map(str, ns), "--d-in", str(d), "--k", str(k),
           "--rows", str(rows), "--steps", str(steps), "--out", str(out), *extra]
    if isolate:  # a network namespace of our own: lo carries only these ranks' traffic
        env["GLOO_SOCKET_IFNAME"] = "lo"
        cmd = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *cmd]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{part} S={S} n={ns} failed (exit {r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")
    return [json.loads((out / f"rank{i}.json").read_text()) for i in range(S)]


def can_isolate() -> bool:
    """Whether ``unshare -n`` with a loopback works here (root, or user namespaces)."""
    if not (shutil.which("unshare") and shutil.which("ip")):
        return False
    r = subprocess.run(["unshare", "-n", "sh", "-c", "ip link set lo up"], capture_output=True)
    return r.returncode == 0


def part_mem(a, tmp: Path) -> list[dict]:
    rows = []
    print(f"\n### Memory per rank (d = {a.d}, k = {a.k}, {a.mem_rows} rows a step, R = 1; MiB)\n")
    print("| n | S | state (model) | step (model) | model | measured (max over ranks) | measured / model |"
          " measured x S / measured at S = 1 |")
    print("|---|---|---|---|---|---|---|---|")
    # glibc's mmap threshold fixed at 128 KiB (as bench_step.py's memory table): freed blocks go back to the OS,
    # so RSS is the live memory (saehook's own setting keeps them for reuse, which adds heap slack: see "big")
    fixed = {"MALLOC_MMAP_THRESHOLD_": "131072"}
    runs = {S: launch("mem", S, [1 << e for e in a.mem_n], a.d, a.k, a.mem_rows, 2, tmp, env=fixed)
            for S in a.mem_shards}
    for j, e in enumerate(a.mem_n):
        n = 1 << e
        for S, ranks in runs.items():
            sizes = [r["sizes"][j] for r in ranks]
            meas = max((r["peak_kib"] - r["base_kib"]) * 1024 for r in sizes)
            state, step = state_bytes(n, a.d, S), step_bytes(n, a.d, S, a.mem_rows)
            one = meas if S == 1 else next((x["measured_bytes"] for x in rows if x["n"] == n and x["S"] == 1), None)
            rec = {"n": n, "S": S, "state_bytes": state, "step_bytes": step, "model_bytes": state + step,
                   "measured_bytes": meas, "ratio": meas / (state + step), "ranks": sizes}
            rows.append(rec)
            print(f"| 2^{e} | {S} | {state / MiB:,.0f} | {step / MiB:,.0f} | {(state + step) / MiB:,.0f} | "
                  f"{meas / MiB:,.0f} | {rec['ratio']:.3f} | {f'{meas * S / one:.2f}' if one else '-'} |", flush=True)
    if not all(r["reset_ok"] for rec in rows for r in rec["ranks"]):
        print("\n(VmHWM could not be reset: the peaks include the build)")
    return rows


def part_comm(a, tmp: Path) -> list[dict]:
    isolate = can_isolate()
    res = []
    print(f"\n### Bytes sent per rank and step (n = 2^{a.comm_n}, d = {a.d}, k = {a.k}, N = {a.comm_rows} rows, "
          f"R = 1; loopback {'of a network namespace of our own' if isolate else 'SHARED with other processes'})\n")
    print("| S | AuxK | formula: shard collectives | + trainer | Traffic.bytes_sent | loopback / ranks |"
          " Traffic / formula | loopback / (formula + trainer) |")
    print("|---|---|---|---|---|---|---|---|")
    for S in a.comm_shards:
        ranks = launch("comm", S, [1 << a.comm_n], a.d, a.k, a.comm_rows, 6, tmp, isolate=isolate)
        k_aux = ranks[0]["k_aux"]
        barrier = ranks[0]["barrier_lo_bytes"]
        for auxk in (False, True):
            idx = [i for i, s in enumerate(ranks[0]["steps"]) if s["auxk"] == auxk]
            if not idx:
                continue
            per_step = [traffic_formula(a.comm_rows, a.d, a.k, S, min(k_aux, ranks[0]["steps"][i]["n_dead"]), auxk)
                        for i in idx]  # k_aux is clamped to the dead latents there are
            f_shard, f_tr = (sum(f[j] for f in per_step) / len(idx) for j in (0, 1))
            counted = sum(r["steps"][i]["traffic"] for r in ranks for i in idx) / (len(ranks) * len(idx))
            lo = (sum(ranks[0]["steps"][i]["lo"] for i in idx) / len(idx) - barrier) / S
            rec = {"S": S, "auxk": auxk, "steps": len(idx), "k_aux": k_aux, "formula": f_shard, "trainer": f_tr,
                   "traffic": counted, "loopback": lo, "barrier_lo_bytes": barrier, "isolated": isolate}
            res.append(rec)
            print(f"| {S} | {'yes, k_aux = ' + str(k_aux) if auxk else 'no'} | {f_shard:,.0f} | {f_tr:,.0f} | "
                  f"{counted:,.0f} | {lo:,.0f} | {counted / f_shard:.4f} | {lo / (f_shard + f_tr):.4f} |",
                  flush=True)
    return res


def ensure_activations(a) -> Path:
    """The cache of bench_quality.py, else a small one collected here (``--big-rows * --big-steps`` rows)."""
    if a.activations.is_file():
        return a.activations
    need = a.big_rows * a.big_steps
    sys.path.insert(0, str(HERE))
    import torch
    from bench_quality import cache_path, cached_rows

    import saehook

    model, tok = saehook.load_model(dtype=torch.float32)
    corpus = saehook.Corpus.from_source(None, tok, context=128)
    path = cache_path(model, 20, 128, need)
    if not path.is_file():
        print(f"(collecting {need:,} layer-20 rows into {path})", flush=True)
        cached_rows(model, corpus, 20, 128, need)
    return path


def part_big(a, tmp: Path) -> dict:
    acts = ensure_activations(a)
    n = 1 << a.big_n
    ranks = launch("big", a.big_shards, [n], a.d, a.k, a.big_rows, a.big_steps, tmp,
                   extra=["--activations", str(acts)])
    steps = [max(r["steps"][i]["s"] for r in ranks) for i in range(a.big_steps)]
    timed = steps[1:] if len(steps) > 1 else steps  # the first step allocates Adam's state
    s_step = sum(timed) / len(timed)
    wall = max(r["wall_s"] for r in ranks)
    s0, sl = ranks[0]["steps"][0], ranks[0]["steps"][-1]
    peaks = [r["peak_kib"] / 1024 for r in ranks]
    model = (state_bytes(n, a.d, a.big_shards) + step_bytes(n, a.d, a.big_shards, a.big_rows)) / MiB
    rec = {"n": n, "S": a.big_shards, "rows": a.big_rows, "steps": a.big_steps, "activations": str(acts),
           "s_per_step": s_step, "tokens_per_s": a.big_rows / s_step, "wall_s": wall,
           "tokens_per_s_wall": a.big_rows * a.big_steps / wall, "fvu_first": s0["fvu"], "fvu_last": sl["fvu"],
           "peak_rss_mib": peaks, "model_mib": model, "ranks": ranks}
    print(f"\n### n = 2^{a.big_n} = {n:,} latents, d = {a.d}, k = {a.k}, S = {a.big_shards} ranks, "
          f"{a.big_steps} steps of {a.big_rows} rows ({acts.name})\n")
    print("| tokens/s (steps 2..) | s/step | wall (all steps) | FVU step 1 | FVU last step | L0 last | "
          "peak RSS per rank (MiB) | share per rank: peak - RSS before the build, largest / model (MiB) |")
    print("|---|---|---|---|---|---|---|---|")
    share = max((r["peak_kib"] - r["base_kib"]) / 1024 for r in ranks)
    print(f"| {rec['tokens_per_s']:,.0f} | {s_step:.2f} | {wall:.0f} s | {rec['fvu_first']:.4f} | "
          f"{rec['fvu_last']:.4f} | {sl['l0']:.1f} | {', '.join(f'{p:,.0f}' for p in peaks)} | "
          f"{share:,.0f} / {model:,.0f} |", flush=True)
    rec["share_mib"] = share
    return rec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", nargs="+", default=["mem", "comm", "big"], choices=["mem", "comm", "big"])
    p.add_argument("--d-in", dest="d", type=int, default=576)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--mem-n", type=int, nargs="+", default=[15, 16, 17, 18], help="log2 of n for the memory part")
    p.add_argument("--mem-shards", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--mem-rows", type=int, default=512)
    p.add_argument("--comm-n", type=int, default=16)
    p.add_argument("--comm-shards", type=int, nargs="+", default=[2, 4])
    p.add_argument("--comm-rows", type=int, default=1024)
    p.add_argument("--big-n", type=int, default=19)
    p.add_argument("--big-shards", type=int, default=4)
    p.add_argument("--big-rows", type=int, default=1024)
    p.add_argument("--big-steps", type=int, default=20)
    p.add_argument("--activations", type=Path, default=DEFAULT_CACHE,
                   help="safetensors file with 'rows' [N, d] fp32 (bench_quality.py's cache)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "latent_shard.json")
    # the worker's own arguments
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--part", help=argparse.SUPPRESS)
    p.add_argument("--shards", type=int, help=argparse.SUPPRESS)
    p.add_argument("--latents", dest="n", type=int, nargs="+", help=argparse.SUPPRESS)
    p.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        a.out = Path(a.out)
        return worker(a)

    import torch

    load_before, t0 = os.getloadavg(), time.perf_counter()
    cores = os.cpu_count() or 2
    print(f"torch {torch.__version__}, {cores} cores, OMP_NUM_THREADS = max(1, {cores} // ranks); "
          f"load average {load_before[0]:.2f}")
    result = {"env": {"torch": torch.__version__, "cores": cores, "threads_per_rank": {
        str(S): max(1, cores // S) for S in sorted(set(a.mem_shards + a.comm_shards + [a.big_shards]))},
        "loadavg_before": load_before, "args": {k: str(v) for k, v in vars(a).items()}}}
    with tempfile.TemporaryDirectory(prefix="bench_latent_shard-") as tmp:
        if "mem" in a.parts:
            result["mem"] = part_mem(a, Path(tmp))
        if "comm" in a.parts:
            result["comm"] = part_comm(a, Path(tmp))
        if "big" in a.parts:
            result["big"] = part_big(a, Path(tmp))
    result["env"].update(loadavg_after=os.getloadavg(), wall_s=time.perf_counter() - t0)
    print(f"\nload average {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after; "
          f"{time.perf_counter() - t0:.0f} s in all")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))
    if "mem" in a.parts and not all(abs(r["ratio"] - 1) <= 0.1 for r in result["mem"]):
        print("memory: some measured / model ratios are outside 1 +- 0.1", file=sys.stderr)


if __name__ == "__main__":
    main()
