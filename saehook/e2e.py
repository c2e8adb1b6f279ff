"""End-to-end training: autoencoders trained against the model's own next-token predictions.

Braun et al. 2024 (*Identifying functionally important features with end-to-end sparse dictionary
learning*) train an autoencoder so that splicing its reconstruction into the model changes the output
distribution as little as possible; Karvonen et al. 2025 fine-tune the last steps of a TopK autoencoder
that way. One step on a model batch, with evaluated positions ``E`` (real tokens at least
``skip_positions`` into their row) and loss positions ``L`` (``t`` in ``E`` and ``t + 1`` real)::

    p_t    = softmax(model(ids))_t                                   clean forward, no gradient ("kl" only)
    q_t    = softmax(model(ids; x_h[E] <- x_hat_h[E] at every hookpoint h))_t     spliced, with gradient
    e2e    = mean_{t in L} KL(p_t || q_t)       ("kl")   or   mean_{t in L} -log q_t(ids_{t+1})   ("ce")
    loss_h = e2e_fvu_coef * (fvu_h + multi_topk_coef * fvu_4k_h) + auxk_coef * auxk_fvu_h
    grad(theta_h) = d e2e / d theta_h + d loss_h / d theta_h

``loss_h`` is :meth:`~saehook.SAETrainer.forward`'s loss on the rows ``x_h[E]``; the optimizer step,
decoder projection, learning-rate schedule, EMA and dead-latent counters are
:meth:`~saehook.SAETrainer.apply`'s, as in a normal step.

Every reconstruction is spliced in at once (like the joint splice of :func:`saehook.evaluate.evaluate`),
so a later autoencoder reads activations computed from earlier reconstructions and the shared end-to-end
loss reaches every autoencoder through the model; each one's own terms ``loss_h`` train only itself.
The backward is restricted to the autoencoders' parameters: the model's parameters never get a
``.grad``, whatever their ``requires_grad``, and nothing about the model is changed. Nothing before the
first hookpoint is differentiated. The activations are replaced through
:meth:`saehook.Hooked.replacing`, the hooks' own path.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .config import TrainConfig
from .forward import add_position_ids, kl_divergence, loss_mask, next_token_logprobs, position_masks
from .hookpoints import Key
from .trainer import SAETrainer, TrainForward

if TYPE_CHECKING:
    from .hooks import Hooked

__all__ = ["e2e_step"]


class _Splice:
    """The replacement function of one spliced forward: each trained hookpoint's evaluated rows go through
    its trainer's :meth:`~saehook.SAETrainer.forward` and come back as the reconstruction."""

    def __init__(self, trainers: Mapping[Key, SAETrainer], evaluated: Tensor, fvu_coef: float):
        self.trainers, self.evaluated, self.fvu_coef = trainers, evaluated, fvu_coef
        self.fwds: dict[Key, TrainForward] = {}

    def __call__(self, key: Key, hp, x: Tensor) -> Tensor | None:
        tr = self.trainers.get(key)
        if tr is None:
            return None
        if x.shape[:-1] != self.evaluated.shape:
            raise ValueError(f"{hp}: end-to-end training needs activations [B, T, d] matching input_ids "
                             f"{tuple(self.evaluated.shape)}, got {tuple(x.shape)}")
        # Until a reconstruction is in, x depends on no autoencoder: cutting the graph there is exact and
        # keeps the backward out of the layers before the first hookpoint.
        base = x if self.fwds else x.detach()
        m = self.evaluated.to(x.device)
        rows = base[m]  # [n, d]
        fwd = tr.forward(rows, fvu_coef=self.fvu_coef)
        if fwd is None or len(fwd.acts) != len(rows):  # skipped (nan_policy="skip"): left as it is
            return None
        self.fwds[key] = fwd
        out = base[..., base.shape[-1] - fwd.out.x_hat.shape[-1]:]  # a transcoder's [input, output]: the output
        return out.masked_scatter(m.unsqueeze(-1), fwd.out.x_hat.to(x.dtype))


def e2e_step(hooked: Hooked, trainers: Mapping[Key, SAETrainer], batch: dict,
             config: TrainConfig) -> dict[Key, dict[str, float]]:
    """One end-to-end optimizer step of every trainer in ``trainers`` on one model batch (see the module
    docstring for the math).

    Args:
        hooked: the attached autoencoders; ``trainers[key].sae`` must be ``hooked.saes[key]``.
        trainers: key -> :class:`~saehook.SAETrainer` (single process: no ``dist``).
        batch: model inputs for ``model(**batch)``, on the model's device: ``input_ids [B, T]`` and
            optionally ``attention_mask`` (padding is excluded, left padding gets ``position_ids``).
        config: supplies ``skip_positions``, ``e2e_loss`` and ``e2e_fvu_coef``.

    Returns:
        key -> the trainer's metrics (``loss`` = end-to-end loss + its own terms) plus ``e2e_loss``,
        ``ce`` (mean next-token cross-entropy of the spliced model) and, for ``"kl"``, ``kl``. A trainer
        whose step was skipped (non-finite rows under ``nan_policy="skip"``) has no entry.
    """
    for key, tr in trainers.items():
        if hooked.saes.get(key) is not tr.sae:
            raise ValueError(f"the trainer for {key!r} does not train the autoencoder attached there; attached "
                             f"keys are {list(hooked.saes)}")
        if tr.dist is not None:
            raise ValueError("end-to-end training runs in one process; use e2e_fraction=0 with several ranks")
    batch = dict(batch)
    ids = batch["input_ids"]
    evaluated, real = position_masks(batch, config.skip_positions)
    add_position_ids(batch, real)
    lmask = loss_mask(evaluated, real)  # [B, T-1]
    if not bool(lmask.any()):
        raise ValueError(f"the batch {tuple(ids.shape)} has no position to train on after skip_positions="
                         f"{config.skip_positions} and padding")
    model, splice = hooked.model, _Splice(trainers, evaluated, config.e2e_fvu_coef)
    was_recording, hooked.record = hooked.record, False  # latents are not needed: no encode beside the step
    try:
        logp_clean = None
        if config.e2e_loss == "kl":
            with torch.no_grad():
                logp_clean, _ = next_token_logprobs(model(**batch).logits, ids, lmask)  # [n, V]
        with torch.enable_grad(), hooked.replacing(splice):
            logits = model(**batch).logits
        fwds = splice.fwds
        if not fwds:
            return {}
        with torch.enable_grad():
            logp, ce = next_token_logprobs(logits, ids, lmask)
            del logits
            kl = kl_divergence(logp_clean, logp).mean() if logp_clean is not None else None
            e2e = kl if kl is not None else ce.mean()
        params = {key: [p for p in trainers[key].sae.parameters() if p.requires_grad] for key in fwds}
        for key in fwds:
            trainers[key].opt.zero_grad(set_to_none=True)
        # each autoencoder's own terms train only itself; then the shared loss trains all (graphs overlap)
        for key, fwd in fwds.items():
            torch.autograd.backward(fwd.loss, inputs=params[key], retain_graph=True)
        torch.autograd.backward(e2e, inputs=[p for ps in params.values() for p in ps])
        extra = {"e2e_loss": float(e2e.detach()), "ce": float(ce.detach().mean())}
        if kl is not None:
            extra["kl"] = float(kl.detach())
        return {key: {**trainers[key].apply(fwd, loss=fwd.loss.detach() + e2e.detach()), **extra}
                for key, fwd in fwds.items()}
    finally:
        hooked.record = was_recording
