"""Plots (matplotlib, PNG) of a training run's ``metrics.jsonl``."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: str | Path) -> dict[str, list[dict]]:
    """``metrics.jsonl`` (a file or a run directory) -> ``{hookpoint: [metrics dicts in step order]}``."""
    path = Path(path)
    files = sorted(path.glob("metrics*.jsonl")) if path.is_dir() else [path]  # + metrics.rank<r>.jsonl
    runs: dict[str, list[dict]] = {}
    for line in (ln for f in files for ln in f.read_text().splitlines()):
        if line.strip():
            m = json.loads(line)
            runs.setdefault(m["hookpoint"], []).append(m)
    for rows in runs.values():
        rows.sort(key=lambda m: m["step"])
    return runs


def _pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend (files only, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: str | Path, dpi: int) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only), for plots made outside this module."""
    return _pyplot()


def save_figure(fig, out: str | Path, dpi: int = 120) -> Path:
    """Lay out ``fig``, write it as a PNG to ``out`` (its folder created), close it; returns ``out``."""
    return _save(fig, out, dpi)


def plot_training(runs: dict[str, str | Path], out: str | Path, title: str = "") -> Path:
    """FVU and dead fraction over training tokens for one or more runs (``{label: run dir}``)."""
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for label, run in runs.items():
        for hp, rows in read_metrics(run).items():
            name = f"{label} {hp}" if len(runs) > 1 else hp
            toks = [m["tokens"] for m in rows if "fvu" in m]
            ax1.plot(toks, [m["fvu"] for m in rows if "fvu" in m], label=name)
            ax2.plot([m["tokens"] for m in rows], [m["dead_frac"] for m in rows], label=name)
    ax1.set(xlabel="training tokens", ylabel="FVU (training batch)", yscale="log", title="reconstruction")
    ax2.set(xlabel="training tokens", ylabel="fraction of dead latents", title="dead latents")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, out, dpi=120)


def plot_density(density, out: str | Path, title: str = "", bins: int = 50) -> Path:
    """Histogram of ``log10(density)`` over the latents that fired (``density``: the fraction of tokens on which
    each latent fires, e.g. ``EvalReport[key]["density"]`` or ``TopExamples.density``); dead latents (density
    0) cannot go on a log axis, so they are counted separately and annotated. Writes a PNG to ``out``."""
    import numpy as np

    plt = _pyplot()

    d = np.asarray(density.detach().cpu() if hasattr(density, "detach") else density, dtype=np.float64).ravel()
    alive = d[d > 0]
    dead = int((d <= 0).sum())
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if len(alive):
        ax.hist(np.log10(alive), bins=bins, color="tab:blue")
    note = f"{len(alive)} alive, {dead} dead ({dead / max(len(d), 1):.1%}: never fired, not in the histogram)"
    ax.set(xlabel="log10(fraction of tokens on which the latent fires)", ylabel="latents")
    ax.set_title(f"{title or f'latent density ({len(d)} latents)'}\n{note}", fontsize=10)
    ax.grid(alpha=0.3)
    return _save(fig, out, dpi=100)
