"""A training session: per-hookpoint shuffle buffers and trainers, fed by the hooks' taps, with checkpoints.

Single process: every hookpoint is trained here. With several ranks (see :mod:`saehook.distributed`):

- ``shard="data"``: every rank trains every autoencoder on its own rows; each step is taken in lockstep
  (the number of ready batches is all-reduced with MIN) because DDP averages the gradients.
- ``shard="layers"``: autoencoder i is owned by rank ``i % world``; each hookpoint's rows are gathered to
  its owner, which alone trains it.

Checkpoint layout (one folder per step, swapped into place by :mod:`saehook.atomic`, then ``LATEST`` switched)::

    step-0000500/state.json                            data position, config, world size, shard mode
    step-0000500/<hookpoint>/cfg.json, sae.safetensors the autoencoder
    step-0000500/<hookpoint>/trainer.safetensors       Adam state, dead counters (+ EMA)
    step-0000500/<hookpoint>/trainer.json              step, tokens, ...
    step-0000500/<hookpoint>/buffer.rank<r>.safetensors  each rank's shuffle buffer and its RNG
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from . import atomic
from . import distributed as D
from .buffer import ShuffleBuffer
from .config import TrainConfig
from .forward import StopForward
from .hookpoints import hookpoint_dirname
from .trainer import SAETrainer

log = logging.getLogger(__name__)


_NO_ATTENTION_MASK = (
    "TrainingSession.attention_mask was removed and is not read: each forward's padding comes from that forward's "
    "own inputs (pass attention_mask to the model call, e.g. model(**batch); see saehook.forward). Do not set it.")


class TrainingSession:
    """Buffers and trainers for the hookpoints of a :class:`~saehook.Hooked` that this rank trains."""

    def __init__(self, hooked, config: TrainConfig, *, total_tokens: int | None = None, stop_early=False,
                 dist: D.Dist | None = None, shard: str = "data"):
        if shard not in ("data", "layers"):
            raise ValueError(f"shard must be 'data' or 'layers', got {shard!r}")
        self.hooked, self.cfg, self.stop_early, self.dist, self.shard = hooked, config, stop_early, dist, shard
        world, rank = (dist.world, dist.rank) if dist else (1, 0)
        self.owner = {key: (i % world if shard == "layers" else rank) for i, key in enumerate(hooked.saes)}
        self.names = {key: hookpoint_dirname(hp) for key, hp in hooked.hookpoints.items()}
        batch = config.batch_for(total_tokens)
        per_rank = batch // world if dist and shard == "data" else batch
        if per_rank < 1:
            raise ValueError(f"batch_tokens={batch} is smaller than the {world} ranks")
        # a quarter of the run at most (this rank's share of it): filling the buffer reads text nobody trains on
        capacity = config.shuffle_buffer
        if total_tokens:
            capacity = min(capacity, total_tokens // (4 * world if dist and shard == "data" else 4))
        self.trainers: dict = {}
        self.buffers: dict = {}
        for i, (key, sae) in enumerate(hooked.saes.items()):
            if self.owner[key] != rank:
                continue
            self.trainers[key] = SAETrainer(sae, config, total_tokens=total_tokens, name=str(hooked.hookpoints[key]),
                                            dist=dist if shard == "data" else None)
            self.buffers[key] = ShuffleBuffer(sae.d_in, per_rank, capacity,
                                              seed=config.seed + i + 7919 * rank, device=sae.W_enc.device)
        self.seen: set = set()
        self.last: dict = {}
        self.on_step = None  # callback(key, metrics)
        self.on_phase = None  # callback(name): "initialising scale and b_dec" (saehook.progress)

    @property
    def attention_mask(self):
        """Removed: the padding of each forward is read from that forward's own inputs."""
        raise AttributeError(_NO_ATTENTION_MASK)

    @attention_mask.setter
    def attention_mask(self, value):
        raise AttributeError(_NO_ATTENTION_MASK)

    # ------------------------------------------------------------------ feeding
    def valid_rows(self, hp, x: Tensor) -> Tensor:
        """Rows of the current forward's activation ``x [B, T, d]`` to train on: real tokens fed for the first
        time, not among the first ``skip_positions`` of their row (:meth:`saehook.Hooked.valid_mask`)."""
        return x if x.dim() == 2 else x[self.hooked.valid_mask(x, self.cfg.skip_positions)]

    def tap(self, key, hp, x: Tensor) -> None:
        """Called by the hook at ``hp`` with its activation ``x`` during a forward the user runs (inside
        :meth:`saehook.Hooked.training`): feed its valid rows; stop the forward once every hookpoint was read
        when ``stop_early``."""
        self.feed(key, self.valid_rows(hp, x))
        self.seen.add(key)
        if self.stop_early and len(self.seen) == len(self.owner):
            self.seen = set()
            raise StopForward

    def feed(self, key, rows: Tensor, valid: Tensor | None = None) -> None:
        """Keep rows for training: ``rows [n, d]``, or an activation ``[B, T, d]`` and its ``valid [B, T]``
        mask (as :meth:`saehook.Hooked.run` hands them to ``visit``); sent to the owner rank when layers are
        sharded."""
        if valid is not None:
            rows = rows[valid] if rows.dim() == 3 else rows
        if self.cfg.nan_policy == "raise" and not bool(torch.isfinite(rows).all()):
            step = self.trainers[key].step_count if key in self.trainers else "?"
            raise FloatingPointError(f"non-finite activations at step {step} for {self.hooked.hookpoints[key]}")
        if self.dist is not None and self.shard == "layers":
            rows = D.gather_rows(rows.float().contiguous(), dst=self.owner[key])
        if key in self.buffers:
            self.buffers[key].add(rows)

    def _initialized(self, key, flush: bool) -> bool:
        """Whether hookpoint ``key``'s trainer is initialised, initialising it first when its buffer holds the
        trainer's ``init_rows`` rows (data parallel: each rank its share, on every rank at once; ``flush``:
        whatever is held). Until then no batch leaves the buffer, so the scale and ``b_dec`` are fitted on the
        first ``init_samples`` rows of the stream, however small the batches."""
        tr, buf = self.trainers[key], self.buffers[key]
        if tr.initialized:
            return True
        data_parallel = self.dist is not None and self.shard == "data"
        share = -(-tr.init_rows // self.dist.world) if data_parallel else tr.init_rows
        ready = buf.n >= share or (flush and buf.n >= 2)
        if data_parallel:
            ready = bool(D.all_reduce(torch.tensor([int(ready)]), op=D.dist.ReduceOp.MIN))
        if ready:
            if self.on_phase:
                self.on_phase("initialising scale and b_dec")
            tr.initialize(buf.head(share))
        return ready

    def fill_status(self) -> tuple[int, int]:
        """``(held, needed)`` rows of the first hookpoint this rank trains: the first batch leaves its shuffle buffer
        once it holds ``shuffle_buffer + batch`` rows and the trainer's ``init_rows`` (this rank's share); ``(0, 0)``
        when this rank trains none."""
        if not self.trainers:
            return 0, 0
        key = next(iter(self.trainers))
        tr, buf = self.trainers[key], self.buffers[key]
        share = -(-tr.init_rows // self.dist.world) if self.dist is not None and self.shard == "data" else tr.init_rows
        return buf.n, max(buf.capacity + buf.batch, 0 if tr.initialized else share)

    def drain(self, flush: bool = False) -> int:
        """Train on full batches (once the trainer is initialised from the first ``init_samples`` rows); returns
        the number of steps taken by the first trained hookpoint."""
        n = 0
        with torch.enable_grad():
            for key, buf in self.buffers.items():
                if not self._initialized(key, flush):
                    continue
                limit = None
                if self.dist is not None and self.shard == "data":  # DDP: every rank steps equally often
                    limit = int(D.all_reduce(torch.tensor([buf.ready(flush)]), op=D.dist.ReduceOp.MIN))
                for batch in buf.batches(flush, limit):
                    self.last[key] = self.trainers[key].step(batch)
                    if self.on_step:
                        self.on_step(key, self.last[key])
                    n += key == next(iter(self.buffers))
        return n

    @property
    def tokens(self) -> int:
        """Tokens trained on by the least advanced autoencoder (over all ranks)."""
        mine = min((t.tokens for t in self.trainers.values()), default=1 << 62)
        if self.dist is not None and self.shard == "layers":
            mine = int(D.all_reduce(torch.tensor([mine]), op=D.dist.ReduceOp.MIN))
        return mine

    @property
    def steps(self) -> int:
        """Optimizer steps taken by the most advanced autoencoder this rank trains."""
        return max((t.step_count for t in self.trainers.values()), default=0)

    # ------------------------------------------------------------------ checkpoints
    def _writes_sae(self, key) -> bool:
        return key in self.trainers and (self.shard == "layers" or self.dist is None or self.dist.main)

    def save(self, out: Path, position: int, keep: int = 2) -> Path:
        """Write a complete checkpoint into a temporary folder, swap it into place, then point LATEST at it
        (:mod:`saehook.atomic`): a failure or a kill at any moment leaves the previous checkpoint loadable, and
        re-saving the step LATEST names never removes it first. Then refresh each ``out/<hookpoint>``, one unit
        each. Everything of a file is serialised before it is written."""
        main = self.dist is None or self.dist.main
        sync = D.barrier if self.dist is not None else (lambda: None)
        root = out / "checkpoints"
        step = int(D.all_reduce(torch.tensor([self.steps]), op=D.dist.ReduceOp.MAX)) if self.dist else self.steps
        name = f"step-{step:07d}"
        tmp = root / f".tmp-{name}"
        if main:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        sync()
        rank = self.dist.rank if self.dist else 0
        for key, tr in self.trainers.items():
            files = {}
            if self._writes_sae(key):
                files.update(tr.sae.to_files())
                files["trainer.safetensors"] = atomic.safetensors_bytes(tr.state_tensors())
                files["trainer.json"] = atomic.json_bytes(tr.state_scalars(), indent=None)
            files[f"buffer.rank{rank}.safetensors"] = atomic.safetensors_bytes(self.buffers[key].state())
            atomic.write_into(tmp / self.names[key], files)
        sync()
        if main:
            world = self.dist.world if self.dist else 1
            state = {"position": position, "world": world, "shard": self.shard, "config": self.cfg.to_dict(),
                     "hookpoints": self.names and {self.names[k]: repr(k) for k in self.owner}}
            atomic.write_into(tmp, {"state.json": atomic.json_bytes(state)})
            atomic.replace_folder(tmp, root / name)
            atomic.write_file(root / "LATEST", name.encode())
            old = sorted(p for p in root.glob("step-*") if p.name != name)
            for p in old[: max(0, len(old) - (keep - 1))]:
                shutil.rmtree(p, ignore_errors=True)
        for key, tr in self.trainers.items():
            if self._writes_sae(key):
                tr.sae.save(out / self.names[key])
        sync()
        return root / name

    def load(self, out: Path) -> int:
        """Restore from ``out/checkpoints/LATEST``; returns the data position (source batches consumed)."""
        ck = atomic.committed(out / "checkpoints" / (out / "checkpoints" / "LATEST").read_text().strip())
        state = json.loads((ck / "state.json").read_text())
        world, rank = (self.dist.world, self.dist.rank) if self.dist else (1, 0)
        if state["world"] != world or state["shard"] != self.shard:
            raise ValueError(f"checkpoint {ck} was written by {state['world']} rank(s) with shard="
                             f"{state['shard']!r}; resume with the same (now {world}, {self.shard!r})")
        for key, tr in self.trainers.items():
            d = ck / self.names[key]
            if not (d / "trainer.json").is_file():
                raise ValueError(f"checkpoint {ck} has no state for {self.names[key]}; "
                                 f"it has {sorted(p.name for p in ck.iterdir() if p.is_dir())}")
            saved = type(tr.sae).load(d, device=tr.sae.W_enc.device)
            shape = (tr.sae.d_in, tr.sae.n_latents, tr.sae.k)
            if (saved.d_in, saved.n_latents, saved.k) != shape:
                raise ValueError(f"checkpoint autoencoder for {self.names[key]} has shape "
                                 f"{(saved.d_in, saved.n_latents, saved.k)}, the attached one {shape}")
            tr.sae.load_state_dict(saved.state_dict())
            tr.sae.metadata = saved.metadata
            tr.load_state(load_file(str(d / "trainer.safetensors")), json.loads((d / "trainer.json").read_text()))
            self.buffers[key].load_state(load_file(str(d / f"buffer.rank{rank}.safetensors")))
        log.info("resumed from %s at data position %d", ck, state["position"])
        return state["position"]
