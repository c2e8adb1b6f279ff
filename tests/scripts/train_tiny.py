"""Run used by test_training's kill test: trains a tiny Llama with a checkpoint every step."""

import sys

import torch

sys.path.insert(0, sys.argv[2])
from conftest import tiny_model  # noqa: E402

import saehook  # noqa: E402

out, resume = sys.argv[1], len(sys.argv) > 3
m = tiny_model("llama")
g = torch.Generator().manual_seed(0)
src = [torch.randint(3, 128, (8, 32), generator=g) for _ in range(4000)]
cfg = saehook.TrainConfig(batch_tokens=256, shuffle_buffer=512, checkpoint_every=1)
with saehook.attach(m, {1: saehook.TopKSAE(32, 256, 4)}) as h:
    h.train(src, tokens=256 * 3000, config=cfg, out=out, resume=resume, progress=False)
