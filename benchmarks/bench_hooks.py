"""Generation latency of a hooked SmolLM2-135M: what attaching an autoencoder costs per new token.

Greedy ``generate`` of ``--new-tokens`` tokens (exactly: ``min_new_tokens`` is set too) from a short
prompt, batch 1, with the KV cache, in these modes:

- ``plain``: a model that saehook never touched;
- ``detached``: a second copy after ``attach(...)`` and exit; its module hooks must be exactly the ones
  it had before (checked, else the benchmark fails), so the cost must be 0%;
- ``record``: attached, recording latents only;
- ``splice``: the reconstruction replaces the activation;
- ``steer add`` / ``steer clamp``: one latent steered at every position.

The autoencoder is ``TopKSAE(576, 16384, 32)`` at layer 20. Its own compute is timed alone on the
activation shapes the hookpoint sees during one generation (the ``[1, T, d]`` prefill, then one
``[1, 1, d]`` row per new token): ``encode`` for record and steer (they only need the code),
``encode`` + ``decode`` for splice. A mode's reference is ``plain + that compute``; "overhead beyond SAE
compute" is how much slower the mode is than its reference.

The machine may be shared, so every timed item (the six modes and the two autoencoder-alone timings)
runs once per round, round-robin in a rotating order, and ratios are taken within a round before the
median over rounds: a slow spell slows a whole round, not one mode.

A second table times the hook path per call: one ``[1, 1, d]`` activation through a hooked identity
layer, against the autoencoder's calls alone. It resolves the few microseconds the hook machinery adds,
which the end-to-end figures cannot separate from noise.

    python benchmarks/bench_hooks.py                     # fp32 and bf16, tables + benchmarks/results/hooks.json
    python benchmarks/bench_hooks.py --dtype fp32 --reps 9
    python benchmarks/bench_hooks.py --profile "steer add"   # torch.profiler's top operators in one mode
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
import types
from pathlib import Path

import torch
from torch import nn

import saehook
from saehook import TopKSAE, attach

RESULTS = Path(__file__).resolve().parent / "results" / "hooks.json"
LAYER, N_LATENTS, K = 20, 16384, 32
PROMPT = "The capital of France is"
STEER_LATENT, STEER_VALUE = 123, 4.0
MODES = ["plain", "detached", "record", "splice", "steer add", "steer clamp"]
SAE_ITEMS = ["sae encode", "sae encode+decode"]
REFERENCE = {"plain": None, "detached": None, "record": "sae encode", "splice": "sae encode+decode",
             "steer add": "sae encode", "steer clamp": "sae encode", "bare": None}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def hook_snapshot(model: nn.Module) -> dict:
    """Every forward hook and pre-hook (and their flags) of every module, to compare before/after."""
    attrs = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
             "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")
    return {name: tuple(tuple(getattr(m, a, {}).items()) for a in attrs) for name, m in model.named_modules()}


def mode_context(mode: str, model: nn.Module, sae: TopKSAE, key=LAYER) -> contextlib.ExitStack:
    """The context one timed item runs in (entered before the clock starts, left after it stops)."""
    stack = contextlib.ExitStack()
    if mode in ("plain", "detached", "bare") or mode.startswith("sae"):
        return stack
    hooked = stack.enter_context(attach(model, {key: sae}))
    if mode == "splice":
        stack.enter_context(hooked.splice())
    elif mode == "steer add":
        stack.enter_context(hooked.steer({key: {STEER_LATENT: STEER_VALUE}}))
    elif mode == "steer clamp":
        stack.enter_context(hooked.steer({key: {STEER_LATENT: STEER_VALUE}}, mode="clamp"))
    elif mode != "record":
        raise ValueError(mode)
    return stack


def generate(model, inputs, new_tokens: int):
    return model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)


def sae_alone(sae: TopKSAE, xs: list, decode: bool) -> None:
    """What the hook asks of the autoencoder for these activations, without any hook."""
    for x in xs:
        codes = sae.encode(x.to(sae.W_enc.dtype))
        if decode:
            sae.decode(codes)


def round_robin(items: list, run, reps: int, warmup: int) -> dict:
    """``{item: [seconds per round]}``: each item once per round, the order rotated every round."""
    times = {it: [] for it in items}
    for r in range(warmup + reps):
        order = items[r % len(items):] + items[:r % len(items)]
        for it in order:
            dt = run(it)
            if r >= warmup:
                times[it].append(dt)
    return times


def summarise(times: dict, modes: list, base: str, per: int, scale: float) -> list:
    """Rows with medians of per-round figures, from ``times`` in seconds per round: times are reported
    as ``seconds * scale / per`` (e.g. ms per new token); ``runs_s`` keeps the raw seconds."""
    rows = []
    for mode in modes:
        ref = REFERENCE[mode]
        t, b = times[mode], times[base]
        s = times[ref] if ref else [0.0] * len(t)
        rows.append({
            "mode": mode,
            "median": scale * statistics.median(t) / per,
            "min": scale * min(t) / per,
            "ratio_vs_plain": statistics.median(ti / bi for ti, bi in zip(t, b)),
            "sae_compute": ref.removeprefix("sae ") if ref else None,
            "sae": scale * statistics.median(s) / per,
            "extra_beyond_sae": scale * statistics.median(ti - bi - si for ti, bi, si in zip(t, b, s)) / per,
            "overhead_beyond_sae_pct": 100 * statistics.median(ti / (bi + si) - 1 for ti, bi, si in zip(t, b, s)),
            "extra_pct_of_sae": (100 * statistics.median((ti - bi - si) / si for ti, bi, si in zip(t, b, s))
                                 if ref else None),
            "runs_s": t,
        })
    return rows


def bench_generation(name: str, new_tokens: int, reps: int, warmup: int) -> dict:
    dtype = DTYPES[name]
    model, tok = saehook.load_model(dtype=dtype)  # never attached
    model_b, _ = saehook.load_model(dtype=dtype)  # attached and detached, then used by the hooked modes
    inputs = tok(PROMPT, return_tensors="pt")
    torch.manual_seed(0)
    sae = TopKSAE(model.config.hidden_size, N_LATENTS, K)

    # The activations the hookpoint sees in one generation (taken on model_b before any attach).
    acts = []
    pristine = hook_snapshot(model_b)
    layer = saehook.hookpoints.resolve(model_b, LAYER).module
    h = layer.register_forward_hook(lambda m, a, o: acts.append((o if torch.is_tensor(o) else o[0]).clone()))
    generate(model_b, inputs, new_tokens)
    h.remove()
    assert hook_snapshot(model_b) == pristine

    with attach(model_b, {LAYER: sae}) as hooked:
        generate(model_b, inputs, 2)
        assert LAYER in hooked.latents and hook_snapshot(model_b) != pristine
    if hook_snapshot(model_b) != pristine:
        raise AssertionError("attach + detach left module hooks behind")

    def run(item: str) -> float:
        m = model if item == "plain" else model_b
        with torch.no_grad(), mode_context(item, m, sae):
            t0 = time.perf_counter()
            if item.startswith("sae"):
                sae_alone(sae, acts, decode=item.endswith("decode"))
            else:
                out = generate(m, inputs, new_tokens)
            dt = time.perf_counter() - t0
        if not item.startswith("sae"):
            assert out.shape[1] == inputs.input_ids.shape[1] + new_tokens
        return dt

    times = round_robin(MODES + SAE_ITEMS, run, reps, warmup)
    if hook_snapshot(model_b) != pristine:
        raise AssertionError("hooks left behind after the timed runs")
    return {
        "dtype": name,
        "new_tokens": new_tokens,
        "prompt_tokens": int(inputs.input_ids.shape[1]),
        "hookpoint_calls_per_generation": len(acts),
        "reps": reps,
        "warmup": warmup,
        "detached_hooks_identical": True,
        "unit": "ms per new token",
        "rows": summarise(times, MODES, "plain", new_tokens, 1e3),
        "sae_alone_runs_s": {k: times[k] for k in SAE_ITEMS},
    }


class _Bare(nn.Module):
    """One identity 'decoder layer': the hook path with no model around it."""

    def __init__(self, d: int):
        super().__init__()
        self.layers = nn.ModuleList([nn.Identity()])
        self.config = types.SimpleNamespace(num_hidden_layers=1, hidden_size=d)


def bench_hook_path(d: int, calls: int, reps: int, warmup: int) -> dict:
    torch.manual_seed(0)
    sae = TopKSAE(d, N_LATENTS, K)
    bare = _Bare(d)
    x = torch.randn(1, 1, d) * 200
    layer = bare.layers[0]

    def run(item: str) -> float:
        with torch.no_grad(), mode_context(item, bare, sae, key=0):
            t0 = time.perf_counter()
            if item.startswith("sae"):
                sae_alone(sae, [x] * calls, decode=item.endswith("decode"))
            else:
                for _ in range(calls):
                    layer(x)
            return time.perf_counter() - t0

    modes = ["bare", "record", "splice", "steer add", "steer clamp"]
    times = round_robin(modes + SAE_ITEMS, run, reps, warmup)
    return {"d": d, "calls_per_round": calls, "reps": reps, "unit": "us per call",
            "rows": summarise(times, modes, "bare", calls, 1e6)}


def generation_table(res: dict) -> str:
    lines = [
        f"### SmolLM2-135M {res['dtype']}: greedy generate {res['new_tokens']} tokens "
        f"({res['prompt_tokens']}-token prompt), batch 1, KV cache, TopKSAE(576, {N_LATENTS}, {K}) at layer {LAYER}",
        "",
        f"Medians of {res['reps']} rounds; ratios and overheads are per-round (mode vs plain and SAE-alone timed in "
        f"the same round). {res['hookpoint_calls_per_generation']} hookpoint calls per generation. "
        f"Detached: module hooks identical to before attach: {res['detached_hooks_identical']}.",
        "",
        "| mode | ms/token | ratio vs plain | SAE compute (ms/token) | extra beyond SAE (ms/token) "
        "| overhead beyond SAE compute (%) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in res["rows"]:
        sae_col = f"{row['sae']:.3f} ({row['sae_compute']})" if row["sae_compute"] else "0"
        lines.append(f"| {row['mode']} | {row['median']:.2f} | {row['ratio_vs_plain']:.3f} | {sae_col} "
                     f"| {row['extra_beyond_sae']:+.2f} | {row['overhead_beyond_sae_pct']:+.1f} |")
    return "\n".join(lines)


def hook_path_table(res: dict) -> str:
    lines = [
        f"### Hook path per call: one [1, 1, {res['d']}] activation through a hooked identity layer "
        f"({res['calls_per_round']} calls per round, medians of {res['reps']} rounds)",
        "",
        "| mode | us/call | SAE compute (us/call) | extra beyond SAE (us/call) | extra as % of SAE compute |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in res["rows"]:
        if row["sae_compute"]:
            lines.append(f"| {row['mode']} | {row['median']:.1f} | {row['sae']:.1f} ({row['sae_compute']}) "
                         f"| {row['extra_beyond_sae']:+.1f} | {row['extra_pct_of_sae']:+.2f} |")
        else:
            lines.append(f"| {row['mode']} (no hook) | {row['median']:.2f} | 0 | | |")
    return "\n".join(lines)


def profile(mode: str, dtype: str, new_tokens: int) -> None:
    """Print torch.profiler's top operators (by self CPU time) for a few generations in one mode."""
    from torch.profiler import ProfilerActivity, record_function
    from torch.profiler import profile as tprofile

    model, tok = saehook.load_model(dtype=DTYPES[dtype])
    inputs = tok(PROMPT, return_tensors="pt")
    torch.manual_seed(0)
    sae = TopKSAE(model.config.hidden_size, N_LATENTS, K)
    with mode_context(mode, model, sae):
        generate(model, inputs, new_tokens)
        with tprofile(activities=[ProfilerActivity.CPU]) as prof, record_function(f"generate[{mode}]"):
            for _ in range(3):
                generate(model, inputs, new_tokens)
    print(f"### torch.profiler, {dtype}, mode {mode!r}, 3 generations of {new_tokens} tokens")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtype", choices=["fp32", "bf16", "both"], default="both")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--reps", type=int, default=7, help="timed rounds (median reported; >= 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--calls", type=int, default=200, help="calls per round in the hook-path table")
    p.add_argument("--out", type=Path, default=RESULTS, help="JSON results (default: %(default)s)")
    p.add_argument("--profile", choices=MODES, help="profile one mode instead of benchmarking")
    args = p.parse_args(argv)
    if args.reps < 5:
        p.error("--reps must be >= 5")
    dtypes = ["fp32", "bf16"] if args.dtype == "both" else [args.dtype]
    if args.profile:
        for d in dtypes:
            profile(args.profile, d, args.new_tokens)
        return 0

    load_before = os.getloadavg()
    generation = []
    for d in dtypes:
        res = bench_generation(d, args.new_tokens, args.reps, args.warmup)
        generation.append(res)
        print(generation_table(res), end="\n\n", flush=True)
    hook_path = bench_hook_path(576, args.calls, args.reps, args.warmup)
    print(hook_path_table(hook_path), end="\n\n")
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
           "python": platform.python_version(), "machine": platform.machine(),
           "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "time": time.strftime("%F %T")}
    print(f"torch {env['torch']}, {env['threads']} threads on {env['cpus']} CPUs; load average "
          f"{load_before[0]:.2f} before, {env['loadavg_after'][0]:.2f} after (a busy machine widens the noise)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "hooks", "env": env, "generation": generation,
                                    "hook_path": hook_path}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
