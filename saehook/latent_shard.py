"""One TopK autoencoder split over processes by its latents: the paper's path to 16M latents.

The ranks form a ``replicas x shards`` grid (a ``torch.distributed.device_mesh.DeviceMesh`` with
dimensions ``("replica", "shard")``; rank ``= r * S + s``). The ``S`` ranks of a replica (its *shard group*)
hold one autoencoder between them: shard ``s`` owns latents ``[s n/S, (s+1) n/S)``, their rows of ``W_enc``,
``b_enc``, ``W_dec``, their Adam state and dead-latent counters; ``b_dec`` and the input scale are replicated.
The ``R`` replicas train on different rows, like data parallelism, and sum their gradients.

Every rank of a shard group holds the same rows ``x [N, d]``. One forward, on shard ``s``:

    xc      = s x - b_dec                                              replicated
    cand_s  = TopK_K(W_enc_s xc + b_enc_s)          [N, K]             local candidates (K = k, or 4k)
    cand    = all_gather_s(cand_s)                  [N, S K]           values and global indices
    sel     = TopK_K(cand)                          [N, K]             the exact global top-K: the same
                                                                       latents as one process (ties aside)
    part_s  = sum over sel owned by s of  v_j W_dec[j]                 [N, d]
    x_hat   = all_reduce_s(part_s) + b_dec                             identical on every rank of the group
    loss    = fvu(x, x_hat)                                            identical on every rank of the group

Backward: ``dL/dx_hat`` is the same on every rank, so each shard back-propagates it through its own rows only
(the all-reduce's backward is the identity); ``b_dec``'s gradient through the encoder (``-(g_b_enc W_enc)``) is
summed over the shard group, its gradient through the decoder's bias is already whole. AuxK does the same over
the globally dead latents (each shard's top ``k_aux`` dead candidates, all-gathered, the global top ``k_aux``;
``k_aux`` clamped to the global count of dead latents).

Communication per step and rank (all in the shard group, ``N`` its rows, 4-byte values and indices):
``8 N K (S-1)`` bytes of candidates received, an all-reduce of ``[N, d]`` (``2 (S-1)/S * 4 N d`` bytes sent
by a ring), the same again for AuxK (``K = k_aux``) and Multi-TopK; plus ``4 d`` for ``b_dec``. Independent of
``n``. ``docs/distributed.md`` works it out for the paper's 16M-latent case.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from . import atomic
from . import distributed as D
from .sae import CFG_NAME, Codes, SAEConfigError, SAEOutput, TopKSAE, fvu, shard_weights_name, total_variance


# ---------------------------------------------------------------------------------------------- the layout
@dataclass(frozen=True)
class ShardLayout:
    """This rank's place in the ``replicas x shards`` grid.

    Attributes:
        rank, world: the global rank and the number of ranks.
        shards: ``S``, ranks that share one autoencoder; ``replicas = world / S``.
        shard_group, replica_group: the process groups along each dimension (None when it has one rank).
    """

    rank: int
    world: int
    shards: int
    shard_group: object = None
    replica_group: object = None

    @property
    def replicas(self) -> int:
        """``R = world / S``: copies of the autoencoder, each trained on its own rows."""
        return self.world // self.shards

    @property
    def shard(self) -> int:
        """``s = rank % S``: which slice of the latents this rank holds."""
        return self.rank % self.shards

    @property
    def replica(self) -> int:
        """``r = rank // S``: which replica this rank belongs to."""
        return self.rank // self.shards

    @property
    def main(self) -> bool:
        """Rank 0: writes what is written once."""
        return self.rank == 0


def make_layout(shards: int | None = None, device: torch.device | str = "cpu") -> ShardLayout:
    """The grid for the current process group (joined by :func:`saehook.distributed.setup`): ``shards`` ranks per
    autoencoder (default: every rank, one replica). Raises ``ValueError`` when ``shards`` does not divide the
    world size."""
    if not dist.is_initialized():
        raise RuntimeError("latent sharding needs a process group: launch with torchrun / accelerate launch and call "
                           "saehook.distributed.setup() first (hooked.train does)")
    world, rank = dist.get_world_size(), dist.get_rank()
    shards = world if shards is None else shards
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1 or world % shards:
        raise ValueError(f"shards={shards!r} must be a positive divisor of the {world} ranks "
                         f"(world = replicas x shards)")
    from torch.distributed.device_mesh import init_device_mesh

    dev = torch.device(device)
    mesh = init_device_mesh(dev.type, (world // shards, shards), mesh_dim_names=("replica", "shard"))
    return ShardLayout(rank, world, shards, mesh.get_group("shard") if shards > 1 else None,
                       mesh.get_group("replica") if world > shards else None)


def latent_range(n_latents: int, shards: int, shard: int) -> tuple[int, int]:
    """``[start, stop)`` of the latents shard ``shard`` of ``shards`` owns."""
    size = n_latents // shards
    return shard * size, (shard + 1) * size


# ---------------------------------------------------------------------------------------------- collectives
class Traffic:
    """Payload bytes this rank sent into the shard group's collectives (a ring all-reduce of ``b`` bytes over
    ``S`` ranks sends ``2 (S-1)/S b``; an all-gather of ``b`` bytes per rank sends ``(S-1) b``)."""

    bytes_sent = 0

    @classmethod
    def reset(cls) -> None:
        """Start counting from zero."""
        cls.bytes_sent = 0


def _all_gather(t: Tensor, group) -> Tensor:
    """``[S, *t.shape]``: ``t`` from every rank of ``group``, in rank order."""
    S = dist.get_world_size(group)
    parts = [torch.empty_like(t) for _ in range(S)]
    D._guard(dist.all_gather, parts, t.contiguous(), group=group)
    Traffic.bytes_sent += (S - 1) * t.numel() * t.element_size()
    return torch.stack(parts)


def _all_reduce(t: Tensor, group) -> Tensor:
    S = dist.get_world_size(group)
    D.all_reduce(t, group=group)
    Traffic.bytes_sent += 2 * (S - 1) * t.numel() * t.element_size() // S
    return t


class _SumOverShards(torch.autograd.Function):
    """Forward: the sum of every shard's partial reconstruction. Backward: the identity (each shard receives the
    whole ``dL/dx_hat``, the same on every rank because the loss is)."""

    @staticmethod
    def forward(ctx, part, group):
        return _all_reduce(part.clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ReduceGradOverShards(torch.autograd.Function):
    """Forward: the identity on ``b_dec``. Backward: the gradient summed over the shard group (each shard's
    encoder contributes its own latents' share of ``dL/db_dec``)."""

    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad.contiguous().clone(), ctx.group), None


def _global_topk(vals: Tensor, idx: Tensor, K: int, group) -> tuple[Tensor, Tensor, Tensor]:
    """The global top-K of every shard's candidates ``vals, idx [N, K_s]`` (global indices; ``-inf`` pads).

    Returns ``(sel_vals [N, K], sel_idx [N, K], pos [N, K])`` with ``pos`` the position in the owner's candidate
    list, or -1 where another shard owns the entry. Sorted by value, identical on every rank of the group."""
    S = dist.get_world_size(group) if group is not None else 1
    N, Ks = vals.shape
    if S == 1:
        pos = torch.arange(Ks, device=vals.device).expand(N, Ks)
        top = vals.topk(K, dim=-1, sorted=True)
        return top.values, idx.gather(1, top.indices), pos.gather(1, top.indices)
    all_v = _all_gather(vals.detach(), group).permute(1, 0, 2).reshape(N, S * Ks)
    all_i = _all_gather(idx.to(torch.int32), group).permute(1, 0, 2).reshape(N, S * Ks)
    top = all_v.topk(K, dim=-1, sorted=True)
    owner = torch.div(top.indices, Ks, rounding_mode="floor")
    me = dist.get_rank(group)
    pos = torch.where(owner == me, top.indices % Ks, torch.full_like(top.indices, -1))
    return top.values, all_i.gather(1, top.indices).long(), pos


# ---------------------------------------------------------------------------------------------- the autoencoder
class ShardedTopKSAE(nn.Module):
    """Shard ``layout.shard`` of a :class:`~saehook.TopKSAE` with ``n_latents`` latents split over ``layout.shards``
    ranks (see the module docstring for the math and the communication).

    The slice is an ordinary ``TopKSAE`` (``self.local``, ``n_latents / S`` latents; its ``b_dec`` and
    ``input_scale`` are the whole autoencoder's), so normalisation, initialisation from data, decoder
    renormalisation and the sparse kernels are the one-process ones.

    Args:
        d_in: width of the activations.
        n_latents: latents of the whole autoencoder (a multiple of ``layout.shards``).
        k: active latents per row (at most ``n_latents / S``).
        layout: from :func:`make_layout`.
        multi_topk: as for :class:`~saehook.TopKSAE`.
        dtype: as for :class:`~saehook.TopKSAE`.
        device: as for :class:`~saehook.TopKSAE`.
        seed: seeds this shard's random init (``seed * 65537 + shard``); None = torch's global generator.

    Raises ``SAEConfigError`` for sizes that do not split.
    """

    def __init__(self, d_in: int, n_latents: int, k: int, layout: ShardLayout, *, multi_topk: bool = False,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 seed: int | None = None) -> None:
        super().__init__()
        S = layout.shards
        if n_latents % S:
            raise SAEConfigError(f"n_latents={n_latents} does not split over {S} shards: use a multiple of {S}")
        if k > n_latents // S:
            raise SAEConfigError(f"k={k} is larger than the {n_latents // S} latents of one shard "
                                 f"(n_latents={n_latents} over {S} shards): use fewer shards")
        self.layout, self.d_in, self.n_latents, self.k, self.multi_topk = layout, d_in, n_latents, k, bool(multi_topk)
        self.start, self.stop = latent_range(n_latents, S, layout.shard)
        if seed is None:
            self.local = TopKSAE(d_in, n_latents // S, k, multi_topk=multi_topk, dtype=dtype, device=device)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed * 65537 + layout.shard)
                self.local = TopKSAE(d_in, n_latents // S, k, multi_topk=multi_topk, dtype=dtype, device=device)
        self.metadata: dict = {}
        """Saved in ``cfg.json`` like :attr:`saehook.TopKSAE.metadata`."""

    @classmethod
    @torch.no_grad()
    def from_full(cls, sae: TopKSAE, layout: ShardLayout) -> ShardedTopKSAE:
        """This rank's shard of an existing one-process autoencoder (every rank holds the same ``sae``)."""
        if type(sae) is not TopKSAE:
            raise SAEConfigError(f"latent sharding supports TopKSAE, not {type(sae).__name__}: train it with "
                                 "shard='data' or shard='layers'")
        out = cls(sae.d_in, sae.n_latents, sae.k, layout, multi_topk=sae.multi_topk, dtype=sae.W_enc.dtype,
                  device="meta")
        out.local = out.local.to_empty(device=sae.W_enc.device)
        rows = slice(out.start, out.stop)
        state = {n: t for n, t in sae.state_dict().items()}
        for name in ("W_enc", "b_enc", "W_dec"):
            state[name] = state[name][rows]
        out.local.load_state_dict({n: t.clone() for n, t in state.items()})
        out.metadata = dict(sae.metadata)
        return out

    # -------------------------------------------------------------- what the trainer and the kernels use
    @property
    def W_enc(self) -> Tensor:
        """This shard's ``[n_latents / S, d_in]`` encoder rows."""
        return self.local.W_enc

    @property
    def W_dec(self) -> Tensor:
        """This shard's ``[n_latents / S, d_in]`` decoder rows."""
        return self.local.W_dec

    @property
    def b_dec(self) -> Tensor:
        """The whole ``[d_in]`` decoder bias (replicated)."""
        return self.local.b_dec

    @property
    def train_width(self) -> int:
        """Width of the rows training feeds it: ``d_in`` (what :class:`~saehook.trainer.SAETrainer` reshapes to)."""
        return self.d_in

    @property
    def n_local(self) -> int:
        """Latents of this shard: ``n_latents / S``."""
        return self.stop - self.start

    def normalise(self, x: Tensor):
        """:meth:`saehook.TopKSAE.normalise` (the input scale is replicated)."""
        return self.local.normalise(x)

    def set_input_scale_(self, x: Tensor, mode: str = "scalar"):
        """:meth:`saehook.TopKSAE.set_input_scale_` on every shard (each from the same sample)."""
        return self.local.set_input_scale_(x, mode=mode)

    def init_b_dec_(self, x: Tensor, **kw) -> Tensor:
        """:meth:`saehook.TopKSAE.init_b_dec_` on every shard (each from the same sample)."""
        return self.local.init_b_dec_(x, **kw)

    def unit_norm_decoder_(self) -> None:
        """Unit-norm this shard's decoder rows (row-local: no communication)."""
        self.local.unit_norm_decoder_()

    def remove_parallel_decoder_grad_(self) -> None:
        """Project this shard's decoder gradient (row-local)."""
        self.local.remove_parallel_decoder_grad_()

    def extra_repr(self) -> str:
        """Sizes and the latents held."""
        return (f"d_in={self.d_in}, n_latents={self.n_latents}, k={self.k}, shard={self.layout.shard} of "
                f"{self.layout.shards}, latents [{self.start}, {self.stop})")

    # -------------------------------------------------------------- the math
    def _decode_owned(self, vals: Tensor, pos: Tensor, local_idx: Tensor) -> Tensor:
        """``sum_j v_j W_dec[j]`` over the selected entries this shard owns (``pos >= 0``, a position in this shard's
        candidates ``vals, local_idx [N, K_s]``), ``[N, d]``."""
        if vals.shape[1] == 0:  # no candidates here (no dead latent on this shard): a zero share
            return vals.new_zeros(vals.shape[0], self.d_in)
        owned = pos >= 0
        at = pos.clamp_min(0)
        v = torch.where(owned, vals.gather(1, at), vals.new_zeros(()))
        i = torch.where(owned, local_idx.gather(1, at), local_idx.new_zeros(()))
        if torch.is_grad_enabled() and (v.requires_grad or self.W_dec.requires_grad):
            from .kernels import TopKDecode

            return TopKDecode.apply(v, i, self.W_dec)
        return F.embedding_bag(i, self.W_dec, per_sample_weights=v, mode="sum")

    def _reconstruct(self, vals: Tensor, pos: Tensor, local_idx: Tensor) -> Tensor:
        part = self._decode_owned(vals, pos, local_idx)
        group = self.layout.shard_group
        return part if group is None else _SumOverShards.apply(part, group)

    def forward(self, x: Tensor, dead_mask: Tensor | None = None, k_aux: int | None = None,
                matmul_dtype: torch.dtype | None = None, variance_fn=None) -> SAEOutput:
        """As :meth:`saehook.TopKSAE.forward` for the whole autoencoder, on rows ``x [..., d_in]`` that every rank
        of the shard group holds identically. ``dead_mask``: this shard's ``[n_latents / S]`` dead latents
        (AuxK runs over the globally dead ones); ``variance_fn`` as there (replicas pass a global one). The codes
        carry global latent indices; every output is identical on every rank of the shard group."""
        from .kernels import TopKEncode

        L, group, k = self.local, self.layout.shard_group, self.k
        lead = x.shape[:-1]
        xn, state = L.normalise(x)
        xn = xn.reshape(-1, self.d_in)
        N = xn.shape[0]
        K = min(4 * k, self.n_latents) if self.multi_topk else k
        K_local = min(K, self.n_local)
        dm, aux_local, aux_global = None, 0, 0
        if dead_mask is not None:
            counts = torch.tensor([int(dead_mask.sum())], dtype=torch.long)
            n_dead = int(_all_reduce(counts.clone(), group)) if group is not None else int(counts)
            if n_dead > 0:
                aux_global = min(k_aux or self.d_in // 2, n_dead)
                aux_local = min(aux_global, int(counts))
                if aux_local > 0:
                    dm = dead_mask.to(xn.device)
        b_dec = L.b_dec if group is None else _ReduceGradOverShards.apply(L.b_dec, group)
        vals, idx, aux_vals, aux_idx = TopKEncode.apply(xn, L.W_enc, L.b_enc, b_dec, K_local, dm, aux_local,
                                                        matmul_dtype)
        sel_v, sel_i, pos = _global_topk(vals, idx + self.start, K, group)
        main_part = self._reconstruct(vals, pos[:, :k], idx)
        xn_hat = main_part + L.b_dec
        var = variance_fn or total_variance
        var_x = var(xn)
        main = fvu(xn, xn_hat, var_x)
        multi = fvu(xn, self._reconstruct(vals, pos, idx) + L.b_dec, var_x) if self.multi_topk else None
        auxk = None
        if aux_global > 0:
            av, ai = aux_vals, aux_idx + self.start
            if aux_local < aux_global:  # pad to the global count so that every shard gathers equal shapes
                pad = aux_global - aux_local
                av = torch.cat([av, av.new_full((N, pad), -math.inf)], 1)
                ai = torch.cat([ai, ai.new_zeros(N, pad)], 1)
            _, _, apos = _global_topk(av, ai, aux_global, group)
            apos = torch.where(apos < aux_local, apos, torch.full_like(apos, -1))  # padding never decodes
            e = (xn - xn_hat).detach()
            e_hat = self._reconstruct(aux_vals, apos, aux_idx)
            auxk = fvu(e, e_hat, var(e))
        x_hat = L.unnormalise(xn_hat.reshape(*lead, self.d_in), state)
        codes = Codes(sel_v[:, :k].reshape(*lead, k), sel_i[:, :k].reshape(*lead, k))
        return SAEOutput(x_hat, codes, main, auxk, multi)

    # -------------------------------------------------------------- the whole autoencoder back
    @torch.no_grad()
    def gather(self) -> TopKSAE:
        """The whole autoencoder as one :class:`~saehook.TopKSAE` on every rank of the shard group (an all-gather
        of the rows: it needs the whole autoencoder's memory on each rank)."""
        sae = TopKSAE(self.d_in, self.n_latents, self.k, multi_topk=self.multi_topk, dtype=self.W_enc.dtype,
                      device="meta").to_empty(device=self.W_enc.device)
        state = dict(self.local.state_dict())
        group = self.layout.shard_group
        if group is not None:
            for name in ("W_enc", "b_enc", "W_dec"):
                t = state[name]
                state[name] = _all_gather(t, group).reshape(-1, *t.shape[1:])
        sae.load_state_dict(state)
        sae.metadata = dict(self.metadata)
        return sae

    # -------------------------------------------------------------- persistence
    def config(self) -> dict:
        """The whole autoencoder's ``cfg.json``, with ``latent_shards`` naming how its weights are split."""
        cfg = self.local.config()
        cfg.update(n_latents=self.n_latents, latent_shards=self.layout.shards, metadata=self.metadata)
        return cfg

    def shard_files(self) -> dict[str, bytes]:
        """This shard's weights file (:func:`shard_weights_name`), serialised in memory."""
        return {shard_weights_name(self.layout.shard, self.layout.shards):
                atomic.safetensors_bytes(self.local.state_dict(), metadata={"format": "saehook.topk.shard"})}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the whole autoencoder as one folder, every shard its own weights (a collective: every rank of
        the grid calls it; the replicas of shard ``s`` other than the first write nothing). Atomic as
        :meth:`saehook.TopKSAE.save`: the shards write into a hidden sibling folder that rank 0 swaps in once
        every shard is done. :meth:`saehook.TopKSAE.load` reads the folder back as one autoencoder."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}{atomic.NEW}shards")
        if self.layout.main:
            atomic.recover(path)
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        D.barrier()
        write_shards(self, tmp)
        D.barrier()
        if self.layout.main:
            atomic.replace_folder(tmp, path)
        D.barrier()
        return path


def write_shards(sae: ShardedTopKSAE, folder: str | os.PathLike) -> None:
    """Add this shard's weights to ``folder`` (a folder still being built), and ``cfg.json`` from rank 0. Only the
    first replica writes."""
    if sae.layout.replica != 0:
        return
    files = sae.shard_files()
    if sae.layout.main:
        files[CFG_NAME] = atomic.json_bytes(sae.config(), indent=2, sort_keys=True)
    atomic.write_into(folder, files)
