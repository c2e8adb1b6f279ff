"""Sweep n_latents and k on SmolLM2 layer 20, fit the paper's scaling law L(n, k), save a plot.

Activations are collected once (held in memory) and every autoencoder of the grid trains on the same
rows with SAETrainer; the loss is FVU on held-out rows.

    python recipes/scaling_sweep.py --tokens 300k --latents 512 1024 2048 4096 --ks 8 16 32 --out runs/sweep
"""

import argparse
import json
import math
from pathlib import Path

import saehook
from saehook.cli import parse_count

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--layer", type=int, default=20)
p.add_argument("--latents", type=parse_count, nargs="+", default=[512, 1024, 2048, 4096])
p.add_argument("--ks", type=int, nargs="+", default=[8, 16, 32])
p.add_argument("--tokens", type=parse_count, default=parse_count("300k"), help="training rows per autoencoder")
p.add_argument("--eval-tokens", type=parse_count, default=parse_count("20k"))
p.add_argument("--batch-tokens", type=parse_count, default=4096)
p.add_argument("--epochs", type=int, default=1)
p.add_argument("--out", default="runs/sweep")
args = p.parse_args()

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from saehook.scaling import fit_scaling_law  # noqa: E402
from saehook.training import collect_activations  # noqa: E402

out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
model, tok = saehook.load_model(dtype=torch.bfloat16)
corpus = saehook.Corpus.from_source(None, tok, context=128)
d = model.config.hidden_size
with saehook.attach(model, {args.layer: saehook.TopKSAE(d, 8, 1)}, record=False) as hooked:
    acts = collect_activations(hooked, corpus, args.tokens + args.eval_tokens, batch_size=16)[args.layer]
acts = acts[torch.randperm(len(acts), generator=torch.Generator().manual_seed(0))]  # mix windows
train, held_out = acts[: args.tokens], acts[args.tokens:]
print(f"collected {len(acts):,} activation rows of width {d} at layer {args.layer}")

results = []
for n in args.latents:
    for k in args.ks:
        torch.manual_seed(0)
        sae = saehook.TopKSAE(d, n, k)
        trainer = saehook.SAETrainer(sae, saehook.TrainConfig(batch_tokens=args.batch_tokens),
                                     total_tokens=args.epochs * len(train))
        for _ in range(args.epochs):
            for batch in train.split(args.batch_tokens):
                if len(batch) == args.batch_tokens:
                    trainer.step(batch)
        with torch.no_grad():
            fvu = float(saehook.fvu(held_out, sae.decode(sae.encode(held_out))))
        results.append({"n_latents": n, "k": k, "fvu": fvu})
        print(f"n={n:>6} k={k:>3}: held-out fvu {fvu:.4f}")

fit = fit_scaling_law([r["n_latents"] for r in results], [r["k"] for r in results], [r["fvu"] for r in results])
print("fit:", {name: round(v, 4) for name, v in fit.to_dict().items()})
(out / "sweep.json").write_text(json.dumps({"results": results, "fit": fit.to_dict()}, indent=2))

fig, ax = plt.subplots(figsize=(6, 4))
grid = torch.logspace(math.log10(min(args.latents)), math.log10(max(args.latents)), 50)
for k in args.ks:
    pts = [r for r in results if r["k"] == k]
    line = ax.plot([r["n_latents"] for r in pts], [r["fvu"] for r in pts], "o", label=f"k={k}")
    ax.plot(grid, [fit(float(n), k) for n in grid], "-", color=line[0].get_color())
ax.set(xscale="log", yscale="log", xlabel="n_latents", ylabel="held-out FVU",
       title=f"SmolLM2 layer {args.layer}: L(n, k) fit (rmse log {fit.rmse_log:.3f})")
ax.legend()
fig.tight_layout()
fig.savefig(out / "scaling_law.png", dpi=120)
print(f"saved {out / 'scaling_law.png'} and {out / 'sweep.json'}")
