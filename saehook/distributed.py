"""Multi-process training through torch.distributed (launched by ``torchrun`` or ``accelerate launch``).

saehook has no launcher and no communication layer of its own: a run started by ``torchrun
--nproc_per_node N`` or ``accelerate launch --num_processes N`` finds the usual environment variables
(``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...), joins the process group, and uses its collectives:

- data parallel (``shard="data"``): every rank reads a different slice of the data stream, each
  autoencoder is wrapped in ``DistributedDataParallel`` (gradients averaged), the FVU denominator and the
  normalisation statistics are all-reduced so that N ranks with batch B each equal one rank with batch N*B,
  and dead-latent counters are summed so every rank agrees which latents are dead.
- layer sharded (``shard="layers"``): autoencoder i lives on rank ``i % N`` (any number of ranks and
  layers); every rank runs the model on its own data and sends each hookpoint's rows to its owner with a
  gather.

Collectives time out after ``SAEHOOK_DIST_TIMEOUT`` seconds (default 300), so a rank that dies makes the
others fail with an error instead of hanging.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

log = logging.getLogger(__name__)


class RankFailure(RuntimeError):
    """A collective failed or timed out: another rank probably died."""


@dataclass(frozen=True)
class Dist:
    """This process's place in the group."""

    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        """Whether this is rank 0, the main process."""
        return self.rank == 0


def setup(device: torch.device | None = None) -> Dist | None:
    """Join the process group described by the environment (``torchrun`` / ``accelerate launch``); None for
    a single process. Uses NCCL for CUDA devices and gloo otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not dist.is_initialized():
        return None
    device = device or torch.device("cpu")
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=float(os.environ.get("SAEHOOK_DIST_TIMEOUT", "300")))
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=timeout)
        log.info("joined %s process group: rank %d of %d", backend, dist.get_rank(), dist.get_world_size())
    if dist.get_world_size() <= 1:
        return None
    return Dist(dist.get_rank(), dist.get_world_size(), device)


def _guard(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except RuntimeError as e:  # gloo/nccl report a dead peer or a timeout as RuntimeError
        raise RankFailure(f"rank {dist.get_rank()}: a collective failed, another rank probably died or hung "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:300]})") from e


def all_reduce(t: Tensor, op=dist.ReduceOp.SUM, group=None) -> Tensor:
    """In-place all-reduce of ``t`` over ``group`` (default: every rank)."""
    _guard(dist.all_reduce, t, op=op, group=group)
    return t


def barrier() -> None:
    """Wait for every rank; raises :class:`RankFailure` if a collective fails or times out."""
    _guard(dist.barrier)


def _padded(x: Tensor, group=None) -> tuple[Tensor, list[int]]:
    """Every rank's row count, and ``x`` zero-padded to the largest (collectives need equal shapes)."""
    n = torch.tensor([len(x)], dtype=torch.long, device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size(group))]
    _guard(dist.all_gather, sizes, n, group=group)
    counts = [int(s.item()) for s in sizes]
    padded = torch.zeros(max(counts), *x.shape[1:], dtype=x.dtype, device=x.device)
    padded[: len(x)] = x
    return padded, counts


def all_gather_rows(x: Tensor, group=None) -> Tensor:
    """Concatenate the rows ``x [m_r, d]`` of every rank of ``group`` (default: all) in rank order (the m_r may
    differ)."""
    return all_gather_rows_at(x, group)[0]


def all_gather_rows_at(x: Tensor, group=None) -> tuple[Tensor, slice]:
    """``(rows, mine)``: the rows ``x [m_r, d]`` of every rank of ``group`` (default: all) concatenated in rank
    order, ``[sum_r m_r, d]``, and the slice of them that is this rank's ``x``. Without gradient."""
    padded, counts = _padded(x.detach(), group)
    parts = [torch.empty_like(padded) for _ in counts]
    _guard(dist.all_gather, parts, padded, group=group)
    start = sum(counts[: dist.get_rank(group)])
    return torch.cat([p[:c] for p, c in zip(parts, counts)]), slice(start, start + len(x))


def gather_rows(x: Tensor, dst: int) -> Tensor | None:
    """Every rank's rows ``x [m_r, d]`` concatenated on rank ``dst`` (None elsewhere)."""
    padded, counts = _padded(x)
    mine = dist.get_rank() == dst
    parts = [torch.empty_like(padded) for _ in counts] if mine else None
    _guard(dist.gather, padded, parts, dst=dst)
    return torch.cat([p[:c] for p, c in zip(parts, counts)]) if mine else None


def global_variance(x: Tensor, group=None) -> Tensor:
    """``sum_i ||x_i - mean||^2`` over the rows of every rank of ``group`` (default: all), with the global mean
    (a constant: no gradient flows through the denominator)."""
    x = x.reshape(-1, x.shape[-1])
    stats = torch.cat([x.sum(0).detach(), torch.tensor([float(len(x))], dtype=x.dtype, device=x.device)])
    all_reduce(stats, group=group)
    mean = stats[:-1] / stats[-1]
    local = (x - mean).pow(2).sum()
    total = local.detach().clone()
    all_reduce(total, group=group)
    return total
