"""Sparse probing (SAEBench's ``sparse_probing``; Gurnee et al. 2023, Gao et al. 2024): can k latents classify?

For labelled documents and each label ``c`` (one-vs-rest), with documents split once into train and test:

1. Document features: the mean over a document's tokens (padding and the first ``skip_positions`` excluded) of
   the hookpoint activation ``x`` (``[N, d]``) and of every latent's code ``z`` (``[N, n_latents]``, 0 where a
   latent is not among a token's top k).
2. Balanced task: all ``P`` training (test) documents of ``c`` against ``P`` documents of the other labels, drawn
   as SAEBench does: ``ceil(P / (L - 1))`` at random from each other label, then ``P`` of those at random.
3. Latent ranking on the training documents: ``|mean_{y=1} f_j - mean_{y=0} f_j|``, largest first.
4. An L2 logistic regression ``p = sigmoid(w . f_S + b)`` on the top ``k`` features ``S`` (sklearn's objective:
   ``||w||^2 / 2 + C * sum_i BCE_i``, ``C = 1``, no penalty on ``b``, raw features), fitted on the training
   documents; its accuracy on the test documents (threshold 0.5) is the task's ``*_top_{k}_test_accuracy``.
   The same probe on all features gives ``llm_test_accuracy`` (activations) and ``sae_test_accuracy`` (latents).
5. The metrics are the mean over the labels' tasks.

SAEBench names: eval_type_id ``sparse_probing``, sections ``llm`` (``llm_test_accuracy``,
``llm_top_{k}_test_accuracy``) and ``sae`` (``sae_test_accuracy``, ``sae_top_{k}_test_accuracy``); accuracies are
fractions in [0, 1]. Differences from SAEBench are listed in ``docs/metrics/sparse-probing.md``.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from ..hookpoints import Key
from ..sae import TopKSAE
from .activations import Ragged, pooled_codes, token_activations

log = logging.getLogger(__name__)

EVAL_TYPE_ID = "sparse_probing"


@dataclass(frozen=True)
class SparseProbingConfig:
    """Settings of :func:`run` (saved in the result's ``eval_config``)."""

    source: str | None = None
    """Labelled documents: None for the embedded BBC News (five topics), or a ``.jsonl`` path."""
    text_field: str = "text"
    """The ``.jsonl`` field holding the text."""
    label_field: str = "label"
    """The ``.jsonl`` field holding the label."""
    dataset_name: str = ""
    """The name in ``eval_result_details`` (default: ``bbc_news`` or the file's stem)."""
    context_length: int = 128
    """Tokens kept from the start of each document, BOS included (SAEBench: 128)."""
    test_fraction: float = 0.2
    """Share of each label's documents held out for testing (SAEBench: 1,000 test of 5,000)."""
    max_documents_per_label: int | None = None
    """Keep at most this many documents of each label (drawn with ``random_seed``); None keeps all."""
    k_values: tuple[int, ...] = (1, 2, 5, 10, 20)
    """Numbers of top-ranked features probed (SAEBench's default: 1, 2, 5)."""
    C: float = 1.0
    """Inverse L2 strength of every probe (sklearn's default, as SAEBench's top-k probes)."""
    max_iter: int = 500
    """L-BFGS iterations per probe."""
    skip_positions: int = 1
    """Leading tokens of each document left out of its mean (the BOS)."""
    full_probes: bool = True
    """Also probe all activations and all latents (``llm_test_accuracy``, ``sae_test_accuracy``)."""
    random_seed: int = 42
    """Seeds the split and the balanced negatives (SAEBench: 42)."""
    llm_batch_size: int = 8
    """Documents per forward when collecting activations."""
    sae_batch_size: int = 4096
    """Tokens per encode when computing codes from the cached activations."""

    def __post_init__(self):
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        if not self.k_values or any(int(k) < 1 for k in self.k_values):
            raise ValueError(f"k_values must be positive integers, got {self.k_values}")
        if self.C <= 0 or self.context_length < 2:
            raise ValueError(f"C must be > 0 and context_length >= 2, got C={self.C}, "
                             f"context_length={self.context_length}")
        object.__setattr__(self, "k_values", tuple(int(k) for k in self.k_values))


# ---------------------------------------------------------------------------------------------- pure math
def fit_logistic(x: Tensor, y: Tensor, *, C: float = 1.0, max_iter: int = 500) -> tuple[Tensor, Tensor]:
    """L2 logistic regression: minimise ``||w||^2 / 2 + C * sum_i BCE(sigmoid(x_i . w + b), y_i)`` over
    ``w [F]`` and ``b`` (not penalised), by L-BFGS in float64 (sklearn's objective). ``x [N, F]``, ``y [N]`` 0/1.
    Returns ``(w [F], b [])`` float64."""
    x, y = x.double(), y.double()
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    p = y.mean().clamp(1e-6, 1 - 1e-6)
    b = torch.log(p / (1 - p)).reshape(()).clone().requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, tolerance_grad=1e-7, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")
    scale = 1.0 / len(y)  # the objective divided by N (same minimum), for the tolerances

    def closure():
        opt.zero_grad()
        z = x @ w + b
        loss = scale * (0.5 * (w * w).sum() / C + (torch.nn.functional.softplus(z) - y * z).sum())
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def accuracy(x: Tensor, y: Tensor, w: Tensor, b: Tensor) -> float:
    """Share of rows of ``x [N, F]`` whose prediction ``x . w + b > 0`` equals ``y [N]`` (0/1)."""
    return float(((x.double() @ w + b > 0) == y.bool()).double().mean())


def rank_by_mean_diff(x: Tensor, y: Tensor) -> Tensor:
    """Feature indices ``[F]`` by ``|mean(x[y = 1]) - mean(x[y = 0])|``, largest first (ties: lower index)."""
    y = y.bool()
    diff = (x[y].double().mean(0) - x[~y].double().mean(0)).abs()
    return torch.sort(diff, descending=True, stable=True).indices


def balanced_task(labels: Sequence[str], positive: str, rng: random.Random) -> tuple[list[int], Tensor]:
    """SAEBench's one-vs-rest sample: every document of ``positive`` (``P``), and ``P`` others drawn as
    ``ceil(P / (L - 1))`` from each other label at random then ``P`` of those at random (when other labels have
    too few, the rest is drawn from what remains; when all others hold fewer than ``P``, ``P`` positives are
    drawn down to their number). Returns ``(indices, y [2P] float 0/1)``."""
    pos = [i for i, v in enumerate(labels) if v == positive]
    others = sorted({v for v in labels if v != positive})
    if not pos or not others:
        raise ValueError(f"label {positive!r} needs documents of its own and of another label, got {len(pos)} "
                         f"and labels {others}")
    per = math.ceil(len(pos) / len(others))
    pools = {o: [i for i, v in enumerate(labels) if v == o] for o in others}
    neg = [i for o in others for i in rng.sample(pools[o], min(per, len(pools[o])))]
    if len(neg) < len(pos):
        rest = sorted(set(i for p in pools.values() for i in p) - set(neg))
        neg += rng.sample(rest, min(len(pos) - len(neg), len(rest)))
    neg = rng.sample(neg, min(len(pos), len(neg)))
    pos = rng.sample(pos, len(neg)) if len(neg) < len(pos) else pos
    idx = pos + neg
    return idx, torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))])


def probe_accuracies(train: Tensor, train_labels: Sequence[str], test: Tensor, test_labels: Sequence[str], *,
                     k_values: Sequence[int], C: float = 1.0, max_iter: int = 500, full: bool = True,
                     seed: int = 42) -> dict:
    """One-vs-rest probes on precomputed document features ``train [N, F]`` / ``test [M, F]``.

    Returns ``{"test_accuracy": mean over labels or None, "top_{k}_test_accuracy": mean, ..., "tasks": {label:
    {"test_accuracy", "top_{k}_test_accuracy", "top_features": the top max(k) indices, "train_docs",
    "test_docs"}}}``; ``k`` larger than ``F`` is skipped (None)."""
    tasks = {}
    for c in sorted(set(train_labels)):
        rng = random.Random(f"{seed}:{c}")
        tr, ytr = balanced_task(train_labels, c, rng)
        te, yte = balanced_task(test_labels, c, rng)
        xtr, xte = train[tr], test[te]
        order = rank_by_mean_diff(xtr, ytr)
        out = {"top_features": order[:max(k_values)].tolist(), "train_docs": len(tr), "test_docs": len(te)}
        for k in k_values:
            if k > train.shape[1]:
                out[f"top_{k}_test_accuracy"] = None
                continue
            S = order[:k]
            w, b = fit_logistic(xtr[:, S], ytr, C=C, max_iter=max_iter)
            out[f"top_{k}_test_accuracy"] = accuracy(xte[:, S], yte, w, b)
        if full:
            w, b = fit_logistic(xtr, ytr, C=C, max_iter=max_iter)
            out["test_accuracy"] = accuracy(xte, yte, w, b)
        tasks[c] = out

    def mean(name):
        vals = [t.get(name) for t in tasks.values()]
        return None if any(v is None for v in vals) else sum(vals) / len(vals)

    res = {"test_accuracy": mean("test_accuracy") if full else None}
    res.update({f"top_{k}_test_accuracy": mean(f"top_{k}_test_accuracy") for k in k_values})
    res["tasks"] = tasks
    return res


# ---------------------------------------------------------------------------------------------- documents
def labelled_documents(config: SparseProbingConfig, tokenizer) -> tuple[str, list[tuple[list[int], str]]]:
    """``(dataset name, [(token ids, label)])`` from ``config.source``: ``[BOS] + text tokens``, at most
    ``context_length`` of them; unlabelled and empty documents dropped."""
    from pathlib import Path

    from .. import corpus

    if config.source is None or config.source in ("bbc", "bbc_news"):
        name, docs = "bbc_news", corpus.bbc_news()
    elif str(config.source).endswith(".jsonl"):
        name = Path(config.source).stem
        docs = corpus.jsonl(config.source, text_field=config.text_field, label_field=config.label_field)
    else:
        raise ValueError(f"sparse probing reads labelled documents from None (BBC News) or a .jsonl file, got "
                         f"{config.source!r}")
    if tokenizer is None:
        raise ValueError("sparse probing of text needs tokenizer=...; or pass documents=[(token ids, label), ...]")
    bos = getattr(tokenizer, "bos_token_id", None)
    out = []
    for d in docs:
        if d.label is None:
            continue
        ids = ([bos] if bos is not None else []) + tokenizer(d.text, add_special_tokens=False)["input_ids"]
        if len(ids) > config.skip_positions:
            out.append((ids[:config.context_length], str(d.label)))
    return config.dataset_name or name, out


def split_documents(labels: Sequence[str], config: SparseProbingConfig) -> tuple[list[int], list[int]]:
    """``(train indices, test indices)``: per label, ``max_documents_per_label`` kept at random, then
    ``test_fraction`` of them (at least one) held out; drawn with ``random_seed``."""
    rng = random.Random(config.random_seed)
    train, test = [], []
    for c in sorted(set(labels)):
        idx = [i for i, v in enumerate(labels) if v == c]
        rng.shuffle(idx)
        if config.max_documents_per_label is not None:
            idx = idx[:config.max_documents_per_label]
        if len(idx) < 2:
            raise ValueError(f"label {c!r} has {len(idx)} document; sparse probing needs at least 2 per label "
                             f"(one to train, one to test)")
        n_test = min(max(1, round(len(idx) * config.test_fraction)), len(idx) - 1)
        test += idx[:n_test]
        train += idx[n_test:]
    return sorted(train), sorted(test)


# ---------------------------------------------------------------------------------------------- run
def _subset(r: Ragged, idx: Sequence[int]) -> Ragged:
    parts = [r.doc(i) for i in idx]
    lengths = torch.tensor([len(p) for p in parts], dtype=torch.long)
    return Ragged(torch.cat(parts), torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]))


def evaluate_features(acts: Ragged, sae: TopKSAE, labels: Sequence[str], train: list[int], test: list[int],
                      config: SparseProbingConfig, dataset: str) -> dict:
    """The result dict of one dictionary from its hookpoint's cached activations ``acts`` of the documents with
    ``labels`` (see :func:`run`); ``train`` / ``test``: document indices."""
    t0 = time.perf_counter()
    lab_tr, lab_te = [labels[i] for i in train], [labels[i] for i in test]
    kw = dict(k_values=config.k_values, C=config.C, max_iter=config.max_iter, full=config.full_probes,
              seed=config.random_seed)
    x = acts.pooled("mean", config.skip_positions)
    llm = probe_accuracies(x[train], lab_tr, x[test], lab_te, **kw)
    st_tr, st_te = {}, {}
    z_tr = pooled_codes(sae, _subset(acts, train), skip_positions=config.skip_positions,
                        batch_rows=config.sae_batch_size, stats=st_tr)
    z_te = pooled_codes(sae, _subset(acts, test), skip_positions=config.skip_positions,
                        batch_rows=config.sae_batch_size, stats=st_te)
    l0 = (st_tr["l0"] * st_tr["tokens"] + st_te["l0"] * st_te["tokens"]) / max(st_tr["tokens"] + st_te["tokens"], 1)
    s = probe_accuracies(z_tr, lab_tr, z_te, lab_te, **kw)
    metrics = {"llm": {"llm_test_accuracy": llm["test_accuracy"]},
               "sae": {"sae_test_accuracy": s["test_accuracy"]}}
    for k in config.k_values:
        metrics["llm"][f"llm_top_{k}_test_accuracy"] = llm[f"top_{k}_test_accuracy"]
        metrics["sae"][f"sae_top_{k}_test_accuracy"] = s[f"top_{k}_test_accuracy"]
    detail = {"dataset_name": dataset, **metrics["llm"], **metrics["sae"], "saehook_tasks": {
        c: {"saehook_top_latents": s["tasks"][c]["top_features"],
            "saehook_top_channels": llm["tasks"][c]["top_features"],
            "saehook_train_docs": s["tasks"][c]["train_docs"], "saehook_test_docs": s["tasks"][c]["test_docs"],
            **{f"sae_{n}": v for n, v in s["tasks"][c].items() if n.endswith("accuracy")},
            **{f"llm_{n}": v for n, v in llm["tasks"][c].items() if n.endswith("accuracy")}}
        for c in s["tasks"]}}
    return {"eval_type_id": EVAL_TYPE_ID, "eval_config": {**asdict(config), "dataset_names": [dataset]},
            "eval_result_metrics": metrics, "eval_result_details": [detail],
            "wall_seconds": time.perf_counter() - t0, "saehook_l0": l0}


def run(model, tokenizer, saes: Mapping[Key, TopKSAE], *, config: SparseProbingConfig | None = None,
        cache_dir=None, progress: bool = True, documents: Sequence[tuple[Sequence[int], str]] | None = None,
        activations: Mapping[Key, Ragged] | None = None) -> dict[Key, dict]:
    """Sparse probing of each autoencoder on its hookpoint: ``{key: SAEBench-style result dict}``.

    Args:
        model: a Hugging Face causal LM.
        tokenizer: its tokenizer (only used to read ``config.source``).
        saes: ``{hookpoint key: autoencoder}`` as :func:`saehook.attach` takes them.
        config: :class:`SparseProbingConfig` (default: BBC News's five topics, k = 1, 2, 5, 10, 20).
        cache_dir: where activations are cached (:func:`~saehook.bench.activations.token_activations`).
        progress: progress bars on stderr.
        documents: ``[(token ids, label)]`` instead of ``config.source``.
        activations: the documents' activations already collected (``{key: Ragged}``), e.g. for several
            dictionaries on one hookpoint without a disk cache.

    Each result: ``{"eval_type_id": "sparse_probing", "eval_config", "eval_result_metrics": {"llm": {...},
    "sae": {...}}, "eval_result_details": [{"dataset_name", the same metrics, "saehook_tasks": per label}],
    "wall_seconds" (collection included), "saehook_l0": latents above 0 per token of these documents}``.
    Raises ``ValueError`` for fewer than 2 labels or a label with fewer than 2 documents.
    """
    config = config or SparseProbingConfig()
    t0 = time.perf_counter()
    if documents is None:
        dataset, documents = labelled_documents(config, tokenizer)
    else:
        dataset = config.dataset_name or "documents"
        documents = [(list(ids)[:config.context_length], str(label)) for ids, label in documents]
    labels = [label for _, label in documents]
    if len(set(labels)) < 2:
        raise ValueError(f"sparse probing needs at least 2 labels, got {sorted(set(labels))}")
    train, test = split_documents(labels, config)
    if len(train) + len(test) < len(documents):  # max_documents_per_label: collect only the documents kept
        keep = sorted(train + test)
        where = {i: j for j, i in enumerate(keep)}
        documents, labels = [documents[i] for i in keep], [labels[i] for i in keep]
        train, test = [where[i] for i in train], [where[i] for i in test]
        if activations is not None:
            raise ValueError("activations= must be of the documents kept: leave max_documents_per_label None")
    if activations is None:
        activations = token_activations(model, saes, [ids for ids, _ in documents], cache_dir=cache_dir,
                                        tag=f"sparse_probing-{dataset}", batch_size=config.llm_batch_size,
                                        progress=progress)
    collect = time.perf_counter() - t0
    out = {}
    for key, sae in saes.items():
        r = evaluate_features(activations[key], sae, labels, train, test, config, dataset)
        r["wall_seconds"] += collect / len(saes)
        out[key] = r
    return out
