"""The demo's last step: find a latent for a topic by labelled text, then steer it on a neutral prompt.

:func:`find_and_steer` runs :func:`saehook.features.find_by_labels` over a small labelled sample (the BBC
News topics in ``saehook demo``), takes the latent ranked first for one label (largest effect), and
generates greedily from a prompt that names no topic twice: unsteered, and with that latent added at
``multiple`` times its typical activation (:mod:`saehook.strength`), on the generated positions only.

The typical activation used is the latent's mean activation where it fires on the label's documents
(:attr:`saehook.features.LabelLatent.mean_in`), the unit of the measured SmolLM2 sweep in
docs/steering.md (topic words from about 6 x, grammar breaking past about 12 x).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import torch

from .features import LabelLatent, find_by_labels
from .hookpoints import Key
from .hooks import attach
from .sae import TopKSAE
from .strength import steering_values

__all__ = ["DEMO_PER_LABEL", "NEUTRAL_PROMPT", "TopicSteer", "find_and_steer"]

log = logging.getLogger("saehook")

NEUTRAL_PROMPT = "I want to tell you about"
"""A prompt that names no topic: what follows it is the model's choice, so a steered topic shows."""

DEMO_PER_LABEL = 10
"""Documents per label that ``saehook demo`` searches (128 tokens each): the 50 BBC documents take 15-35 s for
SmolLM2 at layer 20 on 2 shared vCPUs (load 4-5), and rank the same *sports* latent first as 40 per label do
with the autoencoder of docs/steering.md."""


class TopicSteer(NamedTuple):
    """What :func:`find_and_steer` found and generated."""

    key: Key
    """The hookpoint of the autoencoder that was searched and steered."""
    found: LabelLatent
    """The latent ranked first for the label (``found.latent``, ``found.effect``, firing rates, ``mean_in``)."""
    typical: float
    """Its typical activation: mean activation where it fires on the label's documents (``found.mean_in``)."""
    multiple: float
    """The steering strength in multiples of :attr:`typical`."""
    value: float
    """``multiple * typical``: the value passed to :meth:`saehook.Hooked.steer` (the latent's own units)."""
    prompt: str
    clean: str
    """The greedy continuation without steering (new tokens only, decoded)."""
    steered: str
    """The greedy continuation with the latent steered on the generated positions."""
    documents: int
    """Labelled documents read to find the latent."""
    find_seconds: float
    """Wall time of the search (one forward over the documents)."""
    generate_seconds: float
    """Wall time of the two generations."""

    def lines(self) -> list[str]:
        """The result as printable lines: latent, label effect, typical activation, multiple, both texts."""
        f = self.found
        return [f"latent {f.latent} at {self.key}: the most specific to {f.label!r} of {self.documents} labelled "
                f"documents (effect {f.effect:.3f}; fires on {f.rate_in:.1%} of {f.label} tokens, "
                f"{f.rate_out:.1%} of the others), found in {self.find_seconds:.0f}s",
                f"typical activation {self.typical:.2f} (its mean where it fires on {f.label}); steering at "
                f"{self.multiple:g} x typical = +{self.value:.1f}, on the generated tokens only",
                f"prompt:                       {self.prompt!r}",
                f"unsteered:                    {self.clean!r}",
                f"steered ({self.multiple:g} x latent {f.latent}): {self.steered!r}"]


@torch.no_grad()
def find_and_steer(model, tokenizer, saes: Mapping[Key, TopKSAE], texts: Sequence[str], labels: Sequence, *,
                   label: str, multiple: float, key: Key | None = None, prompt: str = NEUTRAL_PROMPT,
                   max_new_tokens: int = 30, max_tokens: int | None = 128, batch_size: int = 8,
                   progress: bool = False, say: Callable[[str], None] | None = None) -> TopicSteer:
    """Find the latent most specific to ``label`` and generate from ``prompt`` with and without it steered.

    Args:
        saes: ``{key: TopKSAE}``; the search runs on ``saes[key]`` (``key``: default the first).
        texts: ``N`` documents (:func:`saehook.features.labelled_texts`), cut to ``max_tokens`` tokens each.
        labels: their ``N`` labels; ``label`` must be one of them.
        multiple: steering strength in multiples of the latent's typical activation (its mean activation
            where it fires on ``label``'s documents); about 6-10 suits the SmolLM2 sweep of docs/steering.md.
        max_new_tokens: greedy tokens generated for each text.
        say: called with a line naming each phase as it starts (e.g. ``print``); default: logged at INFO.

    Cost: one forward per ``batch_size`` documents up to the hookpoint, then two greedy generations.
    Raises ``ValueError`` for a ``label`` absent from ``labels`` (before any forward pass), ``KeyError`` for a
    ``key`` not in ``saes``, and ``ValueError`` when no latent fired on the label's tokens.
    """
    say = say or log.info
    if not math.isfinite(multiple):
        raise ValueError(f"multiple must be a finite number of typical activations, got {multiple}")
    key = next(iter(saes)) if key is None else key
    if key not in saes:
        raise KeyError(f"no autoencoder at {key!r}; saes has {list(saes)}")
    names = sorted({str(v) for v in labels})
    if str(label) not in names:
        raise ValueError(f"label {label!r} is not among the labels of the documents {names}; pass one of them")
    say(f"finding the latent most specific to {label!r}: {len(texts)} labelled documents, "
        f"{max_tokens or 'all'} tokens each...")
    t0 = time.perf_counter()
    table = find_by_labels(model, {key: saes[key]}, texts, labels, tokenizer=tokenizer, max_tokens=max_tokens,
                           batch_size=batch_size, progress=progress)[key]
    # the most specific latent that fired on the label's tokens (one that never fired has no typical activation)
    fired = [r for r in table.top(str(label), table.effect.shape[-1]) if r.rate_in > 0]
    if not fired:
        raise ValueError(f"no latent of {key!r} fired on the {label!r} documents, so none can be steered by its "
                         "typical activation; train longer or pass more documents")
    found = fired[0]
    typical = table.mean_activation[table.labels.index(str(label))]
    value = steering_values({key: {found.latent: multiple}}, {key: typical})[key][found.latent]
    find_seconds = time.perf_counter() - t0
    say(f"generating {max_new_tokens} tokens from {prompt!r}, unsteered and with latent {found.latent} at "
        f"{multiple:g} x its typical activation...")
    t0 = time.perf_counter()
    enc = tokenizer(prompt, return_tensors="pt").to(model.device)
    n = enc["input_ids"].shape[1]
    gen = {"max_new_tokens": max_new_tokens, "do_sample": False}
    with attach(model, {key: saes[key]}) as hooked:
        clean = model.generate(**enc, **gen)
        with hooked.steer({key: {found.latent: value}}, positions="generated"):
            steered = model.generate(**enc, **gen)
    text = [tokenizer.decode(s[0, n:], skip_special_tokens=True) for s in (clean, steered)]
    return TopicSteer(key, found, float(found.mean_in), float(multiple), value, prompt, text[0], text[1], len(texts),
                      find_seconds, time.perf_counter() - t0)
