"""Command line: ``saehook train``, ``saehook eval``, ``saehook dashboard`` and ``saehook demo`` (the main job
on the embedded model and corpus)."""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from pathlib import Path

from .config import TrainConfig
from .dataclass_args import add_dataclass_args, dataclass_from_args, parse_count

log = logging.getLogger("saehook")

EVAL_TOKENS = "3k"
"""``saehook eval``'s default: about a minute on 2 idle CPU cores for SmolLM2 and one hookpoint, every metric on
(4,064 tokens took 152 s of CPU time; docs/quickstart.md has the measurement and the machine's load)."""

USAGE_ERRORS = (ValueError, TypeError, KeyError, FileNotFoundError, FileExistsError, NotADirectoryError,
                IsADirectoryError)
"""Exceptions that mean the input was wrong (a value, a path, a name): one line, exit code 2."""
FAILURES = (OSError, RuntimeError, ImportError, FloatingPointError, MemoryError)
"""Exceptions that mean the work failed (disk, device, a missing package, a diverged run): one line, exit code 1.
Anything else is a bug in saehook: its traceback is printed."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every default shown ``(default: ...)``, except where the help already states it or there is none (off
    switches, ``None``); a text of several lines (the examples of an epilog) kept as written, others wrapped."""

    def _fill_text(self, text, width, indent):
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)

    def _get_help_string(self, action):
        text = action.help or ""
        if "(default" in text or action.default in (None, False, [], argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


TRAIN_EPILOG = """examples:
  saehook train --layers 20 --tokens 2M --out runs/x                  # one autoencoder at decoder layer 20
  saehook train --layers 6 20 --latents 32k --k 64 --out runs/big      # two hookpoints from one forward pass
  saehook train --layers model.layers.20.mlp --corpus my_texts/ --out runs/mlp   # a module path, your .txt files
  saehook train --out runs/x --resume                                  # continue runs/x from its last checkpoint
  saehook train --out runs/x --overwrite                               # delete runs/x's run files, start again
A folder that is not empty is refused unless --resume or --overwrite."""

DEMO_EPILOG = """examples:
  saehook demo                        # trains into runs/demo (runs/demo-2, ... if it holds a run), then shows it
  saehook demo --tokens 200k          # a quicker, rougher autoencoder
  saehook demo --steer-label tech --steer-multiple 6   # steer the top tech latent at 6 x its typical activation
  saehook demo --out runs/demo --resume   # finish an interrupted demo"""

EVAL_EPILOG = """examples:
  saehook eval --sae runs/demo                        # every autoencoder of a run; report.json in runs/demo
  saehook eval --sae runs/x/model.layers.20 --tokens 50k   # one autoencoder, a 4x smaller error bar (~15 min)
  saehook eval --sae runs/x --no-control --no-ablations    # FVU, L0, delta LM loss, KL only: ~2.5x faster
  saehook eval --sae runs/x --out results/x.json --overwrite
  saehook eval --sae runs/x --suite sparse_probing,absorption   # SAEBench's metrics; JSON in runs/x/saebench
  saehook eval --sae runs/x --suite all --cache-dir cache/smollm2  # every metric; activations cached and shared
An existing report.json is kept: the new one is report-2.json, report-3.json, ..."""

DASHBOARD_EPILOG = """examples:
  saehook dashboard runs/demo                   # HTML pages in dash/: open dash/index.html
  saehook dashboard runs/demo --explain 0       # no N2G explanations: much faster
  saehook dashboard runs/x/model.layers.20 --latents 200 --out dash-l20"""


def parse_key(text: str):
    return int(text) if re.fullmatch(r"-?\d+", text) else text


def _dtype(name: str):
    import torch

    return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
            "float16": torch.float16, "fp16": torch.float16}[name]


def add_train_args(p: argparse.ArgumentParser, *, demo: bool = False) -> None:
    """The options of ``saehook train`` / ``demo``: the run's own (model, hookpoints, autoencoder shape, data,
    output) by hand, then one flag per :class:`~saehook.TrainConfig` field, generated from the dataclass."""
    p.add_argument("--model", default=None, help="HF model name or path (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--layers", nargs="+", type=parse_key, default=[20],
                   help="hookpoints: decoder-layer indices and/or module paths (default: 20)")
    p.add_argument("--latents", type=parse_count, default=4096 if demo else 16384, help="n_latents per autoencoder")
    p.add_argument("--k", type=int, default=32, help="active latents per token")
    p.add_argument("--multi-topk", action="store_true", help="train with the Multi-TopK loss L(k) + L(4k)/8")
    if not demo:
        from .architectures import ARCHITECTURES

        p.add_argument("--architecture", default="topk", choices=sorted(ARCHITECTURES),
                       help="dictionary variant (docs/variants.md); a transcoder at layer L reads and replaces that "
                            "layer's MLP (<layers>.L.mlp)")
    p.add_argument("--tokens", type=parse_count, default=parse_count("900k" if demo else "2M"),
                   help="training tokens per hookpoint, e.g. 2M")
    p.add_argument("--context", type=int, default=128, help="tokens per window")
    p.add_argument("--batch-size", type=int, default=16, help="windows per forward pass")
    p.add_argument("--corpus", default=None,
                   help="text source: a .txt file, a folder, a .jsonl, hf:<dataset> (default: embedded BBC News)")
    if demo:
        p.add_argument("--out", default=None, help="run directory (default: runs/demo; when that holds a run, the "
                       "first free of runs/demo-2, runs/demo-3, ..., so a second demo keeps the first)")
    else:
        p.add_argument("--out", default="runs/x", help="run directory; one that is not empty is refused unless "
                       "--resume or --overwrite")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the run files in --out (autoencoders, checkpoints, metrics, reports) and start again")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="language model dtype; auto = bfloat16 where the device multiplies it natively (CUDA, CPUs "
                        "with AVX512-BF16/AMX), else float32 (the autoencoders train in float32)")
    p.add_argument("--device-map", default=None, help="accelerate device map for the model, e.g. auto")
    p.add_argument("--log-to", nargs="*", default=[], choices=["tensorboard", "wandb"],
                   help="also log the training metrics to these (metrics.jsonl in --out is always written)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    if not demo:
        p.add_argument("--shard", default="data", choices=["data", "layers", "latents"],
                       help="under torchrun / accelerate launch: data (every rank trains every autoencoder on its "
                            "own rows), layers (each rank owns some autoencoders) or latents (each autoencoder "
                            "split by its latents over --shards ranks); docs/distributed.md")
        p.add_argument("--shards", type=int, default=None,
                       help="with --shard latents: ranks per autoencoder (default: all; world = replicas x shards)")
    add_dataclass_args(p.add_argument_group(
        "training recipe", "TrainConfig's fields (docs/training.md); --seed also seeds the order of the corpus's "
        "documents and windows (the held-out split is fixed by a hash of each document)"), TrainConfig)


def train_summary(report, names: dict, out: Path) -> str:
    """The end-of-training table: per hookpoint (``names[key]``) the smoothed training FVU
    (``report.train_fvu``, not the last batch's), L0, dead fraction and folder."""
    from .training import SMOOTH_STEPS

    lines = [f"{'hookpoint':<28}{'train fvu*':>11}{'l0':>8}{'dead':>8}  saved to"]
    for key, name in names.items():
        m = report[key]
        lines.append(f"{name:<28}{report.train_fvu.get(key, m['fvu']):>11.4f}{m['l0']:>8.1f}{m['dead_frac']:>8.2%}"
                     f"  {out / name}")
    lines.append(f"* train fvu: mean of the last {SMOOTH_STEPS} training steps (one batch's FVU is noisy); "
                 "held-out figures: saehook eval")
    return "\n".join(lines)


def check_layout(shard: str, shards: int | None) -> None:
    """Refuse ``--shard`` / ``--shards`` that cannot run with the ranks this launch has (``WORLD_SIZE``), before
    anything loads."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if shards is not None and shard != "latents":
        raise ValueError(f"--shards {shards} splits autoencoders by their latents: pass --shard latents with it")
    if shard == "latents" and world <= 1:
        raise ValueError("--shard latents splits each autoencoder over several processes: launch with torchrun "
                         "--nproc_per_node N (or accelerate launch); one process trains whole autoencoders")
    if shards is not None and (shards < 1 or world % shards):
        raise ValueError(f"--shards {shards} must be a positive divisor of the {world} ranks (world = replicas x "
                         "shards)")


def run_train(args) -> dict:
    """Load model and corpus, attach fresh autoencoders, train, print a summary; returns the report."""
    import torch

    import saehook

    from .runs import prepare_run

    cfg = dataclass_from_args(TrainConfig, args)  # first: a bad value fails before the model loads
    prepare_run(args.out, resume=args.resume, overwrite=args.overwrite, clear=False,
                flags=("--out", "--resume", "--overwrite"))  # and a refused --out before it too
    check_layout(getattr(args, "shard", "data"), getattr(args, "shards", None))  # before the model loads too
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    from .models import auto_dtype

    device = "cuda" if torch.cuda.is_available() and args.device_map else "cpu"
    args.dtype = auto_dtype(args.dtype, device)
    kwargs = {"dtype": _dtype(args.dtype)}
    if args.device_map:
        kwargs["device_map"] = args.device_map
    model, tok = saehook.load_model(args.model, **kwargs)
    print(f"model: {args.model or 'SmolLM2-135M-Instruct (embedded)'}, {model.config.num_hidden_layers} layers, "
          f"d_model {model.config.hidden_size}, {args.dtype}, loaded in {time.perf_counter() - t0:.1f}s")
    corpus = saehook.Corpus.from_source(args.corpus, tok, context=args.context, seed=args.seed)
    print(f"corpus: {args.corpus or 'BBC News (embedded)'}, windows of {args.context} tokens")
    probe = saehook.hookpoints
    from .architectures import class_for

    cls = class_for(getattr(args, "architecture", "topk"))
    saes = {}
    for key in args.layers:
        if cls.transcoder and isinstance(key, int):  # a layer index names that layer's MLP
            key = f"{probe.find_layers(model)[0]}.{key}.mlp"
        hp = probe.resolve(model, key)
        d = hp.width or model.config.hidden_size
        saes[key] = cls(d, args.latents, args.k, multi_topk=args.multi_topk)
    print(f"training {len(saes)} {cls.__name__}(s) at {[str(probe.resolve(model, k)) for k in saes]}: "
          f"n_latents={args.latents}, k={args.k}, {args.tokens:,} tokens, {cfg.batch_for(args.tokens)} per step, "
          f"peak lr={cfg.lr_for(args.latents):.3g} ({cfg.lr_schedule})")
    with saehook.attach(model, saes) as hooked:
        report = hooked.train(corpus, tokens=args.tokens, config=cfg, out=args.out, resume=args.resume,
                              overwrite=args.overwrite, batch_size=args.batch_size, progress=not args.no_progress,
                              log_to=args.log_to, shard=getattr(args, "shard", "data"),
                              shards=getattr(args, "shards", None))
    print(f"\ntrained {report.tokens:,} tokens in {report.steps} steps, {report.seconds:.0f}s "
          f"({report.tokens_per_s:,.0f} tokens/s, forward + training)")
    used = json.loads((Path(args.out) / "train_config.json").read_text()).get("matmul_dtype_used", {})
    print(f"encoder matmul: {', '.join(sorted(set(used.values()))) or '?'} (matmul_dtype={cfg.matmul_dtype})")
    print(train_summary(report, {key: saehook.hookpoints.hookpoint_dirname(hooked.hookpoints[key]) for key in saes},
                        Path(args.out)))
    return {"report": report, "model": model, "tokenizer": tok, "saes": saes, "corpus": corpus}


def run_demo(args) -> None:
    """The main job, in three phases: train on the embedded model and corpus, evaluate on held-out text, then
    find the latent most specific to one topic (``--steer-label``) and steer a neutral prompt with it."""
    import saehook
    from saehook.demo import DEMO_PER_LABEL, find_and_steer
    from saehook.features import labelled_texts
    from saehook.runs import next_free
    from saehook.training import SMOOTH_STEPS

    # the labelled documents first: a label that is not there fails before any training
    texts, labels = labelled_texts(args.steer_texts, per_label=DEMO_PER_LABEL, seed=args.seed)
    if args.steer_label not in set(labels):
        raise ValueError(f"--steer-label {args.steer_label!r} is not a label of {args.steer_texts} "
                         f"({', '.join(sorted(set(labels)))}); pass one of those")
    if args.out is None:  # a second demo keeps the first: runs/demo-2, ... (--resume / --overwrite: runs/demo)
        base = Path("runs/demo")
        fresh = args.resume or args.overwrite or not base.exists() or not any(base.iterdir())
        args.out = str(base if fresh else next_free(base))
        print(f"run folder: {args.out}")
    t_all = time.perf_counter()
    print("\n== demo 1/3: training ==")
    res = run_train(args)
    model, tok, saes = res["model"], res["tokenizer"], res["saes"]
    key = next(iter(saes))
    sae = saes[key]
    print(f"\n== demo 2/3: held-out evaluation on {args.eval_tokens:,} tokens (the corpus's test split) ==")
    t0 = time.perf_counter()
    report = saehook.evaluate(model, {key: sae}, res["corpus"], tokens=args.eval_tokens, batch_size=8,
                              progress=not args.no_progress)
    print(report.table())
    path = report.save(next_free(Path(args.out) / "report.json"))
    m = report[key]
    train_fvu = res["report"].train_fvu.get(key, float("nan"))
    print(f"held-out: fvu {m['fvu']:.4f} (train fvu, mean of the last {SMOOTH_STEPS} steps: {train_fvu:.4f}), "
          f"LM loss {m['clean_loss']:.3f} -> {m['spliced_loss']:.3f} with the "
          f"reconstruction spliced in ({m['delta_lm_loss']:+.3f} ± {m['delta_lm_loss_se']:.3f} nats, "
          f"{m['ce_recovered_zero']:.1%} of the "
          f"zero-ablation loss recovered); report in {path} ({time.perf_counter() - t0:.0f}s)")
    print(f"\n== demo 3/3: find a {args.steer_label!r} latent and steer with it ==")
    try:
        found = find_and_steer(model, tok, {key: sae}, texts, labels, label=args.steer_label,
                               multiple=args.steer_multiple, progress=not args.no_progress, say=print)
        print("\n".join(found.lines()))
    except ValueError as e:  # the run is trained and saved; only this last step has nothing to show
        print(f"steering skipped: {e}")
    print(f"\ndemo done in {time.perf_counter() - t_all:.0f}s; next: saehook find {args.out} --labels bbc, "
          f"saehook dashboard {args.out} --out dash")


def add_eval_args(p: argparse.ArgumentParser) -> None:
    """The options of ``saehook eval``."""
    p.add_argument("--sae", action="append", required=True, metavar="DIR",
                   help="a training run (all its autoencoders, e.g. runs/x) or one autoencoder folder (e.g. "
                        "runs/x/model.layers.20); repeatable. The hookpoint is metadata['hookpoint'] in cfg.json, "
                        "else the folder name")
    p.add_argument("--model", default=None, help="HF model name or path (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--tokens", type=parse_count, default=parse_count(EVAL_TOKENS),
                   help="evaluated tokens, e.g. 200k; the default answers in about a minute on 2 idle CPU cores "
                        "(SmolLM2, one hookpoint), with the standard error of delta LM loss beside it (4x the tokens "
                        "halve it, and take 4x as long)")
    p.add_argument("--corpus", default=None,
                   help="text source; its held-out split is used (default: embedded BBC News)")
    p.add_argument("--context", type=int, default=128, help="tokens per window")
    p.add_argument("--holdout", type=float, default=0.05, help="held-out fraction of documents (as in training)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--skip-positions", type=int, default=1, help="first positions per window left out (BOS)")
    p.add_argument("--dense-threshold", type=float, default=0.1, help="dense: fires on more than this fraction")
    p.add_argument("--no-joint", action="store_true", help="skip the joint splice of all autoencoders")
    p.add_argument("--no-control", action="store_true",
                   help="skip the random-error control (delta LM loss of a random error of the same per-token "
                        "norm; one forward per hookpoint and batch)")
    p.add_argument("--no-ablations", action="store_true",
                   help="skip the zero- and mean-ablated passes and CE recovered (two forwards per hookpoint, batch)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="language model dtype")
    p.add_argument("--device-map", default=None, help="accelerate device map for the model, e.g. auto")
    p.add_argument("--out", default=None,
                   help="report JSON path (default: report.json in the run folder of the first --sae, or "
                        "report-2.json, report-3.json, ... when it exists); an existing --out is refused unless "
                        "--overwrite")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--seed", type=int, default=0, help="seed of the control's random directions")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--suite", default="core",
                   help="what to measure, comma-separated: core (the metrics above), SAEBench's sparse_probing, "
                        "absorption, autointerp (docs/metrics/saebench.md), or all")
    p.add_argument("--bench-out", default=None,
                   help="folder of the SAEBench-layout JSON (<eval_type_id>/<name>_<hookpoint>_eval_results.json; "
                        "default: saebench/ in the run folder of the first --sae)")
    p.add_argument("--cache-dir", default=None,
                   help="activation cache the SAEBench metrics share and resume from (default: <bench-out>/cache); "
                        "give one folder to several runs on the same model to collect once")
    p.add_argument("--labelled", default=None,
                   help="labelled .jsonl ({\"text\": ..., \"label\": ...} lines) for sparse_probing (default: the "
                        "embedded BBC News topics)")
    p.add_argument("--max-documents-per-label", type=int, default=None,
                   help="sparse_probing: keep at most this many documents of each label (SparseProbingConfig; "
                        "default all: 2,225 BBC News documents, 285k tokens to collect once)")
    p.add_argument("--absorption-words", type=int, default=None,
                   help="absorption: first-letter words to prompt (AbsorptionConfig.max_words; default 5,000, about "
                        "410k tokens on SmolLM2)")
    p.add_argument("--autointerp-latents", type=int, default=None,
                   help="autointerp: latents to explain and score (AutoInterpConfig.n_latents; default 100)")
    p.add_argument("--autointerp-docs", type=int, default=None,
                   help="autointerp: BBC News articles searched for each latent's windows (AutoInterpConfig.n_docs; "
                        "default all 2,225, 128 tokens each)")
    p.add_argument("--judge-url", default=None,
                   help="autointerp: an OpenAI-compatible endpoint (e.g. http://localhost:8000/v1) for the explainer "
                        "and scorer; the key from $OPENAI_API_KEY (default: the local --judge-model)")
    p.add_argument("--judge-model", default=None,
                   help="autointerp: a local transformers model name or path, or the served model's name with "
                        "--judge-url (default: the embedded SmolLM2-135M-Instruct, a weak judge)")


def _eval_suites(text: str) -> tuple[bool, list[str]]:
    """``--suite`` -> (run the core metrics, the SAEBench metrics to run); raises ValueError for an unknown name."""
    from .bench import SUITES, parse_suites

    names = [s.strip() for s in text.split(",") if s.strip()]
    if "all" in names:
        return True, list(SUITES)
    bench = [s for s in names if s != "core"]
    return "core" in names, parse_suites(bench) if bench else []


def _run_bench(args, model, tok, saes, suites: list[str]) -> dict:
    """``saehook eval --suite ...``'s SAEBench metrics: run, print the headline numbers, write the JSON."""
    from .bench import run_suite
    from .bench.sparse_probing import SparseProbingConfig
    from .formats.detect import single_format

    first = Path(args.sae[0]).resolve()
    run_dir = first.parent if single_format(first) else first
    out = Path(args.bench_out) if args.bench_out else run_dir / "saebench"
    probing = {"source": args.labelled, "max_documents_per_label": args.max_documents_per_label}
    probing = {k: v for k, v in probing.items() if v is not None}
    configs = {"sparse_probing": SparseProbingConfig(**probing)} if probing else {}
    if args.absorption_words is not None:
        from .bench.absorption import AbsorptionConfig

        configs["absorption"] = AbsorptionConfig(max_words=args.absorption_words)
    interp = {"n_latents": args.autointerp_latents, "n_docs": args.autointerp_docs, "judge_url": args.judge_url,
              "judge_model": args.judge_model}
    interp = {k: v for k, v in interp.items() if v is not None}
    if interp:
        from .bench.autointerp import AutoInterpConfig

        configs["autointerp"] = AutoInterpConfig(**interp)
    t0 = time.perf_counter()
    results = run_suite(model, saes, suites, tokenizer=tok, cache_dir=args.cache_dir, out=out, name=run_dir.name,
                        configs=configs, progress=not args.no_progress)
    for suite, per_key in results.items():
        for key, r in per_key.items():
            flat = ", ".join(f"{n} {v:.4g}" if isinstance(v, float) else f"{n} {v}"
                             for sec in r["eval_result_metrics"].values() for n, v in sec.items())
            print(f"{suite} {key} ({r['wall_seconds']:.0f}s): {flat}")
    print(f"SAEBench metrics in {time.perf_counter() - t0:.0f}s; JSON written under {out}")
    return results


def run_eval(args):
    """Load the autoencoders and the model, evaluate on held-out text, print a table, write the JSON report."""
    import torch

    import saehook
    from saehook.dashboard import load_saes
    from saehook.evaluate import evaluate
    from saehook.formats.detect import single_format
    from saehook.runs import next_free

    torch.manual_seed(args.seed)
    core, bench = _eval_suites(args.suite)
    if args.out and Path(args.out).exists() and not args.overwrite:
        raise FileExistsError(f"--out {args.out} exists: pass another --out, or --overwrite to replace it")
    saes, where = {}, {}
    for path in args.sae:  # a run folder (every autoencoder in it) or one autoencoder folder, as dashboard takes
        for key, sae in load_saes(path).items():
            if key in saes:
                raise ValueError(f"two autoencoders for hookpoint {key!r} ({where[key]} and {path}): pass each "
                                 "hookpoint once")
            saes[key], where[key] = sae, path
    kwargs = {"dtype": _dtype(args.dtype)}
    if args.device_map:
        kwargs["device_map"] = args.device_map
    model, tok = saehook.load_model(args.model, **kwargs)
    bench_results = _run_bench(args, model, tok, saes, bench) if bench else None
    if not core:
        return bench_results
    corpus = saehook.Corpus.from_source(args.corpus, tok, context=args.context, holdout=args.holdout, seed=args.seed)
    print(f"evaluating {len(saes)} autoencoder(s) at {list(saes)} on {args.tokens:,} held-out tokens of "
          f"{args.corpus or 'BBC News (embedded)'} with {args.model or 'SmolLM2-135M-Instruct (embedded)'}")
    t0 = time.perf_counter()
    report = evaluate(model, saes, corpus, tokens=args.tokens, batch_size=args.batch_size,
                      skip_positions=args.skip_positions, joint=not args.no_joint,
                      dense_threshold=args.dense_threshold, progress=not args.no_progress,
                      control=not args.no_control, ablations=not args.no_ablations, seed=args.seed)
    report.settings.update(model=args.model or "SmolLM2-135M-Instruct", corpus=args.corpus or "bbc_news",
                           saes={str(k): str(where[k]) for k in saes}, dtype=args.dtype)
    first = Path(args.sae[0]).resolve()
    run_dir = first.parent if single_format(first) else first
    out = Path(args.out) if args.out else next_free(run_dir / "report.json")
    report.save(out)
    print(f"{report.tokens:,} tokens ({next(iter(report.values()))['windows']} windows) in "
          f"{time.perf_counter() - t0:.0f}s")
    print(report.table())
    print("se: standard error of delta LM loss over the windows; the value on unlimited text of this kind lies "
          "within 2 se of the printed delta about 95% of the time")
    print(f"report written to {out}")
    return report


def add_dashboard_args(p: argparse.ArgumentParser) -> None:
    """The options of ``saehook dashboard``."""
    p.add_argument("run", help="a training run (its <hookpoint>/ autoencoder folders) or one autoencoder folder")
    p.add_argument("--out", default=None, help="output folder of the HTML dashboard (default: dash, or dash-2, "
                   "dash-3, ... when it exists); an existing --out is refused unless --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing dashboard folder (one holding summary.json) given as --out")
    p.add_argument("--model", default=None, help="HF model name or path (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--corpus", default=None,
                   help="text source; its held-out split is used (default: embedded BBC News)")
    p.add_argument("--context", type=int, default=128, help="tokens per window")
    p.add_argument("--holdout", type=float, default=0.05, help="held-out fraction of documents (as in training)")
    p.add_argument("--tokens", type=parse_count, default=parse_count("20k"),
                   help="held-out tokens for the top examples and densities")
    p.add_argument("--score-tokens", type=parse_count, default=None,
                   help="further held-out tokens to score the explanations on (default: half of --tokens)")
    p.add_argument("--latents", type=int, default=64,
                   help="latents with a static page (logit effects, explanation) per hookpoint, a random sample of the "
                        "alive; every latent is in the sortable table and has a data page")
    p.add_argument("--labels", default="bbc",
                   help="labelled text for per-label firing rates and each latent's top label: 'bbc' (BBC News "
                        "topics), a .jsonl of {text, label}, or 'none'")
    p.add_argument("--per-label", type=int, default=20, help="documents per label read for --labels")
    p.add_argument("--explain", type=int, default=32, help="of those, how many get an N2G explanation (0: none)")
    p.add_argument("--examples", type=int, default=20, help="top examples per latent")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="language model dtype")
    p.add_argument("--seed", type=int, default=0, help="seed of the latents shown and of the corpus's document order")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_dashboard(args):
    """Load the autoencoders of a run, the model and the held-out corpus, build the static dashboard."""
    import shutil

    import saehook
    from saehook.dashboard import build_dashboard, load_saes
    from saehook.runs import next_free

    replace = False
    if args.out is None:
        args.out = str(next_free("dash"))
    elif Path(args.out).exists() and any(Path(args.out).iterdir()):
        if not (args.overwrite and (Path(args.out) / "summary.json").is_file()):
            raise FileExistsError(f"--out {args.out} is not empty: choose another --out" + (
                "" if args.overwrite else ", or pass --overwrite to replace the dashboard in it") + (
                " (--overwrite replaces only a dashboard folder, one with summary.json)" if args.overwrite else ""))
        replace = True
    saes = load_saes(args.run)
    model, tok = saehook.load_model(args.model, dtype=_dtype(args.dtype))
    corpus = saehook.Corpus.from_source(args.corpus, tok, context=args.context, holdout=args.holdout, seed=args.seed)
    print(f"dashboard of {len(saes)} autoencoder(s) at {list(saes)}: {args.tokens:,} held-out tokens of "
          f"{args.corpus or 'BBC News (embedded)'} with {args.model or 'SmolLM2-135M-Instruct (embedded)'}")
    t0 = time.perf_counter()
    if replace:  # only now that the autoencoders, the model and the corpus loaded
        shutil.rmtree(args.out)
    index = build_dashboard(saes, args.out, model, tok, corpus, tokens=args.tokens, score_tokens=args.score_tokens,
                            n_latents_shown=args.latents, n_explained=args.explain, n_examples=args.examples,
                            batch_size=args.batch_size, seed=args.seed, progress=not args.no_progress,
                            labels=None if args.labels == "none" else args.labels, per_label=args.per_label)
    summary = json.loads((Path(args.out) / "summary.json").read_text())
    for key, s in summary["hookpoints"].items():
        e = s["explainability"]
        line = f"{key}: {s['tokens']:,} tokens, {s['dead_frac']:.2%} dead, {s['shown']} latents shown"
        if e:
            line += (f", {e['latents']} explained: precision {e['precision']:.3f} recall {e['recall']:.3f} "
                     f"f1 {e['f1']:.3f} (fires > {summary['settings']['explain']['fire_fraction']:g} x max)")
        print(line)
    print(f"built in {time.perf_counter() - t0:.0f}s: open {index}")
    return index


FIND_EPILOG = """examples:
  saehook find runs/demo --labels bbc                       # latents specific to each BBC News topic
  saehook find runs/demo --labels reviews.jsonl --top 5     # any {"text": ..., "label": ...} per line
  saehook find runs/demo --text "The striker scored twice"  # which latents fire on a text, and where
  saehook find runs/demo --search "prime minister"          # latents whose top contexts contain a phrase
Steer with a latent found here in multiples of its typical activation ('mean act in'): see docs/steering.md."""


class _FindHelp(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every default shown (those of options off by default are in their help), the epilog kept as written."""

    def _get_help_string(self, action):
        return action.help if action.default in (None, False) else super()._get_help_string(action)


def add_find_args(p: argparse.ArgumentParser) -> None:
    """The options of ``saehook find``."""
    p.add_argument("run", help="a training run (its <hookpoint>/ autoencoder folders) or one autoencoder folder")
    p.add_argument("--labels", default=None, metavar="bbc|FILE.jsonl",
                   help="rank latents by how specific they are to each label of this labelled text (default: off)")
    p.add_argument("--text", default=None,
                   help="list the latents that fire on this text, with positions (default: off)")
    p.add_argument("--search", default=None, metavar="PHRASE",
                   help="list the latents whose top-activating contexts contain this phrase at the active token "
                        "(default: off)")
    p.add_argument("--top", type=int, default=10, help="rows shown per label, text or search")
    p.add_argument("--by", default="effect", choices=["effect", "log_odds"],
                   help="--labels ranking: effect = standardised mean activation difference, log_odds = of firing")
    p.add_argument("--per-label", type=int, default=50,
                   help="--labels: documents read per label (random subset); BBC News: 250 documents, 32k tokens")
    p.add_argument("--max-tokens", type=int, default=128, help="--labels: tokens read per document")
    p.add_argument("--text-field", default="text", help="--labels FILE.jsonl: the text field")
    p.add_argument("--label-field", default="label", help="--labels FILE.jsonl: the label field")
    p.add_argument("--corpus", default=None,
                   help="--search: text whose held-out split gives the top contexts (default: embedded BBC News)")
    p.add_argument("--tokens", type=parse_count, default=parse_count("10k"),
                   help="--search: held-out tokens read for the top contexts")
    p.add_argument("--examples", type=int, default=20, help="--search: top contexts kept per latent")
    p.add_argument("--anywhere", action="store_true",
                   help="--search: match the phrase anywhere in a context, not only at the active token")
    p.add_argument("--context", type=int, default=128, help="--search: tokens per window")
    p.add_argument("--holdout", type=float, default=0.05, help="--search: held-out fraction of documents")
    p.add_argument("--model", default=None, help="HF model name or path (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="language model dtype")
    p.add_argument("--batch-size", type=int, default=8, help="documents or windows per forward pass")
    p.add_argument("--seed", type=int, default=0, help="seed of the per-label subset")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_find(args) -> dict:
    """Load the autoencoders and the model, then find latents by label, by text and by phrase; print tables."""
    import saehook
    from saehook.dashboard import load_saes
    from saehook.examples import top_examples
    from saehook.features import find_by_labels, find_by_text, labelled_texts, search_contexts

    if not (args.labels or args.text or args.search):
        print("saehook find: give at least one of --labels, --text or --search (see saehook find --help)",
              file=sys.stderr)
        raise SystemExit(2)
    saes = load_saes(args.run)
    model, tok = saehook.load_model(args.model, dtype=_dtype(args.dtype))
    found: dict = {}
    if args.labels:
        t0 = time.perf_counter()
        texts, labels = labelled_texts(args.labels, per_label=args.per_label, text_field=args.text_field,
                                       label_field=args.label_field, seed=args.seed)
        found["labels"] = find_by_labels(model, saes, texts, labels, tokenizer=tok, max_tokens=args.max_tokens,
                                         batch_size=args.batch_size, progress=not args.no_progress)
        print(f"latents by label: {len(texts)} documents of {args.labels} ({len(set(labels))} labels, at most "
              f"{args.per_label} each, {args.max_tokens} tokens each) in {time.perf_counter() - t0:.0f}s")
        for table in found["labels"].values():
            print(table.table(args.top, by=args.by) + "\n")
    if args.text:
        found["text"] = find_by_text(model, saes, args.text, tokenizer=tok)
        print(f"latents on the text {args.text!r}:")
        for hits in found["text"].values():
            print(hits.table(args.top) + "\n")
    if args.search:
        corpus = saehook.Corpus.from_source(args.corpus, tok, context=args.context, holdout=args.holdout,
                                            seed=args.seed)
        examples = top_examples(model, saes, corpus, args.tokens, n_examples=args.examples,
                                batch_size=args.batch_size, progress=not args.no_progress)
        found["search"] = search_contexts(examples, args.search, tok, anywhere=args.anywhere, top=args.top)
        print(f"latents whose top {args.examples} contexts ({args.tokens:,} held-out tokens of "
              f"{args.corpus or 'BBC News (embedded)'}) contain {args.search!r}:")
        print(f"  {'hookpoint':<12} {'latent':>7} {'matches':>8} {'value':>7}  best matching context")
        for m in found["search"]:
            print(f"  {str(m.key):<12} {m.latent:>7} {f'{m.hits}/{m.examples}':>8} {m.value:>7.2f}  "
                  f"{m.context!r}")
        if not found["search"]:
            print("  none (try --anywhere, more --tokens, or a shorter phrase)")
    return found


def build_parser() -> argparse.ArgumentParser:
    """The ``saehook`` parser with its subcommands."""
    parser = argparse.ArgumentParser(prog="saehook", formatter_class=HelpFormatter, description=(
        "TopK sparse autoencoders on live Hugging Face models (Gao et al. 2024). "
        "Defaults run offline on the embedded SmolLM2-135M-Instruct and BBC News corpus."))
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log progress details, and show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train autoencoders online from forward passes",
                             description="Train TopK autoencoders at one or more hookpoints from one forward pass "
                                         "per batch; checkpoints, metrics.jsonl and <hookpoint>/ dirs in --out.",
                             epilog=TRAIN_EPILOG, formatter_class=HelpFormatter)
    add_train_args(p_train)
    p_demo = sub.add_parser("demo", epilog=DEMO_EPILOG, formatter_class=HelpFormatter,
                            help="the main job on the embedded model and corpus (train, evaluate, find a topic "
                                 "latent and steer with it)",
                            description="Train a layer-20 autoencoder on SmolLM2 over BBC News and save it, measure "
                                        "it on held-out text (delta LM loss with its standard error), then find the "
                                        "latent most specific to one BBC topic and print a neutral prompt's greedy "
                                        "continuation without and with that latent steered.")
    add_train_args(p_demo, demo=True)
    p_demo.add_argument("--eval-tokens", type=parse_count, default=parse_count(EVAL_TOKENS),
                        help="held-out tokens for the evaluation after training (SmolLM2: 87-105 s measured on 2 "
                             "shared vCPUs at load 3-5; the standard error of delta LM loss is printed beside it)")
    p_demo.add_argument("--steer-label", default="sports",
                        help="the topic whose most specific latent is steered at the end (a label of --steer-texts)")
    p_demo.add_argument("--steer-multiple", type=float, default=8.0,
                        help="steering strength in multiples of that latent's typical activation (its mean where "
                             "it fires on the label's text); docs/steering.md: topic words from ~6, broken grammar "
                             "past ~12")
    p_demo.add_argument("--steer-texts", default="bbc",
                        help="labelled documents to find the latent in: bbc (the embedded BBC News topics) or a "
                             ".jsonl of {\"text\": ..., \"label\": ...} lines")
    p_eval = sub.add_parser("eval", help="evaluate saved autoencoders on held-out text",
                            epilog=EVAL_EPILOG, formatter_class=HelpFormatter,
                            description="FVU, L0, dead/dense latents and the downstream loss (delta LM loss, KL, "
                                        "CE recovered vs zero- and mean-ablation) of saved autoencoders; prints a "
                                        "table and writes a JSON report.")
    add_eval_args(p_eval)
    p_dash = sub.add_parser("dashboard", help="build a static HTML dashboard of latents",
                            epilog=DASHBOARD_EPILOG, formatter_class=HelpFormatter,
                            description="Top examples, density, logit effects and N2G explanations (with their "
                                        "precision / recall on held-out text) of saved autoencoders, as static "
                                        "HTML pages with a client-side search.")
    add_dashboard_args(p_dash)
    p_find = sub.add_parser("find", help="find latents: by labelled text, by a text you type, by a phrase",
                            description="Rank latents by how specific they are to each label (BBC News topics or "
                                        "a labelled .jsonl), list the latents that fire on a text and where, and "
                                        "search the latents' top contexts for a phrase.",
                            epilog=FIND_EPILOG, formatter_class=_FindHelp)
    add_find_args(p_find)
    for p in sub.choices.values():  # -v also after the subcommand (`saehook eval -v ...`)
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                       help="log progress details, and show the traceback of an error")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``saehook <command> ...``; returns the exit code: 0, or 2 / 1 after a one-line error (:func:`report_error`)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    run = {"train": run_train, "eval": run_eval, "dashboard": run_dashboard, "find": run_find, "demo": run_demo}
    try:
        run[args.command](args)
    except (*USAGE_ERRORS, *FAILURES) as e:
        return report_error(e, args.verbose)
    return 0


def report_error(e: BaseException, verbose: bool) -> int:
    """Print ``e`` as one line ``saehook: error: ...`` on stderr (with ``verbose``, its traceback first); returns
    the exit code: 2 for wrong input (:data:`USAGE_ERRORS`), 1 for a failure (:data:`FAILURES`)."""
    import traceback

    if verbose:
        traceback.print_exception(e)
    text = e.args[0] if isinstance(e, KeyError) and len(e.args) == 1 else str(e)
    if isinstance(e, OSError) and e.strerror and e.filename:  # "[Errno 2] No such file..." -> its parts
        text = f"{e.filename}: {e.strerror}"
    line = " ".join(str(text).split()) or type(e).__name__
    hint = "" if verbose else " (saehook -v shows the traceback)" if not isinstance(e, USAGE_ERRORS) else ""
    print(f"saehook: error: {line}{hint}", file=sys.stderr)
    return 2 if isinstance(e, USAGE_ERRORS) else 1


if __name__ == "__main__":
    sys.exit(main())
