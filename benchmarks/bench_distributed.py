"""Distributed scaling: the same online training (SmolLM2 layer 8, 4096 latents) on 1 process and on 2
processes launched by torchrun (gloo, data parallel), with the machine's cores split between them.

    python benchmarks/bench_distributed.py [--tokens 40960]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

p = argparse.ArgumentParser()
p.add_argument("--tokens", type=int, default=40960)
p.add_argument("--latents", type=int, default=4096)
args = p.parse_args()
worker = Path(__file__).parent / "dist_worker.py"
cores = os.cpu_count() or 2
rows = {}
with tempfile.TemporaryDirectory() as tmp:
    for nproc in (1, 2):
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": str(max(1, cores // nproc))}
        res = Path(tmp) / f"n{nproc}.json"
        if nproc == 1:
            cmd = [sys.executable, str(worker), str(res), str(args.tokens), str(args.latents)]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   str(worker), str(res), str(args.tokens), str(args.latents)]
        subprocess.run(cmd, check=True, env=env, capture_output=True)
        rows[nproc] = json.loads(res.read_text())
print(f"\nonline training, SmolLM2 bf16 layer 8, n={args.latents}, k=32, {args.tokens} tokens, {cores} cores")
print("| processes | threads each | tokens/s | speed-up | final batch fvu |")
print("|---|---|---|---|---|")
for nproc, r in rows.items():
    tps = r["tokens"] / r["seconds"]
    print(f"| {nproc} | {max(1, cores // nproc)} | {tps:,.0f} | {tps / (rows[1]['tokens'] / rows[1]['seconds']):.2f}x "
          f"| {r['fvu']:.4f} |")
out = Path(__file__).parent / "results" / "distributed.json"
out.parent.mkdir(exist_ok=True)
out.write_text(json.dumps(rows, indent=2))
