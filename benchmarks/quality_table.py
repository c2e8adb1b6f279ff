"""Markdown tables of ``benchmarks/results/quality.json`` (written by ``bench_quality.py``), per budget and size.

    python benchmarks/quality_table.py                      # every budget / n_latents
    python benchmarks/quality_table.py --tokens 1000000 --latents 4096
"""

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "quality.json"


def fmt(v, f: str) -> str:
    return "–" if v is None or (isinstance(v, float) and v != v) else f.format(v)


def table(records: list[dict]) -> str:
    lines = ["| arm | batch | steps | fvu | fvu_std | cos | relerr_med | dead | delta_lm | kl | ctrl_delta | train_s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(
            f"| {r['arm']} | {r.get('batch_tokens')} | {r.get('steps')} | {fmt(r['fvu'], '{:.4f}')} | "
            f"{fmt(r.get('fvu_standardized'), '{:.3f}')} | {fmt(r.get('cosine'), '{:.3f}')} | "
            f"{fmt(r.get('rel_error_median'), '{:.3f}')} | {fmt(r['dead_frac'], '{:.1%}')} | "
            f"{fmt(r['delta_lm_loss'], '{:.3f}')} | {fmt(r['kl'], '{:.3f}')} | "
            f"{fmt(r.get('random_error_delta_lm_loss'), '{:.3f}')} | {fmt(r.get('train_s'), '{:.0f}')} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--tokens", type=int, default=None)
    p.add_argument("--latents", type=int, default=None)
    args = p.parse_args()
    records = json.loads(Path(args.results).read_text())["records"]
    groups: dict = {}
    for r in records:
        if args.tokens not in (None, r["budget"]) or args.latents not in (None, r["n_latents"]):
            continue
        groups.setdefault((r["budget"], r["n_latents"], r["k"]), []).append(r)
    for (budget, n, k), rows in groups.items():
        print(f"\n{budget:,} rows, n = {n:,}, k = {k}\n")
        print(table(rows))


if __name__ == "__main__":
    main()
