"""Where an autoencoder reads: resolve user keys (layer indices, module paths) to modules.

A key is either
- an ``int``: a decoder-layer index, found structurally (the model's one ``ModuleList`` whose length is
  the config's number of layers; works for Llama, GPT-2, GPT-NeoX, Gemma, Qwen, ...). Negative
  indices count from the end. The hookpoint is the layer's output: the residual stream after it.
- a ``str``: a module path from ``model.named_modules()``, optionally with a site suffix
  ``":output"`` (default) or ``":input"`` (the module's first positional or ``hidden_states`` input).
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from torch import nn

Key = Union[int, str]
SITES = ("output", "input")


@dataclass(frozen=True)
class Hookpoint:
    """A resolved place in the model that an autoencoder reads and may write."""

    key: Key
    """The key the user gave (results are keyed by it)."""
    name: str
    """Module path, e.g. ``model.layers.20``."""
    module: nn.Module
    site: str
    """``"output"`` or ``"input"``."""
    layer: int | None
    """Index of the decoder layer this hookpoint lies in (None if outside the layer stack)."""
    width: int | None
    """Activation width if known before any forward, else None (checked at the first forward)."""

    def __str__(self) -> str:
        return self.name if self.site == "output" else f"{self.name}:{self.site}"


def hookpoint_dirname(hookpoint: Hookpoint | str) -> str:
    """The folder name of a hookpoint in a training run or a folder of autoencoders: its ``str`` with ``:``
    and ``/`` made ``_`` (``model.layers.20``, ``lm_head:input`` -> ``lm_head_input``). Inverse:
    :func:`hookpoint_of_dirname`."""
    return str(hookpoint).replace(":", "_").replace("/", "_")


def hookpoint_of_dirname(name: str) -> str:
    """The hookpoint key a folder name written by :func:`hookpoint_dirname` stands for: a trailing ``_input``
    / ``_output`` becomes the site suffix (``lm_head_input`` -> ``lm_head:input``); other names are module
    paths as they are."""
    for site in SITES:
        if name.endswith("_" + site):
            return name[: -len(site) - 1] + ":" + site
    return name


def saved_key(path: str | os.PathLike, metadata: Mapping) -> str:
    """The hookpoint key of an autoencoder saved at ``path``: ``metadata["hookpoint"]`` (written by
    training), else what its folder name stands for (:func:`hookpoint_of_dirname`)."""
    return metadata.get("hookpoint") or hookpoint_of_dirname(Path(path).resolve().name)


def unwrap(model) -> nn.Module:
    """The ``torch.nn.Module`` behind a model wrapper (e.g. an ``nnsight.LanguageModel``)."""
    if isinstance(model, nn.Module):
        return model
    for attr in ("_model", "_module"):  # where nnsight wrappers keep it (older releases: _model)
        inner = getattr(model, attr, None)
        if isinstance(inner, nn.Module):
            return inner
    raise TypeError(f"expected a torch.nn.Module (a transformers model), got {type(model).__name__}")


def _config_int(model: nn.Module, names: tuple[str, ...]) -> int | None:
    """The first integer attribute among ``names`` of the model's (text) config, else None."""
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "get_text_config", lambda: cfg)() if cfg is not None else None
    for attr in names:
        n = getattr(cfg, attr, None)
        if isinstance(n, int):
            return n
    return None


def num_layers_of(model: nn.Module) -> int | None:
    """The configured decoder-layer count (``num_hidden_layers``, ``n_layer`` or ``num_layers`` of the
    config, or of its text config), or None when the config has none."""
    return _config_int(model, ("num_hidden_layers", "n_layer", "num_layers"))


def find_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder-layer stack: the ModuleList whose length equals the configured layer count
    (falling back to the longest ModuleList)."""
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of layers; pass module paths instead")
    n_layers = num_layers_of(model)
    matching = [(n, m) for n, m in lists if len(m) == n_layers]
    return matching[0] if matching else max(lists, key=lambda nm: len(nm[1]))


def hidden_size_of(model: nn.Module) -> int | None:
    """The configured hidden size (``hidden_size``, ``n_embd`` or ``d_model`` of the config, or of its
    text config), or None when the config has none."""
    return _config_int(model, ("hidden_size", "n_embd", "d_model"))


def _module_width(module: nn.Module, site: str) -> int | None:
    """Width of a module's output/input when its type tells us, else None."""
    if isinstance(module, nn.Linear):
        return module.out_features if site == "output" else module.in_features
    if isinstance(module, nn.Embedding):
        return module.embedding_dim if site == "output" else None
    if type(module).__name__ == "Conv1D":  # GPT-2's transposed linear: weight [in, out]
        return module.weight.shape[1] if site == "output" else module.weight.shape[0]
    w = getattr(module, "weight", None)
    if "norm" in type(module).__name__.lower() and w is not None and w.dim() == 1:
        return w.shape[0]
    return None


def resolve(model: nn.Module, key: Key) -> Hookpoint:
    """Resolve one key to a :class:`Hookpoint`, with errors that list what exists."""
    if isinstance(key, bool) or not isinstance(key, (int, str)):
        raise TypeError(f"hookpoint keys are layer indices (int) or module paths (str), got {key!r}")
    layers_name, layers = find_layers(model)
    hidden = hidden_size_of(model)
    if isinstance(key, int):
        n = len(layers)
        if not -n <= key < n:
            raise IndexError(
                f"layer index {key} is out of range: the model has {n} decoder layers "
                f"({layers_name}.0 .. {layers_name}.{n - 1}); use 0..{n - 1} or negative indices"
            )
        i = key % n
        return Hookpoint(key, f"{layers_name}.{i}", layers[i], "output", i, hidden)

    name, _, site = key.partition(":")
    site = site or "output"
    if site not in SITES:
        raise ValueError(f"unknown site {site!r} in hookpoint {key!r}; use one of {SITES}")
    modules = dict(model.named_modules())
    base = getattr(model, "base_model_prefix", "")
    if name not in modules and base and f"{base}.{name}" in modules:
        # a path inside the base model, as sparsify names hookpoints (`layers.20` is `model.layers.20`)
        name = f"{base}.{name}"
    if name not in modules:
        near = difflib.get_close_matches(name, list(modules), n=5, cutoff=0.5)
        example = [f"{layers_name}.0", f"{layers_name}.0.mlp"] if f"{layers_name}.0.mlp" in modules else [
            f"{layers_name}.0"]
        raise KeyError(
            f"no module named {name!r} in {type(model).__name__}; nearest valid paths: {near or example}"
            f" (decoder layers are {layers_name}.0 .. {layers_name}.{len(layers) - 1})"
        )
    module = modules[name]
    layer = None
    prefix = layers_name + "."
    if name.startswith(prefix):
        layer = int(name[len(prefix):].split(".")[0])
    width = _module_width(module, site)
    if width is None and layer is not None and (name.count(".") == layers_name.count(".") + 1):
        width = hidden  # a whole decoder layer reads and writes the residual stream
    return Hookpoint(key, name, module, site, layer, width)
