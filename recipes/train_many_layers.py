"""Train autoencoders at four layers of SmolLM2 from ONE forward pass per batch.

The pass stops after the deepest hooked layer, and every layer's activations feed its own autoencoder.

    python recipes/train_many_layers.py --layers 8 14 20 26 --tokens 200k --out runs/many
"""

import argparse

import saehook
from saehook.cli import parse_count

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--layers", type=int, nargs="+", default=[8, 14, 20, 26])
p.add_argument("--latents", type=parse_count, default=4096)
p.add_argument("--k", type=int, default=32)
p.add_argument("--tokens", type=parse_count, default=parse_count("200k"))
p.add_argument("--batch-tokens", type=parse_count, default=8192)
p.add_argument("--shuffle-buffer", type=parse_count, default=65536)
p.add_argument("--out", default="runs/many")
args = p.parse_args()

import torch  # noqa: E402

model, tok = saehook.load_model(dtype=torch.bfloat16)
corpus = saehook.Corpus.from_source(None, tok, context=128)
d = model.config.hidden_size
saes = {layer: saehook.TopKSAE(d, args.latents, args.k) for layer in args.layers}
config = saehook.TrainConfig(batch_tokens=args.batch_tokens, shuffle_buffer=args.shuffle_buffer)

with saehook.attach(model, saes) as hooked:
    report = hooked.train(corpus, tokens=args.tokens, config=config, out=args.out, batch_size=16)

print(f"{report.tokens:,} tokens per layer in {report.seconds:.0f}s")
for layer in args.layers:
    m = report[layer]
    print(f"layer {layer:>2}: fvu {m['fvu']:.4f}  l0 {m['l0']:.1f}  dead {m['dead_frac']:.2%}")
