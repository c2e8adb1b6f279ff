"""Worker for bench_distributed.py: online training on SmolLM2 layer 8, data parallel over the ranks."""

import json
import os
import sys
import time

import torch

import saehook

out, tokens, latents = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rank = int(os.environ.get("RANK", "0"))
model, tok = saehook.load_model(dtype=torch.bfloat16)
corpus = saehook.Corpus.from_source(None, tok, context=128)
torch.manual_seed(0)
sae = saehook.TopKSAE(model.config.hidden_size, latents, 32)
cfg = saehook.TrainConfig(batch_tokens=4096, shuffle_buffer=0, matmul_dtype="bfloat16", checkpoint_every=10**6,
                          init_samples=4096)  # initialised from the first global batch: every timed batch steps
with saehook.attach(model, {8: sae}) as hooked:
    hooked.train(corpus, tokens=4096, config=cfg, batch_size=8, progress=False)  # warm-up, not timed
    t = time.perf_counter()
    report = hooked.train(corpus, tokens=tokens, config=cfg, batch_size=8, progress=False)
    elapsed = time.perf_counter() - t
if rank == 0:
    with open(out, "w") as f:
        json.dump({"tokens": report.tokens, "seconds": elapsed, "fvu": report[8]["fvu"]}, f)
