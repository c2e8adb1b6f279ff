"""Run under torchrun: a few steps of latent-sharded training (ShardedTrainer) on fixed rows, and the same steps
of the one-process SAETrainer on the same rows on rank 0; writes what the test compares.

    torchrun --nproc_per_node W latent_shard_worker.py OUT --shards S [S ...] [--steps N] [--dtype float64]

For each S (one layout after the other, in the same process group), rank 0 writes OUT/S<S>/result.json: per
step, the sharded and the reference loss / fvu / auxk_fvu, the selected indices' agreement, and the largest
difference of the final weights; and OUT/S<S>/sharded (the sharded save, for TopKSAE.load) and
OUT/S<S>/reference (the one-process autoencoder).
"""

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist

from saehook import TopKSAE
from saehook import distributed as D
from saehook.config import TrainConfig
from saehook.latent_shard import ShardedTopKSAE, make_layout
from saehook.latent_trainer import ShardedTrainer
from saehook.trainer import SAETrainer

p = argparse.ArgumentParser()
p.add_argument("out", type=Path)
p.add_argument("--shards", type=int, nargs="+", required=True)
p.add_argument("--steps", type=int, default=6)
p.add_argument("--dtype", default="float64")
p.add_argument("--d", type=int, default=16)
p.add_argument("--n", type=int, default=64)
p.add_argument("--k", type=int, default=4)
p.add_argument("--rows", type=int, default=64, help="rows per step, all replicas together")
p.add_argument("--multi-topk", action="store_true")
p.add_argument("--grad-clip", type=float, default=None)
a = p.parse_args()

torch.set_num_threads(1)
dtype = getattr(torch, a.dtype)
D.setup()


def run(shards: int, out: Path) -> None:
    layout = make_layout(shards)
    R = layout.replicas

    # structured rows: sparse sums of random directions, plus noise; identical on every rank
    g = torch.Generator().manual_seed(0)
    dirs = torch.randn(3 * a.n, a.d, generator=g, dtype=dtype)
    rows = []
    for _ in range(a.steps):
        coef = torch.rand(a.rows, 3 * a.n, generator=g, dtype=dtype) * (torch.rand(a.rows, 3 * a.n, generator=g) < 0.03)
        rows.append(coef @ dirs + 0.05 * torch.randn(a.rows, a.d, generator=g, dtype=dtype))

    # dead latents appear after 2 steps of 64 rows: AuxK runs from step 3 on
    cfg = TrainConfig(batch_tokens=a.rows, lr=3e-3, dead_tokens=2 * a.rows, dead_firings=0, grad_clip=a.grad_clip,
                      warmup_fraction=0.0)
    torch.manual_seed(1)
    full = TopKSAE(a.d, a.n, a.k, multi_topk=a.multi_topk, dtype=dtype)
    sharded = ShardedTopKSAE.from_full(full, layout)
    trainer = ShardedTrainer(sharded, cfg, total_tokens=a.rows * a.steps, name="sharded")
    B = a.rows // R
    mine = []
    for step_rows in rows:  # replica r trains on its slice of each step's rows
        x = step_rows[layout.replica * B:(layout.replica + 1) * B]
        m = trainer.step(x)
        with torch.no_grad():
            codes = sharded(x).codes
        mine.append({"metrics": m, "indices": codes.indices.tolist(), "values": codes.values.tolist()})

    out.mkdir(parents=True, exist_ok=True)
    sharded.metadata = {"test": "latent_shard_worker"}
    sharded.save(out / "sharded")
    gathered = sharded.gather()
    if layout.main:
        ref = SAETrainer(full, cfg, total_tokens=a.rows * a.steps, name="reference")
        result = {"world": layout.world, "shards": layout.shards, "steps": []}
        for step_rows, got in zip(rows, mine):
            m = ref.step(step_rows)
            with torch.no_grad():
                codes = full(step_rows[:B]).codes
            same = [(set(i for i, v in zip(gi, gv) if v > 0) == set(i for i, v in zip(ri, rv) if v > 0))
                    for gi, gv, ri, rv in zip(got["indices"], got["values"], codes.indices.tolist(),
                                              codes.values.tolist())]
            result["steps"].append({"sharded": got["metrics"], "reference": m, "rows_same_selection": sum(same),
                                    "rows": len(same)})
        result["max_weight_diff"] = {n: float((gathered.state_dict()[n] - t).abs().max())
                                     for n, t in full.state_dict().items()}
        full.save(out / "reference")
        (out / "result.json").write_text(json.dumps(result, indent=1))


for S in a.shards:
    run(S, a.out / f"S{S}")
D.barrier()
dist.destroy_process_group()
