"""Evaluate attached autoencoders on held-out text: reconstruction, sparsity and downstream loss.

Per hookpoint, over the evaluated positions (not padding, not among the first ``skip_positions``):

    fvu            = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2      (one ratio over all tokens)
    l0             = mean number of latents with a value > 0 per token
    density[j]     = fraction of tokens on which latent j is > 0;  dead: never,  dense: > dense_threshold
    clean_loss     = mean next-token cross-entropy of the unedited model
    spliced_loss   = the same with x_hat spliced in place of x (this autoencoder alone)
    delta_lm_loss  = spliced_loss - clean_loss
    kl             = mean KL(p_clean || p_spliced) of the next-token distributions
    ce_recovered_* = 1 - (spliced_loss - clean_loss) / (ablated_loss - clean_loss), with the hookpoint
                     zero-ablated (x -> 0) or mean-ablated (x -> mean of x)

A loss term is the prediction made *at* an evaluated position ``t`` of the token at ``t + 1`` (the last
position of a row and positions whose next token is padding have none). Splices and ablations are applied
only at evaluated positions, so the first positions (BOS, whose activation is an outlier) stay clean.
The mean used by mean-ablation is the running mean of ``x`` over every evaluated row of the clean passes
so far, the current batch included. See ``docs/metrics/``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .hookpoints import Key
from .hooks import Hooked, attach
from .sae import TopKSAE

log = logging.getLogger(__name__)


class EvalReport(Mapping):
    """What :func:`evaluate` measured: ``report[key]`` is a dict of metrics for that hookpoint.

    ``report.joint`` holds ``delta_lm_loss``, ``kl``, ``clean_loss``, ``spliced_loss`` with every
    autoencoder spliced in at once (None with a single hookpoint). ``report.settings`` records the
    arguments. ``density`` is a CPU float tensor ``[n_latents]`` (a list in :meth:`to_dict`).
    """

    def __init__(self, metrics: dict, joint: dict | None = None, settings: dict | None = None):
        self.metrics, self.joint, self.settings = dict(metrics), joint, dict(settings or {})

    def __getitem__(self, key: Key) -> dict:
        try:
            return self.metrics[key]
        except KeyError:
            raise KeyError(f"no hookpoint {key!r} in this report; it has {list(self.metrics)}") from None

    def __iter__(self) -> Iterator[Key]:
        return iter(self.metrics)

    def __len__(self) -> int:
        return len(self.metrics)

    @property
    def tokens(self) -> int:
        """Evaluated positions (rows per hookpoint)."""
        return next(iter(self.metrics.values()))["tokens"] if self.metrics else 0

    def to_dict(self) -> dict:
        """JSON-ready: ``{"settings", "hookpoints": {str(key): metrics, ...}, "joint"}``; each entry keeps its
        original ``key`` (int or str) and NaN becomes null."""
        def clean(v):
            if isinstance(v, Tensor):
                return v.tolist()
            if isinstance(v, float) and not math.isfinite(v):
                return None
            return v

        return {"settings": self.settings,
                "hookpoints": {str(k): {n: clean(v) for n, v in m.items()} for k, m in self.metrics.items()},
                "joint": None if self.joint is None else {n: clean(v) for n, v in self.joint.items()}}

    def save(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_dict` as JSON to ``path``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> EvalReport:
        """Read a file written by :meth:`save` (``density`` back as a tensor, null back as NaN)."""
        data = json.loads(Path(path).read_text())

        def back(n, v):
            if v is None:
                return float("nan")
            return torch.tensor(v) if n == "density" else v

        metrics = {m["key"]: {n: back(n, v) for n, v in m.items()} for m in data["hookpoints"].values()}
        joint = data.get("joint")
        return cls(metrics, None if joint is None else {n: back(n, v) for n, v in joint.items()}, data["settings"])

    def table(self) -> str:
        """A fixed-width text table, one line per hookpoint (and one for the joint splice)."""
        cols = [("fvu", "{:.4f}"), ("l0", "{:.1f}"), ("dead_frac", "{:.2%}"), ("dense_frac", "{:.2%}"),
                ("clean_loss", "{:.4f}"), ("spliced_loss", "{:.4f}"), ("delta_lm_loss", "{:+.4f}"), ("kl", "{:.4f}"),
                ("ce_recovered_zero", "{:.3f}"), ("ce_recovered_mean", "{:.3f}")]
        names = {"dead_frac": "dead", "dense_frac": "dense", "clean_loss": "clean", "spliced_loss": "spliced",
                 "delta_lm_loss": "delta", "ce_recovered_zero": "rec_zero", "ce_recovered_mean": "rec_mean"}
        rows = [[m.get("hookpoint", str(k))] + [f.format(m[c]) if c in m else "" for c, f in cols]
                for k, m in self.metrics.items()]
        if self.joint is not None:
            rows.append(["joint"] + [f.format(self.joint[c]) if c in self.joint else "" for c, f in cols])
        header = ["hookpoint"] + [names.get(c, c) for c, _ in cols]
        widths = [max(len(r[i]) for r in rows + [header]) + 2 for i in range(len(header))]
        fmt = lambda r: r[0].ljust(widths[0]) + "".join(v.rjust(w) for v, w in zip(r[1:], widths[1:]))  # noqa: E731
        return "\n".join([fmt(header).rstrip()] + [fmt(r).rstrip() for r in rows])

    def __repr__(self) -> str:
        return f"EvalReport({self.tokens} tokens)\n{self.table()}"


# ---------------------------------------------------------------------------------------------- helpers
def eval_batches(source, batch_size: int = 8) -> Iterator[dict]:
    """Model inputs to evaluate on: a :class:`~saehook.Corpus` gives its held-out ``"test"`` windows;
    anything else goes through :func:`saehook.training.iter_batches` (``input_ids`` tensors or dicts)."""
    from .corpus import Corpus
    from .training import iter_batches

    if isinstance(source, Corpus):
        for ids in source.windows("test", batch_size=batch_size):
            yield {"input_ids": ids}
    else:
        yield from iter_batches(source, batch_size=batch_size)


def position_masks(batch: dict, skip_positions: int) -> tuple[Tensor, Tensor]:
    """``(evaluated [B, T], real [B, T])`` bool masks: real = not padding (``attention_mask``); evaluated =
    real and at least ``skip_positions`` real tokens into the row (so left padding counts from the first
    real token, like :meth:`saehook.training.TrainingSession.valid_rows`)."""
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.to(ids.device).bool()
    pos = real.long().cumsum(-1) - 1
    return real & (pos >= skip_positions), real


def add_position_ids(batch: dict, real: Tensor) -> None:
    """With padding and no ``position_ids`` in ``batch``, add them counted from each row's first real token
    (as ``generate`` does), so left-padded rows see the same positions as unpadded ones."""
    if "attention_mask" in batch and "position_ids" not in batch and not bool(real.all()):
        batch["position_ids"] = (real.long().cumsum(-1) - 1).clamp_min(0)


def loss_mask(evaluated: Tensor, real: Tensor) -> Tensor:
    """``[B, T-1]``: the prediction at ``t`` of token ``t+1`` counts if ``t`` is evaluated and ``t+1`` real."""
    return evaluated[:, :-1] & real[:, 1:]


def next_token_logprobs(logits: Tensor, ids: Tensor, lmask: Tensor) -> tuple[Tensor, Tensor]:
    """``(log-probs [n, V], cross-entropy [n])`` in float32 at the ``n`` positions of ``lmask [B, T-1]``."""
    logp = F.log_softmax(logits[:, :-1][lmask].float(), dim=-1)
    ce = -logp.gather(-1, ids[:, 1:][lmask].unsqueeze(-1)).squeeze(-1)
    return logp, ce


def kl_divergence(logp_p: Tensor, logp_q: Tensor) -> Tensor:
    """``KL(p || q)`` per row, ``sum_v p_v (log p_v - log q_v)``, from log-probabilities ``[n, V]``."""
    return (logp_p.exp() * (logp_p - logp_q)).sum(-1)


def constant_sae(d_in: int, value: Tensor | None = None) -> TopKSAE:
    """An autoencoder whose reconstruction is the constant ``value`` (zeros by default): spliced in, it
    zero- or mean-ablates the hookpoint through the same hooks as a real autoencoder."""
    sae = TopKSAE(d_in, 1, 1)
    with torch.no_grad():
        for p in sae.parameters():
            p.zero_()
        if value is not None:
            sae.b_dec.copy_(value)
    return sae


def _recovered(spliced: float, clean: float, ablated: float) -> float:
    denom = ablated - clean
    return 1.0 - (spliced - clean) / denom if denom != 0 else float("nan")


class _HookpointStats:
    """Running sums for one hookpoint over the clean passes (float64 where they accumulate)."""

    def __init__(self, sae: TopKSAE):
        self.sae = sae
        dev = sae.W_enc.device
        self.n, self.active = 0, 0
        self.err = torch.zeros((), dtype=torch.float64, device=dev)
        self.sum_x = torch.zeros(sae.d_in, dtype=torch.float64, device=dev)
        self.sum_sq = torch.zeros((), dtype=torch.float64, device=dev)
        self.fires = torch.zeros(sae.n_latents, dtype=torch.int64, device=dev)
        self.loss = dict.fromkeys(("spliced", "zero", "mean", "kl"), 0.0)

    @torch.no_grad()
    def add(self, x: Tensor) -> None:
        """``x [n, d]``: evaluated rows of the clean activation."""
        x = x.to(self.sae.W_enc.dtype)
        codes = self.sae.encode(x)
        x_hat = self.sae.decode(codes)
        on = codes.values > 0
        self.n += x.shape[0]
        self.active += int(on.sum())
        self.err += (x - x_hat).double().pow(2).sum()
        self.sum_x += x.double().sum(0)
        self.sum_sq += x.double().pow(2).sum()
        self.fires.index_add_(0, codes.indices[on], torch.ones_like(codes.indices[on]))

    @property
    def mean(self) -> Tensor:
        return (self.sum_x / max(self.n, 1)).float()

    def fvu(self) -> float:
        total = self.sum_sq - self.sum_x.pow(2).sum() / max(self.n, 1)
        return float(self.err / total) if total > 0 else float("nan")


# ---------------------------------------------------------------------------------------------- evaluate
class _Evaluation:
    """The hooks and running sums of one :func:`evaluate` call; :meth:`step` handles one batch."""

    def __init__(self, model, saes: Mapping[Key, TopKSAE], skip_positions: int, joint: bool, keep_error: bool):
        self.skip, self.keep_error = skip_positions, keep_error
        self.hooked = attach(model, saes, record=False)
        self.model = self.hooked.model  # the torch module behind a wrapper
        self.zero_h = self.mean_h = None
        self.keys = list(self.hooked.saes)
        self.stats = {key: _HookpointStats(sae) for key, sae in self.hooked.saes.items()}
        self.mean_saes = {key: constant_sae(sae.d_in) for key, sae in self.hooked.saes.items()}
        try:  # a zero-ablating and a mean-ablating constant autoencoder at every hookpoint
            self.zero_h = Hooked(self.model, {key: constant_sae(sae.d_in) for key, sae in self.hooked.saes.items()},
                                 record=False)
            self.mean_h = Hooked(self.model, self.mean_saes, record=False)
        except BaseException:
            self.close()
            raise
        self.joint = joint and len(self.keys) > 1
        self.where = skip_positions if skip_positions > 0 else None  # splice at positions >= skip only
        self.totals = {"clean": 0.0, "joint": 0.0, "joint_kl": 0.0, "n": 0}
        self._rows: dict = {}

    def close(self) -> None:
        for h in (self.hooked, self.zero_h, self.mean_h):
            if h is not None:
                h.detach()

    def _tap(self, key, hp, x):
        self._rows[key] = x[self._rows["evaluated"]] if x.dim() == 3 else x

    def _pass(self, batch: dict, lmask: Tensor, h: Hooked | None = None, keys=None):
        """One forward; returns ``(log-probs [n, V], cross-entropy [n])`` at the loss positions. With ``h``,
        its ``keys`` are spliced in (a real autoencoder, or a constant one: an ablation)."""
        if h is None:
            return next_token_logprobs(self.model(**batch).logits, batch["input_ids"], lmask)
        with h.splice(keys, keep_error=self.keep_error and h is self.hooked, positions=self.where):
            return next_token_logprobs(self.model(**batch).logits, batch["input_ids"], lmask)

    def step(self, batch: dict) -> int:
        """Evaluate one batch (already on the model's device); returns its number of evaluated positions."""
        evaluated, real = position_masks(batch, self.skip)
        add_position_ids(batch, real)
        lmask = loss_mask(evaluated, real)
        self._rows = {"evaluated": evaluated}
        with self.hooked._tapping(self._tap):
            logp_clean, ce_clean = self._pass(batch, lmask)
        for key in self.keys:
            self.stats[key].add(self._rows[key])
            self.mean_saes[key].b_dec.copy_(self.stats[key].mean.to(self.mean_saes[key].b_dec.device))
        self.totals["clean"] += float(ce_clean.sum())
        self.totals["n"] += int(ce_clean.numel())
        for key in self.keys:
            loss = self.stats[key].loss
            logp, ce = self._pass(batch, lmask, self.hooked, [key])
            loss["spliced"] += float(ce.sum())
            loss["kl"] += float(kl_divergence(logp_clean, logp).sum())
            loss["zero"] += float(self._pass(batch, lmask, self.zero_h, [key])[1].sum())
            loss["mean"] += float(self._pass(batch, lmask, self.mean_h, [key])[1].sum())
        if self.joint:
            logp, ce = self._pass(batch, lmask, self.hooked, self.keys)
            self.totals["joint"] += float(ce.sum())
            self.totals["joint_kl"] += float(kl_divergence(logp_clean, logp).sum())
        return int(evaluated.sum())

    def metrics(self, key: Key, dense_threshold: float) -> dict:
        s, n_loss = self.stats[key], max(self.totals["n"], 1)
        clean = self.totals["clean"] / n_loss
        density = (s.fires.double() / s.n).float().cpu()
        spliced, zero, mean = (s.loss[n] / n_loss for n in ("spliced", "zero", "mean"))
        return {
            "key": key, "hookpoint": str(self.hooked.hookpoints[key]), "tokens": s.n, "loss_tokens": self.totals["n"],
            "fvu": s.fvu(), "l0": s.active / s.n,
            "dead_frac": float((s.fires == 0).float().mean()),
            "dense_frac": float((density > dense_threshold).float().mean()),
            "clean_loss": clean, "spliced_loss": spliced, "delta_lm_loss": spliced - clean,
            "kl": s.loss["kl"] / n_loss, "zero_ablation_loss": zero, "mean_ablation_loss": mean,
            "ce_recovered_zero": _recovered(spliced, clean, zero),
            "ce_recovered_mean": _recovered(spliced, clean, mean),
            "density": density,
        }

    def joint_metrics(self) -> dict | None:
        if not self.joint:
            return None
        n_loss = max(self.totals["n"], 1)
        clean, j = self.totals["clean"] / n_loss, self.totals["joint"] / n_loss
        return {"keys": self.keys, "tokens": self.stats[self.keys[0]].n, "loss_tokens": self.totals["n"],
                "clean_loss": clean, "spliced_loss": j, "delta_lm_loss": j - clean,
                "kl": self.totals["joint_kl"] / n_loss}


@torch.no_grad()
def evaluate(model, saes: Mapping[Key, TopKSAE], source, tokens: int, *, batch_size: int = 8,
             skip_positions: int = 1, joint: bool = True, dense_threshold: float = 0.1, keep_error: bool = False,
             progress: bool = False) -> EvalReport:
    """Measure autoencoders at their hookpoints of ``model`` on held-out text.

    Args:
        model: a Hugging Face causal LM (or a wrapper :func:`saehook.attach` accepts).
        saes: ``{key: TopKSAE}``, keys as for :func:`saehook.attach`; the report is keyed by them.
        source: a :class:`~saehook.Corpus` (its held-out ``"test"`` windows), or an iterable of
            ``input_ids [B, T]`` tensors or of dicts for ``model(**batch)`` (``attention_mask`` marks padding).
        tokens: evaluate at least this many positions (whole batches; ``report.tokens`` says how many).
        skip_positions: the first positions of each row that are neither measured nor spliced (BOS).
        joint: with several hookpoints, also splice all of them at once (``report.joint``).
        dense_threshold: a latent is dense if it fires on more than this fraction of tokens.
        keep_error: splice ``x_hat + (x - x_hat)`` (numerically the clean activation): a sanity check
            whose ``delta_lm_loss`` and ``kl`` must be ~0.

    Per batch it runs one clean pass (reconstruction statistics and clean logits), then per hookpoint a
    spliced, a zero-ablated and a mean-ablated pass, then the joint splice: ``3 H + 1 (+1)`` forwards.
    """
    if tokens <= 0:
        raise ValueError(f"tokens must be positive, got {tokens}")
    if skip_positions < 0:
        raise ValueError(f"skip_positions must be >= 0, got {skip_positions}")
    from tqdm.auto import tqdm

    from .training import _model_device

    run = _Evaluation(model, saes, skip_positions, joint, keep_error)
    device = _model_device(run.hooked.model)
    bar = tqdm(total=tokens, unit="tok", unit_scale=True, disable=not progress, desc="saehook eval")
    try:
        for batch in eval_batches(source, batch_size):
            if run.stats[run.keys[0]].n >= tokens:
                break
            bar.update(run.step({k: (v.to(device) if isinstance(v, Tensor) else v)
                                 for k, v in batch.items() if k != "labels"}))
    finally:
        bar.close()
        run.close()
    if run.stats[run.keys[0]].n == 0:
        raise ValueError("the source gave no evaluated positions (empty, or every row shorter than "
                         f"skip_positions={skip_positions} + 1)")
    n = run.stats[run.keys[0]].n
    if n < tokens:
        log.warning("source exhausted after %d of %d evaluated tokens", n, tokens)
    settings = {"tokens_requested": tokens, "batch_size": batch_size, "skip_positions": skip_positions,
                "dense_threshold": dense_threshold, "keep_error": keep_error,
                "mean_ablation": "running mean of the evaluated rows of the clean passes so far"}
    return EvalReport({key: run.metrics(key, dense_threshold) for key in run.keys}, run.joint_metrics(), settings)
