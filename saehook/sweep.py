"""A sweep in one pass: several dictionaries on one hookpoint, trained from the same stream of rows.

As dictionary_learning does, the expensive part (the language model's forward, or reading cached activations) is
paid once: every row read at the hookpoint goes into one shuffle buffer, and each batch that leaves it is one
optimizer step of every member (any variant, size, k or recipe), so all members see exactly the same rows in the
same order. Each member has its own :class:`~saehook.trainer.SAETrainer` (its own optimizer, schedule and dead
counters); the input scale and ``b_dec`` of each are fitted on the same first ``init_samples`` rows.

    with saehook.attach(model, {20: saes["k32"]}, record=False) as hooked:   # any member as the hook's carrier
        sweep = Sweep(saes, config, total_tokens=1_000_000)
        for batch in batches:
            hooked.run(batch, skip_positions=1, visit=lambda key, x, valid: sweep.feed(x[valid]))
            sweep.drain()

:func:`train_sweep` does that loop (and saves each member under ``out/<name>``); :meth:`Sweep.feed` also takes
rows from anywhere (an activation cache on disk, :func:`saehook.training.collect_activations`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import Tensor

from .buffer import ShuffleBuffer
from .config import TrainConfig
from .counts import as_count
from .sae import TopKSAE
from .trainer import SAETrainer


class Sweep:
    """Trainers of several autoencoders fed one stream of rows ``[N, d_in]``.

    Args:
        saes: ``{name: autoencoder}``, all of the same ``d_in``.
        config: the recipe of every member; ``configs`` overrides it per name. The batch size, shuffle buffer,
            ``skip_positions``, ``init_samples`` and seed must be the same for all (one buffer feeds them all):
            they come from ``config``.
        total_tokens: the run's length (learning-rate schedule and dead thresholds of every member).

    Raises ``ValueError`` for an empty sweep, mismatched widths, or per-member configs that change the stream.
    """

    STREAM_FIELDS = ("batch_tokens", "shuffle_buffer", "skip_positions", "seed", "init_samples", "target_steps")

    def __init__(self, saes: Mapping[str, TopKSAE], config: TrainConfig | None = None, *,
                 configs: Mapping[str, TrainConfig] | None = None, total_tokens: int | None = None):
        if not saes:
            raise ValueError("a sweep needs at least one {name: autoencoder}")
        config = config or TrainConfig()
        configs = dict(configs or {})
        unknown = set(configs) - set(saes)
        if unknown:
            raise ValueError(f"configs for {sorted(unknown)}, which are not in the sweep ({sorted(saes)})")
        widths = {name: sae.train_width for name, sae in saes.items()}
        if len(set(widths.values())) > 1:
            raise ValueError(f"the members of a sweep read one hookpoint, so they need one d_in (a transcoder's rows "
                             f"are twice as wide); got {widths}")
        for name, cfg in configs.items():
            differ = [f for f in self.STREAM_FIELDS if getattr(cfg, f) != getattr(config, f)]
            if differ:
                raise ValueError(f"the config of {name!r} changes {differ}, which one stream shares: set them in "
                                 "the sweep's config instead")
        self.config = config
        self.trainers = {name: SAETrainer(sae, configs.get(name, config), total_tokens=total_tokens, name=name)
                         for name, sae in saes.items()}
        self.batch_tokens = config.batch_for(total_tokens)
        capacity = config.shuffle_buffer if not total_tokens else min(config.shuffle_buffer, total_tokens // 4)
        first = next(iter(saes.values()))
        self.buffer = ShuffleBuffer(first.train_width, self.batch_tokens, capacity, seed=config.seed,
                                    device=first.W_enc.device)
        self.init_rows = min(tr.init_rows for tr in self.trainers.values())
        self.last: dict[str, dict] = {}
        self.history: list[dict] = []
        """Every member's metrics of every step, as dicts with ``member``."""

    @property
    def tokens(self) -> int:
        """Rows every member has trained on."""
        return min(tr.tokens for tr in self.trainers.values())

    def feed(self, rows: Tensor) -> None:
        """Add rows ``[N, d_in]`` (detached copies are kept until their batch leaves)."""
        self.buffer.add(rows.reshape(-1, self.buffer.d).float())

    def drain(self, flush: bool = False) -> int:
        """One step of every member per full batch (once the first ``init_samples`` rows are in, from which each
        member fits its scale and ``b_dec``); returns the number of batches."""
        trainers = self.trainers.values()
        if not all(tr.initialized for tr in trainers):
            if self.buffer.n < self.init_rows and not (flush and self.buffer.n >= 2):
                return 0
            sample = self.buffer.head(self.init_rows)
            for tr in trainers:
                if not tr.initialized:
                    tr.initialize(sample)
        n = 0
        with torch.enable_grad():
            for batch in self.buffer.batches(flush):
                for name, tr in self.trainers.items():
                    m = tr.step(batch)
                    self.last[name] = m
                    self.history.append({"member": name, **m})
                n += 1
        return n


def train_sweep(hooked, key, saes: Mapping[str, TopKSAE], source: Iterable, tokens: int | str,
                config: TrainConfig | None = None, out=None, *, configs: Mapping[str, TrainConfig] | None = None,
                batch_size: int = 8, progress: bool = True, overwrite: bool = False) -> Sweep:
    """Train every member of ``saes`` on hookpoint ``key`` of an attached model (``hooked``, from
    :func:`saehook.attach`, with any autoencoder at ``key``) from one stream of forward passes over ``source``
    (a :class:`~saehook.Corpus` or batches, as :meth:`saehook.Hooked.train`), each forward stopped after the
    deepest hookpoint. ``tokens``: rows per member. ``out``: each member saved as ``out/<name>`` with
    ``sweep.json`` (names, configs, tokens, seconds) and ``metrics.jsonl``; a folder that is not empty is refused
    unless ``overwrite`` (:mod:`saehook.runs`). Returns the :class:`Sweep` (``last`` metrics per member)."""
    from tqdm.auto import tqdm

    from . import atomic
    from .runs import prepare_run
    from .training import iter_batches

    tokens = as_count(tokens)
    prepare_run(out, overwrite=overwrite)
    if key not in hooked.saes:
        raise KeyError(f"hookpoint {key!r} is not attached; attached: {list(hooked.saes)}")
    cfg = config or TrainConfig()
    sweep = Sweep(saes, cfg, configs=configs, total_tokens=tokens)
    t0 = time.perf_counter()
    bar = tqdm(total=tokens, unit="tok", unit_scale=True, disable=not progress, desc=f"sweep of {len(saes)}")

    def visit(k, x, valid):
        if k == key:
            sweep.feed(x[valid])

    was = hooked.record
    hooked.record = False
    try:
        for batch in iter_batches(source, batch_size=batch_size):
            if sweep.tokens >= tokens:
                break
            with torch.no_grad():
                hooked.run(batch, skip_positions=cfg.skip_positions, visit=visit)
            before = sweep.tokens
            sweep.drain()
            bar.update(sweep.tokens - before)
    finally:
        hooked.record = was
        bar.close()
    seconds = time.perf_counter() - t0
    if out is not None:
        out = Path(out)
        for name, tr in sweep.trainers.items():
            tr.sae.metadata.update(hookpoint=str(hooked.hookpoints[key]), tokens=tr.tokens, steps=tr.step_count)
            tr.sae.save(out / name)
        summary = {"hookpoint": str(hooked.hookpoints[key]), "tokens": sweep.tokens, "seconds": seconds,
                   "members": {name: {"class": type(tr.sae).__name__, "n_latents": tr.sae.n_latents, "k": tr.sae.k,
                                      "config": tr.cfg.to_dict(), "last": sweep.last.get(name)}
                               for name, tr in sweep.trainers.items()}}
        atomic.write_file(out / "sweep.json", atomic.json_bytes(summary))
        atomic.write_file(out / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in sweep.history).encode())
    return sweep
