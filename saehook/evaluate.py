"""Evaluate attached autoencoders on held-out text: reconstruction, sparsity and downstream loss.

Per hookpoint, over the evaluated positions (not padding, not among the first ``skip_positions``), with
``e_t = x_t - x_hat_t`` and ``var_c = sum_t (x_tc - mean_c)^2`` the variance of channel ``c``:

    fvu            = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2      (one ratio over all tokens)
    cosine         = mean_t cos(x_t, x_hat_t)                          (cosine_median: its median)
    rel_error_*    = median, 90th, 99th percentile over t of ||e_t|| / ||x_t||
    top_channels   = the 5 channels of largest var_c;  top_channel_share = var_c1 / sum_c var_c
    fvu_excl_top   = sum_{c not top 5} sum_t e_tc^2 / sum_{c not top 5} var_c
    fvu_standardized = mean_{c: var_c > 0} sum_t e_tc^2 / var_c       (FVU of per-channel standardised x)
    l0             = mean number of latents with a value > 0 per token
    density[j]     = fraction of tokens on which latent j is > 0;  dead: never,  dense: > dense_threshold
    clean_loss     = mean next-token cross-entropy of the unedited model
    spliced_loss   = the same with x_hat spliced in place of x (this autoencoder alone)
    delta_lm_loss  = spliced_loss - clean_loss
    delta_lm_loss_se = standard error of delta_lm_loss over windows (rows): std_r(delta_r) / sqrt(R), delta_r
                     the mean of (spliced - clean) cross-entropy over row r's loss positions; the value on
                     unlimited text of this kind lies within one se of delta_lm_loss about 68% of the time,
                     within two about 95%
    kl             = mean KL(p_clean || p_spliced) of the next-token distributions
    ce_recovered_* = 1 - (spliced_loss - clean_loss) / (ablated_loss - clean_loss), with the hookpoint
                     zero-ablated (x -> 0) or mean-ablated (x -> mean of x)
    random_error_delta_lm_loss, random_error_kl = delta_lm_loss and kl with x_t + ||e_t|| u_t spliced in,
                     u_t a random unit vector (Gaussian direction, seeded): an error of the same size per
                     token in no particular direction
    error_vs_random = delta_lm_loss / random_error_delta_lm_loss    (> 1: worse than a random error)

A loss term is the prediction made *at* an evaluated position ``t`` of the token at ``t + 1`` (the last
position of a row and positions whose next token is padding have none). Splices and ablations are applied
only at evaluated positions, so the first positions (BOS, whose activation is an outlier) stay clean.
The mean used by mean-ablation is the running mean of ``x`` over every evaluated row of the clean passes
so far, the current batch included. When one channel holds half the variance or more, ``fvu`` mostly
measures that channel: a warning is logged and listed in ``warnings``. See ``docs/metrics/``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import Tensor

from .counts import as_count

# helpers whose home was here, still importable from saehook.evaluate
from .forward import add_position_ids, kl_divergence, loss_mask, next_token_logprobs, position_masks  # noqa: F401
from .hookpoints import Key
from .hooks import Hooked, attach
from .sae import Codes, TopKSAE

log = logging.getLogger(__name__)


class EvalReport(Mapping):
    """What :func:`evaluate` measured: ``report[key]`` is a dict of metrics for that hookpoint.

    ``report.joint`` holds ``delta_lm_loss``, ``kl``, ``clean_loss``, ``spliced_loss`` with every
    autoencoder spliced in at once (None with a single hookpoint). ``report.settings`` records the
    arguments. ``density`` is a CPU float tensor ``[n_latents]`` (a list in :meth:`to_dict`);
    ``top_channels`` (channel indices) and ``warnings`` (sentences) are lists.
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
        """A fixed-width text table, one line per hookpoint (and one for the joint splice), then the
        warnings, one line each."""
        cols = [("fvu", "{:.4f}"), ("fvu_standardized", "{:.4f}"), ("cosine", "{:.3f}"), ("rel_error_median", "{:.3f}"),
                ("l0", "{:.1f}"), ("dead_frac", "{:.2%}"), ("dense_frac", "{:.2%}"),
                ("clean_loss", "{:.4f}"), ("spliced_loss", "{:.4f}"), ("delta_lm_loss", "{:+.4f}"),
                ("delta_lm_loss_se", "±{:.4f}"), ("kl", "{:.4f}"),
                ("random_error_delta_lm_loss", "{:+.4f}"), ("ce_recovered_zero", "{:.3f}"),
                ("ce_recovered_mean", "{:.3f}")]
        names = {"fvu_standardized": "fvu_std", "cosine": "cos", "rel_error_median": "relerr_med",
                 "dead_frac": "dead", "dense_frac": "dense", "clean_loss": "clean", "spliced_loss": "spliced",
                 "delta_lm_loss": "delta", "delta_lm_loss_se": "se", "random_error_delta_lm_loss": "ctrl_delta",
                 "ce_recovered_zero": "rec_zero", "ce_recovered_mean": "rec_mean"}
        rows = [[m.get("hookpoint", str(k))] + [f.format(m[c]) if c in m else "" for c, f in cols]
                for k, m in self.metrics.items()]
        if self.joint is not None:
            rows.append(["joint"] + [f.format(self.joint[c]) if c in self.joint else "" for c, f in cols])
        header = ["hookpoint"] + [names.get(c, c) for c, _ in cols]
        widths = [max(len(r[i]) for r in rows + [header]) + 2 for i in range(len(header))]
        fmt = lambda r: r[0].ljust(widths[0]) + "".join(v.rjust(w) for v, w in zip(r[1:], widths[1:]))  # noqa: E731
        notes = [f"warning: {m.get('hookpoint', k)}: {w}"
                 for k, m in self.metrics.items() for w in m.get("warnings", ())]
        return "\n".join([fmt(header).rstrip()] + [fmt(r).rstrip() for r in rows] + notes)

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


def _standard_error(parts: list[Tensor]) -> float:
    """``std / sqrt(n)`` of the values in ``parts`` (sample std, n - 1); NaN with fewer than two values."""
    v = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
    return float(v.std() / math.sqrt(len(v))) if len(v) > 1 else float("nan")


def _quantiles(values: Tensor, qs: list[float]) -> list[float]:
    """Exact quantiles of a 1-D tensor, linearly interpolated between order statistics (as
    ``torch.quantile``, which refuses more than 2^24 values); NaN for an empty tensor."""
    v = values.flatten().double().sort().values
    if v.numel() == 0:
        return [float("nan")] * len(qs)
    out = []
    for q in qs:
        pos = q * (v.numel() - 1)
        lo, hi = float(v[math.floor(pos)]), float(v[math.ceil(pos)])
        out.append(lo if lo == hi else lo + (hi - lo) * (pos - math.floor(pos)))
    return out


class _Replacement(TopKSAE):
    """A stand-in autoencoder whose reconstruction of the current batch is ``value`` (``[B, T, d]``, the
    shape of the hookpoint activation, set before each pass): spliced in, the hookpoint becomes ``value``
    at the spliced positions, through the same hooks and positions as a real autoencoder. The random-error
    control sets ``value = x + e`` with ``e`` random of the autoencoder's per-token error norm."""

    def __init__(self, d_in: int):
        super().__init__(d_in, 1, 1)
        self.value: Tensor | None = None

    def encode(self, x: Tensor, k: int | None = None) -> Codes:
        if self.value is None or self.value.shape != x.shape:
            got = None if self.value is None else tuple(self.value.shape)
            raise RuntimeError(f"replacement of shape {got} set for an activation of shape {tuple(x.shape)}")
        zeros = x.new_zeros(*x.shape[:-1], 1)
        return Codes(zeros, zeros.long())

    def decode(self, codes: Codes) -> Tensor:
        return self.value


class _HookpointStats:
    """Running sums for one hookpoint over the clean passes (float64 where they accumulate). Per-channel
    sums are taken around ``shift`` (the first batch's mean), so a channel with a large mean and a small
    variance loses no precision; per-token relative errors and cosines are kept (float32, CPU)."""

    def __init__(self, sae: TopKSAE):
        self.sae = sae
        dev, d = sae.W_enc.device, sae.d_in
        self.n, self.active = 0, 0
        self.shift: Tensor | None = None
        self.sum_x = torch.zeros(d, dtype=torch.float64, device=dev)  # sum_t (x_t - shift)
        self.sum_x2 = torch.zeros(d, dtype=torch.float64, device=dev)  # sum_t (x_t - shift)^2, per channel
        self.sum_err2 = torch.zeros(d, dtype=torch.float64, device=dev)  # sum_t (x_t - x_hat_t)^2, per channel
        self.rel_error: list[Tensor] = []
        self.cosine: list[Tensor] = []
        self.fires = torch.zeros(sae.n_latents, dtype=torch.int64, device=dev)
        self.loss = dict.fromkeys(("spliced", "zero", "mean", "kl", "random", "random_kl"), 0.0)
        self.row_delta: list[Tensor] = []  # per window: mean (spliced - clean) cross-entropy, for the standard error

    @torch.no_grad()
    def add(self, x: Tensor) -> Tensor:
        """``x [n, d]``: evaluated rows of the clean activation (a transcoder's: its module's input and output side by
        side, ``[n, 2d]``, measured on the output). Returns ``||x - x_hat|| [n]`` (float64)."""
        x = x.to(self.sae.W_enc.dtype)
        codes = self.sae.encode(x)
        x_hat = self.sae.decode(codes)
        x = x[..., x.shape[-1] - self.sae.d_in:]  # what x_hat predicts: the activation, or a transcoder's output
        on = codes.values > 0
        xd, hd = x.double(), x_hat.double()
        ed = xd - hd
        if self.shift is None:
            self.shift = xd.mean(0)
        self.n += x.shape[0]
        self.active += int(on.sum())
        self.sum_err2 += ed.pow(2).sum(0)
        self.sum_x += (xd - self.shift).sum(0)
        self.sum_x2 += (xd - self.shift).pow(2).sum(0)
        err, norm, norm_hat = ed.norm(dim=-1), xd.norm(dim=-1), hd.norm(dim=-1)
        self.rel_error.append((err / norm).nan_to_num(nan=0.0).float().cpu())  # 0/0 (x = x_hat = 0): no error
        self.cosine.append(((xd * hd).sum(-1) / (norm * norm_hat).clamp_min(1e-300)).float().cpu())
        self.fires.index_add_(0, codes.indices[on], torch.ones_like(codes.indices[on]))
        return err

    @property
    def mean(self) -> Tensor:
        shift = 0.0 if self.shift is None else self.shift
        return (shift + self.sum_x / max(self.n, 1)).float()

    def channel_variance(self) -> Tensor:
        """``var_c = sum_t (x_tc - mean_c)^2``, float64 ``[d]``."""
        return (self.sum_x2 - self.sum_x.pow(2) / max(self.n, 1)).clamp_min(0)

    def fvu(self) -> float:
        total = self.channel_variance().sum()
        return float(self.sum_err2.sum() / total) if total > 0 else float("nan")

    def quality(self) -> dict:
        """The reconstruction metrics that one dominant channel cannot hide (see the module docstring)."""
        var, err = self.channel_variance().cpu(), self.sum_err2.cpu()
        top = var.argsort(descending=True)[: min(5, len(var))]
        total, rest = float(var.sum()), var.clone()
        rest[top] = 0
        err_rest = float(err.sum() - err[top].sum())
        live = var > 0
        ratio = lambda a, b: a / b if b > 0 else float("nan")  # noqa: E731
        rel = torch.cat(self.rel_error) if self.rel_error else torch.zeros(0)
        cos = torch.cat(self.cosine) if self.cosine else torch.zeros(0)
        med, p90, p99 = _quantiles(rel, [0.5, 0.9, 0.99])
        return {"cosine": float(cos.double().mean()) if len(cos) else float("nan"),
                "cosine_median": _quantiles(cos, [0.5])[0],
                "rel_error_median": med, "rel_error_p90": p90, "rel_error_p99": p99,
                "top_channels": top.tolist(), "top_channel_share": ratio(float(var[top[0]]), total),
                "top5_channel_share": ratio(float(var[top].sum()), total),
                "fvu_excl_top": ratio(err_rest, float(rest.sum())),
                "fvu_standardized": float((err[live] / var[live]).mean()) if bool(live.any()) else float("nan")}


# ---------------------------------------------------------------------------------------------- evaluate
class _Evaluation:
    """The hooks and running sums of one :func:`evaluate` call; :meth:`step` handles one batch."""

    def __init__(self, model, saes: Mapping[Key, TopKSAE], skip_positions: int, joint: bool, keep_error: bool,
                 ablations: bool = True, control: bool = True, seed: int = 0):
        self.skip, self.keep_error, self.ablations, self.control = skip_positions, keep_error, ablations, control
        self.hooked = attach(model, saes, record=False)
        self.model = self.hooked.model  # the torch module behind a wrapper
        self.zero_h = self.mean_h = self.random_h = None
        self.keys = list(self.hooked.saes)
        self.stats = {key: _HookpointStats(sae) for key, sae in self.hooked.saes.items()}
        self.mean_saes = {key: constant_sae(sae.d_in) for key, sae in self.hooked.saes.items()}
        self.random_saes = {key: _Replacement(sae.d_in) for key, sae in self.hooked.saes.items()}
        # one CPU generator per hookpoint: its directions depend on the seed only, not on the device or on
        # which other hookpoints are evaluated alongside
        self.gens = {key: torch.Generator().manual_seed(seed) for key in self.keys}
        try:  # a zero-ablating and a mean-ablating constant autoencoder, and the control, at every hookpoint
            if ablations:
                self.zero_h = Hooked(self.model, {key: constant_sae(sae.d_in) for key, sae in self.hooked.saes.items()},
                                     record=False)
                self.mean_h = Hooked(self.model, self.mean_saes, record=False)
            if control:
                self.random_h = Hooked(self.model, self.random_saes, record=False)
        except BaseException:
            self.close()
            raise
        self.joint = joint and len(self.keys) > 1
        self.where = skip_positions if skip_positions > 0 else None  # splice at positions >= skip only
        self.totals = {"clean": 0.0, "joint": 0.0, "joint_kl": 0.0, "n": 0}

    def close(self) -> None:
        for h in (self.hooked, self.zero_h, self.mean_h, self.random_h):
            if h is not None:
                h.detach()

    def _pass(self, batch: dict, lmask: Tensor, h: Hooked | None = None, keys=None):
        """One forward; returns ``(log-probs [n, V], cross-entropy [n])`` at the loss positions. With ``h``,
        its ``keys`` are spliced in (a real autoencoder, a constant one: an ablation, or the control)."""
        if h is None:
            return next_token_logprobs(self.model(**batch).logits, batch["input_ids"], lmask)
        with h.splice(keys, keep_error=self.keep_error and h is self.hooked, positions=self.where):
            return next_token_logprobs(self.model(**batch).logits, batch["input_ids"], lmask)

    @torch.no_grad()
    def _random_error(self, key: Key, x: Tensor, evaluated: Tensor, err: Tensor) -> None:
        """Set the control's replacement to ``x + ||e_t|| u_t`` at the evaluated rows of ``x [B, T, d]``
        (``x`` elsewhere), ``u_t`` a Gaussian direction from this hookpoint's seeded generator. With ``keep_error`` the
        splice changes nothing, so neither does the control."""
        sae = self.random_saes[key]
        value = x.to(sae.W_enc.dtype).clone()
        rows = evaluated if x.dim() == 3 else slice(None)
        if not self.keep_error:
            u = torch.randn(len(err), x.shape[-1], generator=self.gens[key], dtype=torch.float64)
            u = u / u.norm(dim=-1, keepdim=True) * err.cpu().unsqueeze(-1)
            value[rows] += u.to(value)
        sae.value = value

    def step(self, batch: dict) -> int:
        """Evaluate one batch; returns its number of evaluated positions."""
        run = self.hooked.run(batch, skip_positions=self.skip, stop_early=False)  # the clean pass
        batch, evaluated, real = run.batch, run.valid, run.real
        lmask = loss_mask(evaluated, real)
        logp_clean, ce_clean = next_token_logprobs(run.output.logits, batch["input_ids"], lmask)
        for key in self.keys:
            x = run.acts[key]
            err = self.stats[key].add(x[evaluated] if x.dim() == 3 else x)
            self.mean_saes[key].b_dec.copy_(self.stats[key].mean.to(self.mean_saes[key].b_dec.device))
            if self.control:  # around the activation the autoencoder predicts (a transcoder's: the output half)
                self._random_error(key, x[..., x.shape[-1] - self.hooked.saes[key].d_in:], evaluated, err)
        del run
        self.totals["clean"] += float(ce_clean.sum())
        self.totals["n"] += int(ce_clean.numel())
        rows = lmask.nonzero()[:, 0]  # the window of each loss position, in next_token_logprobs' order
        per_row = torch.zeros(lmask.shape[0], dtype=torch.float64, device=rows.device).index_add_(
            0, rows, torch.ones_like(rows, dtype=torch.float64))
        for key in self.keys:
            loss = self.stats[key].loss
            logp, ce = self._pass(batch, lmask, self.hooked, [key])
            loss["spliced"] += float(ce.sum())
            diff = torch.zeros_like(per_row).index_add_(0, rows, (ce - ce_clean).double())
            self.stats[key].row_delta.append((diff[per_row > 0] / per_row[per_row > 0]).cpu())
            loss["kl"] += float(kl_divergence(logp_clean, logp).sum())
            if self.ablations:
                loss["zero"] += float(self._pass(batch, lmask, self.zero_h, [key])[1].sum())
                loss["mean"] += float(self._pass(batch, lmask, self.mean_h, [key])[1].sum())
            if self.control:
                logp, ce = self._pass(batch, lmask, self.random_h, [key])
                self.random_saes[key].value = None
                loss["random"] += float(ce.sum())
                loss["random_kl"] += float(kl_divergence(logp_clean, logp).sum())
        if self.joint:
            logp, ce = self._pass(batch, lmask, self.hooked, self.keys)
            self.totals["joint"] += float(ce.sum())
            self.totals["joint_kl"] += float(kl_divergence(logp_clean, logp).sum())
        return int(evaluated.sum())

    def metrics(self, key: Key, dense_threshold: float) -> dict:
        s, n_loss = self.stats[key], max(self.totals["n"], 1)
        clean = self.totals["clean"] / n_loss
        density = (s.fires.double() / s.n).float().cpu()
        spliced = s.loss["spliced"] / n_loss
        hookpoint = str(self.hooked.hookpoints[key])
        m = {"key": key, "hookpoint": hookpoint, "tokens": s.n, "loss_tokens": self.totals["n"],
             "fvu": s.fvu(), **s.quality(), "l0": s.active / s.n,
             "dead_frac": float((s.fires == 0).float().mean()),
             "dense_frac": float((density > dense_threshold).float().mean()),
             "clean_loss": clean, "spliced_loss": spliced, "delta_lm_loss": spliced - clean,
             "delta_lm_loss_se": _standard_error(s.row_delta), "windows": sum(len(r) for r in s.row_delta),
             "kl": s.loss["kl"] / n_loss}
        if self.ablations:
            zero, mean = s.loss["zero"] / n_loss, s.loss["mean"] / n_loss
            m.update(zero_ablation_loss=zero, mean_ablation_loss=mean,
                     ce_recovered_zero=_recovered(spliced, clean, zero),
                     ce_recovered_mean=_recovered(spliced, clean, mean))
        if self.control:
            rand = s.loss["random"] / n_loss - clean
            m.update(random_error_delta_lm_loss=rand, random_error_kl=s.loss["random_kl"] / n_loss,
                     error_vs_random=(spliced - clean) / rand if rand > 0 else float("nan"))
        m["warnings"] = []
        if m["top_channel_share"] >= 0.5:
            m["warnings"].append(f"channel {m['top_channels'][0]} holds {m['top_channel_share']:.0%} of the variance: "
                                 "FVU mostly measures that channel; read fvu_standardized, rel_error_* and "
                                 "delta_lm_loss")
        for w in m["warnings"]:
            log.warning("%s: %s", hookpoint, w)
        m["density"] = density
        return m

    def joint_metrics(self) -> dict | None:
        if not self.joint:
            return None
        n_loss = max(self.totals["n"], 1)
        clean, j = self.totals["clean"] / n_loss, self.totals["joint"] / n_loss
        return {"keys": self.keys, "tokens": self.stats[self.keys[0]].n, "loss_tokens": self.totals["n"],
                "clean_loss": clean, "spliced_loss": j, "delta_lm_loss": j - clean,
                "kl": self.totals["joint_kl"] / n_loss}


@torch.no_grad()
def evaluate(model, saes: Mapping[Key, TopKSAE], source, tokens: int | None = None, *, batch_size: int = 8,
             skip_positions: int = 1, joint: bool = True, dense_threshold: float = 0.1, keep_error: bool = False,
             ablations: bool = True, control: bool = True, seed: int = 0, progress: bool = False) -> EvalReport:
    """Measure autoencoders at their hookpoints of ``model`` on held-out text.

    Args:
        model: a Hugging Face causal LM (or a wrapper :func:`saehook.attach` accepts).
        saes: ``{key: TopKSAE}``, keys as for :func:`saehook.attach`; the report is keyed by them.
        source: a :class:`~saehook.Corpus` (its held-out ``"test"`` windows), or an iterable of
            ``input_ids [B, T]`` tensors or of dicts for ``model(**batch)`` (``attention_mask`` marks padding).
        tokens: evaluate at least this many positions (whole batches; ``report.tokens`` says how many), an int
            or a count like ``"20k"``; None: the whole of a finite ``source`` (one with ``len()``, e.g. a list
            of batches).
        skip_positions: the first positions of each row that are neither measured nor spliced (BOS).
        joint: with several hookpoints, also splice all of them at once (``report.joint``).
        dense_threshold: a latent is dense if it fires on more than this fraction of tokens.
        keep_error: splice ``x_hat + (x - x_hat).detach()`` as :meth:`saehook.Hooked.splice` does
            (numerically the clean activation; evaluation runs without gradients, so only the value
            matters): a sanity check whose ``delta_lm_loss`` and ``kl`` must be ~0.
        ablations: run the zero- and mean-ablated passes (``zero_ablation_loss``, ``mean_ablation_loss``,
            ``ce_recovered_*``); False leaves them and their metrics out, for fast sweeps.
        control: run the random-error control (``random_error_delta_lm_loss``, ``random_error_kl``,
            ``error_vs_random``): one more forward per hookpoint and batch; False leaves it out.
        seed: seeds the control's random directions (a CPU generator), so reruns agree.
        progress: show a progress bar.

    Per batch it runs one clean pass (reconstruction statistics and clean logits), then per hookpoint a
    spliced pass, a zero- and a mean-ablated pass (``ablations``) and the control pass (``control``), then
    the joint splice: ``1 + 4 H (+1)`` forwards with everything on, ``1 + H (+1)`` with both off.

    Raises:
        ValueError: ``tokens`` is not positive; ``tokens`` is None and ``source`` has no ``len()`` (a
            :class:`~saehook.Corpus` or a generator may not end); the source gave no evaluated positions.
    """
    if tokens is None and not hasattr(source, "__len__"):
        raise ValueError(f"tokens=None evaluates the whole source, but a {type(source).__name__} has no len() and "
                         "may never end: pass tokens=, e.g. tokens=50_000")
    if tokens is not None:
        tokens = as_count(tokens)
        if tokens <= 0:
            raise ValueError(f"tokens must be positive, got {tokens}")
    if skip_positions < 0:
        raise ValueError(f"skip_positions must be >= 0, got {skip_positions}")
    from tqdm.auto import tqdm

    run = _Evaluation(model, saes, skip_positions, joint, keep_error, ablations, control, seed)
    bar = tqdm(total=tokens, unit="tok", unit_scale=True, disable=not progress, desc="saehook eval")
    try:
        for batch in eval_batches(source, batch_size):
            if tokens is not None and run.stats[run.keys[0]].n >= tokens:
                break
            bar.update(run.step(batch))
    finally:
        bar.close()
        run.close()
    if run.stats[run.keys[0]].n == 0:
        raise ValueError("the source gave no evaluated positions (empty, or every row shorter than "
                         f"skip_positions={skip_positions} + 1)")
    n = run.stats[run.keys[0]].n
    if tokens is not None and n < tokens:
        log.warning("source exhausted after %d of %d evaluated tokens", n, tokens)
    settings = {"tokens_requested": tokens, "batch_size": batch_size, "skip_positions": skip_positions,
                "dense_threshold": dense_threshold, "keep_error": keep_error, "ablations": ablations,
                "control": control, "seed": seed}
    if ablations:
        settings["mean_ablation"] = "running mean of the evaluated rows of the clean passes so far"
    return EvalReport({key: run.metrics(key, dense_threshold) for key in run.keys}, run.joint_metrics(), settings)
