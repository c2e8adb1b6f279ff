"""The suite's results on disk, in SAEBench's layout, and plots of a metric against L0 for several dictionaries.

One JSON file per dictionary, hookpoint and metric (written atomically, :func:`saehook.atomic.write_file`)::

    <out>/<eval_type_id>/<name>_<hookpoint>_eval_results.json

as SAEBench writes ``eval_results/<eval_type_id>/<release>_<sae_id>_eval_results.json``. Each holds SAEBench's
top-level fields (``eval_type_id``, ``eval_config``, ``eval_id``, ``datetime_epoch_millis``,
``eval_result_metrics``, ``eval_result_details``, ``sae_bench_commit_hash`` (None: not run by SAEBench),
``sae_lens_id`` / ``sae_lens_release_id`` / ``sae_lens_version`` (None), ``sae_cfg_dict``,
``eval_result_unstructured``) plus saehook's own, prefixed ``saehook_`` (``saehook_version``,
``saehook_wall_seconds``, ``saehook_l0``, ``saehook_hookpoint``, ``saehook_name``).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from pathlib import Path

from ..atomic import json_bytes, write_file
from ..hookpoints import hookpoint_dirname
from ..sae import TopKSAE

__all__ = ["saebench_record", "write_results", "read_results", "metric_value", "plot_against_l0"]


def saebench_record(result: Mapping, *, name: str, hookpoint: str, sae: TopKSAE | None = None) -> dict:
    """One metric's ``result`` (from a metric's ``run``) as the JSON object SAEBench writes for it."""
    from .. import __version__

    cfg = None
    if sae is not None:  # SAELens's cfg names where they mean the same
        cfg = {"architecture": getattr(sae, "architecture", "topk"), "d_in": sae.d_in, "d_sae": sae.n_latents,
               "k": getattr(sae, "k", None), "hook_name": hookpoint}
    rec = {"eval_type_id": result["eval_type_id"], "eval_config": dict(result["eval_config"]),
           "eval_id": str(uuid.uuid4()), "datetime_epoch_millis": int(time.time() * 1000),
           "eval_result_metrics": result["eval_result_metrics"],
           "eval_result_details": list(result.get("eval_result_details", [])),
           "sae_bench_commit_hash": None, "sae_lens_id": None, "sae_lens_release_id": None,
           "sae_lens_version": None, "sae_cfg_dict": cfg,
           "eval_result_unstructured": result.get("eval_result_unstructured"),
           "saehook_version": __version__, "saehook_name": name, "saehook_hookpoint": hookpoint,
           "saehook_wall_seconds": result.get("wall_seconds")}
    rec.update({k: v for k, v in result.items() if k.startswith("saehook_")})
    return rec


def write_results(results: Mapping[str, Mapping], out: str | Path, *, name: str = "sae",
                  saes: Mapping | None = None) -> list[Path]:
    """Write ``{suite: {key: result}}`` under ``out`` (see the module docstring); returns the files written.
    ``saes`` (``{key: autoencoder}``) fills ``sae_cfg_dict``."""
    paths = []
    for per_key in results.values():
        for key, result in per_key.items():
            hp = hookpoint_dirname(key if isinstance(key, str) else f"layer{key}")
            path = Path(out) / result["eval_type_id"] / f"{name}_{hp}_eval_results.json".replace("/", "_")
            path.parent.mkdir(parents=True, exist_ok=True)
            write_file(path, json_bytes(saebench_record(result, name=name, hookpoint=str(key),
                                                        sae=(saes or {}).get(key))))
            paths.append(path)
    return paths


def read_results(out: str | Path, eval_type_id: str) -> dict[str, dict]:
    """``{file stem: record}`` of every ``<out>/<eval_type_id>/*_eval_results.json``."""
    import json

    return {p.name[:-len("_eval_results.json")]: json.loads(p.read_text())
            for p in sorted(Path(out, eval_type_id).glob("*_eval_results.json"))}


def metric_value(record: Mapping, metric: str) -> float | None:
    """``metric`` (``"sae_top_1_test_accuracy"`` or ``"sae.sae_top_1_test_accuracy"``) from a record's
    ``eval_result_metrics``; raises ``KeyError`` listing the metrics it has."""
    sections = record["eval_result_metrics"]
    if "." in metric:
        sec, name = metric.split(".", 1)
        if name in sections.get(sec, {}):
            return sections[sec][name]
    for values in sections.values():
        if metric in values:
            return values[metric]
    have = [f"{s}.{n}" for s, v in sections.items() for n in v]
    raise KeyError(f"no metric {metric!r} in this {record.get('eval_type_id')} result; it has {have}")


def plot_against_l0(results: Mapping[str, Mapping], metric: str | list[str], out: str | Path, *,
                    l0: Mapping[str, float] | None = None, groups: Mapping[str, str] | None = None,
                    title: str = "") -> Path:
    """One point per dictionary: ``metric`` (one name or several, one series each) against its L0, log x axis.

    Args:
        results: ``{label: record}`` (a metric's result or a written JSON record, e.g. from :func:`read_results`).
        metric: a name in ``eval_result_metrics`` (see :func:`metric_value`). A ``sae_*`` metric whose ``llm_*``
            twin exists gets that baseline as a dashed line (the model's own activations).
        l0: ``{label: L0}``; default each record's ``saehook_l0``.
        groups: ``{label: family}``: the dictionaries of a family are joined by a line in L0 order, one colour
            each (e.g. a variant at several k); default none: separate markers.
    Raises ``ValueError`` when a dictionary has no L0. Writes a PNG to ``out`` and returns its path.
    """
    from ..plots import pyplot, save_figure

    metrics = [metric] if isinstance(metric, str) else list(metric)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = {}
    for label, rec in results.items():
        x = (l0 or {}).get(label, rec.get("saehook_l0"))
        if x is None:
            raise ValueError(f"no L0 for {label!r}: pass l0={{label: value}} or a result holding saehook_l0")
        xs[label] = x
    for m in metrics:
        pts = sorted((xs[lab], metric_value(rec, m), lab) for lab, rec in results.items())
        if groups is None:  # separate dictionaries: markers only (a line would suggest one family)
            line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", label=m)
        else:  # one line per group, in L0 order
            for g in dict.fromkeys(groups.get(p[2], p[2]) for p in pts):
                gp = [p for p in pts if groups.get(p[2], p[2]) == g]
                line, = ax.plot([p[0] for p in gp], [p[1] for p in gp], "o-",
                                label=g if len(metrics) == 1 else f"{g}: {m}")
        for x, y, lab in pts:
            ax.annotate(lab, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        name = m.split(".")[-1]
        if name.startswith("sae_"):
            try:
                base = [metric_value(rec, "llm_" + name[4:]) for rec in results.values()]
            except KeyError:
                base = []
            if base and base[0] is not None:
                ax.axhline(sum(base) / len(base), ls="--", color=line.get_color(), alpha=0.6,
                           label="llm_" + name[4:] + " (activations)")
    ax.set_xscale("log")
    ax.set(xlabel="L0 (latents above 0 per token)", ylabel=metrics[0] if len(metrics) == 1 else "value",
           title=title or ", ".join(metrics))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, out, dpi=120)
