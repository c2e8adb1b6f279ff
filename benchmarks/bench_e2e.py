"""Cost of end-to-end training (saehook.e2e) on SmolLM2, against the usual online step.

Measures, on the same batch of corpus windows (default 8 x 128 tokens), one autoencoder at layer 20:
  full forward     the model's whole forward under no_grad (what the KL step adds once)
  e2e step (kl)    clean forward + spliced forward with autograd + backward to the autoencoder + Adam
  e2e step (ce)    the same without the clean forward
  online training  ``hooked.train`` the usual way (forward stopped after layer 20, shuffle buffer,
                   8192 rows per step), in ms per model batch of the same size

Each e2e measurement runs one untimed step first (initialisation, Adam's state), then ``--reps`` timed
steps; the median is reported. Writes benchmarks/results/e2e.json.

    python benchmarks/bench_e2e.py [--latents 4096] [--layer 20] [--batch-size 8] [--reps 3] [--dtype auto]
"""

import argparse
import functools
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

import saehook  # noqa: E402
from saehook.e2e import e2e_step  # noqa: E402


def timed(fn, reps: int) -> float:
    """Median wall time of ``fn()`` over ``reps`` calls, in ms."""
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--latents", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--layer", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--reps", type=int, default=3)
    # NOTE (lead engineer): this machine's CPU has no AVX512-BF16: bf16 matmuls are emulated, ~60x slower than
    # float32 (saehook.models.fast_bf16). "auto" picks bf16 only where it is native.
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--matmul-dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    args = p.parse_args()

    from saehook.models import auto_dtype

    args.dtype, args.matmul_dtype = auto_dtype(args.dtype), auto_dtype(args.matmul_dtype)
    model, tok = saehook.load_model(dtype=getattr(torch, args.dtype))
    corpus = saehook.Corpus.from_source(None, tok)
    batch = {"input_ids": next(iter(corpus.windows("train", batch_size=args.batch_size)))}
    rows = batch["input_ids"].numel() - batch["input_ids"].shape[0]  # the first position is skipped
    d = model.config.hidden_size
    res: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "torch": torch.__version__,
                 "model_dtype": args.dtype, "latents": args.latents, "k": args.k, "layer": args.layer,
                 "batch": list(batch["input_ids"].shape), "rows_per_batch": rows}
    with torch.no_grad():
        model(**batch)
        res["full_forward_ms"] = timed(lambda: model(**batch), args.reps)
    for loss in ("kl", "ce"):
        torch.manual_seed(0)
        sae = saehook.TopKSAE(d, args.latents, args.k)
        cfg = saehook.TrainConfig(e2e_fraction=1.0, e2e_loss=loss, matmul_dtype=args.matmul_dtype)
        with saehook.attach(model, {args.layer: sae}, record=False) as hooked:
            tr = saehook.SAETrainer(sae, cfg, total_tokens=1_000_000, name=str(args.layer))
            step = functools.partial(e2e_step, hooked, {args.layer: tr}, batch, cfg)
            step()
            res[f"e2e_{loss}_ms"] = timed(step, args.reps)
    torch.manual_seed(0)
    sae = saehook.TopKSAE(d, args.latents, args.k)
    cfg = saehook.TrainConfig(batch_tokens=8192, shuffle_buffer=8192, matmul_dtype=args.matmul_dtype,
                              init_samples=8192)  # the scale of one batch, as timed before init_samples counted
    with saehook.attach(model, {args.layer: sae}) as hooked:
        report = hooked.train(corpus, tokens=4 * 8192, config=cfg, batch_size=args.batch_size, progress=False)
    res["online_ms_per_batch"] = rows / report.tokens_per_s * 1e3
    for key, v in res.items():
        print(f"{key:>22}: {round(v, 1) if isinstance(v, float) else v}")
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    (out / "e2e.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
