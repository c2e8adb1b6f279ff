"""Dictionary variants at equal budget on one hookpoint: TopK, BatchTopK, Matryoshka BatchTopK and JumpReLU at three
sparsities each, trained in one sweep from the same rows, measured by one evaluator; plus an MLP transcoder.

Protocol (the same for every member):

- rows: layer ``--layer``'s output on the embedded corpus's training windows (first position excluded), from
  ``--activations`` (a safetensors file with ``rows [N, d]``, e.g. bench_quality's cache) or collected here;
  ``--tokens`` rows per member (a budget beyond the rows repeats them in a fresh order);
- training: ``saehook.sweep.Sweep`` (one shuffle buffer, every batch a step of every member), ``TrainConfig()``'s
  defaults for the budget, ``e2e_fraction=0`` (an equal, purely local recipe for all);
- members: ``TopKSAE``, ``BatchTopKSAE`` and ``MatryoshkaBatchTopKSAE`` at each k of ``--ks``; ``JumpReLUSAE`` at
  each coefficient of ``--jumprelu-coefs`` (its L0 is whatever the penalty gives; the cap ``--jumprelu-cap``),
  and at each target L0 of ``--jumprelu-target-l0`` (thresholds set from the first sample for that L0, then the
  ``(L0 / target - 1)^2`` penalty);
- evaluation: ``saehook.evaluate`` on the first ``--eval-windows`` held-out windows, the member spliced at the
  hookpoint: held-out FVU, L0 and dead fraction, delta LM loss and KL;
- transcoder: ``Transcoder(d, n, k)`` at ``model.layers.<layer>.mlp`` trained online with ``hooked.train`` for
  ``--transcoder-tokens`` (0 skips it), its FVU on the MLP's output and delta LM loss.

Writes ``<out>/members/<name>`` (each trained member), ``<out>/results.json``, ``<out>/table.md`` and
``<out>/frontier.png`` (FVU and delta LM loss against L0).

    python recipes/compare_variants.py --activations runs/quality/cache/smollm2-float32-L20-ctx128-512000.safetensors \\
        --tokens 1M --out runs/variants
"""

import argparse
import json
import time
from pathlib import Path

import torch

import saehook
from saehook.cli import parse_count
from saehook.sweep import Sweep
from saehook.transcoder import Transcoder

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--layer", type=int, default=20)
p.add_argument("--latents", type=parse_count, default=4096)
p.add_argument("--ks", type=int, nargs="+", default=[16, 32, 64])
p.add_argument("--jumprelu-coefs", type=float, nargs="+", default=[3e-3, 1e-2, 3e-2],
               help="JumpReLU sparsity coefficients (three sparsities)")
p.add_argument("--jumprelu-cap", type=int, default=256, help="JumpReLU's cap of active latents per row")
p.add_argument("--jumprelu-threshold-init", type=float, nargs="+", default=[2.0],
               help="JumpReLU's initial threshold (normalised units, where pre-activations start ~N(0, 1): 2.0 lets "
                    "about 2%% of the latents through at init; the default 0.024 lets half through, and log-space "
                    "thresholds move only a few e-folds in a short run); several values: a member per coefficient "
                    "and initial threshold")
p.add_argument("--jumprelu-target-l0", type=float, nargs="*", default=[],
               help="JumpReLU members trained for these mean L0s (JumpReLUSAE(target_l0=...): thresholds from the "
                    "first sample, then dictionary_learning's (L0 / target - 1)^2 penalty); none by default")
p.add_argument("--jumprelu-target-coef", type=float, default=None,
               help="sparsity_coef of the target-L0 members (default: JumpReLUSAE's, 1.0)")
p.add_argument("--jumprelu-threshold-lr-scale", type=float, default=None,
               help="every JumpReLU member's threshold learning rate over the trainer's (default: JumpReLUSAE's, 1.0, "
                    "or 10 with a target L0; 30 lets the coefficients set L0 within a few hundred steps)")
p.add_argument("--tokens", type=parse_count, default=parse_count("1M"), help="training rows per member")
p.add_argument("--activations", type=Path, default=None, help="safetensors file with rows [N, d] of the layer")
p.add_argument("--context", type=int, default=128)
p.add_argument("--eval-windows", type=int, default=64)
p.add_argument("--transcoder-tokens", type=parse_count, default=parse_count("250k"))
p.add_argument("--only", nargs="*", default=None, help="member names to train (default: all)")
p.add_argument("--out", type=Path, default=Path("runs/variants"))
args = p.parse_args()


def log(msg: str) -> None:
    print(f"[compare_variants {time.strftime('%H:%M:%S')}] {msg}", flush=True)


torch.manual_seed(0)
model, tok = saehook.load_model(dtype=torch.float32)
corpus = saehook.Corpus.from_source(None, tok, context=args.context)
d, n, L = model.config.hidden_size, args.latents, args.layer
from saehook.runs import prepare_run  # noqa: E402

prepare_run(args.out)
args.out.mkdir(parents=True, exist_ok=True)

if args.activations is not None:
    from safetensors.torch import load_file

    rows = load_file(str(args.activations))["rows"]
else:
    from saehook.training import collect_activations

    log(f"collecting {args.tokens:,} rows of layer {L}")
    with saehook.attach(model, {L: saehook.TopKSAE(d, 8, 1)}, record=False) as hooked:
        rows = collect_activations(hooked, corpus.windows("train", batch_size=16), args.tokens, batch_size=16)[L]
rows = rows.float()
log(f"{len(rows):,} rows of width {rows.shape[1]}")

members = {}
for k in args.ks:
    members[f"topk-k{k}"] = saehook.TopKSAE(d, n, k)
    members[f"batchtopk-k{k}"] = saehook.BatchTopKSAE(d, n, k)
    members[f"matryoshka-k{k}"] = saehook.MatryoshkaBatchTopKSAE(d, n, k)
for c in args.jumprelu_coefs:
    for t in args.jumprelu_threshold_init:
        name = f"jumprelu-{c:g}" + (f"-init{t:g}" if len(args.jumprelu_threshold_init) > 1 else "")
        members[name] = saehook.JumpReLUSAE(d, n, args.jumprelu_cap, sparsity_coef=c, threshold_init=t,
                                            threshold_lr_scale=args.jumprelu_threshold_lr_scale)
for t in args.jumprelu_target_l0:
    members[f"jumprelu-t{t:g}"] = saehook.JumpReLUSAE(d, n, args.jumprelu_cap, target_l0=t,
                                                      sparsity_coef=args.jumprelu_target_coef,
                                                      threshold_lr_scale=args.jumprelu_threshold_lr_scale)
if args.only:
    members = {name: sae for name, sae in members.items() if name in args.only}
cfg = saehook.TrainConfig(e2e_fraction=0)
sweep = Sweep(members, cfg, total_tokens=args.tokens)
log(f"training {len(members)} members on {args.tokens:,} rows each, {sweep.batch_tokens} per step")
t0, fed, g = time.perf_counter(), 0, torch.Generator().manual_seed(0)
while sweep.tokens < args.tokens:
    order = torch.randperm(len(rows), generator=g) if fed else torch.arange(len(rows))  # a fresh order per epoch
    for chunk in order.split(sweep.batch_tokens):  # a batch at a time: no member trains past the budget
        sweep.feed(rows[chunk])
        fed += len(chunk)
        sweep.drain()
        if sweep.tokens >= args.tokens:
            break
    log(f"  {sweep.tokens:,} rows trained, {time.perf_counter() - t0:.0f}s")
train_s = time.perf_counter() - t0
for name, tr in sweep.trainers.items():  # every member kept: later metrics (saehook.bench) read them
    tr.sae.save(args.out / "members" / name)

windows, count = [], 0
for ids in corpus.windows("test", batch_size=8):
    windows.append(ids)
    count += len(ids)
    if count >= args.eval_windows:
        break
results = []
for name, tr in sweep.trainers.items():
    rep = saehook.evaluate(model, {L: tr.sae}, windows, tokens=args.eval_windows * (args.context - 1),
                           ablations=False, control=False)[L]
    family = name.split("-")[0]
    results.append({"member": name, "family": family, "class": type(tr.sae).__name__, "k": tr.sae.k,
                    "train_s_total": train_s, **{key: rep[key] for key in
                                                 ("fvu", "l0", "dead_frac", "delta_lm_loss", "kl", "tokens")}})
    log(f"{name}: fvu {rep['fvu']:.4f}, l0 {rep['l0']:.1f}, delta {rep['delta_lm_loss']:.3f}")

if args.transcoder_tokens:
    mlp = f"model.layers.{L}.mlp"
    tc = Transcoder(d, n, 32)
    log(f"transcoder at {mlp}: {args.transcoder_tokens:,} tokens online")
    t1 = time.perf_counter()
    with saehook.attach(model, {mlp: tc}) as hooked:
        hooked.train(corpus, tokens=args.transcoder_tokens, config=saehook.TrainConfig(), out=args.out / "transcoder",
                     batch_size=16, progress=False)
    rep = saehook.evaluate(model, {mlp: tc}, windows, tokens=args.eval_windows * (args.context - 1),
                           ablations=False, control=False)[mlp]
    results.append({"member": "transcoder-k32", "family": "transcoder", "class": "Transcoder", "k": 32,
                    "train_s_total": time.perf_counter() - t1, "hookpoint": mlp,
                    **{key: rep[key] for key in ("fvu", "l0", "dead_frac", "delta_lm_loss", "kl", "tokens")}})
    log(f"transcoder: fvu (MLP output) {rep['fvu']:.4f}, delta {rep['delta_lm_loss']:.3f}")

info = {"layer": L, "latents": n, "tokens": args.tokens, "batch_tokens": sweep.batch_tokens, "train_s": train_s,
        "transcoder_tokens": args.transcoder_tokens, "results": results}
(args.out / "results.json").write_text(json.dumps(info, indent=1))
lines = ["| member | L0 | FVU | dead | delta LM loss | KL |", "|---|---|---|---|---|---|"]
lines += [f"| {r['member']} | {r['l0']:.1f} | {r['fvu']:.4f} | {r['dead_frac']:.1%} | {r['delta_lm_loss']:.3f} | "
          f"{r['kl']:.3f} |" for r in results]
(args.out / "table.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

fig, axes = plt.subplots(1, 2, figsize=(10, 4))
for family in dict.fromkeys(r["family"] for r in results if r["family"] != "transcoder"):
    rs = sorted((r for r in results if r["family"] == family), key=lambda r: r["l0"])
    for ax, key in zip(axes, ("fvu", "delta_lm_loss")):
        ax.plot([r["l0"] for r in rs], [r[key] for r in rs], "o-", label=family)
for ax, key in zip(axes, ("held-out FVU", "delta LM loss (nats)")):
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("L0 (active latents per token)")
    ax.set_ylabel(key)
    ax.legend()
fig.suptitle(f"SmolLM2-135M layer {L}, n = {n}, {args.tokens:,} tokens per dictionary")
fig.tight_layout()
fig.savefig(args.out / "frontier.png", dpi=120)
log(f"wrote {args.out}/results.json, table.md, frontier.png")
