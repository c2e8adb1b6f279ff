"""One full TopK-autoencoder optimizer step: saehook against eai-sparsify and sae-lens, plus numerics,
roofline and memory.

**Step.** Forward with AuxK (a fixed 10% dead mask), backward, decoder-gradient projection, Adam,
decoder renormalisation, dead-latent counters: whatever each library's own trainer does per step, on
the same random activations ``[tokens, d]`` and the same dead mask, from the same initial weights.

- ``saehook fp32`` / ``saehook bf16``: ``SAETrainer.step`` itself (``TrainConfig.matmul_dtype``).
- ``sparsify``: ``SparseCoder`` (eai-sparsify, CPU path: eager ``embedding_bag`` decoder) and the body
  of its trainer's step: unit-norm decoder, forward with ``dead_mask``, ``fvu + auxk_alpha * auxk_loss``
  backward, ``remove_gradient_parallel_to_decoder_directions``, Adam, fired-latent counters.
- ``sae-lens``: ``TopKTrainingSAE.training_forward_pass`` and the body of ``SAETrainer._train_step``:
  firing statistics, backward, ``clip_grad_norm_(1.0)``, Adam (its TopK rescales by the decoder norm
  instead of renormalising).

All use ``torch.optim.Adam`` with saehook's lr (``2e-4 / sqrt(n / 2^14)``), betas and eps. Each size
runs in a fresh subprocess holding every implementation: warm-up steps, then timed rounds, one step of
each implementation per round in a rotating order. ``ms/step`` is the median over rounds; the speed
ratios are taken within each round and then the median over rounds is reported, so a slow spell on a
shared machine slows a whole round and cancels out. Memory: each implementation alone in a fresh
process (glibc's mmap threshold fixed at 128 KiB, so freed blocks return to the OS), the peak RSS during
one step (``VmHWM`` reset just before it) above the RSS just before it, when parameters and Adam state
are already resident; compared with one dense ``[tokens, n]`` fp32 tensor.

**Numerics.** saehook's parameter gradients against a dense float64 autograd reference (``z`` =
ReLU of the top-k pre-activations scattered into ``[N, n]``, ``x_hat = z W_dec + b_dec``, FVU + AuxK),
in fp32 and bf16 matmul; then 30 training steps on a fixed stream of structured synthetic data (sparse
sums of random directions) with fp32 vs bf16 matmul from the same init: max relative loss difference.

**Roofline.** This machine's matmul rate at the encoder's shape ``[tokens, d] x [d, n]`` in fp32 and
bf16 (the product alone, timed as two more items of the same rounds, so under the same machine state),
and the fraction of it the whole step reaches counting ``2dn + 8kd`` FLOPs per token (per round, then
the median).

    python benchmarks/bench_step.py                       # everything (re-execs under .venv-bench for the peers)
    python benchmarks/bench_step.py --sizes 16384 --reps 7
    python benchmarks/bench_step.py --impls saehook-fp32 saehook-bf16 --skip-numerics
    python benchmarks/bench_step.py --profile bf16        # torch.profiler's top operators of saehook's step
    python benchmarks/bench_step.py --wait-load 1.5       # first wait (up to 10 min) for the 1-min load < 1.5

Results: the tables on stdout and ``benchmarks/results/step.json``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH_VENV = ROOT / ".venv-bench"
PEERS = ("sparsify", "sae_lens")
INSTALL_PEERS = ("python -m venv .venv-bench && .venv-bench/bin/pip install torch==2.13.0 && "
                 ".venv-bench/bin/pip install eai-sparsify sae-lens && .venv-bench/bin/pip install -e . --no-deps")


def _peers_missing() -> list[str]:
    return [m for m in PEERS if importlib.util.find_spec(m) is None]


# The peers live in a separate venv (their dependencies clash with saehook's): re-exec there once.
if (_peers_missing() and (BENCH_VENV / "bin" / "python").exists() and os.environ.get("SAEHOOK_BENCH_REEXEC") != "1"
        and Path(sys.prefix).resolve() != BENCH_VENV.resolve()):
    os.environ["SAEHOOK_BENCH_REEXEC"] = "1"
    _py = str(BENCH_VENV / "bin" / "python")
    print(f"[bench_step] {', '.join(_peers_missing())} not importable here; re-running under {_py}", flush=True)
    os.execv(_py, [_py, str(Path(__file__).resolve()), *sys.argv[1:]])

# Idle OpenMP threads must not spin on 2 shared vCPUs (a sort can take 100x longer otherwise).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "step.json"
IMPLS = ["saehook-fp32", "saehook-bf16", "sparsify", "sae-lens"]
TORCH_OPS = ["saehook-fp32-torchops", "saehook-bf16-torchops"]
"""saehook with its C kernels off (saehook.cpu_kernels), for --impls: what the kernels are worth."""
MATMULS = ["matmul-fp32", "matmul-fp32-chunked", "matmul-bf16", "matmul-bf16-chunked"]
LABEL = {"saehook-fp32": "saehook (fp32 matmul)", "saehook-bf16": "saehook (bf16 matmul)",
         "sparsify": "eai-sparsify 1.x (CPU path)", "sae-lens": "sae-lens TopK",
         "saehook-fp32-torchops": "saehook (fp32 matmul, torch ops, no C kernels)",
         "saehook-bf16-torchops": "saehook (bf16 matmul, torch ops, no C kernels)"}
# Dense [tokens, n] fp32 tensors alive at a step's peak, a priori (used only to decide whether an
# implementation fits in memory before the smaller size has measured it).
DENSE_GUESS = {"saehook-fp32": 1.5, "saehook-bf16": 1.5, "sparsify": 5.0, "sae-lens": 12.0,
               "saehook-fp32-torchops": 1.5, "saehook-bf16-torchops": 1.5}


# ====================================================================== small utilities
def proc_status(field: str) -> int:
    """A ``/proc/self/status`` memory field (VmRSS, VmHWM...) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return sorted(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in have)
    except OSError:
        pass
    return []


def version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as v
    try:
        return v(dist)
    except PackageNotFoundError:
        return None


def wait_for_load(threshold: float, max_s: float, poll_s: float = 30.0) -> tuple[float, float]:
    """Poll until the 1-min load average is below ``threshold`` (at most ``max_s``); returns (load, waited)."""
    start = time.monotonic()
    while True:
        load = os.getloadavg()[0]
        waited = time.monotonic() - start
        if load < threshold or waited >= max_s:
            return load, waited
        print(f"[bench_step] load {load:.2f} >= {threshold}; waiting ({waited:.0f}/{max_s:.0f} s)", flush=True)
        time.sleep(poll_s)


def lr_for(n: int) -> float:
    from saehook import TrainConfig
    return TrainConfig().lr_for(n)


def inputs(tokens: int, d: int, n: int, dead_frac: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random activations and dead mask for every implementation (fixed seeds)."""
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(tokens, d, generator=g) * 3.0 + 0.5
    dead = torch.zeros(n, dtype=torch.bool)
    dead[torch.randperm(n, generator=g)[: int(round(dead_frac * n))]] = True
    return x, dead


def init_weights(d: int, n: int) -> dict[str, torch.Tensor]:
    """saehook's initialisation (unit decoder rows, encoder parallel), shared by every implementation."""
    from saehook import TopKSAE
    torch.manual_seed(0)
    sae = TopKSAE(d, n, 32)
    return {k: v.detach().clone() for k, v in sae.state_dict().items()}


# ====================================================================== the steps
def make_trainer(sae, matmul_dtype: str, **cfg):
    """A saehook ``SAETrainer`` whose step runs the encoder matmul in ``matmul_dtype``."""
    import dataclasses
    import functools

    from saehook import SAETrainer, TrainConfig
    if "matmul_dtype" in {f.name for f in dataclasses.fields(TrainConfig)}:
        return SAETrainer(sae, TrainConfig(matmul_dtype=matmul_dtype, **cfg))
    # Older saehook without the knob: the trainer calls sae(...) without matmul_dtype; inject it.
    trainer = SAETrainer(sae, TrainConfig(**cfg))
    if matmul_dtype != "float32":
        sae.forward = functools.partial(type(sae).forward, sae, matmul_dtype=getattr(torch, matmul_dtype))
    return trainer


def setup_saehook(impl: str, x, dead, w):
    from saehook import TopKSAE
    d, n = x.shape[1], dead.numel()
    sae = TopKSAE(d, n, 32)
    sae.load_state_dict(w)
    trainer = make_trainer(sae, "bfloat16" if "bf16" in impl else "float32", batch_tokens=len(x))
    trainer.initialize(x)  # input scale + geometric-median b_dec, once, outside the timing
    counts = torch.where(dead, trainer.dead_threshold, 0).to(trainer.tokens_since_fired.dtype)

    def reset():
        trainer.tokens_since_fired.copy_(counts)

    def step():
        if not impl.endswith("torchops"):
            return trainer.step(x)["loss"]
        from saehook import cpu_kernels
        with cpu_kernels.enabled(False):
            return trainer.step(x)["loss"]

    return reset, step


def setup_sparsify(x, dead, w, k: int):
    from sparsify import SparseCoder, SparseCoderConfig

    from saehook import TrainConfig
    d, n = x.shape[1], dead.numel()
    sc = SparseCoder(d, SparseCoderConfig(num_latents=n, k=k), device="cpu", dtype=torch.float32)
    with torch.no_grad():
        sc.encoder.weight.copy_(w["W_enc"])
        sc.encoder.bias.copy_(w["b_enc"])
        sc.W_dec.copy_(w["W_dec"])
        sc.b_dec.copy_(x.mean(0))  # what its trainer does on the first step
    cfg = TrainConfig()
    opt = torch.optim.Adam(sc.parameters(), lr=lr_for(n), betas=cfg.betas, eps=cfg.eps)
    threshold, auxk_alpha = 10_000_000, cfg.auxk_coef
    counts = torch.where(dead, threshold + 1, 0).long()
    state = {"counts": counts.clone()}

    def reset():
        state["counts"].copy_(counts)

    def step():
        c = state["counts"]
        sc.set_decoder_norm_to_unit_norm()
        dead_mask = c > threshold
        did_fire = torch.zeros(n, dtype=torch.bool)
        out = sc(x, dead_mask=dead_mask)
        did_fire[out.latent_indices.flatten()] = True
        loss = out.fvu + auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8
        loss.backward()
        sc.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            c += len(x)
            c[did_fire] = 0
        return float(loss.detach())

    return reset, step


def setup_saelens(x, dead, w, k: int):
    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    from saehook import TrainConfig
    d, n = x.shape[1], dead.numel()
    sl = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=n, k=k, dtype="float32", device="cpu"))
    with torch.no_grad():
        sl.W_enc.copy_(w["W_enc"].t())
        sl.b_enc.copy_(w["b_enc"])
        sl.W_dec.copy_(w["W_dec"])
        sl.b_dec.copy_(x.mean(0))
    cfg = TrainConfig()
    opt = torch.optim.Adam(sl.parameters(), lr=lr_for(n), betas=cfg.betas, eps=cfg.eps)
    window = 1000
    counts = torch.where(dead, window + 1.0, 0.0)
    state = {"passes": counts.clone(), "freq": torch.zeros(n), "step": 0}

    def reset():
        state["passes"].copy_(counts)

    def step():
        sl.train()
        out = sl.training_forward_pass(TrainStepInput(
            sae_in=x, coefficients=sl.get_coefficients() or {}, dead_neuron_mask=state["passes"] > window,
            n_training_steps=state["step"], is_logging_step=False))
        with torch.no_grad():  # what SAETrainer._train_step does every step
            firing = out.feature_acts.bool().float()
            did_fire = firing.sum(-2).bool()
            if did_fire.is_sparse:
                did_fire = did_fire.to_dense()
            state["passes"] += 1
            state["passes"][did_fire] = 0
            state["freq"] += firing.sum(0)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sl.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        state["step"] += 1
        return float(out.loss.detach())

    return reset, step


def setup_matmul(impl: str, x, n: int):
    """The encoder's dense product ``addmm(b, x, W^T)`` alone in fp32 or bf16, whole or in the row chunks
    saehook's kernel uses (the faster of the two is the roofline)."""
    g = torch.Generator().manual_seed(0)
    W, b = torch.randn(n, x.shape[1], generator=g) / x.shape[1] ** 0.5, torch.zeros(n)
    xb, Wb, bb = x.bfloat16(), W.bfloat16(), b.bfloat16()

    xm, Wm, bm = (x, W, b) if impl.startswith("matmul-fp32") else (xb, Wb, bb)
    rows = len(x)
    if impl.endswith("chunked"):  # as saehook's kernel runs it: row chunks of about 16 MiB of output
        from saehook.kernels import _chunk_rows
        rows = _chunk_rows(n, bm.element_size(), x.device)

    def step():
        for s in range(0, len(xm), rows):
            torch.addmm(bm, xm[s:s + rows], Wm.t())
        return 0.0

    return (lambda: None), step


def setup(impl: str, x, dead, k: int):
    if impl.startswith("matmul"):
        return setup_matmul(impl, x, dead.numel())
    w = init_weights(x.shape[1], dead.numel())
    if impl.startswith("saehook"):
        return setup_saehook(impl, x, dead, w)
    if impl == "sparsify":
        return setup_sparsify(x, dead, w, k)
    if impl == "sae-lens":
        return setup_saelens(x, dead, w, k)
    raise ValueError(impl)


# ====================================================================== workers (fresh processes)
def worker_rounds(job: dict) -> dict:
    """Every implementation at one size in this one process, timed round-robin: each round runs one step
    of each, in a rotating order, so a slow spell on a shared machine slows a whole round, not one
    implementation."""
    torch.manual_seed(0)
    x, dead = inputs(job["tokens"], job["d"], job["n"], job["dead_frac"])
    impls = job["impls"] + (MATMULS if job.get("roofline") else [])
    fns = {impl: setup(impl, x, dead, job["k"]) for impl in impls}
    res = {impl: {"runs_s": [], "losses": []} for impl in impls}
    for impl in impls:  # warm-up: allocates gradients and Adam state, first-call costs
        reset, step = fns[impl]
        for _ in range(job["warmup"]):
            reset()
            res[impl]["losses"].append(step())
    for r in range(job["reps"]):
        for impl in impls[r % len(impls):] + impls[: r % len(impls)]:
            reset, step = fns[impl]
            reset()
            gc.collect()
            t = time.perf_counter()
            res[impl]["losses"].append(step())
            res[impl]["runs_s"].append(time.perf_counter() - t)
    for impl in impls:
        if not all(math.isfinite(v) for v in res[impl]["losses"]):
            raise FloatingPointError(f"{impl}: non-finite loss {res[impl]['losses']}")
    # saehook's trainer raises glibc's mmap/trim thresholds for the whole process: every implementation
    # timed in this worker (the peers too) runs with them.
    alloc = sys.modules.get("saehook.allocator")
    return {"impls": res, "allocator_tuned": bool(alloc and alloc._done)}


def worker_memory(job: dict) -> dict:
    """One implementation alone in a fresh process (run with glibc's mmap threshold fixed low, so freed
    blocks go back to the OS): peak RSS during one step above the RSS just before it, after a warm-up
    step allocated Adam's state."""
    torch.manual_seed(0)
    x, dead = inputs(job["tokens"], job["d"], job["n"], job["dead_frac"])
    reset, step = setup(job["impl"], x, dead, job["k"])
    reset()
    step()
    reset()
    gc.collect()
    rss = proc_status("VmRSS")
    if not reset_peak_rss():
        return {"step_peak_over_baseline": None, "why": "cannot reset VmHWM (/proc/self/clear_refs)"}
    step()
    peak = proc_status("VmHWM") - rss
    dense = job["tokens"] * job["n"] * 4
    return {"step_peak_over_baseline": peak, "rss_before_step": rss, "dense_tokens_x_n_fp32": dense,
            "step_peak_in_dense": peak / dense,
            "method": "VmHWM reset just before one step minus VmRSS before it (after a warm-up step), "
                      "MALLOC_MMAP_THRESHOLD_=131072"}


def dense_reference(w64: dict, x64, s: float, k: int, dead, k_aux: int, auxk_coef: float,
                    idx=None, aux_idx=None) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Dense autograd: z = ReLU(top-k of pre) scattered into [N, n], x_hat = z W_dec + b_dec, FVU (+ AuxK)."""
    from saehook import fvu
    p = {name: w64[name].clone().requires_grad_(True) for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    xn = x64 * s
    pre = (xn - p["b_dec"]) @ p["W_enc"].t() + p["b_enc"]
    if idx is None:
        idx = pre.detach().topk(k, dim=-1).indices
    z = torch.zeros_like(pre).scatter(1, idx, pre.gather(1, idx)).relu()
    x_hat = z @ p["W_dec"] + p["b_dec"]
    loss = fvu(xn, x_hat)
    if dead is not None:
        if aux_idx is None:
            aux_idx = pre.detach().masked_fill(~dead, float("-inf")).topk(k_aux, dim=-1).indices
        z_aux = torch.zeros_like(pre).scatter(1, aux_idx, pre.gather(1, aux_idx)).relu()
        e = (xn - x_hat).detach()
        loss = loss + auxk_coef * fvu(e, z_aux @ p["W_dec"])
    loss.backward()
    return {name: t.grad for name, t in p.items()}, idx, aux_idx


def rel_err(g: dict, ref: dict) -> dict:
    return {name: float((g[name].double() - ref[name]).abs().max() / ref[name].abs().max().clamp_min(1e-300))
            for name in ref}


def synthetic_stream(steps: int, tokens: int, d: int, m: int = 4096, active: int = 24, seed: int = 7):
    """Structured activations: each row is a sparse non-negative sum of ``active`` of ``m`` random unit
    directions (Zipf-ish frequencies, exponential magnitudes), plus a mean offset and small noise."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(m, d, generator=g)
    dirs /= dirs.norm(dim=1, keepdim=True)
    freq = 1.0 / torch.arange(1, m + 1).double() ** 0.7
    offset = torch.randn(d, generator=g) * 0.5
    for _ in range(steps):
        which = torch.multinomial(freq.expand(tokens, m), active, replacement=False, generator=g)
        mags = torch.empty(tokens, active).exponential_(1.0, generator=g) * 2.0
        x = torch.zeros(tokens, d).index_add_(0, torch.arange(tokens).repeat_interleave(active),
                                              mags.reshape(-1, 1) * dirs[which.reshape(-1)])
        yield x + offset + 0.05 * torch.randn(tokens, d, generator=g)


def worker_numerics(job: dict) -> dict:
    from saehook import TopKSAE, TrainConfig
    res: dict = {}
    # ---- gradients against dense autograd, small size
    d, n, k, N = job["grad_d"], job["grad_n"], job["grad_k"], job["grad_tokens"]
    torch.manual_seed(1)
    sae = TopKSAE(d, n, k)
    with torch.no_grad():
        sae.W_enc.add_(0.3 * torch.randn(n, d) / d ** 0.5)  # not exactly parallel: exercise every term
        sae.b_enc.copy_(0.05 * torch.randn(n))
        sae.b_dec.copy_(0.2 * torch.randn(d))
        sae.input_scale.fill_(0.8)
    x = torch.randn(N, d) * 1.5 + 0.3
    dead = torch.zeros(n, dtype=torch.bool)
    dead[torch.randperm(n)[: n // 10]] = True
    k_aux, coef = min(d // 2, int(dead.sum())), TrainConfig().auxk_coef
    w64 = {name: t.detach().double() for name, t in sae.named_parameters()}
    s = float(sae.input_scale)

    def saehook_grads(mdt, dm):
        sae.zero_grad(set_to_none=True)
        out = sae(x, dead_mask=dm, k_aux=k_aux, matmul_dtype=mdt)
        loss = out.fvu + (coef * out.auxk_fvu if out.auxk_fvu is not None else 0)
        loss.backward()
        return {name: p.grad.clone() for name, p in sae.named_parameters()}, out.codes.indices

    def bf16_selection(dm):
        # the kernel's own bf16 selection (chunked bf16 addmm with the bias, top-k, top-k_aux of the dead ones)
        from saehook.kernels import TopKEncode
        with torch.no_grad():
            _, idx, _, aux = TopKEncode.apply(x * s, sae.W_enc, sae.b_enc, sae.b_dec, k, dm,
                                              k_aux if dm is not None else 0, torch.bfloat16)
        return idx, (aux if dm is not None else None)

    def same_sets(a, b) -> int:
        return int((a.sort(-1).values != b.sort(-1).values).any(-1).sum())

    grads = {}
    ref64, idx64, _ = dense_reference(w64, x.double(), s, k, dead, k_aux, coef)
    w32 = {name: t.detach().float() for name, t in sae.named_parameters()}
    ref32, _, _ = dense_reference(w32, x, s, k, dead, k_aux, coef)
    grads["dense autograd fp32 (context)"] = {"max_rel_err": rel_err(ref32, ref64)}
    g, idx = saehook_grads(torch.float32, dead)
    grads["saehook fp32 matmul, AuxK"] = {"max_rel_err": rel_err(g, ref64),
                                          "rows_selection_differs": same_sets(idx, idx64)}
    ref64m, idx64m, _ = dense_reference(w64, x.double(), s, k, None, k_aux, coef)
    g, idx = saehook_grads(torch.bfloat16, None)
    sel, _ = bf16_selection(None)
    ref_sel, _, _ = dense_reference(w64, x.double(), s, k, None, k_aux, coef, idx=sel)
    grads["saehook bf16 matmul, main only"] = {
        "max_rel_err": rel_err(g, ref_sel), "rows_selection_differs_vs_kernel": same_sets(idx, sel),
        "rows_selection_differs_vs_fp64": same_sets(idx, idx64m), "rows": N}
    g, idx = saehook_grads(torch.bfloat16, dead)
    sel, aux_sel = bf16_selection(dead)
    ref_sel, _, _ = dense_reference(w64, x.double(), s, k, dead, k_aux, coef, idx=sel, aux_idx=aux_sel)
    grads["saehook bf16 matmul, AuxK"] = {
        "max_rel_err": rel_err(g, ref_sel), "rows_selection_differs_vs_kernel": same_sets(idx, sel), "rows": N,
        "note": "reference uses the bf16 selection; AuxK values keep bf16 precision (kernels.py), main values exact"}
    res["gradients"] = {"size": {"d": d, "n": n, "k": k, "tokens": N, "dead": int(dead.sum()), "k_aux": k_aux,
                                 "input_scale": s}, "reference": "dense float64 autograd", "results": grads}

    # ---- 30 steps, fp32 vs bf16 matmul, same init, same stream
    steps, T, n2 = job["curve_steps"], job["curve_tokens"], job["curve_n"]
    stream = list(synthetic_stream(steps, T, job["d"]))
    curves = {}
    for mdt in ("float32", "bfloat16"):
        torch.manual_seed(3)
        sae = TopKSAE(job["d"], n2, job["k"])
        trainer = make_trainer(sae, mdt, batch_tokens=T, lr=job["curve_lr"])
        trainer.dead_threshold = 2 * T  # short run: latents silent for 2 steps count as dead -> AuxK active
        metrics = [trainer.step(b) for b in stream]
        curves[mdt] = {"loss": [m["loss"] for m in metrics], "fvu": [m["fvu"] for m in metrics],
                       "auxk_fvu": [m.get("auxk_fvu") for m in metrics],
                       "dead_frac": [m["dead_frac"] for m in metrics]}
    a, b = curves["float32"]["loss"], curves["bfloat16"]["loss"]
    rel = [abs(u - v) / abs(u) for u, v in zip(a, b)]
    fa, fb = curves["float32"]["fvu"], curves["bfloat16"]["fvu"]
    res["loss_curves"] = {
        "setup": {"d": job["d"], "n": n2, "k": job["k"], "tokens_per_step": T, "steps": steps, "lr": job["curve_lr"],
                  "data": "sparse non-negative sums of 24 of 4096 random unit directions + offset + noise",
                  "dead_threshold_tokens": 2 * T},
        "max_rel_diff_loss": max(rel), "max_rel_diff_fvu": max(abs(u - v) / abs(u) for u, v in zip(fa, fb)),
        "final_rel_diff_loss": rel[-1], "curves": curves}
    return res


def worker_profile(job: dict) -> None:
    from torch.profiler import ProfilerActivity, profile
    x, dead = inputs(job["tokens"], job["d"], job["n"], job["dead_frac"])
    impl = "saehook-bf16" if job["profile"] == "bf16" else "saehook-fp32"
    reset, step = setup(impl, x, dead, job["k"])
    for _ in range(2):
        reset()
        step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(3):
            reset()
            t = time.perf_counter()
            step()
            print(f"step {1e3 * (time.perf_counter() - t):.0f} ms (under the profiler)")
    print(f"### torch.profiler, {impl}, n={job['n']}, 3 steps of {job['tokens']} tokens")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
    print("### the same, by input shape")
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=20,
                                                             max_name_column_width=40, max_shapes_column_width=70))


def run_worker(kind: str, job: dict, timeout: float | None = None, **env_extra: str) -> dict:
    """Run ``kind`` in a fresh interpreter (this one) and return its JSON result or the error."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--job", json.dumps(job)]
    env = dict(os.environ, SAEHOOK_BENCH_REEXEC="1", **env_extra)
    t = time.perf_counter()
    load = os.getloadavg()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    took = time.perf_counter() - t
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("@@RESULT ")]
    if p.returncode != 0 or not lines:
        tail = (p.stderr or p.stdout).strip().splitlines()[-6:]
        why = "killed (out of memory?)" if p.returncode in (-9, 137) else f"exit {p.returncode}"
        return {"error": f"{why}: " + " | ".join(tail)}
    out = json.loads(lines[-1][len("@@RESULT "):])
    out.update(wall_s=took, loadavg_before=load, loadavg_after=os.getloadavg())
    return out


# ====================================================================== tables
def fmt_ratio(v) -> str:
    return "—" if v is None else f"{v:.2f}x"


def step_table(rows: list[dict], sizes: list[int]) -> str:
    out = ["| impl | n | ms/step | tokens/s | speed vs sparsify | speed vs sae-lens |", "|---|---|---|---|---|---|"]
    for n in sizes:
        for r in (r for r in rows if r["n"] == n):
            if "error" in r or "skipped" in r:
                out.append(f"| {LABEL[r['impl']]} | {n:,} | {r.get('skipped') or r['error'][:80]} | | | |")
                continue
            out.append(f"| {LABEL[r['impl']]} | {n:,} | {r['ms_per_step']:.0f} | {r['tokens_per_s']:,.0f} | "
                       f"{fmt_ratio(r.get('speed_vs_sparsify'))} | {fmt_ratio(r.get('speed_vs_sae_lens'))} |")
    return "\n".join(out)


def memory_table(rows: list[dict]) -> str:
    out = ["| impl | n | one dense [tokens, n] fp32 | step peak above baseline | in dense [tokens, n] fp32 |",
           "|---|---|---|---|---|"]
    for r in rows:
        m = r.get("memory")
        if not m or m.get("step_peak_over_baseline") is None:
            continue
        out.append(f"| {LABEL[r['impl']]} | {r['n']:,} | {m['dense_tokens_x_n_fp32'] / 2**20:,.0f} MiB | "
                   f"{m['step_peak_over_baseline'] / 2**20:,.0f} MiB | {m['step_peak_in_dense']:.2f} |")
    return "\n".join(out)


def roofline_row(res: dict, n: int, tokens: int, d: int, k: int, k_aux: int = 0) -> dict:
    """Matmul rate and the step's fraction of it, per round (same machine state), median over rounds. The
    matmul rate of a round is the faster of the whole product and the chunked one. With AuxK acting
    (``k_aux > 0``) ``fraction_with_auxk`` also counts its sparse work, 8 k_aux d FLOPs per token."""
    flops, mm_flops = tokens * (2 * d * n + 8 * k * d), 2 * tokens * d * n
    aux_flops = tokens * 8 * k_aux * d
    row = {"n": n, "flops_per_step": flops, "auxk_flops_per_step": aux_flops}
    for dt, impl in (("float32", "saehook-fp32"), ("bfloat16", "saehook-bf16")):
        short = "fp32" if dt == "float32" else "bf16"
        whole, chunked = res[f"matmul-{short}"]["runs_s"], res[f"matmul-{short}-chunked"]["runs_s"]
        mm = [min(a, b) for a, b in zip(whole, chunked)]
        entry = {"matmul_whole_median_s": statistics.median(whole),
                 "matmul_chunked_median_s": statistics.median(chunked),
                 "matmul_median_s": statistics.median(mm), "matmul_gflops": mm_flops / statistics.median(mm) / 1e9,
                 "matmul_gflops_best": mm_flops / min(mm) / 1e9}
        if impl in res:
            st = res[impl]["runs_s"]
            entry.update(step_median_s=statistics.median(st), step_gflops=flops / statistics.median(st) / 1e9,
                         fraction=statistics.median((flops / s) / (mm_flops / m) for s, m in zip(st, mm)),
                         fraction_with_auxk=statistics.median(((flops + aux_flops) / s) / (mm_flops / m)
                                                              for s, m in zip(st, mm)))
        row[dt] = entry
    return row


def roofline_table(roof: list[dict]) -> str:
    out = ["| dead | n | matmul dtype | encoder matmul alone (whole / chunked) | matmul rate (faster) | saehook step | "
           "step rate (2dn+8kd) | fraction of matmul rate | counting AuxK's 8 k_aux d too |",
           "|---|---|---|---|---|---|---|---|---|"]
    for rr in roof:
        for dt in ("float32", "bfloat16"):
            e = rr[dt]
            if "fraction" not in e:
                continue
            out.append(f"| {rr.get('dead_frac', 0):.0%} | {rr['n']:,} | {dt} | "
                       f"{1e3 * e['matmul_whole_median_s']:.0f} / "
                       f"{1e3 * e['matmul_chunked_median_s']:.0f} ms | "
                       f"{e['matmul_gflops']:.0f} GFLOP/s | {1e3 * e['step_median_s']:.0f} ms | "
                       f"{e['step_gflops']:.0f} GFLOP/s | "
                       f"{100 * e['fraction']:.0f}% | "
                       + (f"{100 * e['fraction_with_auxk']:.0f}% |" if rr.get("auxk_flops_per_step") else "— |"))
    return "\n".join(out)


def numerics_text(num: dict) -> str:
    g = num["gradients"]
    sz = g["size"]
    out = [f"Gradients vs {g['reference']} (d={sz['d']}, n={sz['n']}, k={sz['k']}, {sz['tokens']} tokens, "
           f"{sz['dead']} dead, k_aux={sz['k_aux']}, input scale {sz['input_scale']:.3g}); "
           "max |g - g_ref| / max |g_ref|:",
           "", "| case | W_enc | b_enc | W_dec | b_dec | note |", "|---|---|---|---|---|---|"]
    for case, r in g["results"].items():
        e = r["max_rel_err"]
        note = ", ".join(f"{key.replace('_', ' ')} {v}" for key, v in r.items() if key.startswith("rows_"))
        out.append(f"| {case} | {e['W_enc']:.1e} | {e['b_enc']:.1e} | {e['W_dec']:.1e} | {e['b_dec']:.1e} | {note} |")
    c = num["loss_curves"]
    s = c["setup"]
    f32, b16 = c["curves"]["float32"], c["curves"]["bfloat16"]
    out += ["", f"Training curves, fp32 vs bf16 matmul, same init and stream (d={s['d']}, n={s['n']:,}, k={s['k']}, "
                f"{s['tokens_per_step']} tokens x {s['steps']} steps, Adam lr {s['lr']:g}, {s['data']}):",
            f"loss {f32['loss'][0]:.4f} -> {f32['loss'][-1]:.4f} (fp32), {b16['loss'][0]:.4f} -> {b16['loss'][-1]:.4f} "
            f"(bf16); max relative difference of the loss curves {c['max_rel_diff_loss']:.2e} "
            f"(fvu {c['max_rel_diff_fvu']:.2e}, last step {c['final_rel_diff_loss']:.2e})"]
    return "\n".join(out)


# ====================================================================== main
CHECKS = {  # numerics that make the benchmark fail (exit 1) when exceeded
    "saehook fp32 matmul, AuxK": 1e-4, "saehook bf16 matmul, main only": 1e-4, "saehook bf16 matmul, AuxK": 5e-2}
CURVE_TOL = 5e-2


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[16384, 65536], help="n_latents to time")
    p.add_argument("--tokens", type=int, default=8192, help="activation rows per step")
    p.add_argument("--d", type=int, default=576)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--dead-fracs", type=float, nargs="+", default=[0.1, 0.0],
                   help="fractions of latents in the dead mask, one set of rounds each (AuxK acts when > 0)")
    p.add_argument("--impls", nargs="+", choices=IMPLS + TORCH_OPS, default=IMPLS,
                   help="what to time (default: saehook and the peers); " + ", ".join(TORCH_OPS)
                   + " run saehook with its C kernels off")
    p.add_argument("--reps", type=int, default=5, help="timed steps at n <= 16384 (median; >= 3)")
    p.add_argument("--reps-large", type=int, default=3, help="timed steps at n > 16384 (>= 2)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (>= 1: allocates Adam state)")
    p.add_argument("--skip-numerics", action="store_true")
    p.add_argument("--skip-roofline", action="store_true")
    p.add_argument("--skip-memory", action="store_true", help="skip the per-implementation memory runs")
    p.add_argument("--mem-fraction", type=float, default=0.8,
                   help="skip an implementation whose predicted peak exceeds this fraction of MemAvailable")
    p.add_argument("--wait-load", type=float, default=0.0,
                   help="first wait until the 1-min load average is below this (0 = do not wait)")
    p.add_argument("--wait-max", type=float, default=600.0, help="longest wait for --wait-load, seconds")
    p.add_argument("--profile", choices=["fp32", "bf16"], help="profile saehook's step at the first size and exit")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--job", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        job = json.loads(args.job)
        fn = {"rounds": worker_rounds, "memory": worker_memory, "numerics": worker_numerics,
              "profile": worker_profile}[args.worker]
        res = fn(job)
        if res is not None:
            print("@@RESULT " + json.dumps(res), flush=True)
        return 0
    if args.reps < 3 or args.reps_large < 2 or args.warmup < 1:
        p.error("--reps must be >= 3, --reps-large >= 2, --warmup >= 1")

    command = shlex.join([sys.executable, *sys.argv])
    print(f"command: OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']} {command}", flush=True)
    base_job = {"tokens": args.tokens, "d": args.d, "k": args.k, "dead_frac": args.dead_fracs[0]}
    if args.profile:
        worker_profile({**base_job, "n": args.sizes[0], "profile": args.profile})
        return 0

    missing = _peers_missing()
    impls = list(args.impls)
    if missing:
        print(f"[bench_step] peers not installed ({', '.join(missing)}): measuring saehook alone. Install them with\n"
              f"    {INSTALL_PEERS}", flush=True)
        impls = [i for i in impls if i.startswith("saehook")]
    waited = None
    if args.wait_load > 0:
        load, secs = wait_for_load(args.wait_load, args.wait_max)
        waited = {"threshold": args.wait_load, "load": load, "waited_s": secs}
        print(f"[bench_step] 1-min load {load:.2f} after waiting {secs:.0f} s", flush=True)
    load_before = os.getloadavg()

    rows: list[dict] = []
    roof: list[dict] = []
    measured_dense: dict[str, float] = {}  # impl -> step peak in dense tensors at the previous size
    for dead_frac, n in ((f, n) for f in args.dead_fracs for n in sorted(args.sizes)):
        first = dead_frac == args.dead_fracs[0]
        reps = args.reps if n <= 16384 else args.reps_large
        dense, resident = args.tokens * n * 4, 10 * n * args.d * 4  # per impl: weights, grads, Adam state
        fit = {i: dense * (measured_dense.get(i, DENSE_GUESS[i]) + 0.5) for i in impls}
        run, avail = list(impls), mem_available()
        while run and len(run) * resident + max(fit[i] for i in run) + 1.5 * 2**30 > args.mem_fraction * avail:
            worst = max(run, key=lambda i: fit[i])
            run.remove(worst)
            need = resident + fit[worst] + 1.5 * 2**30
            why = f"skipped: needs ~{need / 2**30:.1f} GiB alone, {avail / 2**30:.1f} GiB available"
            rows.append({"impl": worst, "n": n, "dead_frac": dead_frac, "skipped": why})
            print(f"[bench_step] {worst} n={n}: {rows[-1]['skipped']}", flush=True)
        if not run:
            continue
        print(f"[bench_step] n={n}, {dead_frac:.0%} dead: {', '.join(run)}: {args.warmup} warm-up + {reps} timed "
              f"rounds ...", flush=True)
        res = run_worker("rounds", {**base_job, "dead_frac": dead_frac, "impls": run, "n": n, "reps": reps,
                                    "warmup": args.warmup, "roofline": not args.skip_roofline})
        if "error" in res:
            print(f"[bench_step] n={n} FAILED: {res['error']}", flush=True)
            rows += [{"impl": i, "n": n, "dead_frac": dead_frac, "error": res["error"]} for i in run]
            continue
        size_rows = []
        for impl in run:
            r = res["impls"][impl]
            med = statistics.median(r["runs_s"])
            row = {"impl": impl, "n": n, "dead_frac": dead_frac, "reps": reps, "ms_per_step": 1e3 * med,
                   "ms_min": 1e3 * min(r["runs_s"]),
                   "tokens_per_s": args.tokens / med, "runs_s": r["runs_s"], "losses": r["losses"],
                   "loadavg_before": res["loadavg_before"], "loadavg_after": res["loadavg_after"]}
            size_rows.append(row)
        for row in size_rows:  # ratios within each round, then the median over rounds
            for key, name in (("speed_vs_sparsify", "sparsify"), ("speed_vs_sae_lens", "sae-lens")):
                ref = res["impls"].get(name)
                row[key] = (statistics.median(a / b for a, b in zip(ref["runs_s"], row["runs_s"]))
                            if ref else None)
            print(f"    {LABEL[row['impl']]}: {row['ms_per_step']:.0f} ms/step (min {row['ms_min']:.0f}), "
                  f"{row['tokens_per_s']:,.0f} tokens/s", flush=True)
        print(f"    load average {res['loadavg_before'][0]:.2f} before, {res['loadavg_after'][0]:.2f} after; "
              f"glibc thresholds raised for all implementations: {res.get('allocator_tuned')}", flush=True)
        for row in size_rows:
            row["allocator_tuned"] = res.get("allocator_tuned")
        if not args.skip_memory and first:  # peak memory with AuxK acting (the first dead fraction)
            for row in size_rows:
                mem = run_worker("memory", {**base_job, "impl": row["impl"], "n": n},
                                 MALLOC_MMAP_THRESHOLD_="131072")
                row["memory"] = mem
                if mem.get("step_peak_in_dense") is not None:
                    measured_dense[row["impl"]] = mem["step_peak_in_dense"]
                    print(f"    {LABEL[row['impl']]}: step peak {mem['step_peak_over_baseline'] / 2**20:,.0f} MiB "
                          f"= {mem['step_peak_in_dense']:.2f} dense [tokens, n] fp32", flush=True)
                else:
                    print(f"    {LABEL[row['impl']]}: memory not measured ({mem.get('error') or mem.get('why')})")
        rows += size_rows
        if not args.skip_roofline:
            k_aux = min(args.d // 2, int(round(dead_frac * n)))  # the trainer's default k_aux = d_in // 2
            roof.append({**roofline_row(res["impls"], n, args.tokens, args.d, args.k, k_aux), "dead_frac": dead_frac})

    numerics, failures = None, []
    if not args.skip_numerics:
        print("[bench_step] numerics: gradients vs dense autograd, fp32 vs bf16 training curves ...", flush=True)
        numerics = run_worker("numerics", {**base_job, "grad_d": 64, "grad_n": 1024, "grad_k": 8,
                                           "grad_tokens": 512, "curve_steps": 30, "curve_tokens": 4096,
                                           "curve_n": 16384, "curve_lr": 1e-3})
        if "error" in numerics:
            failures.append(f"numerics worker: {numerics['error']}")
        else:
            for case, tol in CHECKS.items():
                worst = max(numerics["gradients"]["results"][case]["max_rel_err"].values())
                if not worst <= tol:
                    failures.append(f"{case}: gradient max relative error {worst:.2e} > {tol:g}")
            if not numerics["loss_curves"]["max_rel_diff_loss"] <= CURVE_TOL:
                failures.append(f"fp32 vs bf16 loss curves differ by {numerics['loss_curves']['max_rel_diff_loss']:.2e}"
                                f" > {CURVE_TOL:g}")
    failures += [f"{r['impl']} n={r['n']}: {r['error']}" for r in rows
                 if "error" in r and r["impl"].startswith("saehook")]

    sizes = sorted(args.sizes)
    for f in args.dead_fracs:
        aux = f"AuxK k_aux={args.d // 2}" if f > 0 else "AuxK idle"
        print(f"\n### One optimizer step, d={args.d}, k={args.k}, {args.tokens} tokens/step, {f:.0%} dead ({aux})\n")
        print(step_table([r for r in rows if r.get("dead_frac") == f], sizes))
    if any(r.get("memory") for r in rows):
        print(f"\n### Memory: peak RSS during one step above the RSS just before it (each implementation alone, "
              f"{args.dead_fracs[0]:.0%} dead)\n")
        print(memory_table(rows))
    if roof:
        print(f"\n### Roofline: the encoder matmul [{args.tokens}, {args.d}] x [{args.d}, n] alone vs the whole step\n")
        print(roofline_table(roof))
    if numerics and "error" not in numerics:
        print("\n### Numerics\n")
        print(numerics_text(numerics))
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "nproc": os.cpu_count(),
           "cpu": cpu_model(), "cpu_flags": cpu_flags(), "python": platform.python_version(),
           "machine": platform.machine(), "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
           "saehook": version("saehook"), "eai-sparsify": version("eai-sparsify"), "sae-lens": version("sae-lens"),
           "interpreter": sys.executable, "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
           "load_wait": waited, "time": time.strftime("%F %T")}
    print(f"\ntorch {env['torch']}, {env['threads']} threads on {env['nproc']} CPUs ({env['cpu']}); "
          f"load average {load_before[0]:.2f} before, {env['loadavg_after'][0]:.2f} after")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "step", "command": command, "env": env,
                                    "config": {**base_job, "sizes": sizes, "impls": impls, "reps": args.reps,
                                               "reps_large": args.reps_large, "warmup": args.warmup,
                                               "flops_per_token": "2*d*n + 8*k*d"},
                                    "steps": rows, "roofline": roof, "numerics": numerics,
                                    "failures": failures}, indent=2))
    print(f"wrote {args.out}")
    if failures:
        print("FAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
