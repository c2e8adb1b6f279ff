"""Which class reads a saehook save: the ``architecture`` field of its ``cfg.json``.

Every dictionary variant is a :class:`~saehook.TopKSAE` subclass sharing its storage, normalisation and save
format; ``cfg.json``'s ``"architecture"`` says which one wrote it (absent in older saves: ``"topk"``), and
:func:`saehook.load` reads each with its own class. A variant registers here by name, module and class (imported
only when a file needs it, so this module imports none of them).
"""

from __future__ import annotations

import importlib

ARCHITECTURES: dict[str, tuple[str, str]] = {
    "topk": ("saehook.sae", "TopKSAE"),
    "jumprelu": ("saehook.jumprelu", "JumpReLUSAE"),
    "transcoder": ("saehook.transcoder", "Transcoder"),
    "skip_transcoder": ("saehook.transcoder", "SkipTranscoder"),
    "batchtopk": ("saehook.batchtopk", "BatchTopKSAE"),
    "matryoshka_batchtopk": ("saehook.matryoshka", "MatryoshkaBatchTopKSAE"),
}
"""``{architecture: (module, class name)}`` of the classes :func:`class_for` returns."""


def class_for(architecture: str) -> type:
    """The class that reads saves of ``architecture``; raises ``ValueError`` naming the known ones."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown autoencoder architecture {architecture!r}; saehook reads "
                         f"{', '.join(sorted(ARCHITECTURES))}")
    module, name = ARCHITECTURES[architecture]
    return getattr(importlib.import_module(module), name)
