"""The sparsify arm of ``bench_quality.py``: eai-sparsify's own ``Trainer`` with its defaults.

Runs in the benchmark-only ``.venv-bench`` (eai-sparsify 1.3.3). sparsify's ``Trainer`` reads activations
through a forward hook on the module named by its hookpoint. To give it exactly the rows saehook's arms
train on (the cached layer output of the same windows, BOS position excluded, the same number of rows),
the "model" handed to it is a row server: a module whose ``layers.<L>`` returns
``cache[input_ids]``, the cached activation rows indexed by the dataset's "token ids". Everything
sparsify does with those rows is its own code and defaults: signum with schedule-free, lr
``5e-3 / sqrt(n / 2^14)``, 32 sequences per step (here 32 x 127 = 4,064 rows, as 32 windows of 128
tokens without BOS), b_dec from the first batch's mean, no AuxK, decoder rows kept unit-norm.

    .venv-bench/bin/python benchmarks/quality_sparsify.py --cache runs/quality/cache/X.safetensors \\
        --tokens 1000000 --latents 4096 --k 32 --out runs/quality/sp
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from torch import nn


class RowServer(nn.Module):
    """``layers[L](ids) -> rows[ids]``: what sparsify's hook sees as the layer's output ``[B, T, d]``."""

    def __init__(self, rows: torch.Tensor, layer: int):
        super().__init__()
        self.rows = rows
        self.layers = nn.ModuleList([nn.Identity() for _ in range(layer)] + [_Lookup(rows)])
        self.layer = layer

    @property
    def base_model(self):  # sparsify resolves hookpoints under model.base_model
        return self

    @property
    def device(self):
        return torch.device("cpu")

    @property
    def dummy_inputs(self):
        return {"input_ids": torch.zeros(1, 4, dtype=torch.long)}

    def forward(self, input_ids=None, **_):
        return self.layers[self.layer](input_ids)


class _Lookup(nn.Module):
    def __init__(self, rows):
        super().__init__()
        self.rows = rows

    def forward(self, ids):
        return self.rows[ids].float()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", required=True, help="safetensors file with 'rows' [N, d] (from bench_quality.py)")
    p.add_argument("--tokens", type=int, required=True)
    p.add_argument("--latents", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--layer", type=int, default=20)
    p.add_argument("--seq", type=int, default=127, help="rows per 'sequence' (a 128-token window without BOS)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args()

    from datasets import Dataset
    from safetensors.torch import load_file
    from sparsify import SaeConfig, TrainConfig, Trainer

    torch.set_num_threads(os.cpu_count() or 1)
    rows = load_file(args.cache)["rows"]
    n_seq = args.tokens // args.seq
    order, epoch = [], 0
    while len(order) * len(rows) < n_seq * args.seq:  # the same permutations as saehook.buffer.epoch_batches
        order.append(torch.randperm(len(rows), generator=torch.Generator().manual_seed(args.seed + epoch)))
        epoch += 1
    ids = torch.cat(order)[: n_seq * args.seq].reshape(n_seq, args.seq)
    ds = Dataset.from_dict({"input_ids": ids.tolist()}).with_format("torch")
    out = Path(args.out)
    cfg = TrainConfig(SaeConfig(num_latents=args.latents, k=args.k), hookpoints=[f"layers.{args.layer}"],
                      log_to_wandb=False, save_dir=str(out.parent), run_name=out.name, save_every=10**9)
    model = RowServer(rows, args.layer)
    t0 = time.perf_counter()
    trainer = Trainer(cfg, ds, model)
    trainer.fit()
    secs = time.perf_counter() - t0
    found = [d.parent for d in out.rglob("cfg.json") if (d.parent / "sae.safetensors").is_file()]
    if not found:
        raise SystemExit(f"sparsify wrote no autoencoder under {out}")
    info = {"train_s": secs, "steps": n_seq // cfg.batch_size, "batch_tokens": cfg.batch_size * args.seq,
            "optimizer": cfg.optimizer, "sparsify_folder": str(found[0]), "sparsify_version": _version()}
    (out / "bench_info.json").write_text(json.dumps(info, indent=2))
    print(json.dumps(info))


def _version() -> str:
    from importlib.metadata import version

    return version("eai-sparsify")


if __name__ == "__main__":
    main()
