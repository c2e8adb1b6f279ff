"""dictionary_learning (saprmarks/dictionary_learning, PyPI ``dictionary-learning``) autoencoders.

Its trainers write ``<run>/ae.pt``, a ``torch.save``'d (pickled) state dict, beside ``<run>/config.json``
(``{"trainer": {"dict_class": ..., ...}, ...}``); version 0.1.0 writes no safetensors. saehook reads safetensors
and JSON, and pickles only in OpenAI's released files, so :func:`saehook.load` recognises this layout
(:func:`is_dictionary_learning`) and refuses it, naming :func:`from_state_dict`: unpickle the file yourself
where you trust it (``torch.load(path, weights_only=True)``), convert the state dict, and save it
(``sae.save(dir)``: safetensors + JSON) for every later load.

The layouts, in dictionary_learning's formulas (``x`` in the units it was trained on: its ``scale_biases`` has
already put a normalisation factor into the saved biases):

- ``BatchTopKSAE``: ``encoder.weight [n, d]``, ``encoder.bias [n]``, ``decoder.weight [d, n]``, ``b_dec [d]``,
  ``k``, ``threshold`` (a scalar). Inference ``a = ReLU(encoder(x - b_dec))``, ``z = a (a > threshold)``,
  ``x_hat = decoder(z) + b_dec``. -> :class:`~saehook.BatchTopKSAE` with ``k_max = n`` (no cap, as there).
- ``MatryoshkaBatchTopKSAE``: ``W_enc [d, n]``, ``b_enc``, ``W_dec [n, d]``, ``b_dec``, ``k``, ``threshold``,
  ``group_sizes``: the same formula with ``x @ W_enc + b_enc``. -> :class:`~saehook.MatryoshkaBatchTopKSAE`
  with prefixes the running sums of ``group_sizes``.
- ``JumpReluAutoEncoder``: ``W_enc [d, n]``, ``b_enc``, ``W_dec [n, d]``, ``b_dec``, ``threshold [n]``;
  ``pre = x @ W_enc + b_enc`` (``b_dec`` not subtracted), ``z = ReLU(pre (pre > threshold))``. ->
  :class:`~saehook.JumpReLUSAE` with ``b_enc + W_enc b_dec`` (so that subtracting ``b_dec`` changes nothing),
  ``log_threshold = log(max(threshold, 0))`` and the cap ``k = n``.

An untrained BatchTopK's ``threshold`` (-1) keeps every positive activation there; saehook's threshold 0 does the
same (its -1 would mean per-row TopK).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import Tensor

from ..sae import TopKSAE
from ._common import FormatError, build_sae

FILE = "ae.pt"
CONFIG = "config.json"
LAYOUTS = {
    "BatchTopKSAE": {"encoder.weight", "encoder.bias", "decoder.weight", "b_dec", "k", "threshold"},
    "MatryoshkaBatchTopKSAE": {"W_enc", "b_enc", "W_dec", "b_dec", "k", "threshold", "group_sizes"},
    "JumpReluAutoEncoder": {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"},
}
"""``{dict_class: tensor names}`` of the layouts :func:`from_state_dict` converts."""


def _dict_class(config: Path) -> str | None:
    """``config.json``'s ``trainer.dict_class``, or None when it is not a dictionary_learning config."""
    try:
        cfg = json.loads(config.read_text())
    except (OSError, ValueError):
        return None
    trainer = cfg.get("trainer") if isinstance(cfg, dict) else None
    return str(trainer.get("dict_class")) if isinstance(trainer, dict) and "dict_class" in trainer else None


def is_dictionary_learning(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a dictionary_learning run (a folder with ``ae.pt`` and a ``config.json`` that has
    ``trainer.dict_class``) or the ``ae.pt`` (any ``.pt``) inside one. Reads only the JSON."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    pt = path if path.is_file() else folder / FILE
    return pt.is_file() and pt.suffix in (".pt", ".pth") and _dict_class(folder / CONFIG) is not None


def refusal(path: str | os.PathLike) -> FormatError:
    """The error :func:`saehook.load` raises for a dictionary_learning run: what it is and how to convert it."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    pt = path if path.is_file() else folder / FILE
    cls = _dict_class(folder / CONFIG)
    return FormatError(
        f"{pt} is a dictionary_learning {cls} saved as a pickle (torch.save), which saehook does not unpickle; "
        f"if you trust the file, convert it once with sae = saehook.formats.dictionary_learning.from_state_dict("
        f"torch.load({str(pt)!r}, weights_only=True), {cls!r}) and sae.save(<dir>), then load that folder")


def from_state_dict(state: dict[str, Tensor], dict_class: str, *, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None) -> TopKSAE:
    """A dictionary_learning state dict (what ``ae.pt`` holds, already loaded by you) of class ``dict_class`` (its
    ``config.json``'s ``trainer.dict_class``) -> the saehook autoencoder with the same codes and reconstructions
    (module docstring). ``dtype`` defaults to the weights'. Raises ``FormatError`` for another class or missing
    tensors."""
    if dict_class not in LAYOUTS:
        raise FormatError(f"dictionary_learning {dict_class!r} has no saehook conversion; saehook converts "
                          f"{', '.join(sorted(LAYOUTS))}")
    missing = sorted(LAYOUTS[dict_class] - state.keys())
    if missing:
        raise FormatError(f"this state dict is not a dictionary_learning {dict_class}: {missing} missing; it has "
                          f"{sorted(state)}")
    t = {name: v.detach().to("cpu", torch.float64) if v.is_floating_point() else v for name, v in state.items()}
    where = f"dictionary_learning {dict_class}"
    meta = {"source_format": "dictionary_learning", "dict_class": dict_class}
    if dict_class == "JumpReluAutoEncoder":
        from ..jumprelu import JumpReLUSAE

        W_enc = t["W_enc"].T  # [n, d]
        n = W_enc.shape[0]
        sae = build_sae(W_enc, t["b_enc"] + W_enc @ t["b_dec"], t["W_dec"], t["b_dec"], n, where=where,
                        cls=JumpReLUSAE, dtype=dtype or state["W_dec"].dtype, device=device, metadata=meta)
        with torch.no_grad():
            sae.log_threshold.copy_(t["threshold"].clamp_min(0).log())
        return sae
    from functools import partial

    if dict_class == "BatchTopKSAE":
        from ..batchtopk import BatchTopKSAE

        W_enc, b_enc, W_dec, weights = t["encoder.weight"], t["encoder.bias"], t["decoder.weight"].T, "decoder.weight"
        cls = partial(BatchTopKSAE, k_max=W_enc.shape[0])
    else:
        from ..matryoshka import MatryoshkaBatchTopKSAE

        W_enc, b_enc, W_dec, weights = t["W_enc"].T, t["b_enc"], t["W_dec"], "W_dec"
        prefixes = [int(v) for v in torch.cumsum(t["group_sizes"].reshape(-1), 0)]
        cls = partial(MatryoshkaBatchTopKSAE, k_max=W_enc.shape[0], prefixes=prefixes)
    sae = build_sae(W_enc, b_enc, W_dec, t["b_dec"], int(t["k"]), where=where, cls=cls,
                    dtype=dtype or state[weights].dtype, device=device, metadata=meta)
    with torch.no_grad():  # theirs -1 (never trained) keeps every positive activation: threshold 0 here
        sae.threshold.copy_(t["threshold"].reshape(()).clamp_min(0))
    return sae
