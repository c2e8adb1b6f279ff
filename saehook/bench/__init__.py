"""SAEBench's metrics (Karvonen et al. 2025), offline, on any attached dictionary.

Metrics (one module each, each with a ``<Metric>Config`` dataclass and ``run(model, tokenizer, saes, *, config,
cache_dir, progress) -> {key: result}``): ``sparse_probing`` (:mod:`saehook.bench.sparse_probing`),
``absorption`` (:mod:`saehook.bench.absorption`), ``autointerp`` (:mod:`saehook.bench.autointerp`). They read
hookpoint activations from one on-disk cache (:mod:`saehook.bench.activations`); :func:`run_suite` runs several
and writes SAEBench's JSON layout (:mod:`saehook.bench.results`).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from .activations import Ragged, pooled_codes, token_activations

log = logging.getLogger(__name__)

SUITES = ("sparse_probing", "absorption", "autointerp")
"""The metrics :func:`run_suite` knows, in the order it runs them."""

__all__ = ["SUITES", "Ragged", "parse_suites", "pooled_codes", "run_suite", "token_activations"]


def parse_suites(suites: str | Sequence[str]) -> list[str]:
    """``"sparse_probing,absorption"`` / a list / ``"all"`` -> the metric names in :data:`SUITES` order;
    raises ``ValueError`` naming an unknown one and listing the known."""
    names = [s.strip() for s in (suites.split(",") if isinstance(suites, str) else suites) if s.strip()]
    if "all" in names:
        return list(SUITES)
    bad = [s for s in names if s not in SUITES]
    if bad or not names:
        raise ValueError(f"unknown benchmark suite(s) {bad or names}; choose from {', '.join(SUITES)} or all")
    return [s for s in SUITES if s in names]


def _metric_module(suite: str):
    """The module of metric ``suite``, imported when first used; a clear error when it is not installed."""
    try:
        return importlib.import_module(f"{__name__}.{suite}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{suite}":
            raise
        raise ModuleNotFoundError(f"the {suite} metric is not available in this saehook (no module "
                                  f"saehook.bench.{suite}); run the other suites: {', '.join(SUITES)}",
                                  name=e.name) from None


def run_suite(model, saes: Mapping, suites: str | Sequence[str] = "sparse_probing", *, tokenizer,
              cache_dir: str | Path | None = None, out: str | Path | None = None, name: str = "sae",
              configs: Mapping[str, object] | None = None, progress: bool = True) -> dict[str, dict]:
    """Run benchmark metrics on ``saes`` and write their JSON: ``{suite: {key: result}}``.

    Args:
        model: a Hugging Face causal LM.
        tokenizer: its tokenizer.
        saes: ``{hookpoint key: autoencoder}`` as :func:`saehook.attach` takes them (one dictionary per
            hookpoint; run again with another ``name`` and the same ``cache_dir`` for another dictionary).
        suites: names from :data:`SUITES`, comma-separated or a list, or ``"all"``.
        cache_dir: the activation cache every metric reads and writes (default ``<out>/cache`` when ``out`` is
            given, else none: activations in memory only).
        out: folder of the results (:func:`saehook.bench.results.write_results`); None writes nothing.
        name: the dictionaries' label in the file names.
        configs: ``{suite: its config}``; a suite not in it runs with its defaults.
        progress: progress bars with time estimates on stderr.

    Each result gets ``saehook_l0`` (latents above 0 per token, measured by sparse probing when it ran).
    Raises ``ValueError`` for an unknown suite and ``ModuleNotFoundError`` for a metric this saehook lacks.
    """
    names = parse_suites(suites)
    modules = {s: _metric_module(s) for s in names}  # all found before any runs
    if cache_dir is None and out is not None:
        cache_dir = Path(out) / "cache"
    results: dict[str, dict] = {}
    for suite, mod in modules.items():
        log.info("benchmark %s on %s", suite, list(saes))
        results[suite] = mod.run(model, tokenizer, saes, config=(configs or {}).get(suite), cache_dir=cache_dir,
                                 progress=progress)
    l0 = {k: r.get("saehook_l0") for k, r in results.get("sparse_probing", {}).items()}
    for per_key in results.values():
        for key, r in per_key.items():
            if r.get("saehook_l0") is None and l0.get(key) is not None:
                r["saehook_l0"] = l0[key]
    if out is not None:
        from .results import write_results

        write_results(results, out, name=name, saes=saes)
    return results
