"""Finding latents: by labelled text, by a text you type, and by searching their top contexts.

- :func:`find_by_labels` runs the model over labelled documents (the BBC News topics, any labelled
  ``.jsonl``: :func:`labelled_texts`) and ranks, per label, the latents that fire more on that label's
  tokens than on the other labels' tokens.
- :func:`find_by_text` lists the latents that fire on one text, where (token positions) and how much.
- :func:`search_contexts` finds the latents whose top-activating contexts (collected by
  :func:`saehook.examples.top_examples`) contain a phrase, at or around the activating token.

Every pass goes through :meth:`saehook.Hooked.run` (via :func:`saehook.examples.encoded_batches`): one
forward per batch, stopped after the deepest hookpoint, codes of the clean activations. The first
``skip_positions`` tokens of each row (BOS) are left out, as in evaluation.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .corpus import bbc_news, jsonl
from .examples import TopExamples, as_saes, decode_token, encoded_batches
from .hookpoints import Key
from .sae import TopKSAE

__all__ = ["ContextMatch", "LabelLatent", "LabelTable", "TextHit", "TextLatents", "find_by_labels", "find_by_text",
           "labelled_texts", "search_contexts"]


# ---------------------------------------------------------------------------------------------- inputs
def labelled_texts(source: str | Path = "bbc", *, per_label: int | None = None, text_field: str = "text",
                   label_field: str = "label", seed: int = 0) -> tuple[list[str], list[str]]:
    """``(texts, labels)`` of a labelled source: ``"bbc"`` (the embedded BBC News corpus, labels business,
    entertainment, politics, sports, tech) or a ``.jsonl`` file of ``{"text": ..., "label": ...}`` objects.

    ``per_label`` keeps at most that many documents of each label (a random subset drawn with ``seed``,
    in source order). Raises ``FileNotFoundError`` for a missing file, ``ValueError`` for another kind of
    source, a record without the fields, or fewer than two labels.
    """
    if str(source) in ("bbc", "bbc_news"):
        docs = bbc_news()
    else:
        path = Path(source)
        if path.suffix != ".jsonl":
            raise ValueError(f"labelled source {str(source)!r} is neither 'bbc' nor a .jsonl file; pass one of those")
        if not path.is_file():
            raise FileNotFoundError(f"labelled file {path} does not exist; pass 'bbc' or an existing .jsonl file")
        docs = jsonl(path, text_field=text_field, label_field=label_field)
    by_label: dict[str, list[int]] = {}
    for i, d in enumerate(docs):
        by_label.setdefault(str(d.label), []).append(i)
    if len(by_label) < 2:
        raise ValueError(f"{source}: finding latents by label needs at least two labels, found {sorted(by_label)}")
    rng = random.Random(seed)
    keep = sorted(i for idx in by_label.values()
                  for i in (idx if per_label is None or len(idx) <= per_label else rng.sample(idx, per_label)))
    return [docs[i].text for i in keep], [str(docs[i].label) for i in keep]


def _token_ids(texts: Sequence, tokenizer, max_tokens: int | None) -> list[list[int]]:
    """Each text as ``[BOS] + tokens`` (BOS when the tokenizer has one), cut to ``max_tokens``; token-id
    sequences are taken as given."""
    out = []
    for t in texts:
        if isinstance(t, str):
            if tokenizer is None:
                raise ValueError("texts given as strings need tokenizer=...; pass the model's tokenizer")
            bos = getattr(tokenizer, "bos_token_id", None)
            ids = ([] if bos is None else [bos]) + list(tokenizer(t, add_special_tokens=False)["input_ids"])
        else:
            ids = t.tolist() if isinstance(t, Tensor) else [int(i) for i in t]
        out.append(ids[:max_tokens] if max_tokens else ids)
    return out


def _padded(docs: list[list[int]], batch_size: int) -> Iterator[dict]:
    """Right-padded model inputs ``{"input_ids", "attention_mask"}`` of ``batch_size`` documents each."""
    for i in range(0, len(docs), batch_size):
        chunk = docs[i:i + batch_size]
        T = max(max(len(d) for d in chunk), 1)
        ids = torch.zeros(len(chunk), T, dtype=torch.long)
        mask = torch.zeros(len(chunk), T, dtype=torch.long)
        for r, d in enumerate(chunk):
            ids[r, :len(d)], mask[r, :len(d)] = torch.tensor(d, dtype=torch.long), 1
        yield {"input_ids": ids, "attention_mask": mask}


# ---------------------------------------------------------------------------------------------- by label
class LabelLatent(NamedTuple):
    """One latent's specificity to one label (a row of :meth:`LabelTable.top`)."""

    latent: int
    label: str
    effect: float
    """Standardised difference of its mean activation, label against the rest (see :class:`LabelTable`)."""
    log_odds: float
    """Smoothed log-odds ratio of firing on the label's tokens against the other labels' tokens (nats)."""
    rate_in: float
    """Fraction of the label's evaluated tokens on which the latent fires (activation > 0)."""
    rate_out: float
    """The same fraction over the other labels' tokens."""
    mean_in: float
    """Mean activation over the label's tokens where the latent fires (its typical activation there)."""
    mean_out: float
    """Mean activation over the other labels' tokens where it fires (0 when it never does)."""


@dataclass
class LabelTable:
    """Per-label activation statistics of every latent of one autoencoder, and two contrast scores.

    Per token, a latent's activation ``z`` is its value where it fires and 0 elsewhere. For label ``l`` and
    latent ``j``, with ``mu`` / ``var`` the mean and variance of ``z`` over the label's tokens (``in``) and
    over every other label's tokens (``out``):

        effect   = (mu_in - mu_out) / sqrt((var_in + var_out) / 2)          (Cohen's d; the default rank)
        log_odds = ln((a + α) / (b + α)) - ln((c + α) / (d + α))

    where ``a`` / ``b`` are the label's tokens on which ``j`` fires / does not, ``c`` / ``d`` the same over the
    other labels and ``α`` = :attr:`smoothing`. ``effect`` weighs both how often and how strongly the latent
    fires, and it stays small for rare latents (one firing among ``N`` tokens gives about ``sqrt(2 / N)``),
    so it finds latents worth steering toward a topic; ``log_odds`` says how exclusive the firing is, large
    also for latents that fired only a few times. Tokens are not independent (a document's tokens share its
    topic), so neither is a significance test.
    """

    key: Key
    labels: list[str]
    """The label names, sorted; row ``l`` of every ``[L, n_latents]`` tensor belongs to ``labels[l]``."""
    tokens: Tensor
    """``[L]`` int64 evaluated tokens per label."""
    fires: Tensor
    """``[L, n_latents]`` int64 tokens of each label on which each latent fires."""
    sums: Tensor
    """``[L, n_latents]`` float64 sum of each latent's activation over each label's tokens."""
    squares: Tensor
    """``[L, n_latents]`` float64 sum of its squared activation over each label's tokens."""
    smoothing: float = 0.5
    """``α``: pseudo-count added to each of the four cells of the log-odds (0.5: Haldane-Anscombe)."""

    @property
    def rate(self) -> Tensor:
        """``[L, n_latents]`` firing rate per label (fraction of the label's tokens)."""
        return self.fires.double() / self.tokens.clamp_min(1).double().unsqueeze(1)

    @property
    def mean_activation(self) -> Tensor:
        """``[L, n_latents]`` mean activation where the latent fires, per label (0 where it never fires): its
        typical activation on the label's text (a unit for :func:`saehook.strength.steering_values`)."""
        return self.sums / self.fires.clamp_min(1).double()

    def _in_out(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """A per-label count ``x [L, ...]`` and the same summed over the other labels."""
        return x, x.sum(0, keepdim=True) - x

    @property
    def effect(self) -> Tensor:
        """``[L, n_latents]`` standardised mean difference (formula in the class docstring)."""
        n_in, n_out = (t.double().clamp_min(1).unsqueeze(1) for t in self._in_out(self.tokens))
        (s_in, s_out), (q_in, q_out) = self._in_out(self.sums), self._in_out(self.squares)
        mu_in, mu_out = s_in / n_in, s_out / n_out
        var = ((q_in / n_in - mu_in ** 2).clamp_min(0) + (q_out / n_out - mu_out ** 2).clamp_min(0)) / 2
        return (mu_in - mu_out) / var.sqrt().clamp_min(1e-12)

    @property
    def log_odds(self) -> Tensor:
        """``[L, n_latents]`` smoothed log-odds ratio of firing, label against the rest."""
        (f_in, f_out), a = self._in_out(self.fires.double()), self.smoothing
        n_in, n_out = (t.double().unsqueeze(1) for t in self._in_out(self.tokens))
        return ((f_in + a) / (n_in - f_in + a)).log() - ((f_out + a) / (n_out - f_out + a)).log()

    def top(self, label: str, n: int = 10, *, by: str = "effect") -> list[LabelLatent]:
        """The ``n`` latents most specific to ``label``, best first, ranked by ``by`` (``"effect"`` or
        ``"log_odds"``)."""
        if label not in self.labels:
            raise KeyError(f"label {label!r} is not among {self.labels}")
        if by not in ("effect", "log_odds"):
            raise ValueError(f"by={by!r}: rank by 'effect' or 'log_odds'")
        l = self.labels.index(label)
        effect, lo = self.effect[l], self.log_odds[l]
        f_out, s_out = self.fires.sum(0) - self.fires[l], self.sums.sum(0) - self.sums[l]
        n_out = max(int(self.tokens.sum() - self.tokens[l]), 1)
        rate, mean_in = self.rate[l], self.mean_activation[l]
        score = effect if by == "effect" else lo
        return [LabelLatent(j, label, float(effect[j]), float(lo[j]), float(rate[j]), float(f_out[j]) / n_out,
                            float(mean_in[j]), float(s_out[j]) / max(int(f_out[j]), 1))
                for j in score.topk(min(n, len(score))).indices.tolist()]

    def table(self, n: int = 10, *, by: str = "effect") -> str:
        """A text table: for each label, its ``n`` most specific latents with their scores and rates."""
        lines = []
        for label, count in zip(self.labels, self.tokens.tolist()):
            lines.append(f"{self.key} / {label} ({count:,} tokens), ranked by {by}:")
            lines.append(f"  {'latent':>7} {'effect':>7} {'log-odds':>9} {'rate in':>8} {'rate out':>9} "
                         f"{'mean act in':>12}")
            for r in self.top(label, n, by=by):
                lines.append(f"  {r.latent:>7} {r.effect:>7.3f} {r.log_odds:>9.2f} {r.rate_in:>8.2%} "
                             f"{r.rate_out:>9.2%} {r.mean_in:>12.3f}")
        return "\n".join(lines)


@torch.no_grad()
def find_by_labels(model, saes: Mapping[Key, TopKSAE] | TopKSAE, texts: Sequence, labels: Sequence, *,
                   tokenizer=None, max_tokens: int | None = 128, batch_size: int = 8, skip_positions: int = 1,
                   smoothing: float = 0.5, progress: bool = False) -> dict[Key, LabelTable]:
    """Per hookpoint, every latent's firing counts per label, ranked by :meth:`LabelTable.top`.

    Args:
        model: a Hugging Face causal LM.
        saes: ``{key: TopKSAE}``, or one autoencoder whose ``metadata["hookpoint"]`` names its hookpoint.
        texts: ``N`` documents: strings (need ``tokenizer``; a BOS is prepended when it has one) or
            token-id sequences; :func:`labelled_texts` reads the BBC topics or a labelled ``.jsonl``.
        labels: ``N`` labels (any values; compared as strings), at least two distinct ones.
        max_tokens: each document is cut to this many tokens (BOS included; None: whole documents).
        skip_positions: the first tokens of each document (BOS) are not counted.
        smoothing: the pseudo-count ``α`` of the log-odds (:class:`LabelTable`).
        progress: show a progress bar over the documents.

    Returns ``{key: LabelTable}``. Cost: one forward (to the deepest hookpoint) over every document.
    """
    if len(texts) != len(labels):
        raise ValueError(f"got {len(texts)} texts and {len(labels)} labels; give one label per text")
    names = sorted({str(v) for v in labels})
    if len(names) < 2:
        raise ValueError(f"finding latents by label needs at least two distinct labels, got {names}")
    saes = as_saes(saes)
    docs = _token_ids(texts, tokenizer, max_tokens)
    label_ids = torch.tensor([names.index(str(v)) for v in labels])
    L = len(names)
    fires = {k: torch.zeros(L * s.n_latents, dtype=torch.long) for k, s in saes.items()}
    sums = {k: torch.zeros(L * s.n_latents, dtype=torch.float64) for k, s in saes.items()}
    squares = {k: torch.zeros(L * s.n_latents, dtype=torch.float64) for k, s in saes.items()}
    tokens = torch.zeros(L, dtype=torch.long)
    row_labels = label_ids.split(batch_size)
    bar = tqdm(total=len(docs), unit="doc", disable=not progress, desc="saehook find_by_labels")
    for (_, evaluated, _, codes), lab in zip(encoded_batches(model, saes, _padded(docs, batch_size),
                                                             skip_positions=skip_positions), row_labels):
        bar.update(len(lab))
        evaluated = evaluated.cpu()
        tok_lab = lab.unsqueeze(1).expand_as(evaluated)  # [B, T]
        tokens += torch.bincount(tok_lab[evaluated], minlength=L)
        for key, c in codes.items():
            vals, idx = c.values.float().cpu(), c.indices.cpu()  # [B, T, k]
            on = evaluated.unsqueeze(-1) & (vals > 0)
            flat = tok_lab.unsqueeze(-1).expand_as(idx)[on] * saes[key].n_latents + idx[on]
            fires[key] += torch.bincount(flat, minlength=len(fires[key]))
            sums[key].index_add_(0, flat, vals[on].double())
            squares[key].index_add_(0, flat, vals[on].double() ** 2)
    bar.close()
    return {k: LabelTable(k, names, tokens.clone(), fires[k].view(L, -1), sums[k].view(L, -1),
                          squares[k].view(L, -1), smoothing) for k in saes}


# ---------------------------------------------------------------------------------------------- by text
class TextHit(NamedTuple):
    """Where one latent fires on a text."""

    latent: int
    total: float
    """Sum of its activations over the text's evaluated tokens."""
    peak: float
    """Its largest activation."""
    positions: tuple[int, ...]
    """Token positions (indices into :attr:`TextLatents.ids`, BOS at 0) where it fires, in order."""
    values: tuple[float, ...]
    """Its activation at each of those positions."""


@dataclass
class TextLatents:
    """The latents of one autoencoder that fire on a text, by total activation (largest first)."""

    key: Key
    ids: list[int]
    """The text's token ids as run (``[BOS] + tokens``)."""
    tokens: list[str]
    """Each id decoded alone."""
    hits: list[TextHit]

    def table(self, n: int = 20) -> str:
        """A text table of the first ``n`` hits: latent, total, peak and ``position:token=activation`` entries."""
        lines = [f"{self.key}: {len(self.hits)} latents fire on {len(self.ids)} tokens",
                 f"  {'latent':>7} {'total':>8} {'peak':>8}  where (position:token=activation)"]
        for h in self.hits[:n]:
            where = " ".join(f"{p}:{self.tokens[p]!r}={v:.2f}" for p, v in zip(h.positions, h.values))
            lines.append(f"  {h.latent:>7} {h.total:>8.2f} {h.peak:>8.2f}  {where}")
        return "\n".join(lines)


@torch.no_grad()
def find_by_text(model, saes: Mapping[Key, TopKSAE] | TopKSAE, text: str | Sequence[int], *, tokenizer=None,
                 skip_positions: int = 1) -> dict[Key, TextLatents]:
    """Which latents fire on ``text``, where, and how much: ``{key: TextLatents}``, hits sorted by total
    activation over the text (largest first).

    ``text`` is a string (needs ``tokenizer``; a BOS is prepended when it has one) or token ids. The first
    ``skip_positions`` tokens (BOS) are left out; positions count from 0 at the first id.
    """
    saes = as_saes(saes)
    ids = _token_ids([text], tokenizer, None)[0]
    if len(ids) <= skip_positions:
        raise ValueError(f"the text has {len(ids)} token(s), none after the first {skip_positions} (skipped); "
                         "type a longer text")
    out = {}
    for _batch, evaluated, _, codes in encoded_batches(model, saes, [{"input_ids": torch.tensor([ids])}],
                                                      skip_positions=skip_positions):
        for key, c in codes.items():
            vals, idx = c.values[0].float().cpu(), c.indices[0].cpu()  # [T, k]
            on = evaluated[0].cpu().unsqueeze(-1) & (vals > 0)
            t, s = on.nonzero(as_tuple=True)
            found: dict[int, list] = {}
            for p, j, v in zip(t.tolist(), idx[t, s].tolist(), vals[t, s].tolist()):
                found.setdefault(j, []).append((p, v))
            hits = [TextHit(j, sum(v for _, v in pv), max(v for _, v in pv), tuple(p for p, _ in pv),
                            tuple(v for _, v in pv)) for j, pv in found.items()]
            hits.sort(key=lambda h: (-h.total, h.latent))
            out[key] = TextLatents(key, ids, [decode_token(tokenizer, i) for i in ids], hits)
    return out


# ---------------------------------------------------------------------------------------------- by context
class ContextMatch(NamedTuple):
    """A latent whose top contexts contain the searched phrase."""

    key: Key
    latent: int
    hits: int
    """Top examples whose context matches (the phrase covers the activating token, unless ``anywhere``)."""
    examples: int
    """Top examples of the latent that were searched."""
    value: float
    """The activation of the best matching example."""
    context: str
    """That example's decoded context, the activating token between ``[[`` and ``]]``."""


def _may_overlap(piece: str, phrase: str, case_sensitive: bool) -> bool:
    """Whether a token decoded alone as ``piece`` can share characters with an occurrence of ``phrase``: one
    contains the other, or a suffix of one is a prefix of the other (surrounding spaces ignored; a piece
    that is not whole characters, such as part of a UTF-8 sequence, always can)."""
    piece, phrase = piece.strip(), phrase.strip()
    if not case_sensitive:
        piece, phrase = piece.casefold(), phrase.casefold()
    if not piece or not phrase or "\ufffd" in piece or piece in phrase or phrase in piece:
        return True
    return any(piece.endswith(phrase[:k]) or piece.startswith(phrase[-k:]) for k in range(1, len(phrase)))


def search_contexts(examples: Mapping[Key, TopExamples] | TopExamples, phrase: str, tokenizer, *,
                    anywhere: bool = False, case_sensitive: bool = False, top: int | None = 20) -> list[ContextMatch]:
    """Latents whose top-activating contexts contain ``phrase`` (any text: several tokens, part of a word).

    Each stored example (from :func:`saehook.examples.top_examples`) is decoded into text; it matches when
    ``phrase`` occurs in it and the occurrence overlaps the characters of the activating token (with
    ``anywhere=True``: occurs anywhere in the stored context). Results are ranked by the fraction of the
    latent's examples that match, then by the number of matches, then by the best match's activation;
    at most ``top`` (None: all). Decoding uses ``tokenizer.batch_decode`` without cleanup of spaces.
    """
    if not phrase:
        raise ValueError("search_contexts: the phrase is empty; pass the text to look for")
    if tokenizer is None:
        raise ValueError("search_contexts needs the tokenizer to decode the contexts; pass tokenizer=...")
    if isinstance(examples, TopExamples):
        examples = {examples.key: examples}
    pattern = re.compile(re.escape(phrase), 0 if case_sensitive else re.IGNORECASE)
    decode = dict(skip_special_tokens=False, clean_up_tokenization_spaces=False)
    found = []
    for key, ex in examples.items():
        rows, slots = (ex.values > 0).nonzero(as_tuple=True)
        windows = ex.tokens[rows, slots]  # [N, W]: the filled examples' contexts
        act = windows[:, ex.left]  # [N] the activating tokens
        if not anywhere:  # only examples whose activating token can overlap the phrase need decoding
            ids = [i for i in act.unique().tolist() if _may_overlap(decode_token(tokenizer, i), phrase, case_sensitive)]
            keep = torch.isin(act, torch.tensor(ids, dtype=act.dtype)).nonzero().flatten()
        else:
            keep = torch.arange(len(act))
        seqs = [[t for t in w if t >= 0] for w in windows[keep].tolist()]
        marks = (windows[keep, : ex.left] >= 0).sum(1).tolist()
        texts = tokenizer.batch_decode(seqs, **decode) if seqs else []
        cand = [i for i, t in enumerate(texts) if pattern.search(t)]
        starts = tokenizer.batch_decode([seqs[i][: marks[i]] for i in cand], **decode) if cand else []
        ends = tokenizer.batch_decode([seqs[i][: marks[i] + 1] for i in cand], **decode) if cand else []
        per_latent: dict[int, list] = {}
        for i, s_text, e_text in zip(cand, starts, ends):
            a, b = len(s_text), len(e_text)
            if anywhere or any(m.start() < b and a < m.end() for m in pattern.finditer(texts[i])):
                r, e = int(rows[keep[i]]), int(slots[keep[i]])
                t = texts[i]
                a += len(t[a:b]) - len(t[a:b].lstrip())  # mark the token without its leading space
                per_latent.setdefault(int(ex.latents[r]), []).append(
                    (float(ex.values[r, e]), f"{t[:a]}[[{t[a:b]}]]{t[b:]}"))
        counts = torch.bincount(rows, minlength=len(ex.latents)).tolist()
        row_of = {int(j): r for r, j in enumerate(ex.latents.tolist())}
        for latent, items in per_latent.items():
            best = max(items)
            found.append(ContextMatch(key, latent, len(items), counts[row_of[latent]], best[0], best[1]))
    found.sort(key=lambda m: (-m.hits / m.examples, -m.hits, -m.value))
    return found if top is None else found[:top]
