"""``saehook.load``: one entry point for every autoencoder layout saehook reads, local or on the Hub."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from ..architectures import class_for
from ..atomic import committed
from ..hookpoints import hookpoint_dirname
from ..sae import CFG_NAME, WEIGHTS_NAME, TopKSAE, shard_weights_name
from . import dictionary_learning, saelens, sparsify
from ._common import KNOWN_FORMATS, FormatError, listing, read_json, tensor_names
from .layernorm import LN_FORMAT, LayerNormTopKSAE
from .openai import is_torch_file, load_openai

FORMATS = ("saehook", "saehook-layernorm", "sparsify", "saelens", "openai", "dictionary_learning")
"""The single-autoencoder formats :func:`detect_format` recognises; :func:`load` reads them all but
``dictionary_learning`` (a pickle: refused, with how to convert it; ``saehook.formats.dictionary_learning``)."""
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
SKIP_DIRS = {"checkpoints"}  # saehook training keeps copies of every hookpoint there
MAX_DEPTH = 3


def single_format(path: str | os.PathLike) -> str | None:
    """The format of one autoencoder at ``path`` (one of :data:`FORMATS`), or None if it is not one."""
    path = committed(path)
    if dictionary_learning.is_dictionary_learning(path):
        return "dictionary_learning"
    if path.is_file():
        return "openai" if is_torch_file(path) else None
    if not (path / CFG_NAME).is_file():
        return None
    if (path / WEIGHTS_NAME).is_file():
        names = tensor_names(path / WEIGHTS_NAME)
        if "encoder.weight" in names:
            return "sparsify"
        if "W_enc" in names:
            return "saehook-layernorm" if read_json(path / CFG_NAME).get("format") == LN_FORMAT else "saehook"
        return None
    if (path / saelens.WEIGHTS).is_file():
        return "saelens"
    if any(path.glob(shard_weights_name(0, "*"))) and "latent_shards" in read_json(path / CFG_NAME):
        return "saehook"  # split by latents (saehook.latent_shard): TopKSAE.load assembles it
    return None


def find_hookpoints(root: str | os.PathLike) -> dict[str, tuple[Path, str]]:
    """``{name: (path, format)}`` of the autoencoders under a folder: sub-folders up to 3 levels deep, named by
    their path relative to ``root`` (``checkpoints/`` and hidden folders skipped); failing any, the
    ``*.pt`` files directly in ``root``, named by their stem (OpenAI's releases are ``<layer>.pt``)."""
    root = Path(root)
    found: dict[str, tuple[Path, str]] = {}

    def walk(d: Path, depth: int) -> None:
        for sub in sorted(d.iterdir()):
            if not sub.is_dir() or sub.name.startswith(".") or sub.name in SKIP_DIRS:
                continue
            fmt = single_format(sub)
            if fmt is not None:
                found[sub.relative_to(root).as_posix()] = (sub, fmt)
            elif depth + 1 < MAX_DEPTH:
                walk(sub, depth + 1)

    if root.is_dir():
        walk(root, 0)
        if not found:
            found = {f.stem: (f, "openai") for f in sorted(root.iterdir()) if f.suffix in (".pt", ".pth")
                     and is_torch_file(f)}
    return found


def detect_format(path: str | os.PathLike) -> str:
    """The format at a local path: one of :data:`FORMATS`, or ``"folder"`` (hookpoint sub-folders)."""
    path = Path(path)
    fmt = single_format(path)
    if fmt is not None:
        return fmt
    if find_hookpoints(path):
        return "folder"
    raise _unknown(path)


def _unknown(path: Path) -> FormatError:
    what = f"found {listing(path)}" if path.exists() else "it does not exist"
    if (path / CFG_NAME).is_file():
        what += f" (a {CFG_NAME} without {WEIGHTS_NAME} or {saelens.WEIGHTS} next to it)"
    known = "; ".join(KNOWN_FORMATS)
    return FormatError(f"no autoencoder saehook can read at {path}: {what}. Known layouts: {known}")


def _load_one(path: Path, fmt: str, device, dtype) -> TopKSAE:
    if fmt == "saehook":  # the class of its architecture (saehook.architectures)
        cls = class_for(read_json(path / CFG_NAME).get("architecture", "topk"))
        return cls.load(path, device=device, dtype=dtype)
    if fmt == "saehook-layernorm":
        return LayerNormTopKSAE.load(path, device=device, dtype=dtype)
    if fmt == "sparsify":
        return sparsify.load_sparsify(path, device=device, dtype=dtype)
    if fmt == "saelens":
        return saelens.load_saelens(path, device=device, dtype=dtype)
    if fmt == "openai":
        return load_openai(path, device=device, dtype=dtype)
    if fmt == "dictionary_learning":
        raise dictionary_learning.refusal(path)
    raise AssertionError(fmt)


def _names(hookpoint) -> list[str]:
    return list(dict.fromkeys([str(hookpoint), hookpoint_dirname(hookpoint)]))


def _pick(found: dict[str, tuple[Path, str]], hookpoint, where: Path) -> tuple[Path, str]:
    for name in _names(hookpoint):
        if name in found:
            return found[name]
    tails = [key for key in found if key.rsplit("/", 1)[-1] in _names(hookpoint)]
    if len(tails) == 1:
        return found[tails[0]]
    raise FormatError(f"no hookpoint {str(hookpoint)!r} in {where}; available: {sorted(found)}")


def load(
    path_or_hub_id: str | os.PathLike,
    hookpoint: str | int | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    revision: str | None = None,
    token: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> TopKSAE | dict[str, TopKSAE]:
    """Load autoencoders in any layout saehook knows, detected from the files:

    - saehook (``TopKSAE.save``; also a :class:`LayerNormTopKSAE`'s), EleutherAI sparsify, SAELens, and OpenAI
      ``sparse_autoencoder`` ``.pt`` state dicts (see ``docs/formats.md``);
    - a folder of several (a training run, a sparsify run, a Hub repo): ``hookpoint=None`` gives
      ``{hookpoint: TopKSAE}`` (or the autoencoder itself when there is only one), ``hookpoint="layers.20"``
      the one in that sub-folder; an unknown hookpoint lists the available ones;
    - a string that is not an existing path and looks like ``org/name``: a Hugging Face Hub repo, fetched
      with ``huggingface_hub.snapshot_download`` (only the hookpoint's sub-folder when one is given).

    ``device`` / ``dtype``: where and in what to put the parameters (default CPU, the file's dtype).
    ``revision``, ``token``, ``cache_dir``: passed to ``snapshot_download`` for Hub repos.
    """
    path = Path(path_or_hub_id).expanduser()
    if not committed(path).exists():
        text = os.fspath(path_or_hub_id)
        if isinstance(path_or_hub_id, str) and HUB_ID.match(text):
            path = _download(text, hookpoint, revision=revision, token=token, cache_dir=cache_dir)
        else:
            raise FileNotFoundError(f"{text} is neither an existing path nor a Hugging Face Hub repo id (org/name)")
    if path.is_file() and path.name in (CFG_NAME, WEIGHTS_NAME, saelens.WEIGHTS):
        path = path.parent
    fmt = single_format(path)
    if fmt is not None:
        if hookpoint is not None and (path / str(hookpoint)).exists():
            fmt = None  # the hookpoint names a sub-folder of this one: fall through
        elif hookpoint is not None:
            sae_hp = None
            if fmt in ("saehook", "saehook-layernorm"):
                sae_hp = (read_json(path / CFG_NAME).get("metadata") or {}).get("hookpoint")
            if path.name not in _names(hookpoint) and sae_hp not in _names(hookpoint):
                raise FormatError(f"{path} is a single autoencoder ({fmt}, hookpoint "
                                  f"{sae_hp or path.name!r}), not a folder with hookpoint {str(hookpoint)!r}")
        if fmt is not None:
            return _load_one(path, fmt, device, dtype)
    found = find_hookpoints(path)
    if not found:
        raise _unknown(path)
    if hookpoint is not None:
        sub, fmt = _pick(found, hookpoint, path)
        return _load_one(sub, fmt, device, dtype)
    saes = {name: _load_one(sub, fmt, device, dtype) for name, (sub, fmt) in found.items()}
    return next(iter(saes.values())) if len(saes) == 1 else saes


def _download(repo_id: str, hookpoint, *, revision: str | None, token: str | None, cache_dir) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - transformers depends on it
        raise ImportError(f"{repo_id!r} is not a local path; loading from the Hub needs huggingface_hub "
                          f"(pip install huggingface_hub)") from e
    patterns = None
    if hookpoint is not None:
        patterns = [p for name in _names(hookpoint) for p in (f"{name}/*", f"{name}.pt")]
    try:
        local = Path(snapshot_download(repo_id, revision=revision, token=token, allow_patterns=patterns,
                                      cache_dir=cache_dir))
    except Exception as e:
        raise FileNotFoundError(f"{repo_id!r} is not an existing path, so it was taken as a Hugging Face Hub repo "
                                f"id, and downloading it failed: {type(e).__name__}: {e}") from e
    if hookpoint is not None and not any((local / n).exists() or (local / f"{n}.pt").exists()
                                         for n in _names(hookpoint)):
        try:
            from huggingface_hub import list_repo_files

            files = list_repo_files(repo_id, revision=revision, token=token)
            available = sorted({f.split("/")[0] for f in files if "/" in f} | {f[:-3] for f in files
                                                                                if f.endswith(".pt")})
        except Exception as e:  # listing is only for the message: fall back to what is cached
            available = sorted(find_hookpoints(local)) + [f"(cached files only; listing the repo failed: "
                                                          f"{type(e).__name__})"]
        raise FormatError(f"no hookpoint {str(hookpoint)!r} in Hub repo {repo_id}; available: {available}")
    return local
