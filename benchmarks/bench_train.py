"""Online training throughput on SmolLM2 (bf16 model, fp32 autoencoders), 2 CPU cores or whatever runs it.

Measures, on the same corpus windows:
  full       the model's whole forward (all 30 layers + lm_head)
  trunc@L    the forward stopped after layer L by saehook's early stop (no training)
  train@L    online training of one autoencoder at layer L (forward + buffer + optimizer steps)
  train x4   four layers trained from one pass, vs four truncated passes

Each measurement first runs ``--warmup`` batches untimed (for training: the autoencoder's initialisation
and its first optimizer steps, which allocate Adam's state), then times ``--batches`` batches: with the
default 16 x 128 windows and 8192 tokens per step, 16 batches are 4 whole optimizer steps per autoencoder.

    python benchmarks/bench_train.py [--latents 4096] [--batches 16] [--matmul-dtype bfloat16]
"""

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

import saehook  # noqa: E402
from saehook.training import TrainingSession  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--latents", type=int, default=4096)
p.add_argument("--k", type=int, default=32)
p.add_argument("--layer", type=int, default=20)
p.add_argument("--layers4", type=int, nargs=4, default=[8, 14, 20, 26])
p.add_argument("--batches", type=int, default=16, help="timed forward batches of 16 x 128 tokens per measurement")
p.add_argument("--rounds", type=int, default=3, help="timed rounds, every run once per round (median)")
p.add_argument("--warmup", type=int, default=8, help="untimed batches first (8 = two optimizer steps)")
p.add_argument("--matmul-dtype", default="bfloat16", choices=["float32", "bfloat16"],
               help="TrainConfig.matmul_dtype of the autoencoders' encoder matmul")
p.add_argument("--out", default="benchmarks/results/train.json")
args = p.parse_args()

model, tok = saehook.load_model(dtype=torch.bfloat16)
corpus = saehook.Corpus.from_source(None, tok, context=128)
batches = list(corpus.windows("train", batch_size=16, limit=args.warmup + args.batches))
timed_batches = batches[args.warmup:]
tokens = sum(b.numel() for b in timed_batches)
d = model.config.hidden_size


def warm(fn):
    for b in batches[:args.warmup]:
        fn(b)


def timed(fn):
    t = time.perf_counter()
    for b in timed_batches:
        fn(b)
    return tokens / (time.perf_counter() - t)


@torch.no_grad()
def full(b):
    model(b)


def truncated(layers):
    saes = {layer: saehook.TopKSAE(d, 8, 1) for layer in layers}

    @torch.no_grad()
    def run(b):
        with saehook.attach(model, saes, record=False) as hooked:
            hooked.run(b)  # stops right after the deepest hookpoint (what training does, minus training)
    return run


def training(layers):
    saes = {layer: saehook.TopKSAE(d, args.latents, args.k) for layer in layers}
    cfg = saehook.TrainConfig(batch_tokens=8192, shuffle_buffer=0, matmul_dtype=args.matmul_dtype,
                              init_samples=8192)  # the warm-up's first batch initialises, so it takes two steps
    with saehook.attach(model, saes, record=False) as hooked:
        session = TrainingSession(hooked, cfg)
    # attached only while its own batches run (the runs rotate), as the truncated runs are; the loop of train()

    def run(b):
        with torch.no_grad(), saehook.attach(model, saes, record=False) as hooked:
            hooked.run(b, skip_positions=cfg.skip_positions, visit=session.feed)
        t = time.perf_counter()
        steps = session.drain()
        stats["drain_s"] += time.perf_counter() - t
        stats["steps"] += steps
    stats = {"drain_s": 0.0, "steps": 0, "session": session}
    return run, stats


runs = {
    "full forward": full,
    f"truncated after layer {args.layer}": truncated([args.layer]),
    f"train layer {args.layer} (n={args.latents}, k={args.k})": (one := training([args.layer]))[0],
    f"truncated after layer {max(args.layers4)}": truncated([max(args.layers4)]),
    f"train layers {args.layers4} in one pass": training(args.layers4)[0],
}
for fn in runs.values():
    warm(fn)
one[1].update(drain_s=0.0, steps=0)
# Rounds in rotating order: a slow spell on a shared machine slows one round of every run, not one run.
per_round = {name: [] for name in runs}
names = list(runs)
for r in range(args.rounds):
    for name in names[r % len(names):] + names[:r % len(names)]:
        per_round[name].append(timed(runs[name]))
rows = {name: statistics.median(v) for name, v in per_round.items()}
trunc_name = f"truncated after layer {args.layer}"
one_name = f"train layer {args.layer} (n={args.latents}, k={args.k})"
overhead = statistics.median(t / x - 1 for t, x in zip(per_round[trunc_name], per_round[one_name]))

base = rows[f"truncated after layer {args.layer}"]
print(f"\nSmolLM2-135M bf16, {torch.get_num_threads()} threads, {tokens} tokens per measurement "
      f"(16 x 128 windows; training rows exclude BOS); autoencoders fp32 with {args.matmul_dtype} encoder matmul")
print("| run | tokens/s | vs full forward | cost vs truncated forward |")
print("|---|---|---|---|")
for name, tps in rows.items():
    print(f"| {name} | {tps:,.0f} | {tps / rows['full forward']:.2f}x | {base / tps - 1:+.0%} |")
four = rows[f"train layers {args.layers4} in one pass"]
print(f"\ntraining layer {args.layer} costs {overhead:+.1%} over the truncated forward (median of per-round ratios)")
sess = one[1]["session"]
last = next(iter(sess.last.values()), {"fvu": float("nan")})  # no step yet with few --batches
ms_step = 1e3 * one[1]["drain_s"] / max(1, one[1]["steps"])
print(f"the layer-{args.layer} autoencoder took {one[1]['steps']} timed optimizer steps of 8192 rows, {ms_step:.0f} ms "
      f"each (all steps: {sess.steps}, batch fvu {last['fvu']:.3f})")
print(f"four layers in one pass: {four:,.0f} tokens/s per layer-set; four separate truncated passes alone would "
      f"cost {4 / rows[f'truncated after layer {max(args.layers4)}'] * four:.2f}x the time of the single pass")
Path(args.out).parent.mkdir(parents=True, exist_ok=True)
result = {"tokens_per_s": rows, "per_round": per_round, "train_overhead": overhead, "ms_per_step": ms_step,
          "matmul_dtype": args.matmul_dtype, "threads": torch.get_num_threads()}
Path(args.out).write_text(json.dumps(result, indent=2))
