"""Equal-budget quality: what an autoencoder does to the model, saehook's levers and sparsify side by side.

Question (issue 14): at the same budget (same layer, same token windows, same number of training rows,
same n_latents and k), how much does splicing each autoencoder in change the model's predictions? Every
arm is measured by the same evaluator, :func:`saehook.evaluate`, on the same held-out windows of the
corpus's test split: nMSE (FVU), FVU on standardised channels, cosine, per-token relative error, L0,
dead fraction, delta LM loss and KL, and the control (delta LM loss of a random error of the same norm).

Setup. The embedded SmolLM2-135M-Instruct (``--dtype``, float32 by default), the embedded BBC News
corpus, windows of 128 tokens, first position excluded. The layer's output on the first ``--cache-rows``
rows of the training split is computed once and cached (``runs/quality/cache``, safetensors); each
saehook arm trains with :class:`saehook.SAETrainer` on ``--tokens`` rows drawn from that cache, one fresh
permutation per pass (a budget above the cache repeats rows, as ``hooked.train`` repeats the corpus).
sparsify (``--peers``) trains with its own ``Trainer`` and defaults on the same rows in the same order
(``benchmarks/quality_sparsify.py``, in the benchmark-only ``.venv-bench``); its autoencoder is read back
by saehook's sparsify reader and evaluated here.

    python benchmarks/bench_quality.py                              # default vs paper-rule, 1M tokens
    python benchmarks/bench_quality.py --variants default paper paper+wsd paper-lr4x --tokens 1M
    python benchmarks/bench_quality.py --peers                      # + sparsify's Trainer (.venv-bench)
    python benchmarks/bench_quality.py --tokens 250k 4M --variants default paper

Results: the table on stdout and ``benchmarks/results/quality.json`` (one record per arm and budget).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import saehook  # noqa: E402
from saehook.buffer import epoch_batches  # noqa: E402
from saehook.cli import parse_count  # noqa: E402

CACHE = ROOT / "runs" / "quality" / "cache"
RESULTS = ROOT / "benchmarks" / "results" / "quality.json"
BENCH_VENV = ROOT / ".venv-bench"

# Each arm: TrainConfig keyword arguments on top of the defaults ("default" = TrainConfig()).
# The defaults before this search (issue 14, first round): ~500 steps with batches of at least 1,024 rows,
# the paper's Adam betas, AuxK weight 1/32 on latents silent for 5% of the run.
# (No end-to-end phase: e2e_fraction=0, where today's default runs the last 2% end-to-end.)
PREV = {"target_steps": 500, "betas": (0.9, 0.999), "auxk_coef": 1 / 32, "dead_fraction": 0.05, "e2e_fraction": 0.0}
# The paper's rule as saehook shipped it before issue 14: 8,192 rows per step, 2e-4 / sqrt(n / 2^14), constant.
PAPER = {**PREV, "batch_tokens": 8192, "lr_schedule": "constant", "warmup_fraction": 0.0, "lr_scale": 1.0}
# Second round, from PREV: batch 1,024, AuxK weight 1/8 on latents silent for 1% of the run (B); plus beta2 0.99 (C).
B = {**PREV, "batch_tokens": 1024, "dead_fraction": 0.01, "auxk_coef": 1 / 8}
C = {**B, "betas": (0.9, 0.99)}
VARIANTS: dict[str, dict] = {
    "default": {},  # with the live model, as hooked.train: the last 2% end-to-end (e2e_fraction=None)
    "default-no-e2e": {"e2e_fraction": 0.0},  # the defaults without it (SAETrainer on cached rows, several ranks)
    "paper": PAPER,
    "prev": PREV,
    # first round: one lever at a time against the paper's rule, then against PREV
    "paper+wsd": {**PAPER, "lr_schedule": "wsd", "warmup_fraction": 0.02},
    "paper-lr4x": {**PAPER, "lr_scale": 4.0},
    "paper-lr4x+wsd": {**PAPER, "lr_scale": 4.0, "lr_schedule": "wsd", "warmup_fraction": 0.02},
    "batch2k-lr4x": {**PAPER, "batch_tokens": 2048, "lr_scale": 4.0},
    "batch2k-lr8x+wsd": {**PAPER, "batch_tokens": 2048, "lr_scale": 8.0, "lr_schedule": "wsd",
                         "warmup_fraction": 0.02},
    "prev+cosine": {**PREV, "lr_schedule": "cosine"},
    "prev+no-auxk": {**PREV, "auxk": False},
    "prev+normalize-channel": {**PREV, "normalize": "channel"},
    "prev+normalize-none": {**PREV, "normalize": "none"},
    "prev+warmup5%": {**PREV, "warmup_fraction": 0.05},
    "prev+decay40%": {**PREV, "decay_fraction": 0.4},
    "prev+lr8x": {**PREV, "lr_scale": 8.0},
    "prev+batch1k": {**PREV, "batch_tokens": 1024},
    "prev+e2e-kl-2%": {**PREV, "e2e_fraction": 0.02},
    "prev+e2e-kl-5%": {**PREV, "e2e_fraction": 0.05},
    # second round: AuxK against the dead latents that smaller batches and higher rates leave
    "prev+batch1k+dead1%+auxk1/8": B,
    "B-lr6x": {**B, "lr_scale": 6.0},
    "B-lr8x": {**B, "lr_scale": 8.0},
    "B-batch512": {**B, "batch_tokens": 512},
    "B-batch512-lr2x": {**B, "batch_tokens": 512, "lr_scale": 2.0},
    "B-adam-b2-0.99": C,
    "C-dead0.5%": {**C, "dead_fraction": 0.005},
    "C-auxk1/4": {**C, "auxk_coef": 1 / 4},
    "C-batch512-dead0.5%": {**C, "batch_tokens": 512, "dead_fraction": 0.005},
    "C-batch512-dead0.25%": {**C, "batch_tokens": 512, "dead_fraction": 0.0025},
    "C-batch512-dead0.5%-auxk1/4": {**C, "batch_tokens": 512, "dead_fraction": 0.005, "auxk_coef": 1 / 4},
    # = the defaults at 1M tokens (and wherever the automatic batch is 512)
    "C-batch512-dead0.25%-auxk1/4": {**C, "batch_tokens": 512, "dead_fraction": 0.0025, "auxk_coef": 1 / 4},
    # levers on top of today's defaults
    "e2e-kl-2%": {"e2e_fraction": 0.02},
    "e2e-ce-2%": {"e2e_fraction": 0.02, "e2e_loss": "ce"},
    "e2e-kl-2%-pure": {"e2e_fraction": 0.02, "e2e_fvu_coef": 0.0},
    "normalize-channel": {"normalize": "channel"},
    # third round: dead latents at n = 16,384 (a latent fires on k / n of the tokens)
    "default-dead1%": {"dead_fraction": 0.01},
    "default-auxk1/32": {"auxk_coef": 1 / 32},
}


def log(msg: str) -> None:
    print(f"[bench_quality {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------- data
def load_everything(args):
    model, tok = saehook.load_model(dtype=getattr(torch, args.dtype))
    model.eval()
    corpus = saehook.Corpus.from_source(None, tok, context=args.context)
    return model, tok, corpus


def cache_path(model, layer: int, context: int, limit: int) -> Path:
    return CACHE / f"smollm2-{str(model.dtype).removeprefix('torch.')}-L{layer}-ctx{context}-{limit}.safetensors"


def cached_rows(model, corpus, layer: int, context: int, limit: int) -> torch.Tensor:
    """``[rows, d]`` bf16: layer ``layer``'s output on every training window (first position excluded),
    in the corpus's window order; computed once and cached as safetensors."""
    from safetensors.torch import load_file, save_file

    path = cache_path(model, layer, context, limit)
    if path.is_file():
        return load_file(path)["rows"]
    log(f"caching layer {layer} activations of every training window to {path} (one truncated pass)")
    from saehook.training import collect_activations

    t0 = time.perf_counter()
    d = model.config.hidden_size
    with saehook.attach(model, {layer: saehook.TopKSAE(d, 8, 1)}, record=False) as hooked:
        windows = list(corpus.windows("train", batch_size=16))  # one pass, no repetition
        rows = collect_activations(hooked, windows, limit, batch_size=16)[layer]
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({"rows": rows.contiguous()}, str(tmp))
    os.replace(tmp, path)
    log(f"cached {len(rows):,} rows in {time.perf_counter() - t0:.0f}s")
    return rows


def eval_windows(corpus, n_windows: int) -> list[torch.Tensor]:
    """The first ``n_windows`` held-out windows, in batches of 8 (the same for every arm)."""
    out, n = [], 0
    for ids in corpus.windows("test", batch_size=8):
        out.append(ids)
        n += len(ids)
        if n >= n_windows:
            break
    return out


# ---------------------------------------------------------------------------------------------- arms
def train_saehook(rows, d, n, k, tokens, overrides: dict, seed: int = 0, matmul_dtype: str = "float32",
                  live=None):
    """One saehook arm. With ``e2e_fraction`` > 0 the last part of the budget trains end-to-end through the
    live model (``live = (model, corpus, layer, first_window)``) on training windows after the cached ones,
    one step per batch of 8 windows, as ``hooked.train`` does."""
    cfg = saehook.TrainConfig(**{"matmul_dtype": matmul_dtype, **overrides})
    torch.manual_seed(seed)
    sae = saehook.TopKSAE(d, n, k)
    trainer = saehook.SAETrainer(sae, cfg, total_tokens=tokens)
    e2e_fraction = cfg.e2e_fraction_for(live=live is not None)
    if trainer.init_rows:  # scale and b_dec from init_samples rows, as hooked.train fits them
        trainer.initialize(rows[:trainer.init_rows].float())
    local = round((1 - e2e_fraction) * tokens)
    t0 = time.perf_counter()
    m = {}
    if e2e_fraction > 0:
        model, corpus, layer, first = live
        per_batch = 8 * (corpus.context - cfg.skip_positions)
        n_local = -(-local // trainer.batch_tokens)
        trainer.total_steps = n_local + -(-(tokens - n_local * trainer.batch_tokens) // per_batch)
    for batch in epoch_batches(rows, local, trainer.batch_tokens, seed):
        m = trainer.step(batch)
    if e2e_fraction > 0:
        from saehook.e2e import e2e_step

        with saehook.attach(model, {layer: sae}, record=False) as hooked:
            for ids in corpus.windows("train", batch_size=8, start=first // 8):
                if trainer.tokens >= tokens:
                    break
                m = e2e_step(hooked, {layer: trainer}, {"input_ids": ids}, cfg)[layer]
    secs = time.perf_counter() - t0
    return trainer.ema_sae(), {"train_s": secs, "steps": trainer.step_count, "batch_tokens": trainer.batch_tokens,
                               "lr": trainer.lr, "train_dead_frac": m.get("dead_frac"), "config": cfg.to_dict()}


def train_sparsify(args, tokens: int) -> Path:
    """Train sparsify with its own Trainer and defaults on the cached rows, in .venv-bench."""
    py = BENCH_VENV / "bin" / "python"
    if not py.exists():
        raise SystemExit(f"--peers needs {BENCH_VENV} with eai-sparsify (see docs/performance.md)")
    out = ROOT / "runs" / "quality" / f"sparsify-L{args.layer}-n{args.latents}-k{args.k}-{tokens}"
    cmd = [str(py), str(ROOT / "benchmarks" / "quality_sparsify.py"), "--cache", str(args.cache_path),
           "--tokens", str(tokens), "--latents", str(args.latents), "--k", str(args.k), "--layer", str(args.layer),
           "--seq", str(args.context - 1), "--seed", str(args.seed), "--out", str(out)]
    log("sparsify: " + " ".join(cmd))
    subprocess.run(cmd, check=True)
    return out


def evaluate_arm(model, sae, layer, windows, n_windows: int, context: int, control: bool = True) -> dict:
    rep = saehook.evaluate(model, {layer: sae}, windows, tokens=n_windows * (context - 1), batch_size=8,
                           ablations=False, control=control)
    m = rep[layer]
    keep = ("fvu", "fvu_standardized", "fvu_excl_top", "cosine", "rel_error_median", "rel_error_p90", "l0",
            "dead_frac", "delta_lm_loss", "kl", "random_error_delta_lm_loss", "error_vs_random", "top_channel_share",
            "tokens", "clean_loss")
    return {key: m[key] for key in keep if key in m}


COLS = [("arm", "{}"), ("tokens", "{}"), ("batch", "{}"), ("steps", "{}"), ("fvu", "{:.4f}"),
        ("fvu_std", "{:.3f}"), ("cos", "{:.3f}"), ("relerr_med", "{:.3f}"), ("dead", "{:.1%}"),
        ("delta_lm", "{:.3f}"), ("kl", "{:.3f}"), ("ctrl_delta", "{:.3f}"), ("train_s", "{:.0f}")]


def row_of(r: dict) -> list[str]:
    v = {"arm": r["arm"], "tokens": f"{r['budget']:,}", "batch": r.get("batch_tokens", "-"),
         "steps": r.get("steps", "-"), "fvu": r["fvu"], "fvu_std": r.get("fvu_standardized", float("nan")),
         "cos": r.get("cosine", float("nan")), "relerr_med": r.get("rel_error_median", float("nan")),
         "dead": r["dead_frac"], "delta_lm": r["delta_lm_loss"], "kl": r["kl"],
         "ctrl_delta": r.get("random_error_delta_lm_loss", float("nan")), "train_s": r.get("train_s", float("nan"))}
    return [f.format(v[c]) if not isinstance(v[c], str) else v[c] for c, f in COLS]


def table(records: list[dict]) -> str:
    head = "| " + " | ".join(c for c, _ in COLS) + " |"
    sep = "|" + "---|" * len(COLS)
    return "\n".join([head, sep] + ["| " + " | ".join(row_of(r)) + " |" for r in records])


def save(out: Path, record: dict) -> None:
    """Append ``record`` to the records on disk now (several runs may share the file), atomically."""
    out.parent.mkdir(parents=True, exist_ok=True)
    records = json.loads(out.read_text())["records"] if out.is_file() else []
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"records": records + [record]}, indent=2, default=str))
    os.replace(tmp, out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layer", type=int, default=20)
    p.add_argument("--latents", type=parse_count, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--tokens", type=parse_count, nargs="+", default=[parse_count("1M")],
                   help="training rows per autoencoder (budgets)")
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--cache-rows", type=parse_count, default=parse_count("512k"),
                   help="distinct training rows cached (the first windows of the training split); budgets above "
                        "this repeat them in fresh permutations")
    p.add_argument("--eval-windows", type=int, default=64, help="held-out windows (test split) evaluated")
    p.add_argument("--variants", nargs="*", default=["default", "paper"], choices=sorted(VARIANTS),
                   help="saehook arms (none: only --peers)")
    p.add_argument("--control-arms", nargs="*", default=["default", "paper", "sparsify"],
                   help="arms whose evaluation includes the random-error control (one more forward per batch)")
    p.add_argument("--peers", action="store_true", help="also sparsify's Trainer with its defaults (.venv-bench)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="language model dtype (bfloat16 only where the CPU has native bf16 matmuls)")
    p.add_argument("--matmul-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="the autoencoder's encoder matmul dtype")
    p.add_argument("--collect-only", action="store_true", help="build the activation cache and stop")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()

    torch.set_num_threads(os.cpu_count() or 1)
    model, tok, corpus = load_everything(args)
    rows = cached_rows(model, corpus, args.layer, args.context, args.cache_rows)
    args.cache_path = cache_path(model, args.layer, args.context, args.cache_rows)
    if args.collect_only:
        return
    d = rows.shape[1]
    windows = eval_windows(corpus, args.eval_windows)
    log(f"{len(rows):,} cached rows, {args.eval_windows} held-out windows; load {os.getloadavg()}")
    out = Path(args.out)
    records = []  # this run's; each is appended to --out as soon as it is measured, never replacing others
    for tokens in args.tokens:
        for name in args.variants:
            live = (model, corpus, args.layer, len(rows) // (args.context - 1))
            sae, info = train_saehook(rows, d, args.latents, args.k, tokens, VARIANTS[name], args.seed,
                                      args.matmul_dtype, live=live)
            r = {"arm": f"saehook {name}", "budget": tokens, "layer": args.layer, "n_latents": args.latents,
                 "k": args.k, **info, **evaluate_arm(model, sae, args.layer, windows, args.eval_windows, args.context,
                                 name in args.control_arms),
                 "seed": args.seed, "load": os.getloadavg()[0]}
            records.append(r)
            log(table([r]).splitlines()[-1])
            save(out, r)
        if args.peers:
            folder = train_sparsify(args, tokens)
            info = json.loads((folder / "bench_info.json").read_text())
            sae = saehook.load(info["sparsify_folder"])
            r = {"arm": "sparsify (Trainer, defaults)", "budget": tokens, "layer": args.layer,
                 "n_latents": args.latents, "k": args.k, **info,
                 **evaluate_arm(model, sae, args.layer, windows, args.eval_windows, args.context,
                                 "sparsify" in args.control_arms),
                 "seed": args.seed, "load": os.getloadavg()[0]}
            records.append(r)
            log(table([r]).splitlines()[-1])
            save(out, r)
    print(table(records))


if __name__ == "__main__":
    main()
