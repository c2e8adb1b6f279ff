"""Probe loss (Gao et al. 2024, section 4): how well does the single best latent predict a binary label?

For a set of labelled documents and one binary task ``y`` (for several labels: one-vs-rest per label):

1. Document features: each latent's activation averaged over the document's evaluated tokens (not
   padding, not the first ``skip_positions``), ``f[doc, j] = mean_t z_j(t)`` (``reduce="max"`` takes the
   maximum instead). The residual-channel baseline uses the hookpoint activation ``x`` the same way.
2. The documents are split once, at random with ``seed``, into a fitting half and a held-out half.
3. For every feature ``j`` at once, a 1-D logistic regression ``p = sigmoid(w_j f_j + b_j)`` is fitted on
   the fitting half (features standardised, L2 penalty ``l2 * w^2 / 2``, Newton steps with backtracking).
4. The best feature is the one with the lowest cross-entropy on the fitting half; its loss on the
   held-out half is the task's probe loss (choosing on held-out loss would reward noise among
   thousands of latents).

The probe loss is the mean over tasks. A constant predictor scores the entropy of the label prior
(``ln 2 = 0.693`` for a balanced task). The paper reports 0.60 for the residual channels and 0.49-0.52 for
its autoencoders, averaged over 61 tasks.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from .hookpoints import Key
from .hooks import attach
from .sae import TopKSAE

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- the fit
def fit_single_features(x: Tensor, y: Tensor, *, l2: float = 1e-4, iters: int = 50, tol: float = 1e-9
                        ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fit ``p_i = sigmoid(w_j x_ij + b_j)`` to ``y [N]`` for every column ``j`` of ``x [N, F]`` at once.

    Minimises ``mean_i BCE + l2 * w_j^2 / 2`` per column by Newton's method on the 2x2 system of
    ``(w_j, b_j)`` with a backtracking line search. ``x`` is used as given (standardise it first).
    Returns ``(w [F], b [F], loss [F], converged [F] bool)``; ``loss`` is the unpenalised mean BCE.
    """
    x, y = x.double(), y.double().reshape(-1, 1)
    n, f = x.shape
    prior = y.mean().clamp(1e-6, 1 - 1e-6)
    w = torch.zeros(f, dtype=torch.float64, device=x.device)
    b = torch.full((f,), float(torch.log(prior / (1 - prior))), dtype=torch.float64, device=x.device)

    def objective(w, b):
        z = x * w + b
        bce = (torch.nn.functional.softplus(z) - y * z).mean(0)
        return bce + 0.5 * l2 * w * w, bce

    obj, bce = objective(w, b)
    done = torch.zeros(f, dtype=torch.bool, device=x.device)
    for _ in range(iters):
        p = torch.sigmoid(x * w + b)
        r, s = p - y, p * (1 - p)
        g_w, g_b = (r * x).mean(0) + l2 * w, r.mean(0)
        h_ww, h_wb, h_bb = (s * x * x).mean(0) + l2, (s * x).mean(0), s.mean(0) + 1e-12
        det = (h_ww * h_bb - h_wb * h_wb).clamp_min(1e-30)
        d_w, d_b = (h_bb * g_w - h_wb * g_b) / det, (h_ww * g_b - h_wb * g_w) / det
        step = torch.ones(f, dtype=torch.float64, device=x.device)
        new_obj, new_bce = objective(w - d_w, b - d_b)
        for _ in range(30):  # halve the step wherever the objective did not decrease
            worse = new_obj > obj
            if not bool(worse.any()):
                break
            step = torch.where(worse, step / 2, step)
            new_obj, new_bce = objective(w - step * d_w, b - step * d_b)
        accept = new_obj <= obj
        gain = torch.where(accept, obj - new_obj, torch.zeros_like(obj))
        w, b = torch.where(accept, w - step * d_w, w), torch.where(accept, b - step * d_b, b)
        obj, bce = torch.where(accept, new_obj, obj), torch.where(accept, new_bce, bce)
        done = gain <= tol * (1 + obj)
        if bool(done.all()):
            break
    return w, b, bce, done


def bce_loss(x: Tensor, y: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """Mean binary cross-entropy ``[F]`` of ``sigmoid(w_j x_ij + b_j)`` against ``y [N]``."""
    z = x.double() * w + b
    y = y.double().reshape(-1, 1)
    return (torch.nn.functional.softplus(z) - y * z).mean(0)


def best_single_feature(x_fit: Tensor, y_fit: Tensor, x_test: Tensor, y_test: Tensor, *, l2: float = 1e-4,
                        iters: int = 50, chunk: int = 2048) -> dict:
    """Fit every feature on ``(x_fit, y_fit)``, pick the lowest fitting loss, score it on the test docs.

    Features are standardised with the fitting half's mean and standard deviation (constant features
    stay constant and fit the prior only). Returns ``{"index", "loss" (held out), "fit_loss",
    "test_losses" [F], "fit_losses" [F]}``.
    """
    mu, sd = x_fit.double().mean(0), x_fit.double().std(0, unbiased=False)
    sd = torch.where(sd > 1e-12, sd, torch.ones_like(sd))
    fit_losses, test_losses = [], []
    for c in range(0, x_fit.shape[1], chunk):  # bounded memory: [N, chunk] temporaries
        zf = (x_fit[:, c:c + chunk].double() - mu[c:c + chunk]) / sd[c:c + chunk]
        zt = (x_test[:, c:c + chunk].double() - mu[c:c + chunk]) / sd[c:c + chunk]
        w, b, loss, _ = fit_single_features(zf, y_fit, l2=l2, iters=iters)
        fit_losses.append(loss)
        test_losses.append(bce_loss(zt, y_test, w, b))
    fit_losses, test_losses = torch.cat(fit_losses), torch.cat(test_losses)
    j = int(fit_losses.argmin())
    return {"index": j, "loss": float(test_losses[j]), "fit_loss": float(fit_losses[j]),
            "test_losses": test_losses.float(), "fit_losses": fit_losses.float()}


# ---------------------------------------------------------------------------------------------- documents
def binary_tasks(labels: Sequence) -> dict[str, Tensor]:
    """One-vs-rest tasks ``{label: bool [N]}`` for 3+ distinct labels; one task (the second label in
    sorted order as positive) for exactly 2."""
    names = sorted({str(v) for v in labels})
    if len(names) < 2:
        raise ValueError(f"probing needs at least 2 distinct labels, got {names}")
    targets = names[1:] if len(names) == 2 else names
    lab = [str(v) for v in labels]
    return {t: torch.tensor([v == t for v in lab]) for t in targets}


def _as_docs(documents, tokenizer, split: str, max_documents: int | None, max_tokens: int | None, seed: int):
    """``[(ids list, label)]`` from a Corpus or a list of ``(text | ids | Document, label)`` pairs; with
    ``max_documents``, a random subset (drawn with ``seed``, kept in source order)."""
    from .corpus import Corpus, Document

    if isinstance(documents, Corpus):
        out = [(ids, doc.label) for doc, ids in documents.labelled(split, max_tokens=max_tokens)]
    else:
        out = []
        for item, label in documents:
            if isinstance(item, Document):
                item, label = item.text, item.label if label is None else label
            if isinstance(item, str):
                if tokenizer is None:
                    raise ValueError("text documents need tokenizer=...")
                ids = tokenizer(item, add_special_tokens=False)["input_ids"]
                bos = getattr(tokenizer, "bos_token_id", None)
                ids = ([bos] if bos is not None else []) + list(ids)
            else:
                ids = item.tolist() if isinstance(item, Tensor) else list(item)
            out.append((ids[:max_tokens] if max_tokens else ids, label))
    if max_documents is not None and len(out) > max_documents:
        keep = sorted(random.Random(seed).sample(range(len(out)), max_documents))
        out = [out[i] for i in keep]
    return out


@torch.no_grad()
def document_features(model, saes: Mapping[Key, TopKSAE], docs: Sequence[Sequence[int]], *, batch_size: int = 8,
                      skip_positions: int = 1, reduce: str = "mean") -> dict:
    """``{key: (latent features [N, n_latents], residual features [N, d])}``: per document, the mean (or
    max) over its evaluated tokens of each latent's activation and of each activation channel.

    Documents are right-padded into batches; each forward stops after the deepest hookpoint. A document
    with no evaluated token gets zeros."""
    if reduce not in ("mean", "max"):
        raise ValueError(f"reduce must be 'mean' or 'max', got {reduce!r}")
    hooked = attach(model, saes, record=False)
    feats: dict = {key: ([], []) for key in hooked.saes}

    def visit(key, x, keep):  # keep [B, T]: the evaluated tokens
        sae = hooked.saes[key]
        codes = sae.encode(x.to(sae.W_enc.dtype))
        z = torch.zeros(*x.shape[:-1], sae.n_latents, dtype=codes.values.dtype, device=x.device)
        z.scatter_(-1, codes.indices, codes.values)  # [B, T, n]
        w = keep.unsqueeze(-1).to(z.dtype)
        xs = x.to(z.dtype)
        if reduce == "mean":
            cnt = w.sum(1).clamp_min(1)
            lat, res = (z * w).sum(1) / cnt, (xs * w).sum(1) / cnt
        else:
            lat = z.masked_fill(~keep.unsqueeze(-1), float("-inf")).amax(1)
            res = xs.masked_fill(~keep.unsqueeze(-1), float("-inf")).amax(1)
            empty = ~keep.any(1, keepdim=True)
            lat, res = lat.masked_fill(empty, 0.0), res.masked_fill(empty, 0.0)
        feats[key][0].append(lat.float().cpu())
        feats[key][1].append(res.float().cpu())

    try:
        for i in range(0, len(docs), batch_size):
            chunk = [list(d) for d in docs[i:i + batch_size]]
            T = max(max(len(d) for d in chunk), 1)
            ids = torch.zeros(len(chunk), T, dtype=torch.long)
            mask = torch.zeros(len(chunk), T, dtype=torch.long)
            for r, d in enumerate(chunk):
                ids[r, :len(d)], mask[r, :len(d)] = torch.tensor(d, dtype=torch.long), 1
            hooked.run({"input_ids": ids, "attention_mask": mask}, skip_positions=skip_positions, visit=visit)
    finally:
        hooked.detach()
    return {key: (torch.cat(lat), torch.cat(res)) for key, (lat, res) in feats.items()}


def _split(n: int, test_frac: float, seed: int) -> tuple[Tensor, Tensor]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_test = min(max(1, round(n * test_frac)), n - 1)
    return torch.tensor(sorted(order[n_test:])), torch.tensor(sorted(order[:n_test]))


def probe_tasks(features: Tensor, tasks: Mapping[str, Tensor], *, test_frac: float = 0.5, seed: int = 0,
                l2: float = 1e-4) -> dict:
    """Best single feature per task on precomputed ``features [N, F]``: ``{"loss" (held out, mean over tasks),
    "fit_loss" (in sample), "tasks": {name: {"loss", "index", "fit_loss", "positives"}}, "n_fit", "n_test"}``;
    one fit/held-out split for all tasks."""
    n = features.shape[0]
    if n < 4:
        raise ValueError(f"probing needs at least 4 documents, got {n}")
    fit, test = _split(n, test_frac, seed)
    out = {}
    for name, y in tasks.items():
        y = y.float()
        r = best_single_feature(features[fit], y[fit], features[test], y[test], l2=l2)
        out[name] = {"loss": r["loss"], "index": r["index"], "fit_loss": r["fit_loss"], "positives": int(y.sum())}
    if len(fit) < 100:
        log.warning("probe loss from %d fitting documents: choosing the best of %d features overfits with so few; "
                    "the held-out loss can exceed chance (use a few hundred documents)", len(fit), features.shape[1])
    return {"loss": sum(t["loss"] for t in out.values()) / len(out),
            "fit_loss": sum(t["fit_loss"] for t in out.values()) / len(out), "tasks": out,
            "n_fit": len(fit), "n_test": len(test)}


def probe_loss(model, saes: Mapping[Key, TopKSAE], documents, *, tokenizer=None, split: str = "test",
               max_documents: int | None = None, max_tokens: int | None = None, batch_size: int = 8,
               skip_positions: int = 1, reduce: str = "mean", test_frac: float = 0.5, seed: int = 0,
               l2: float = 1e-4) -> dict:
    """Probe loss of each autoencoder and of its hookpoint's residual channels.

    Args:
        documents: a :class:`~saehook.Corpus` (its labelled documents of ``split``; BBC News gives 5
            one-vs-rest topic tasks), or a list of ``(text or token ids or Document, label)``; text needs
            ``tokenizer`` (a BOS is prepended when it has one).
        max_documents: probe a random subset of this many documents (drawn with ``seed``; a Corpus lists
            its documents by label, so the first ones would all share one).
        max_tokens: truncate each document (for a Corpus, default its context).

    Returns ``{key: {"sae_loss", "residual_loss", "sae_fit_loss", "residual_fit_loss", "chance", "documents",
    "n_fit", "n_test", "tasks": {label: {"sae_loss", "latent", "sae_fit_loss", "residual_loss", "channel",
    "residual_fit_loss", "positives"}}}}``; ``*_loss`` are held out, ``*_fit_loss`` in sample (the chosen
    feature's loss on the documents it was fitted on).
    """
    docs = _as_docs(documents, tokenizer, split, max_documents, max_tokens, seed)
    if not docs:
        raise ValueError("no labelled documents to probe")
    tasks = binary_tasks([label for _, label in docs])
    feats = document_features(model, saes, [ids for ids, _ in docs], batch_size=batch_size,
                              skip_positions=skip_positions, reduce=reduce)
    report = {}
    for key, (lat, res) in feats.items():
        s = probe_tasks(lat, tasks, test_frac=test_frac, seed=seed, l2=l2)
        r = probe_tasks(res, tasks, test_frac=test_frac, seed=seed, l2=l2)
        report[key] = {
            "sae_loss": s["loss"], "residual_loss": r["loss"], "sae_fit_loss": s["fit_loss"],
            "residual_fit_loss": r["fit_loss"], "documents": len(docs),
            "n_fit": s["n_fit"], "n_test": s["n_test"], "chance": _mean_prior_entropy(tasks),
            "tasks": {t: {"sae_loss": s["tasks"][t]["loss"], "latent": s["tasks"][t]["index"],
                          "sae_fit_loss": s["tasks"][t]["fit_loss"], "residual_loss": r["tasks"][t]["loss"],
                          "channel": r["tasks"][t]["index"], "residual_fit_loss": r["tasks"][t]["fit_loss"],
                          "positives": s["tasks"][t]["positives"]} for t in tasks},
        }
    return report


def _mean_prior_entropy(tasks: Mapping[str, Tensor]) -> float:
    """Mean over tasks of the label entropy (nats): the loss of a constant predictor."""
    def h(p):
        return 0.0 if p in (0.0, 1.0) else -(p * math.log(p) + (1 - p) * math.log(1 - p))

    return sum(h(float(y.float().mean())) for y in tasks.values()) / len(tasks)
