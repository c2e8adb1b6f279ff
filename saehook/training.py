"""Online training from streamed forward passes: every hooked autoencoder learns from the same pass.

Activations never touch the disk: each forward's rows (BOS / first positions and padding excluded)
go into one shuffling buffer per hookpoint, and full batches go to that hookpoint's
:class:`~saehook.trainer.SAETrainer`. When the pass exists only to train, it stops right after the
deepest hookpoint has been read (no later layers, no lm_head).

Run layout (``out``)::

    out/<hookpoint>/cfg.json, sae.safetensors   the latest autoencoders, loadable with TopKSAE.load
    out/checkpoints/step-000500/...             autoencoders + trainer/buffer/data state (resume)
    out/checkpoints/LATEST                      name of the newest complete checkpoint
    out/metrics.jsonl                           one JSON line per logged step and hookpoint
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from .buffer import ShuffleBuffer
from .config import TrainConfig
from .sae import _atomic_write
from .trainer import SAETrainer

log = logging.getLogger(__name__)


class StopForward(Exception):
    """Raised inside the model once every hookpoint has been read: the rest of the pass is skipped."""


@dataclass
class TrainReport:
    """What a run achieved: ``report[key]`` is the last metrics dict of that hookpoint."""

    metrics: dict
    tokens: int
    steps: int
    seconds: float
    out: Path | None
    history: list = field(default_factory=list, repr=False)

    def __getitem__(self, key):
        return self.metrics[key]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def hookpoint_dirname(hp) -> str:
    return str(hp).replace(":", "_").replace("/", "_")


class TrainingSession:
    """Buffers and trainers for every hookpoint of a :class:`~saehook.Hooked`; fed by its taps."""

    def __init__(self, hooked, config: TrainConfig, *, total_tokens: int | None = None, stop_early=False):
        self.hooked, self.cfg, self.stop_early = hooked, config, stop_early
        self.trainers: dict = {}
        self.buffers: dict = {}
        for i, (key, sae) in enumerate(hooked.saes.items()):
            name = str(hooked.hookpoints[key])
            self.trainers[key] = SAETrainer(sae, config, total_tokens=total_tokens, name=name)
            self.buffers[key] = ShuffleBuffer(sae.d_in, config.batch_tokens, config.shuffle_buffer,
                                              seed=config.seed + i, device=sae.W_enc.device)
        self.attention_mask: Tensor | None = None
        self.seen: set = set()
        self.last: dict = {}
        self.on_step = None  # callback(key, metrics)

    def valid_rows(self, hp, x: Tensor) -> Tensor:
        """Rows of ``x [B, T, d]`` to train on: not padding, not among the first ``skip_positions``."""
        skip = self.cfg.skip_positions
        if x.dim() == 2:
            return x
        mask = self.attention_mask
        if mask is not None and mask.shape == x.shape[:2]:
            mask = mask.to(x.device).bool()
            pos = mask.long().cumsum(-1) - 1
            keep = mask & (pos >= skip)
        else:
            keep = (self.hooked._positions_for(hp, x) >= skip).expand(x.shape[:2])
        return x[keep]

    def tap(self, key, hp, x: Tensor) -> None:
        rows = self.valid_rows(hp, x)
        if self.cfg.nan_policy == "raise" and not bool(torch.isfinite(rows).all()):
            t = self.trainers[key]
            raise FloatingPointError(f"non-finite activations at step {t.step_count} for {hp}")
        self.buffers[key].add(rows)
        self.seen.add(key)
        if self.stop_early and len(self.seen) == len(self.trainers):
            self.seen = set()
            raise StopForward

    def drain(self, flush: bool = False) -> int:
        """Train on every full batch; returns the number of steps taken (per hookpoint)."""
        n = 0
        with torch.enable_grad():
            for key, buf in self.buffers.items():
                for batch in buf.batches(flush):
                    self.last[key] = self.trainers[key].step(batch)
                    if self.on_step:
                        self.on_step(key, self.last[key])
                    n += key == next(iter(self.buffers))
        return n

    @property
    def tokens(self) -> int:
        return next(iter(self.trainers.values())).tokens

    # ------------------------------------------------------------------ checkpoints
    def save(self, out: Path, position: int, keep: int = 2) -> Path:
        """Write a complete checkpoint into a temporary dir, rename it into place, then point LATEST at it;
        a kill at any moment leaves the previous checkpoint loadable. Also refresh ``out/<hookpoint>/``."""
        ck_root = out / "checkpoints"
        ck_root.mkdir(parents=True, exist_ok=True)
        step = next(iter(self.trainers.values())).step_count
        name = f"step-{step:07d}"
        tmp = ck_root / f".tmp-{name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        scalars = {"position": position, "config": self.cfg.to_dict(), "hookpoints": {}}
        for key, tr in self.trainers.items():
            d = hookpoint_dirname(self.hooked.hookpoints[key])
            tr.sae.save(tmp / d)
            tensors = tr.state_tensors()
            tensors.update({f"buffer.{k}": v for k, v in self.buffers[key].state().items()})
            save_file(tensors, str(tmp / d / "state.safetensors"))
            scalars["hookpoints"][d] = {"key": key, **tr.state_scalars()}
        (tmp / "state.json").write_text(json.dumps(scalars, indent=2))
        final = ck_root / name
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _atomic_write(ck_root / "LATEST", lambda p: Path(p).write_text(name))
        for key, tr in self.trainers.items():
            tr.sae.save(out / hookpoint_dirname(self.hooked.hookpoints[key]))
        old = sorted(p for p in ck_root.glob("step-*") if p.name != name)
        for p in old[: max(0, len(old) - (keep - 1))]:
            shutil.rmtree(p, ignore_errors=True)
        return final

    def load(self, out: Path) -> int:
        """Restore from ``out/checkpoints/LATEST``; returns the data position (source batches consumed)."""
        ck = out / "checkpoints" / (out / "checkpoints" / "LATEST").read_text().strip()
        scalars = json.loads((ck / "state.json").read_text())
        for key, tr in self.trainers.items():
            d = hookpoint_dirname(self.hooked.hookpoints[key])
            if d not in scalars["hookpoints"]:
                raise ValueError(f"checkpoint {ck} has no state for {d}; it has {sorted(scalars['hookpoints'])}")
            saved = type(tr.sae).load(ck / d, device=tr.sae.W_enc.device)
            if (saved.d_in, saved.n_latents, saved.k) != (tr.sae.d_in, tr.sae.n_latents, tr.sae.k):
                raise ValueError(f"checkpoint autoencoder for {d} has shape {(saved.d_in, saved.n_latents, saved.k)}"
                                 f", the attached one {(tr.sae.d_in, tr.sae.n_latents, tr.sae.k)}")
            tr.sae.load_state_dict(saved.state_dict())
            tr.sae.metadata = saved.metadata
            tensors = load_file(str(ck / d / "state.safetensors"))
            self.buffers[key].load_state({k[7:]: v for k, v in tensors.items() if k.startswith("buffer.")})
            tr.load_state({k: v for k, v in tensors.items() if not k.startswith("buffer.")}, scalars["hookpoints"][d])
        log.info("resumed from %s at data position %d", ck, scalars["position"])
        return scalars["position"]


@torch.no_grad()
def collect_activations(hooked, source, tokens: int, *, batch_size: int = 8, skip_positions: int = 1) -> dict:
    """Run forward passes over ``source`` until ``tokens`` rows per hookpoint are gathered (first
    ``skip_positions`` and padding excluded, each pass stopped after the deepest hookpoint); returns
    ``{key: Tensor [tokens, d]}`` on the CPU. For sweeps that train many autoencoders on the same data."""
    session = TrainingSession(hooked, TrainConfig(skip_positions=skip_positions, shuffle_buffer=0),
                              stop_early=True)
    rows: dict = {key: [] for key in hooked.saes}
    counts = dict.fromkeys(hooked.saes, 0)

    def tap(key, hp, x):
        r = session.valid_rows(hp, x).float().cpu()
        rows[key].append(r)
        counts[key] += len(r)
        session.seen.add(key)
        if len(session.seen) == len(rows):
            session.seen = set()
            raise StopForward

    device = _model_device(hooked.model)
    hooked._taps.append(tap)
    try:
        for batch in iter_batches(source, batch_size=batch_size):
            if min(counts.values()) >= tokens:
                break
            session.attention_mask = batch.get("attention_mask")
            with contextlib.suppress(StopForward):
                hooked.model(**{k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in batch.items()})
    finally:
        hooked._taps.remove(tap)
    return {key: torch.cat(r)[:tokens] for key, r in rows.items()}


def _epochs(corpus, batch_size: int) -> Iterator[Tensor]:
    """The corpus's training windows, repeated when a pass is exhausted (the same order every epoch;
    the shuffle buffer mixes rows across windows)."""
    epoch = 0
    while True:
        n = 0
        for batch in corpus.windows("train", batch_size=batch_size):
            n += 1
            yield batch
        if n == 0:
            raise ValueError(f"the corpus has no full batch of {batch_size} windows of "
                             f"{corpus.context} tokens")
        epoch += 1
        log.info("corpus pass %d done after %d batches; starting over", epoch, n)


def iter_batches(source, *, batch_size: int = 8, start: int = 0) -> Iterator[dict]:
    """Model inputs from a :class:`~saehook.Corpus` (repeated as needed), an iterable of ``input_ids [B, T]``
    tensors, or of dicts accepted by ``model(**batch)``; ``start`` skips that many batches (resume)."""
    from .corpus import Corpus

    if isinstance(source, Corpus):
        it: Iterable = islice(_epochs(source, batch_size), start, None)
    elif isinstance(source, Tensor):
        raise TypeError("pass an iterable of input_ids batches (e.g. a list of [B, T] tensors), not one tensor")
    else:
        it = islice(source, start, None)
    for item in it:
        if isinstance(item, Tensor):
            yield {"input_ids": item if item.dim() == 2 else item.unsqueeze(0)}
        elif isinstance(item, dict):
            yield item
        else:
            raise TypeError(f"source items must be input_ids tensors or dicts for model(**batch), got {type(item)}")


def _model_device(model) -> torch.device:
    from .hooks import _execution_device

    return _execution_device(model, "") or torch.device("cpu")


class MetricsLogger:
    """metrics.jsonl, plus TensorBoard / Weights & Biases when asked for and installed."""

    def __init__(self, out: Path | None, log_to: Iterable[str] = (), config: dict | None = None):
        self.file = open(out / "metrics.jsonl", "a") if out else None  # noqa: SIM115
        self.tb = self.wandb = None
        for sink in log_to:
            if sink == "tensorboard":
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError as e:
                    raise ImportError("log_to='tensorboard' needs `pip install tensorboard`") from e
                self.tb = SummaryWriter(str(out / "tb") if out else None)
            elif sink == "wandb":
                try:
                    import wandb
                except ImportError as e:
                    raise ImportError("log_to='wandb' needs `pip install wandb`") from e
                self.wandb = wandb.run or wandb.init(project="saehook", config=config)
            else:
                raise ValueError(f"unknown log sink {sink!r}; use 'tensorboard' or 'wandb'")

    def write(self, name: str, metrics: dict) -> None:
        if self.file:
            self.file.write(json.dumps({"hookpoint": name, **metrics}) + "\n")
            self.file.flush()
        step = int(metrics["step"])
        if self.tb:
            for k, v in metrics.items():
                self.tb.add_scalar(f"{name}/{k}", v, step)
        if self.wandb:
            self.wandb.log({f"{name}/{k}": v for k, v in metrics.items()}, step=step)

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb:
            self.tb.close()


def train(hooked, source, tokens: int, config: TrainConfig | None = None, out=None, *, resume: bool = False,
          batch_size: int = 8, progress: bool = True, log_to: Iterable[str] = ()) -> TrainReport:
    """See :meth:`saehook.Hooked.train`."""
    from tqdm.auto import tqdm

    cfg = config or TrainConfig()
    out = Path(out) if out is not None else None
    if resume and (out is None or not (out / "checkpoints" / "LATEST").is_file()):
        raise FileNotFoundError(f"resume=True but there is no checkpoint in {out}/checkpoints")
    session = TrainingSession(hooked, cfg, total_tokens=tokens, stop_early=True)
    position = session.load(out) if resume else 0
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps({"tokens": tokens, **cfg.to_dict()}, indent=2))
    logger = MetricsLogger(out, log_to, cfg.to_dict())
    names = {key: hookpoint_dirname(hp) for key, hp in hooked.hookpoints.items()}
    history: list = []
    bar = tqdm(total=tokens, initial=min(session.tokens, tokens), unit="tok", unit_scale=True,
               disable=not progress, desc="saehook train")
    t0, tok0 = time.perf_counter(), session.tokens

    def record(key, m):
        history.append({"hookpoint": names[key], **m})
        logger.write(names[key], m)
        logged[key] = int(m["step"])

    def on_step(key, m):
        m = {**m, "tokens_per_s": (session.tokens - tok0) / max(time.perf_counter() - t0, 1e-9)}
        session.last[key] = m
        if int(m["step"]) % cfg.log_every == 0 or int(m["step"]) == 1:
            record(key, m)
        if key == first:
            bar.n = min(int(m["tokens"]), tokens)
            bar.set_postfix(fvu=f"{m.get('fvu', float('nan')):.3f}", l0=f"{m.get('l0', 0):.1f}",
                            dead=f"{m['dead_frac']:.2%}", refresh=False)
            bar.refresh()
        if out is not None and int(m["step"]) % cfg.checkpoint_every == 0 and key == last:
            pending.append(True)

    first, last = next(iter(hooked.saes)), list(hooked.saes)[-1]
    pending: list = []
    logged: dict = {}
    session.on_step = on_step
    device = _model_device(hooked.model)
    was_recording = hooked.record
    hooked.record = False
    hooked._taps.append(session.tap)
    try:
        for batch in iter_batches(source, batch_size=batch_size, start=position):
            if session.tokens >= tokens:
                break
            batch = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in batch.items()}
            session.attention_mask = batch.get("attention_mask")
            session.seen = set()
            with torch.no_grad(), contextlib.suppress(StopForward):
                hooked.model(**batch)
            position += 1
            session.drain()
            if pending:
                pending.clear()
                session.save(out, position)
        for key, m in session.last.items():  # the final metrics are always logged
            if logged.get(key) != int(m["step"]):
                record(key, m)
        if session.tokens < tokens:
            log.warning("source exhausted after %d of %d tokens", session.tokens, tokens)
        if out is not None:
            for key, tr in session.trainers.items():
                tr.sae.metadata.update(hookpoint=str(hooked.hookpoints[key]), tokens=tr.tokens, steps=tr.step_count,
                                       model=getattr(getattr(hooked.model, "config", None), "_name_or_path", None))
            session.save(out, position)
    finally:
        hooked._taps.remove(session.tap) if session.tap in hooked._taps else None
        hooked.record = was_recording
        bar.close()
        logger.close()
    return TrainReport(dict(session.last), session.tokens, next(iter(session.trainers.values())).step_count,
                       time.perf_counter() - t0, out, history)
