"""Launched by tests/test_distributed.py under torchrun (or run plainly as the 1-process reference).

    torchrun --standalone --nproc_per_node 2 tests/scripts/dist_train.py OUT --shard data
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent.parent))
from conftest import tiny_model  # noqa: E402

import saehook  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("out")
p.add_argument("--shard", default="data")
p.add_argument("--layers", type=int, nargs="+", default=[1])
p.add_argument("--tokens", type=int, default=512 * 8)
p.add_argument("--batch-tokens", type=int, default=512)
p.add_argument("--die-after", type=int, default=0, help="rank 1 exits abruptly after this many batches")
p.add_argument("--resume", action="store_true")
p.add_argument("--layernorm", action="store_true", help="train LayerNormTopKSAE autoencoders")
p.add_argument("--meta", action="store_true", help="attach autoencoders on the meta device (shard latents)")
p.add_argument("--variants", action="store_true", help="one of each variant instead (--layers ignored): BatchTopK at "
               "layer 0, Matryoshka at 1, JumpReLU at 2 (and with target_l0 at 3), a skip-transcoder of layer 1's MLP, "
               "a transcoder of layer 3's")
args = p.parse_args()
rank = int(os.environ.get("RANK", "0"))

model = tiny_model("llama", layers=4)
g = torch.Generator().manual_seed(0)
batches = [torch.randint(3, 128, (8, 33), generator=g) for _ in range(200)]  # 8 x 32 = 256 rows each


def source():
    for i, b in enumerate(batches):
        if args.die_after and rank == 1 and i >= args.die_after * 2:  # rank 1 reads every other batch
            os._exit(17)
        yield b


torch.manual_seed(0)
cls = saehook.LayerNormTopKSAE if args.layernorm else saehook.TopKSAE
saes = {layer: cls(32, 128, 4, device="meta" if args.meta else None) for layer in args.layers}
if args.variants:
    from saehook.transcoder import SkipTranscoder, Transcoder

    saes = {0: saehook.BatchTopKSAE(32, 128, 4), 1: saehook.MatryoshkaBatchTopKSAE(32, 128, 4),
            2: saehook.JumpReLUSAE(32, 128, 16, threshold_init=0.5), "model.layers.1.mlp": SkipTranscoder(32, 128, 4),
            "model.layers.3.mlp": Transcoder(32, 128, 4), 3: saehook.JumpReLUSAE(32, 128, 16, target_l0=4)}
init = {layer: sae.W_enc.clone() for layer, sae in saes.items()}
# A constant rate: the resume test extends a shorter run, which equals the long run only when the schedule does
# not depend on the run's length (a decaying one is re-planned from the new length on resume). The scale and
# b_dec come from the first 1024 rows: two global batches of 512, i.e. two batches of 256 per rank.
cfg = saehook.TrainConfig(batch_tokens=args.batch_tokens, shuffle_buffer=0, checkpoint_every=2, log_every=1,
                          lr_schedule="constant", warmup_fraction=0.0, init_samples=1024)
with saehook.attach(model, saes) as hooked:
    report = hooked.train(source(), tokens=args.tokens, config=cfg, out=args.out, shard=args.shard,
                          progress=False, resume=args.resume)
    names = {k: saehook.hookpoints.hookpoint_dirname(hp) for k, hp in hooked.hookpoints.items()}
for layer, sae in saes.items():
    if args.meta:  # no weights here: the trained autoencoder is in args.out
        continue
    sae.save(Path(args.out) / f"final.rank{rank}" / names[layer])
changed = {names[k]: args.meta or not torch.equal(saes[k].W_enc, init[k]) for k in saes}
summary = {"rank": rank, "tokens": report.tokens, "steps": report.steps,
           "trained": sorted(names[k] for k in report.metrics), "changed": changed}
(Path(args.out) / f"summary.rank{rank}.json").write_text(json.dumps(summary))
