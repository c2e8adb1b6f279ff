"""Online training throughput on SmolLM2 (bf16 model, fp32 autoencoders), 2 CPU cores or whatever runs it.

Measures, on the same corpus windows:
  full       the model's whole forward (all 30 layers + lm_head)
  trunc@L    the forward stopped after layer L by saehook's early stop (no training)
  train@L    online training of one autoencoder at layer L (forward + buffer + optimizer steps)
  train x4   four layers trained from one pass, vs four truncated passes

    python benchmarks/bench_train.py [--latents 4096] [--batches 6]
"""

import argparse
import contextlib
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

import saehook  # noqa: E402
from saehook.training import StopForward, TrainingSession  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--latents", type=int, default=4096)
p.add_argument("--k", type=int, default=32)
p.add_argument("--layer", type=int, default=20)
p.add_argument("--layers4", type=int, nargs=4, default=[8, 14, 20, 26])
p.add_argument("--batches", type=int, default=6, help="forward batches of 16 x 128 tokens per measurement")
p.add_argument("--out", default="benchmarks/results/train.json")
args = p.parse_args()

model, tok = saehook.load_model(dtype=torch.bfloat16)
corpus = saehook.Corpus.from_source(None, tok, context=128)
batches = list(corpus.windows("train", batch_size=16, limit=args.batches + 1))
tokens = sum(b.numel() for b in batches[1:])
d = model.config.hidden_size


def timed(fn):
    fn(batches[0])  # warm-up
    t = time.perf_counter()
    for b in batches[1:]:
        fn(b)
    return tokens / (time.perf_counter() - t)


@torch.no_grad()
def full(b):
    model(b)


class Stopper:
    """A tap that only stops the pass once every hookpoint was reached (what training does, minus training)."""

    def __init__(self, n):
        self.n, self.seen = n, set()

    def __call__(self, key, hp, x):
        self.seen.add(key)
        if len(self.seen) == self.n:
            self.seen = set()
            raise StopForward


def truncated(layers):
    saes = {layer: saehook.TopKSAE(d, 8, 1) for layer in layers}

    @torch.no_grad()
    def run(b):
        with saehook.attach(model, saes, record=False) as hooked:
            hooked._taps.append(Stopper(len(saes)))
            with contextlib.suppress(StopForward):
                model(b)
    return run


def training(layers):
    saes = {layer: saehook.TopKSAE(d, args.latents, args.k) for layer in layers}
    cfg = saehook.TrainConfig(batch_tokens=8192, shuffle_buffer=0)
    hooked = saehook.attach(model, saes, record=False)
    session = TrainingSession(hooked, cfg, stop_early=True)
    hooked._taps.append(session.tap)

    def run(b):
        session.seen = set()
        with torch.no_grad(), contextlib.suppress(StopForward):
            model(b)
        session.drain()
    return run, hooked


rows = {}
rows["full forward"] = timed(full)
rows[f"truncated after layer {args.layer}"] = timed(truncated([args.layer]))
fn, h = training([args.layer])
rows[f"train layer {args.layer} (n={args.latents}, k={args.k})"] = timed(fn)
h.detach()
rows[f"truncated after layer {max(args.layers4)}"] = timed(truncated([max(args.layers4)]))
fn, h = training(args.layers4)
rows[f"train layers {args.layers4} in one pass"] = timed(fn)
h.detach()

base = rows[f"truncated after layer {args.layer}"]
print(f"\nSmolLM2-135M bf16, {torch.get_num_threads()} threads, {tokens} tokens per measurement "
      f"(16 x 128 windows; training rows exclude BOS)")
print("| run | tokens/s | vs full forward | cost vs truncated forward |")
print("|---|---|---|---|")
for name, tps in rows.items():
    print(f"| {name} | {tps:,.0f} | {tps / rows['full forward']:.2f}x | {base / tps - 1:+.0%} |")
four = rows[f"train layers {args.layers4} in one pass"]
print(f"\nfour layers in one pass: {four:,.0f} tokens/s per layer-set; four separate truncated passes alone would "
      f"cost {4 / rows[f'truncated after layer {max(args.layers4)}'] * four:.2f}x the time of the single pass")
Path(args.out).parent.mkdir(parents=True, exist_ok=True)
Path(args.out).write_text(json.dumps({"tokens_per_s": rows, "threads": torch.get_num_threads()}, indent=2))
