"""Top-activating examples of autoencoder latents, collected in one streaming pass, and logit effects.

:func:`top_examples` runs the model over held-out text once (each pass stops after the deepest hookpoint)
and keeps, for every latent, the ``n_examples`` evaluated tokens where it is largest, with a window of
context around each. The per-latent top-n tables are tensors ``[n_latents, n_examples]`` updated per
batch with one sort (no Python loop over tokens or latents): the batch's active entries that beat a
latent's current n-th value are merged with that latent's current row, and only the winners' contexts
are gathered. Positions are excluded as in :func:`saehook.evaluate.evaluate` (padding and the first
``skip_positions`` of each row) and can never be examples.

:func:`logit_effects` reads a latent's direct effect on the next-token logits through the unembedding.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .edits import latent_ids
from .hookpoints import Key, unwrap
from .sae import Codes, TopKSAE

__all__ = ["TopExamples", "as_saes", "encoded_batches", "final_norm", "logit_effects", "top_examples", "top_tokens"]


@dataclass
class TopExamples:
    """The top-activating examples of the latents of one autoencoder, with density statistics.

    Row ``r`` of every table belongs to latent ``latents[r]`` (all latents unless :func:`top_examples`
    was given ``latents=``); use :meth:`row` to find it. Examples are in descending order of activation;
    empty slots (a latent that fired fewer than ``n_examples`` times) have value 0 and window -1.
    """

    key: Key
    """The hookpoint key the autoencoder was attached at."""
    latents: Tensor
    """``[m]`` int64 latent ids, one per table row."""
    values: Tensor
    """``[m, n]`` float32 activation of the latent on the example's token, descending."""
    tokens: Tensor
    """``[m, n, left + 1 + right]`` int64 token ids around the example; the activating token is at index
    ``left``; -1 outside the row or on padding."""
    acts: Tensor
    """``[m, n, left + 1 + right]`` float32 activation of the same latent on each context token (0 at
    excluded positions: padding and the first ``skip_positions``)."""
    windows: Tensor
    """``[m, n]`` int64 index of the source row (counted across batches, from 0) holding the example."""
    positions: Tensor
    """``[m, n]`` int64 position of the activating token in that row."""
    left: int
    """Context tokens kept before the activating token."""
    right: int
    """Context tokens kept after it."""
    density: Tensor
    """``[n_latents]`` fraction of evaluated tokens on which each latent is > 0 (every latent)."""
    mean_activation: Tensor
    """``[n_latents]`` mean activation over the tokens where the latent fires (0 for a dead latent)."""
    n_tokens: int
    """Evaluated tokens seen."""
    n_latents: int
    """Width of the autoencoder."""
    n_rows: int = 0
    """Source rows read (pass it as ``skip_rows`` to :func:`saehook.explain.explain` to score on the text after
    them when both read the same source)."""

    def row(self, latent: int) -> int:
        """The table row of ``latent`` (KeyError if it was not tracked)."""
        hit = (self.latents == int(latent)).nonzero()
        if not len(hit):
            raise KeyError(f"latent {latent} was not tracked for {self.key!r} (pass it in latents=)")
        return int(hit[0, 0])

    def count(self, latent: int) -> int:
        """Number of filled example slots of ``latent``."""
        return int((self.values[self.row(latent)] > 0).sum())

    def max_activation(self, latent: int) -> float:
        """The largest activation of ``latent`` seen in the pass (0 if it never fired)."""
        return float(self.values[self.row(latent), 0])

    def examples(self, latent: int) -> list[dict]:
        """The filled examples of ``latent``: dicts with ``value``, ``window``, ``position``, ``tokens`` and
        ``acts`` (lists over the context, -1 tokens dropped) and ``index`` (of the activating token in them)."""
        r = self.row(latent)
        out = []
        for e in range(self.values.shape[1]):
            if float(self.values[r, e]) <= 0:
                break
            toks, acts = self.tokens[r, e], self.acts[r, e]
            ok = toks >= 0
            out.append({"value": float(self.values[r, e]), "window": int(self.windows[r, e]),
                        "position": int(self.positions[r, e]), "tokens": toks[ok].tolist(),
                        "acts": acts[ok].tolist(), "index": int(ok[: self.left].sum())})
        return out


# ---------------------------------------------------------------------------------------------- the pass
def as_saes(saes) -> dict[Key, TopKSAE]:
    """``{key: TopKSAE}`` as given, or one autoencoder keyed by its ``metadata["hookpoint"]``."""
    if isinstance(saes, TopKSAE):
        hp = saes.metadata.get("hookpoint")
        if not hp:
            raise ValueError("this autoencoder's metadata names no hookpoint: pass {key: sae}")
        return {hp: saes}
    if not isinstance(saes, Mapping) or not saes:
        raise TypeError(f"expected {{key: TopKSAE}} (or one TopKSAE with metadata['hookpoint']), got {type(saes)}")
    return dict(saes)


def encoded_batches(model, saes: Mapping[Key, TopKSAE], batches: Iterable[dict], *, skip_positions: int = 1
                    ) -> Iterator[tuple[dict, Tensor, Tensor, dict[Key, Codes]]]:
    """For each model-input dict: ``(batch, evaluated [B, T], real [B, T], {key: Codes [B, T, k]})``.

    One forward per batch, stopped after the deepest hookpoint; the codes are computed from the clean
    activations (nothing is spliced). ``evaluated`` / ``real`` are :func:`saehook.evaluate.position_masks`.
    """
    from .hooks import attach

    hooked = attach(model, saes, record=False)
    try:
        for batch in batches:
            with torch.no_grad():
                run = hooked.run(batch, skip_positions=skip_positions, encode=True)
            yield run.batch, run.valid, run.real, dict(run.codes)
    finally:
        hooked.detach()


class _TopN:
    """Per-latent top-n tables of one autoencoder, updated batch by batch."""

    def __init__(self, key, sae: TopKSAE, latents: Tensor | None, n: int, left: int, right: int):
        dev = sae.W_enc.device
        self.key, self.n, self.left, self.right, self.n_latents = key, n, left, right, sae.n_latents
        self.latents = (torch.arange(sae.n_latents, device=dev) if latents is None else torch.tensor(
            latent_ids(latents, sae.n_latents, f"top_examples at {key!r}"), dtype=torch.long, device=dev))
        self.col = torch.full((sae.n_latents,), -1, dtype=torch.long, device=dev)
        self.col[self.latents] = torch.arange(len(self.latents), device=dev)
        m, W = len(self.latents), left + 1 + right
        self.values = torch.zeros(m, n, device=dev)
        self.tokens = torch.full((m, n, W), -1, dtype=torch.long, device=dev)
        self.acts = torch.zeros(m, n, W, device=dev)
        self.windows = torch.full((m, n), -1, dtype=torch.long, device=dev)
        self.positions = torch.full((m, n), -1, dtype=torch.long, device=dev)
        self.fires = torch.zeros(sae.n_latents, dtype=torch.long, device=dev)
        self.sums = torch.zeros(sae.n_latents, dtype=torch.float64, device=dev)
        self.n_tokens = self.n_rows = 0

    @torch.no_grad()
    def update(self, ids: Tensor, codes: Codes, evaluated: Tensor, real: Tensor, row0: int) -> None:
        vals, idx = codes.values.float(), codes.indices
        B, T, _ = idx.shape
        on = evaluated.unsqueeze(-1) & (vals > 0)
        self.n_tokens += int(evaluated.sum())
        self.n_rows = row0 + B
        self.fires += torch.bincount(idx[on], minlength=self.n_latents)
        self.sums.index_add_(0, idx[on], vals[on].double())
        # candidates: active entries of tracked latents that beat the latent's current n-th value
        col = self.col[idx]
        b, t, s = (on & (col >= 0)).nonzero(as_tuple=True)
        c, v = col[b, t, s], vals[b, t, s]
        keep = v > self.values[c, -1]
        b, t, c, v = b[keep], t[keep], c[keep], v[keep]
        if not len(v):
            return
        u, inv = torch.unique(c, return_inverse=True)  # the rows that change, sorted
        U, n = len(u), self.n
        grp = torch.cat([torch.arange(U, device=u.device).repeat_interleave(n), inv])
        val = torch.cat([self.values[u].flatten(), v])
        o1 = torch.argsort(val, descending=True, stable=True)
        order = o1[torch.argsort(grp[o1], stable=True)]  # by row, then by value descending
        g = grp[order]
        rank = torch.arange(len(g), device=g.device) - torch.searchsorted(g, g)
        win = rank < n  # each row keeps exactly n (its n old slots take part)
        order, g, rank = order[win], g[win], rank[win]
        new_v = torch.zeros(U, n, device=val.device)
        new_v[g, rank] = val[order]
        new_tok = torch.full((U, n, self.tokens.shape[-1]), -1, dtype=torch.long, device=val.device)
        new_act = torch.zeros(U, n, self.acts.shape[-1], device=val.device)
        new_win = torch.full((U, n), -1, dtype=torch.long, device=val.device)
        new_pos = torch.full((U, n), -1, dtype=torch.long, device=val.device)
        old = order < U * n
        og, orank, osrc = g[old], rank[old], order[old]
        for new_t, old_t in ((new_tok, self.tokens), (new_act, self.acts), (new_win, self.windows),
                             (new_pos, self.positions)):
            new_t[og, orank] = old_t[u[osrc // n], osrc % n]
        offs = torch.arange(-self.left, self.right + 1, device=t.device)
        ids = ids.to(t.device)
        new = (~old).nonzero().flatten()
        for i in range(0, len(new), 4096):  # the winners' contexts, in chunks to bound the [Q, W, k] gathers
            sel = new[i: i + 4096]
            ng, nrank, nsrc = g[sel], rank[sel], order[sel] - U * n
            bn, tn, lat = b[nsrc], t[nsrc], self.latents[c[nsrc]]
            tt = tn[:, None] + offs
            inside = (tt >= 0) & (tt < T)
            ttc = tt.clamp(0, T - 1)
            bb = bn[:, None].expand_as(ttc)
            is_real = inside & real[bb, ttc]
            new_tok[ng, nrank] = torch.where(is_real, ids[bb, ttc], torch.full_like(ttc, -1))
            ctx = ((idx[bb, ttc] == lat[:, None, None]) * vals[bb, ttc]).sum(-1)
            new_act[ng, nrank] = ctx * (inside & evaluated[bb, ttc])
            new_win[ng, nrank] = bn + row0
            new_pos[ng, nrank] = tn
        self.values[u], self.tokens[u], self.acts[u] = new_v, new_tok, new_act
        self.windows[u], self.positions[u] = new_win, new_pos

    def result(self) -> TopExamples:
        n = max(self.n_tokens, 1)
        density = (self.fires.double() / n).float().cpu()
        mean = (self.sums / self.fires.clamp_min(1)).float().cpu()
        return TopExamples(self.key, self.latents.cpu(), self.values.cpu(), self.tokens.cpu(), self.acts.cpu(),
                           self.windows.cpu(), self.positions.cpu(), self.left, self.right, density, mean,
                           self.n_tokens, self.n_latents, self.n_rows)


def _limited(batches: Iterable[dict], tokens: int, skip_positions: int) -> Iterator[dict]:
    """Batches until at least ``tokens`` evaluated positions have been handed out."""
    from .evaluate import position_masks

    seen = 0
    for batch in batches:
        if seen >= tokens:
            return
        seen += int(position_masks(batch, skip_positions)[0].sum())
        yield batch


@torch.no_grad()
def top_examples(model, saes: Mapping[Key, TopKSAE] | TopKSAE, source, tokens: int, *, n_examples: int = 20,
                 context: tuple[int, int] = (16, 4), latents: Sequence[int] | Mapping[Key, Sequence[int]] | None = None,
                 batch_size: int = 8, skip_positions: int = 1, progress: bool = False) -> dict[Key, TopExamples]:
    """The ``n_examples`` top-activating tokens of every latent, with context, in one streaming pass.

    Args:
        model: a Hugging Face causal LM (or a wrapper :func:`saehook.attach` accepts).
        saes: ``{key: TopKSAE}``, the result keyed the same way; or one autoencoder whose
            ``metadata["hookpoint"]`` names its hookpoint (saved by training).
        source: a :class:`~saehook.Corpus` (its held-out ``"test"`` windows), or an iterable of
            ``input_ids [B, T]`` tensors or of dicts for ``model(**batch)`` (``attention_mask`` marks padding).
        tokens: read at least this many evaluated positions (whole batches).
        n_examples: examples kept per latent.
        context: ``(left, right)`` tokens of context stored around each example.
        latents: track only these latents (a list for every key, or ``{key: list}``); density and mean
            activation always cover every latent.
        skip_positions: the first positions of each row are never examples (BOS), as in ``evaluate``.

    Returns ``{key: TopExamples}``.
    """
    from tqdm.auto import tqdm

    from .counts import as_count
    from .evaluate import eval_batches

    tokens = as_count(tokens)
    if tokens <= 0 or n_examples <= 0:
        raise ValueError(f"tokens and n_examples must be positive, got {tokens} and {n_examples}")
    saes = as_saes(saes)
    left, right = (int(c) for c in context)
    if left < 0 or right < 0:
        raise ValueError(f"context must be two non-negative counts, got {context}")
    model = unwrap(model)
    tables = {key: _TopN(key, sae, latents.get(key) if isinstance(latents, Mapping) else latents, n_examples,
                         left, right) for key, sae in saes.items()}
    bar = tqdm(total=tokens, unit="tok", unit_scale=True, disable=not progress, desc="saehook examples")
    row0 = 0
    try:
        for batch, evaluated, real, codes in encoded_batches(
                model, saes, _limited(eval_batches(source, batch_size), tokens, skip_positions),
                skip_positions=skip_positions):
            for key, table in tables.items():
                table.update(batch["input_ids"], codes[key], evaluated, real, row0)
            row0 += batch["input_ids"].shape[0]
            bar.update(int(evaluated.sum()))
    finally:
        bar.close()
    first = next(iter(tables.values()))
    if first.n_tokens == 0:
        raise ValueError("the source gave no evaluated positions")
    return {key: table.result() for key, table in tables.items()}


# ---------------------------------------------------------------------------------------------- logit effects
def final_norm(model) -> nn.Module | None:
    """The final normalisation before the unembedding (``model.norm``, ``ln_f``, ``final_layer_norm``...),
    or None when none is found."""
    model = unwrap(model)
    base = getattr(model, "base_model", model)
    for owner in (base, model):
        for name in ("norm", "ln_f", "final_layer_norm", "final_layernorm", "final_norm"):
            m = getattr(owner, name, None)
            if isinstance(m, nn.Module) and isinstance(getattr(m, "weight", None), Tensor):
                return m
    return None


@torch.no_grad()
def logit_effects(model, sae: TopKSAE, latents: Sequence[int] | Tensor, *, through_norm: bool = True) -> Tensor:
    """``[len(latents), vocab]``: each latent's direct effect on the logits per unit of activation.

    ``effect_j = W_U (g * d_j)`` with ``d_j = W_dec[j] / s`` the latent's decoder direction in the hookpoint's
    units (elementwise for a per-channel ``s``; ``W_dec[j]`` itself for autoencoders with a per-row
    normalisation) and ``g`` the final norm's weight (``1 + weight`` for Gemma's norm; the direction is also
    centred first when the norm is a ``LayerNorm``). ``through_norm=False`` drops ``g``.

    This is the direct path only, and linearised: it ignores every layer between the hookpoint and the
    unembedding, and the norm's division by the token's RMS (a positive per-token factor, so the *ranking*
    of tokens is unaffected) and its change when ``d_j`` is added. Meaningful for residual-stream hookpoints.
    """
    model = unwrap(model)
    out = model.get_output_embeddings()
    if out is None or not isinstance(getattr(out, "weight", None), Tensor):
        raise ValueError(f"{type(model).__name__} has no output embedding (lm_head) to read logit effects from")
    W_U = out.weight
    if W_U.shape[1] != sae.d_in:
        raise ValueError(f"the unembedding reads width {W_U.shape[1]}, the autoencoder writes {sae.d_in}")
    idx = torch.as_tensor(latents, dtype=torch.long, device=sae.W_dec.device)
    d = sae.W_dec[idx].float()
    if not sae.per_row_scale:
        d = d / sae.input_scale.float()
    norm = final_norm(model) if through_norm else None
    if norm is not None:
        if isinstance(norm, nn.LayerNorm):
            d = d - d.mean(-1, keepdim=True)
        g = norm.weight.float().to(d.device)
        if "gemma" in type(norm).__name__.lower():
            g = 1.0 + g
        d = d * g
    return d.to(W_U.device) @ W_U.float().T


def top_tokens(effects: Tensor, tokenizer, k: int = 10) -> list[dict]:
    """For each row of :func:`logit_effects`: ``{"promoted": [(token, effect)...], "suppressed": [...]}``,
    the ``k`` largest and the ``k`` smallest, token strings decoded with ``tokenizer``."""
    out = []
    k = min(k, effects.shape[-1])
    for row in effects:
        hi, lo = row.topk(k), (-row).topk(k)
        out.append({"promoted": [(decode_token(tokenizer, int(i)), float(v)) for v, i in zip(hi.values, hi.indices)],
                    "suppressed": [(decode_token(tokenizer, int(i)), -float(v))
                                   for v, i in zip(lo.values, lo.indices)]})
    return out


def decode_token(tokenizer, token_id: int) -> str:
    """One token id as text (``tokenizer.decode([id])``; ``"<id>"`` without a tokenizer)."""
    if tokenizer is None:
        return f"<{token_id}>"
    return tokenizer.decode([int(token_id)])
