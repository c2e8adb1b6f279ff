"""Run the benchmarks (``make bench``): every ``benchmarks/bench_*.py``, one after another.

Each runs in its own Python process (the interpreter running this script), prints its own tables and
writes its JSON under ``benchmarks/results/``. All of them run even if one fails; the exit status is
non-zero when any failed.

    python benchmarks/run.py                      # all
    python benchmarks/run.py --only hooks         # bench_hooks.py only (also: bench_hooks, bench_hooks.py)
    python benchmarks/run.py --list
    python benchmarks/run.py --only hooks -- --dtype fp32 --reps 9    # arguments after -- go to each benchmark
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def discover() -> dict[str, Path]:
    """``{name: path}`` of ``bench_<name>.py`` files next to this script, sorted by name."""
    return {p.stem.removeprefix("bench_"): p for p in sorted(HERE.glob("bench_*.py"))}


def _name(arg: str) -> str:
    return Path(arg).name.removesuffix(".py").removeprefix("bench_")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    passthrough: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, passthrough = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description="Run every benchmarks/bench_*.py in sequence.")
    p.add_argument("--only", action="append", metavar="NAME",
                   help="run only this benchmark (repeatable); NAME is e.g. 'hooks' for bench_hooks.py")
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = p.parse_args(argv)

    benches = discover()
    if args.list:
        print("\n".join(benches))
        return 0
    if args.only:
        wanted = [_name(n) for n in args.only]
        unknown = [n for n in wanted if n not in benches]
        if unknown:
            p.error(f"unknown benchmark(s) {unknown}; available: {sorted(benches)}")
        benches = {n: benches[n] for n in wanted}
    if not benches:
        print(f"no benchmarks/bench_*.py found in {HERE}", file=sys.stderr)
        return 1

    env = dict(os.environ)
    for key, value in (("OMP_WAIT_POLICY", "PASSIVE"), ("TOKENIZERS_PARALLELISM", "false"), ("HF_HUB_OFFLINE", "1")):
        env.setdefault(key, value)
    failed = []
    for name, path in benches.items():
        print(f"## {name} ({path.relative_to(HERE.parent)})", flush=True)
        start = time.perf_counter()
        rc = subprocess.run([sys.executable, str(path), *passthrough], env=env, cwd=HERE.parent).returncode
        took = time.perf_counter() - start
        status = "ok" if rc == 0 else f"FAILED (exit {rc})"
        print(f"-- {name}: {status} in {took:.1f} s\n", flush=True)
        if rc != 0:
            failed.append(name)
    if failed:
        print(f"{len(failed)} of {len(benches)} benchmarks failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"all {len(benches)} benchmarks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
