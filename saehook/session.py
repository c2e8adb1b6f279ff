"""A training session: per-hookpoint shuffle buffers and trainers, fed by the hooks' taps, with checkpoints.

Single process: every hookpoint is trained here. With several ranks (see :mod:`saehook.distributed`):

- ``shard="data"``: every rank trains every autoencoder on its own rows; each step is taken in lockstep
  (the number of ready batches is all-reduced with MIN) because DDP averages the gradients.
- ``shard="layers"``: autoencoder i is owned by rank ``i % world``; each hookpoint's rows are gathered to
  its owner, which alone trains it.
- ``shard="latents"``: every autoencoder is split by its latents over the ``shards`` ranks of a replica
  (:mod:`saehook.latent_shard`); each rank runs the model on its own data, the rows are all-gathered within the
  replica, whose ranks then train their shards on the same batches; replicas sum their gradients.

Checkpoint layout (one folder per step, swapped into place by :mod:`saehook.atomic`, then ``LATEST`` switched)::

    step-0000500/state.json                            data position, config, world size, shard mode
    step-0000500/<hookpoint>/cfg.json, sae.safetensors the autoencoder
    step-0000500/<hookpoint>/trainer.safetensors       Adam state, dead counters (+ EMA)
    step-0000500/<hookpoint>/trainer.json              step, tokens, ...
    step-0000500/<hookpoint>/buffer.rank<r>.safetensors  each rank's shuffle buffer and its RNG

Latent sharding writes ``sae.shard-<s>-of-<S>.safetensors`` and ``trainer.shard-<s>-of-<S>.safetensors`` (the
first replica's ranks) in place of ``sae.safetensors`` and ``trainer.safetensors``; ``TopKSAE.load`` reads the
folder as one autoencoder.
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
                 dist: D.Dist | None = None, shard: str = "data", shards: int | None = None):
        if shard not in ("data", "layers", "latents"):
            raise ValueError(f"shard must be 'data', 'layers' or 'latents', got {shard!r}")
        if shards is not None and shard != "latents":
            raise ValueError(f"shards={shards} splits autoencoders by their latents: pass shard='latents' with it")
        self.hooked, self.cfg, self.stop_early, self.dist, self.shard = hooked, config, stop_early, dist, shard
        world, rank = (dist.world, dist.rank) if dist else (1, 0)
        self.layout = None
        """The replicas x shards grid under ``shard="latents"`` (:class:`saehook.latent_shard.ShardLayout`)."""
        if shard == "latents":
            if dist is None:
                raise ValueError("shard='latents' splits each autoencoder over several processes: launch with "
                                 "torchrun or accelerate launch (one process trains whole autoencoders)")
            from .latent_shard import make_layout

            self.layout = make_layout(shards, dist.device)
        self.owner = {key: (i % world if shard == "layers" else rank) for i, key in enumerate(hooked.saes)}
        self.names = {key: hookpoint_dirname(hp) for key, hp in hooked.hookpoints.items()}
        batch = config.batch_for(total_tokens)
        # ranks whose rows make one batch together: each reads its share (data), or all of a replica's (latents)
        self.readers = (world if shard == "data" else self.layout.replicas if self.layout else 1) if dist else 1
        per_rank = batch // self.readers
        if per_rank < 1:
            raise ValueError(f"batch_tokens={batch} is smaller than the {self.readers} ranks that share a batch")
        # a quarter of the run at most (this rank's share of it): filling the buffer reads text nobody trains on
        capacity = config.shuffle_buffer
        if total_tokens:
            capacity = min(capacity, total_tokens // (4 * self.readers))
        self.trainers: dict = {}
        self.buffers: dict = {}
        for i, (key, sae) in enumerate(hooked.saes.items()):
            if self.owner[key] != rank:
                continue
            name = str(hooked.hookpoints[key])
            seed = config.seed + i + 7919 * rank
            if self.layout is not None:  # this rank's shard; the ranks of a replica hold equal buffers
                from .latent_shard import ShardedTopKSAE
                from .latent_trainer import ShardedTrainer

                if sae.W_enc.is_meta:  # no whole autoencoder on any rank: each builds its own shard, seeded
                    shard = ShardedTopKSAE(sae.d_in, sae.n_latents, sae.k, self.layout, multi_topk=sae.multi_topk,
                                           dtype=sae.W_enc.dtype, device=dist.device, seed=config.seed + i)
                else:
                    shard = ShardedTopKSAE.from_full(sae, self.layout)
                self.trainers[key] = ShardedTrainer(shard, config, total_tokens=total_tokens, name=name)
                seed = config.seed + i + 7919 * self.layout.replica
            elif sae.W_enc.is_meta:
                raise ValueError(f"the autoencoder for {name} is on the meta device (no weights): only "
                                 "shard='latents' builds its weights itself; create it on a device to train it")
            else:
                self.trainers[key] = SAETrainer(sae, config, total_tokens=total_tokens, name=name,
                                                dist=dist if shard == "data" else None)
            self.buffers[key] = ShuffleBuffer(sae.train_width, per_rank, capacity, seed=seed,
                                              device=self.trainers[key].sae.W_enc.device)
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
        elif self.layout is not None and self.layout.shard_group is not None:  # the replica's rows, on all its ranks
            rows = D.all_gather_rows(rows.float().contiguous(), group=self.layout.shard_group)
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
        share = -(-tr.init_rows // self.readers)
        ready = buf.n >= share or (flush and buf.n >= 2)
        if self.lockstep:
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
        return buf.n, max(buf.capacity + buf.batch, 0 if tr.initialized else -(-tr.init_rows // self.readers))

    @property
    def lockstep(self) -> bool:
        """Whether every rank must take every step together (data parallel, latent sharded)."""
        return self.dist is not None and self.shard in ("data", "latents")

    def drain(self, flush: bool = False) -> int:
        """Train on full batches (once the trainer is initialised from the first ``init_samples`` rows); returns
        the number of steps taken by the first trained hookpoint."""
        n = 0
        with torch.enable_grad():
            for key, buf in self.buffers.items():
                if not self._initialized(key, flush):
                    continue
                limit = None
                if self.lockstep:  # summed gradients: every rank steps equally often
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

    def _shard_files(self, tr) -> dict[str, bytes]:
        """A latent shard's part of a checkpoint folder: its weights and trainer state (the first replica's ranks),
        ``cfg.json`` and ``trainer.json`` (rank 0)."""
        lay, files = self.layout, {}
        if lay.replica == 0:
            files.update(tr.sae.shard_files())
            files[f"trainer.shard-{lay.shard}-of-{lay.shards}.safetensors"] = atomic.safetensors_bytes(
                tr.state_tensors())
        if lay.main:
            files["cfg.json"] = atomic.json_bytes(tr.sae.config(), indent=2, sort_keys=True)
            files["trainer.json"] = atomic.json_bytes(tr.state_scalars(), indent=None)
        return files

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
            if self.layout is not None:
                files.update(self._shard_files(tr))
            elif self._writes_sae(key):
                files.update(tr.sae.to_files())
                files["trainer.safetensors"] = atomic.safetensors_bytes(tr.state_tensors())
                files["trainer.json"] = atomic.json_bytes(tr.state_scalars(), indent=None)
            files[f"buffer.rank{rank}.safetensors"] = atomic.safetensors_bytes(self.buffers[key].state())
            atomic.write_into(tmp / self.names[key], files)
        sync()
        if main:
            world = self.dist.world if self.dist else 1
            state = {"position": position, "world": world, "shard": self.shard, "config": self.cfg.to_dict(),
                     "shards": self.layout.shards if self.layout else None,
                     "hookpoints": self.names and {self.names[k]: repr(k) for k in self.owner}}
            atomic.write_into(tmp, {"state.json": atomic.json_bytes(state)})
            atomic.replace_folder(tmp, root / name)
            atomic.write_file(root / "LATEST", name.encode())
            old = sorted(p for p in root.glob("step-*") if p.name != name)
            for p in old[: max(0, len(old) - (keep - 1))]:
                shutil.rmtree(p, ignore_errors=True)
        for key, tr in self.trainers.items():
            if self.layout is not None:
                tr.sae.save(out / self.names[key])  # a collective: every shard writes its part
            elif self._writes_sae(key):
                tr.sae.save(out / self.names[key])
        sync()
        return root / name

    def load(self, out: Path) -> int:
        """Restore from ``out/checkpoints/LATEST``; returns the data position (source batches consumed)."""
        ck = atomic.committed(out / "checkpoints" / (out / "checkpoints" / "LATEST").read_text().strip())
        state = json.loads((ck / "state.json").read_text())
        world, rank = (self.dist.world, self.dist.rank) if self.dist else (1, 0)
        shards = self.layout.shards if self.layout else None
        if state["world"] != world or state["shard"] != self.shard or state.get("shards") != shards:
            was = f"shards={state.get('shards')}, " if state.get("shards") else ""
            now = f"shards={shards}, " if shards else ""
            raise ValueError(f"checkpoint {ck} was written by {state['world']} rank(s) with {was}shard="
                             f"{state['shard']!r}; resume with the same layout (now {world} rank(s) with {now}"
                             f"shard={self.shard!r})")
        for key, tr in self.trainers.items():
            d = ck / self.names[key]
            if not (d / "trainer.json").is_file():
                raise ValueError(f"checkpoint {ck} has no state for {self.names[key]}; "
                                 f"it has {sorted(p.name for p in ck.iterdir() if p.is_dir())}")
            if self.layout is not None:
                self._load_shard(d, tr)
                self.buffers[key].load_state(load_file(str(d / f"buffer.rank{rank}.safetensors")))
                continue
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

    def _load_shard(self, d: Path, tr) -> None:
        """Restore a latent shard's weights and trainer state from checkpoint folder ``d`` (same layout)."""
        from .sae import shard_weights_name

        s, S = self.layout.shard, self.layout.shards
        cfg = json.loads((d / "cfg.json").read_text())
        shape = (cfg["d_in"], cfg["n_latents"], cfg["k"])
        if shape != (tr.sae.d_in, tr.sae.n_latents, tr.sae.k):
            raise ValueError(f"checkpoint autoencoder in {d} has shape (d_in, n_latents, k) = {shape}, the attached "
                             f"one {(tr.sae.d_in, tr.sae.n_latents, tr.sae.k)}")
        tr.sae.local.load_state_dict(load_file(str(d / shard_weights_name(s, S))))
        tr.sae.metadata = dict(cfg.get("metadata", {}))
        tr.load_state(load_file(str(d / f"trainer.shard-{s}-of-{S}.safetensors")),
                      json.loads((d / "trainer.json").read_text()))

    @torch.no_grad()
    def sync_attached(self) -> None:
        """Latent sharding: copy the trained shards back into the attached autoencoders (an all-gather of their rows
        within each replica), so that the ``Hooked`` holds what was trained; not into one attached on the meta
        device (too big for one rank: load it from the run folder). A no-op in the other modes, which train the
        attached autoencoders in place."""
        if self.layout is None:
            return
        for key, tr in self.trainers.items():
            if self.hooked.saes[key].W_enc.is_meta:  # attached without weights: the trained one is in ``out``
                continue
            whole = tr.sae.gather()
            self.hooked.saes[key].load_state_dict(whole.state_dict())
            self.hooked.saes[key].metadata = dict(whole.metadata)
