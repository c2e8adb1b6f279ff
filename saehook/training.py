"""Online training from streamed forward passes: every hooked autoencoder learns from the same pass.

Activations never touch the disk: each forward's rows (BOS / first positions and padding excluded)
go into one shuffling buffer per hookpoint, and full batches go to that hookpoint's
:class:`~saehook.trainer.SAETrainer`. When the pass exists only to train, it stops right after the
deepest hookpoint has been read (no later layers, no lm_head). With ``e2e_fraction > 0`` the last
part of the run instead takes one end-to-end step per model batch (:func:`saehook.e2e.e2e_step`: full
forwards, no buffer); several processes refuse it for now.

Run layout (``out``)::

    out/<hookpoint>/cfg.json, sae.safetensors   the latest autoencoders, loadable with TopKSAE.load
    out/checkpoints/step-000500/...             autoencoders + trainer/buffer/data state (resume)
    out/checkpoints/LATEST                      name of the newest complete checkpoint
    out/metrics.jsonl                           one JSON line per logged step and hookpoint
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from itertools import chain, islice
from pathlib import Path

import torch
from torch import Tensor

from . import atomic
from . import distributed as D
from .config import TrainConfig
from .counts import as_count
from .forward import StopForward
from .forward import model_device as _model_device
from .runs import clear_run, prepare_run
from .session import TrainingSession, hookpoint_dirname

__all__ = ["StopForward", "TrainReport", "TrainingSession", "collect_activations", "hookpoint_dirname",
           "iter_batches", "train"]

log = logging.getLogger(__name__)

SMOOTH_STEPS = 50
"""Steps averaged for the smoothed training FVU of summaries (``TrainReport.train_fvu``, the progress bar):
one step's FVU is one batch's and can be far off (an unusual last batch)."""


@dataclass
class TrainReport:
    """What a run achieved: ``report[key]`` is the last metrics dict of that hookpoint."""

    metrics: dict
    tokens: int
    steps: int
    seconds: float
    out: Path | None
    history: list = field(default_factory=list, repr=False)
    train_fvu: dict = field(default_factory=dict)
    """``{key: mean training FVU over the last SMOOTH_STEPS (50) steps of this process}``: the figure to quote
    for a run (``report[key]["fvu"]`` is the last batch's alone)."""

    def __getitem__(self, key):
        return self.metrics[key]

    @property
    def tokens_per_s(self) -> float:
        """Training tokens per second over the whole run (forward passes included)."""
        return self.tokens / max(self.seconds, 1e-9)


@torch.no_grad()
def collect_activations(hooked, source, tokens: int, *, batch_size: int = 8, skip_positions: int = 1) -> dict:
    """Run forward passes over ``source`` until ``tokens`` rows per hookpoint are gathered (first
    ``skip_positions`` and padding excluded, each pass stopped after the deepest hookpoint); returns
    ``{key: Tensor [tokens, d]}`` on the CPU. For sweeps that train many autoencoders on the same data."""
    tokens = as_count(tokens)
    rows: dict = {key: [] for key in hooked.saes}
    counts = dict.fromkeys(hooked.saes, 0)

    def visit(key, x, valid):
        r = x[valid].float().cpu()
        rows[key].append(r)
        counts[key] += len(r)

    for batch in iter_batches(source, batch_size=batch_size):
        if min(counts.values()) >= tokens:
            break
        hooked.run(batch, skip_positions=skip_positions, visit=visit)
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
            raise ValueError(f"the corpus's training split has no full batch of {batch_size} windows of "
                             f"{corpus.context} tokens ({corpus.n_tokens('train'):,} tokens in all): give it more "
                             "text, or pass a smaller batch_size or context")
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


def _plan_e2e_steps(session: TrainingSession, batch: dict, tokens: int, local_tokens: int) -> None:
    """With an end-to-end phase the run's steps no longer all have ``batch_tokens`` rows: set each trainer's
    ``total_steps`` (its learning-rate schedule) to the steps of the first ``local_tokens`` plus one step
    per model batch for the rest, counted with this batch's evaluated rows (the same for every batch of a
    corpus). It depends only on the batch, so a resumed run plans as the uninterrupted one did."""
    from .forward import position_masks

    rows = max(int(position_masks(batch, session.cfg.skip_positions)[0].sum()), 1)
    for tr in session.trainers.values():
        local = -(-local_tokens // tr.batch_tokens)
        tr.total_steps = local + -(-max(tokens - local * tr.batch_tokens, 0) // rows)


class MetricsLogger:
    """metrics.jsonl, plus TensorBoard / Weights & Biases when asked for and installed."""

    def __init__(self, out: Path | None, log_to: Iterable[str] = (), config: dict | None = None,
                 name: str = "metrics.jsonl"):
        self.file = open(out / name, "a") if out else None  # noqa: SIM115
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


def train(hooked, source, tokens: int | str, config: TrainConfig | None = None, out=None, *, resume: bool = False,
          overwrite: bool = False, batch_size: int = 8, progress: bool = True, log_to: Iterable[str] = (),
          shard: str = "data", shards: int | None = None) -> TrainReport:
    """See :meth:`saehook.Hooked.train`."""
    from .progress import TrainProgress

    cfg = config or TrainConfig()
    tokens = as_count(tokens)
    if tokens <= 0:
        raise ValueError(f"tokens must be positive, got {tokens}")
    # every rank checks before any rank writes: a refused folder is refused everywhere, and nothing is written
    prepare_run(out, resume=resume, overwrite=overwrite, clear=False)
    out = Path(out) if out is not None else None
    device = _model_device(hooked.model)
    dist = D.setup(device)
    if dist is not None and cfg.e2e_fraction:
        raise ValueError(f"end-to-end training (e2e_fraction={cfg.e2e_fraction}) runs in one process for now; "
                         "train with several ranks at e2e_fraction=0 (or None, the default)")
    # None = automatic: the last AUTO_E2E_FRACTION of a one-process run end-to-end, none with several ranks
    asked, cfg = cfg, replace(cfg, e2e_fraction=cfg.e2e_fraction_for(live=dist is None))
    rank, world = (dist.rank, dist.world) if dist else (0, 1)
    main = rank == 0
    session = TrainingSession(hooked, cfg, total_tokens=tokens, stop_early=True, dist=dist, shard=shard,
                              shards=shards)
    position = session.load(out) if resume else 0
    # data parallel: rank r reads batches r, r + world, ... of the stream; layer sharding likewise
    stream = islice(iter_batches(source, batch_size=batch_size, start=position), rank, None, world)
    first = next(stream, None)  # an empty source fails here, before the run folder is touched
    if first is None and position == 0 and dist is None:
        raise ValueError("the source gave no batch to train on (an empty list or iterator?): pass a Corpus or an "
                         "iterable of input_ids batches with text in it")
    stream = chain([first] if first is not None else [], stream)
    if dist is not None:
        D.barrier()
    if out is not None and main and overwrite:
        clear_run(out)
    if out is not None and main:
        out.mkdir(parents=True, exist_ok=True)
        # with "auto" fields as resolved on each autoencoder's device (this rank's trainers)
        used = {"matmul_dtype_used": {session.names[k]: tr.matmul_dtype for k, tr in session.trainers.items()},
                "e2e_fraction_used": cfg.e2e_fraction}
        layout = {"tokens": tokens, "world": world, "shard": shard,
                  "shards": session.layout.shards if session.layout else None}
        atomic.write_file(out / "train_config.json", atomic.json_bytes({**layout, **asked.to_dict(), **used}))
    if dist is not None:
        D.barrier()
    # data parallel: rank 0 logs (every rank has the same numbers); layer sharded: each rank its own layers
    writes_log = main or shard == "layers"
    logger = MetricsLogger(out if writes_log else None, log_to if main else (), cfg.to_dict(),
                           name="metrics.jsonl" if main else f"metrics.rank{rank}.jsonl")
    names = session.names
    history: list = []
    bar = TrainProgress(tokens, session.tokens, enabled=progress and main)  # phases; rate from the first step
    session.on_phase = bar.phase
    t0, tok0 = time.perf_counter(), min((t.tokens for t in session.trainers.values()), default=0)
    logged: dict = {}
    recent: dict = {}  # key -> the last SMOOTH_STEPS training FVUs

    def record(key, m):
        history.append({"hookpoint": names[key], **m})
        logger.write(names[key], m)
        logged[key] = int(m["step"])

    def on_step(key, m):
        m = {**m, "tokens_per_s": (m["tokens"] - tok0) / max(time.perf_counter() - t0, 1e-9)}
        session.last[key] = m
        if "fvu" in m:
            recent.setdefault(key, deque(maxlen=SMOOTH_STEPS)).append(float(m["fvu"]))
        if int(m["step"]) % cfg.log_every == 0 or int(m["step"]) == 1:
            record(key, m)
        if key == next(iter(session.trainers)):
            e2e = {cfg.e2e_loss: f"{m[cfg.e2e_loss]:.4f}"} if cfg.e2e_loss in m else {}
            fvu = sum(recent[key]) / len(recent[key]) if key in recent else float("nan")
            bar.trained(int(m["tokens"]), {f"fvu (mean of last {SMOOTH_STEPS})": f"{fvu:.3f}",
                                           "l0": f"{m.get('l0', 0):.1f}", "dead": f"{m['dead_frac']:.2%}", **e2e})

    def all_min(v: int) -> int:
        return int(D.all_reduce(torch.tensor([v]), op=D.dist.ReduceOp.MIN)) if dist else v

    def all_max(v: int) -> int:
        return int(D.all_reduce(torch.tensor([v]), op=D.dist.ReduceOp.MAX)) if dist else v

    session.on_step = on_step
    saved_bucket = all_max(session.steps) // cfg.checkpoint_every

    def after_batch() -> None:  # a checkpoint whenever the step count crossed a multiple of checkpoint_every
        nonlocal saved_bucket
        bucket = all_max(session.steps) // cfg.checkpoint_every
        if out is not None and bucket > saved_bucket:
            saved_bucket = bucket
            session.save(out, position)

    # the usual way until local_tokens, then one end-to-end step per model batch (saehook.e2e)
    local_tokens = round((1 - cfg.e2e_fraction) * tokens)
    if 0 < local_tokens < tokens:  # the scale's sample comes from the local phase (else from the first e2e batch)
        for tr in session.trainers.values():
            tr.init_rows = min(tr.init_rows, local_tokens)
    was_recording = hooked.record
    hooked.record = False
    try:
        while session.tokens < local_tokens:
            batch = next(stream, None)
            if not all_min(batch is not None):  # every rank stops when one runs out
                break
            batch = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in batch.items()}
            if cfg.e2e_fraction > 0:
                _plan_e2e_steps(session, batch, tokens, local_tokens)
            with torch.no_grad():
                hooked.run(batch, skip_positions=cfg.skip_positions, visit=session.feed)
            position += world
            if not bar.training:  # no step yet: the rows stream into the shuffle buffer
                bar.filling(*session.fill_status())
            session.drain()
            after_batch()
        if session.tokens < tokens and cfg.e2e_fraction > 0:
            from .e2e import e2e_step

            bar.phase("end-to-end", f" ({cfg.e2e_loss})")
            while session.tokens < tokens:
                batch = next(stream, None)
                if batch is None:
                    break
                batch = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in batch.items()}
                _plan_e2e_steps(session, batch, tokens, local_tokens)
                for key, m in e2e_step(hooked, session.trainers, batch, cfg).items():
                    on_step(key, m)
                position += world
                after_batch()
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
        session.sync_attached()
    finally:
        hooked.record = was_recording
        bar.close()
        logger.close()
    return TrainReport(dict(session.last), min((t.tokens for t in session.trainers.values()), default=0),
                       session.steps, time.perf_counter() - t0, out, history,
                       {key: sum(v) / len(v) for key, v in recent.items()})
