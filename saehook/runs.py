"""Run folders are never overwritten unasked.

A run folder (``hooked.train(out=...)``, ``saehook train --out``) holds one run's files: ``<hookpoint>/``
autoencoders, ``checkpoints/``, ``metrics.jsonl``, ``train_config.json``, ``tb/`` and the ``report*.json`` of
later evaluations. Starting a run in a folder that is not empty would mix two runs (new autoencoders beside the
old run's metrics, checkpoints and report), so :func:`prepare_run` refuses it unless the caller asks to continue
(``resume``) or to start over (``overwrite``: the run files are removed first, other files are left alone).
Outputs written beside a run (an evaluation report) take the next free name instead (:func:`next_free`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

__all__ = ["RunExistsError", "clear_run", "next_free", "prepare_run", "run_files"]

RUN_NAMES = ("checkpoints", "tb", "train_config.json", "sweep.json")
"""Names a training run writes at the top of its folder, beside its ``<hookpoint>/`` folders and ``metrics*.jsonl``
(``report*.json``: evaluations)."""


class RunExistsError(FileExistsError):
    """A run (or other files) already sits where a new run would be written; nothing was changed."""

    def __str__(self) -> str:  # FileExistsError would show "[Errno None]"
        return str(self.args[0]) if self.args else ""


def run_files(folder: str | os.PathLike) -> list[Path]:
    """The files and folders of a training run directly in ``folder`` (see the module docstring), sorted: the
    names of :data:`RUN_NAMES`, ``metrics*.jsonl``, ``report*.json``, sub-folders holding a ``cfg.json`` (saved
    autoencoders) and hidden leftovers of interrupted saves (``*.saehook-*``)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        n = p.name
        if (n in RUN_NAMES or ".saehook-" in n or (n.startswith("metrics") and n.endswith(".jsonl"))
                or (n.startswith("report") and n.endswith(".json")) or (p.is_dir() and (p / "cfg.json").is_file())):
            found.append(p)
    return sorted(found)


def clear_run(folder: str | os.PathLike) -> list[Path]:
    """Remove the run files of ``folder`` (:func:`run_files`); other files stay. Returns what was removed."""
    removed = run_files(folder)
    for p in removed:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    return removed


def prepare_run(out: str | os.PathLike | None, *, resume: bool = False, overwrite: bool = False, clear: bool = True,
                flags: tuple[str, str, str] = ("out=", "resume=True", "overwrite=True")) -> None:
    """Check that a run may be written to ``out`` and, with ``overwrite`` (and ``clear``), clear its old run files.

    Allowed: ``out`` None, missing or empty; ``resume`` with a checkpoint in ``out/checkpoints``; ``overwrite``
    (its run files are removed, other files kept; ``clear=False`` only checks, for a caller that clears later).
    ``flags`` names the three options in the errors (the CLI passes ``("--out", "--resume", "--overwrite")``).

    Raises:
        ValueError: both ``resume`` and ``overwrite``.
        FileNotFoundError: ``resume`` without a checkpoint in ``out``.
        RunExistsError: ``out`` is not empty and neither ``resume`` nor ``overwrite`` is given.
        NotADirectoryError: ``out`` is a file.
    """
    o, r, w = flags
    if resume and overwrite:
        raise ValueError(f"{r} continues the run in {o} and {w} deletes it: pass one of them")
    if out is None:
        if resume:
            raise FileNotFoundError(f"{r} needs the run folder to continue: pass {o}")
        return
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{o} {out} is a file, not a folder: choose a folder for the run")
    if resume:
        if not (out / "checkpoints" / "LATEST").is_file():
            raise FileNotFoundError(f"{r}: there is no checkpoint in {out}/checkpoints to continue from; "
                                    f"start a new run in an empty folder, or pass {w} to replace what is there")
        return
    contents = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not contents:
        return
    if overwrite:
        if clear:
            clear_run(out)
        return
    what = "a training run" if run_files(out) else "files"
    shown = ", ".join(contents[:4]) + (", ..." if len(contents) > 4 else "")
    raise RunExistsError(f"{out} already holds {what} ({shown}): choose a new {o} folder, pass {r} to continue "
                         f"that run, or {w} to delete its run files and start again")


def next_free(path: str | os.PathLike) -> Path:
    """``path`` if nothing is there, else the first free of ``<stem>-2<suffix>``, ``<stem>-3<suffix>``, ...
    (``report.json`` -> ``report-2.json``; ``runs/demo`` -> ``runs/demo-2``)."""
    path = Path(path)
    if not path.exists():
        return path
    i = 2
    while (cand := path.with_name(f"{path.stem}-{i}{path.suffix}")).exists():
        i += 1
    return cand
