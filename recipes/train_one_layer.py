"""Train one TopK autoencoder on the residual stream after layer 20 of SmolLM2, online.

    python recipes/train_one_layer.py --tokens 500k --latents 16384 --k 32 --out runs/one_layer
"""

import argparse

import saehook
from saehook.cli import parse_count

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--layer", type=int, default=20)
p.add_argument("--latents", type=parse_count, default=16384)
p.add_argument("--k", type=int, default=32)
p.add_argument("--tokens", type=parse_count, default=parse_count("500k"))
p.add_argument("--batch-tokens", type=parse_count, default=8192)
p.add_argument("--shuffle-buffer", type=parse_count, default=65536)
p.add_argument("--no-auxk", action="store_true")
p.add_argument("--out", default="runs/one_layer")
args = p.parse_args()

import torch  # noqa: E402

model, tok = saehook.load_model(dtype=torch.bfloat16)            # embedded SmolLM2-135M-Instruct
corpus = saehook.Corpus.from_source(None, tok, context=128)      # embedded BBC News, 5% held out
sae = saehook.TopKSAE(model.config.hidden_size, args.latents, args.k)
config = saehook.TrainConfig(batch_tokens=args.batch_tokens, shuffle_buffer=args.shuffle_buffer,
                             auxk=not args.no_auxk)

with saehook.attach(model, {args.layer: sae}) as hooked:
    report = hooked.train(corpus, tokens=args.tokens, config=config, out=args.out, batch_size=16)

m = report[args.layer]
print(f"{report.tokens:,} tokens, {report.tokens_per_s:,.0f} tokens/s: fvu {m['fvu']:.4f}, "
      f"l0 {m['l0']:.1f}, dead {m['dead_frac']:.2%}; saved to {args.out}")
