"""Training one latent-sharded autoencoder (:mod:`saehook.latent_shard`): the one-process step, with the sums the
grid needs.

Per step, on shard ``s`` of replica ``r`` (every rank of a replica holds the same ``N`` rows):

- the forward and the loss are :meth:`saehook.latent_shard.ShardedTopKSAE.forward`'s (the FVU's denominator summed
  over the replicas, so ``R`` replicas of ``N`` rows equal one process with ``R N`` rows);
- the gradients of each shard's rows are summed over the replicas (``b_dec``'s too, already summed over the shards);
- Adam, the decoder projection and renormalisation are row-local: no communication;
- dead-latent counters are kept per shard for its own latents, the firings summed over the replicas;
- gradient clipping (``grad_clip``) uses the global norm, summed over the shards.

Every rank ends a step with the metrics of the whole autoencoder on the whole batch.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from . import distributed as D
from .config import TrainConfig
from .latent_shard import ShardedTopKSAE
from .sae import SAEOutput
from .trainer import SAETrainer


class ShardedTrainer(SAETrainer):
    """:class:`~saehook.trainer.SAETrainer` for a :class:`~saehook.latent_shard.ShardedTopKSAE`.

    ``step(acts)`` takes this replica's rows ``acts [N, d_in]``, the same on every rank of the shard group;
    ``config.batch_tokens`` (or the automatic batch) counts the rows of every replica together.
    """

    def __init__(self, sae: ShardedTopKSAE, config: TrainConfig | None = None, *, total_tokens: int | None = None,
                 name: str = "sae"):
        if not isinstance(sae, ShardedTopKSAE):
            raise TypeError(f"ShardedTrainer trains a ShardedTopKSAE, got {type(sae).__name__}; use SAETrainer")
        super().__init__(sae, config, total_tokens=total_tokens, name=name)
        self.layout = sae.layout
        self.tokens_since_fired = torch.zeros(sae.n_local, dtype=torch.long, device=sae.W_enc.device)

    # ------------------------------------------------------------------ what differs from one process
    def _init_sample(self, rows: Tensor) -> Tensor:
        group = self.layout.replica_group
        if group is None:
            return rows[: self.init_rows]
        share = -(-self.init_rows // self.layout.replicas)
        return D.all_gather_rows(rows[:share].to(self.sae.W_enc).contiguous(), group=group)[: self.init_rows]

    def _loss_scale(self) -> int:
        return 1

    def _run(self, acts: Tensor, **kw) -> SAEOutput:
        group = self.layout.replica_group
        variance = partial(D.global_variance, group=group) if group is not None else None
        return self.sae(acts, variance_fn=variance, **kw)

    @torch.no_grad()
    def _reduce_grads(self) -> None:
        group = self.layout.replica_group
        if group is None:
            return
        for p in self.sae.parameters():  # in place, one parameter at a time: no gradient-sized copy
            if p.grad is not None:
                D.all_reduce(p.grad, group=group)

    @torch.no_grad()
    def _clip_grads(self, max_norm: float) -> None:
        local = self.sae.local
        sq = sum((p.grad.float().pow(2).sum() for p in (local.W_enc, local.b_enc, local.W_dec) if p.grad is not None),
                 torch.zeros((), device=local.W_enc.device))
        sq = sq.reshape(1).cpu()
        if self.layout.shard_group is not None:
            D.all_reduce(sq, group=self.layout.shard_group)
        if local.b_dec.grad is not None:
            sq += float(local.b_dec.grad.float().pow(2).sum())
        scale = max_norm / (float(sq.sqrt()) + 1e-6)
        if scale < 1:
            for p in self.sae.parameters():
                if p.grad is not None:
                    p.grad.mul_(scale)

    def _firings(self, out: SAEOutput, n_rows: int, loss: Tensor):
        sae = self.sae
        fired = torch.zeros_like(self.tokens_since_fired)
        active = out.codes.indices[out.codes.values > 0]
        n_active = len(active)
        mine = active[(active >= sae.start) & (active < sae.stop)] - sae.start
        fired.index_add_(0, mine, torch.ones_like(mine))
        group = self.layout.replica_group
        if group is not None:
            counts = torch.tensor([n_rows, n_active], dtype=torch.long, device=fired.device)
            D.all_reduce(fired, group=group)
            D.all_reduce(counts, group=group)
            n_rows, n_active = int(counts[0]), int(counts[1])
            out = out._replace(**{f: D.all_reduce(getattr(out, f).detach().clone(), group=group)
                                  for f in ("fvu", "auxk_fvu", "multi_topk_fvu") if getattr(out, f) is not None})
            loss = D.all_reduce(loss.detach().clone(), group=group)
        return fired, n_rows, n_active, out, loss

    def dead_fraction(self) -> float:
        """Fraction of the whole autoencoder's latents that are dead (the shards' counts summed over the group)."""
        n_dead = torch.tensor([int(self.dead_mask.sum())], dtype=torch.long)
        if self.layout.shard_group is not None:
            D.all_reduce(n_dead, group=self.layout.shard_group)
        return int(n_dead) / self.sae.n_latents
