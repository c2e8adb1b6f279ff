"""SAEBench's metrics (absorption, sparse probing, autointerp) for several dictionaries on one SmolLM2 layer, with a
table, one plot per metric against L0, and the wall time of each metric.

Protocol: every dictionary reads the same activation cache (``--cache-dir``; collected by the first, reused by the
rest), so only the first pays the language model's forwards. The metrics run with the configs below (smaller than
SAEBench's defaults where the CPU demands it: every difference is printed in the table's header and written to
``<out>/summary.json``).

    python recipes/saebench_figures.py --sae demo=runs/variants-1m/members/topk-k32 \\
        --sae 16k=runs/topk-16k/members/topk-k32 --out runs/saebench

Writes ``<out>/<eval_type_id>/<name>_<hookpoint>_eval_results.json`` (SAEBench's layout), ``<out>/summary.json``,
``<out>/table.md`` and ``<out>/<metric>.png``.
"""

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

import saehook
from saehook.bench import run_suite
from saehook.bench.absorption import AbsorptionConfig
from saehook.bench.autointerp import AutoInterpConfig
from saehook.bench.results import metric_value, plot_against_l0
from saehook.bench.sparse_probing import SparseProbingConfig

EVAL_TYPE = {"sparse_probing": "sparse_probing", "absorption": "absorption_first_letter", "autointerp": "autointerp"}

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--sae", action="append", required=True, metavar="NAME=PATH",
               help="a dictionary folder (cfg.json + safetensors) and its label; repeat for several")
p.add_argument("--layer", type=int, default=20)
p.add_argument("--suites", default="sparse_probing,absorption,autointerp")
p.add_argument("--max-words", type=int, default=1500, help="absorption: first-letter words (SAEBench: all)")
p.add_argument("--min-letters", type=int, default=20,
               help="absorption: letters whose probe passes F1 0.6 needed for a score (SAEBench's "
                    "min_feats_for_eval, 20; SmolLM2-135M's layer 20 passes 15 at 1,500 words)")
p.add_argument("--docs-per-label", type=int, default=100, help="sparse probing: BBC documents per topic")
p.add_argument("--autointerp-latents", type=int, default=30, help="autointerp: latents scored per dictionary")
p.add_argument("--autointerp-docs", type=int, default=400, help="autointerp: windows searched for examples")
p.add_argument("--cache-dir", type=Path, default=None, help="activation cache (default <out>/cache)")
p.add_argument("--out", type=Path, default=Path("runs/saebench"))
p.add_argument("--tag", default="", help="suffix of table / summary / plot file names (several views of one --out)")
p.add_argument("--rerun", action="store_true", help="run every metric again (default: read back the JSON a metric "
               "already wrote for that dictionary, so an interrupted run continues where it stopped)")
args = p.parse_args()


def log(msg: str) -> None:
    print(f"[saebench_figures {time.strftime('%H:%M:%S')}] {msg}", flush=True)


torch.manual_seed(0)
model, tok = saehook.load_model(dtype=torch.float32)
key = args.layer
configs = {"absorption": AbsorptionConfig(max_words=args.max_words, min_feats_for_eval=args.min_letters),
           "sparse_probing": SparseProbingConfig(max_documents_per_label=args.docs_per_label),
           "autointerp": AutoInterpConfig(n_latents=args.autointerp_latents, n_docs=args.autointerp_docs)}
cache = args.cache_dir or args.out / "cache"
summary = {"configs": {k: dataclasses.asdict(v) for k, v in configs.items()}, "dictionaries": {}}
records: dict[str, dict[str, dict]] = {}
for spec in args.sae:
    name, _, path = spec.partition("=")
    sae = saehook.load(path)
    log(f"{name}: {type(sae).__name__} n={sae.n_latents} k={sae.k} from {path}")
    row = {"path": path, "n_latents": sae.n_latents, "k": sae.k}
    for suite in [s.strip() for s in args.suites.split(",") if s.strip()]:
        done = args.out / EVAL_TYPE[suite] / f"{name}_layer{key}_eval_results.json"
        if done.exists() and not args.rerun:  # a finished metric of this dictionary is read back, not rerun
            res = json.loads(done.read_text())
            row[f"{suite}_wall_s"] = round(res.get("saehook_wall_seconds") or res.get("wall_seconds") or 0, 1)
            records.setdefault(suite, {})[name] = res
            log(f"  {suite}: read back {done}")
            continue
        t0 = time.perf_counter()
        res = run_suite(model, {key: sae}, suite, tokenizer=tok, cache_dir=cache, out=args.out, name=name,
                        configs=configs)[suite][key]
        row[f"{suite}_wall_s"] = round(time.perf_counter() - t0, 1)
        records.setdefault(suite, {})[name] = res
        log(f"  {suite}: {row[f'{suite}_wall_s']:.0f}s")
    summary["dictionaries"][name] = row

# SAEBench's headline numbers, by its names
HEADLINE = {"absorption": ["mean_absorption_fraction_score", "mean_full_absorption_score", "mean_num_split_features"],
            "sparse_probing": ["sae_top_1_test_accuracy", "sae_top_5_test_accuracy", "sae_test_accuracy",
                               "llm_top_1_test_accuracy", "llm_top_5_test_accuracy", "llm_test_accuracy"],
            "autointerp": ["autointerp_score", "saehook_auroc"]}
l0 = {name: r.get("saehook_l0") for name, r in records.get("sparse_probing", {}).items()}
for suite, per_name in records.items():
    for name, rec in per_name.items():
        for metric in HEADLINE.get(suite, []):
            try:
                summary["dictionaries"][name][metric] = metric_value(rec, metric)
            except KeyError:
                pass
        summary["dictionaries"][name]["l0"] = l0.get(name) or rec.get("saehook_l0")
    for metric in HEADLINE.get(suite, [])[:2]:
        try:
            plot_against_l0(per_name, metric, args.out / f"{suite}-{metric}{args.tag}.png",
                            l0={n: summary["dictionaries"][n]["l0"] for n in per_name},
                            groups={n: n.rsplit("-", 1)[0] if "-" in n else n for n in per_name},
                            title=f"SmolLM2-135M layer {args.layer}: {metric}")
        except (KeyError, ValueError) as e:
            log(f"no plot of {metric}: {e}")

cols = ["n_latents", "k", "l0"] + [m for ms in HEADLINE.values() for m in ms] + \
       [f"{s}_wall_s" for s in HEADLINE]
lines = ["| dictionary | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
for name, row in summary["dictionaries"].items():
    cells = []
    for c in cols:
        v = row.get(c)
        cells.append("" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v))
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
args.out.mkdir(parents=True, exist_ok=True)
(args.out / f"table{args.tag}.md").write_text("\n".join(lines) + "\n")
(args.out / f"summary{args.tag}.json").write_text(json.dumps(summary, indent=1, default=str))
print("\n".join(lines))
log(f"wrote {args.out}/table.md, summary.json and the plots")
