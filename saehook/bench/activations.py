"""Hookpoint activations of whole documents, collected once and cached on disk for every benchmark metric.

:func:`token_activations` runs the model over a list of documents (token-id lists of any length) and keeps,
per hookpoint, every real token's activation (padding excluded, no position skipped) as a :class:`Ragged`:
``values [T, d]`` float32 on the CPU (all documents' tokens back to back) and ``offsets [N + 1]`` (document
``i`` is ``values[offsets[i]:offsets[i + 1]]``). Each forward stops after the deepest hookpoint
(:meth:`saehook.Hooked.run`).

The cache, one folder per hookpoint::

    <cache_dir>/<tag>-<hash>/meta.json
    <cache_dir>/<tag>-<hash>/chunk-00000.safetensors      # values [T_c, d] float32, offsets [n_c + 1] int64
    ...

``hash`` covers the model (``name_or_path``, its config, its dtype, and a fingerprint of a few of its weights, so
two random models from one config do not share a cache), the hookpoint, the documents' token ids and the chunk
size. Each chunk holds ``chunk_docs`` documents and is written atomically (:func:`saehook.atomic.write_file`), so a
killed collection resumes from its first missing chunk. Autoencoder codes are never cached: they are computed from
the cached activations (:func:`pooled_codes`), so one cache serves every dictionary on that hookpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import Tensor

from ..atomic import json_bytes, safetensors_bytes, write_file
from ..hookpoints import Key, hidden_size_of, resolve, unwrap
from ..hooks import attach
from ..sae import TopKSAE

log = logging.getLogger(__name__)

__all__ = ["Ragged", "token_activations", "pooled_codes", "cache_folder"]

CHUNK_DOCS = 64
"""Documents per cache chunk (the unit a killed collection resumes from)."""


@dataclass(frozen=True)
class Ragged:
    """Variable-length rows of ``N`` documents stored back to back.

    Attributes:
        values: ``[T, d]`` float32, the tokens of document 0, then of document 1, ...
        offsets: ``[N + 1]`` int64, document ``i`` is ``values[offsets[i]:offsets[i + 1]]``.
    """

    values: Tensor
    offsets: Tensor

    def __post_init__(self):
        if self.offsets.dim() != 1 or len(self.offsets) < 1 or int(self.offsets[-1]) != len(self.values):
            end = int(self.offsets[-1]) if len(self.offsets) else None
            raise ValueError(f"offsets must be [N + 1] ending at len(values) = {len(self.values)}, got "
                             f"{tuple(self.offsets.shape)} ending at {end}")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def doc(self, i: int) -> Tensor:
        """Document ``i``'s rows ``[T_i, d]``."""
        return self.values[int(self.offsets[i]):int(self.offsets[i + 1])]

    def row_docs(self) -> tuple[Tensor, Tensor]:
        """``(doc [T], position [T])``: each row's document index and its position inside the document."""
        lengths = self.offsets.diff()
        doc = torch.repeat_interleave(torch.arange(len(self)), lengths)
        pos = torch.arange(len(self.values)) - self.offsets[:-1].repeat_interleave(lengths)
        return doc, pos

    def pooled(self, reduce: str = "mean", skip_positions: int = 1) -> Tensor:
        """``[N, d]``: each document's mean (or max) over its rows from position ``skip_positions`` on; a document
        with no such row gets zeros. Raises ``ValueError`` for another ``reduce``."""
        return pool_rows(self.values, *self.row_docs(), len(self), reduce, skip_positions)


def pool_rows(values: Tensor, doc: Tensor, pos: Tensor, n_docs: int, reduce: str, skip_positions: int) -> Tensor:
    """Mean or max of ``values [T, F]`` per document ``doc [T]`` over rows with ``pos >= skip_positions``:
    ``[n_docs, F]`` float32, zeros for a document with no such row."""
    if reduce not in ("mean", "max"):
        raise ValueError(f"reduce must be 'mean' or 'max', got {reduce!r}")
    keep = pos >= skip_positions
    v, d = values[keep].float(), doc[keep]
    out = torch.zeros(n_docs, values.shape[1], dtype=torch.float32)
    if reduce == "mean":
        out.index_add_(0, d, v)
        return out / torch.bincount(d, minlength=n_docs).clamp_min(1).unsqueeze(1).float()
    return out.scatter_reduce_(0, d[:, None].expand_as(v), v, "amax", include_self=False)


@torch.no_grad()
def pooled_codes(sae: TopKSAE, acts: Ragged, *, reduce: str = "mean", skip_positions: int = 1,
                 batch_rows: int = 4096, stats: dict | None = None) -> Tensor:
    """``[N, n_latents]`` float32: each document's mean (or max) over its tokens from position ``skip_positions``
    on of every latent's activation (0 where a latent is not among a token's top k), encoded from the cached
    activations ``acts`` in batches of ``batch_rows`` tokens; no ``[T, n_latents]`` tensor is made.
    A document with no such token gets zeros. ``stats``, when given, receives ``"l0"``: the mean number of
    latents above 0 per encoded token, and ``"tokens"``: how many tokens were encoded."""
    if reduce not in ("mean", "max"):
        raise ValueError(f"reduce must be 'mean' or 'max', got {reduce!r}")
    doc, pos = acts.row_docs()
    keep = pos >= skip_positions
    values, doc = acts.values[keep], doc[keep]
    n, m = len(acts), sae.n_latents
    flat = torch.zeros(n * m, dtype=torch.float32)
    dev, dtype = sae.W_enc.device, sae.W_enc.dtype
    active = 0
    for s in range(0, len(values), batch_rows):
        codes = sae.encode(values[s:s + batch_rows].to(dev, dtype))
        idx = (doc[s:s + batch_rows, None] * m + codes.indices.cpu()).reshape(-1)
        val = codes.values.float().cpu().reshape(-1)
        active += int((val > 0).sum())
        if reduce == "mean":
            flat.index_add_(0, idx, val)
        else:  # latents not among a token's top k are 0 there: max with 0 once a document has any token
            flat.scatter_reduce_(0, idx, val.clamp_min(0), "amax")
    if stats is not None:
        stats.update(l0=active / max(len(values), 1), tokens=len(values))
    out = flat.view(n, m)
    if reduce == "mean":
        out /= torch.bincount(doc, minlength=n).clamp_min(1).unsqueeze(1).float()
    return out


# ---------------------------------------------------------------------------------------------- the cache
def _model_fingerprint(model) -> str:
    """The model's name_or_path, config, dtype and a sample of its first and last weights, hashed."""
    m = unwrap(model)
    cfg = getattr(m, "config", None)
    h = hashlib.sha256()
    h.update(_model_name(m).encode())
    h.update(cfg.to_json_string(use_diff=False).encode() if hasattr(cfg, "to_json_string") else b"")
    params = list(m.parameters())
    h.update(str(params[0].dtype if params else "").encode())
    for p in params[:2] + params[-2:]:
        h.update(p.detach().reshape(-1)[:256].float().cpu().numpy().tobytes())
    return h.hexdigest()


def _model_name(model) -> str:
    return str(getattr(getattr(unwrap(model), "config", None), "_name_or_path", ""))


def _tokens_hash(docs: Sequence[Sequence[int]]) -> str:
    h = hashlib.sha256()
    for d in docs:
        a = np.asarray(list(d), dtype=np.int64)
        h.update(len(a).to_bytes(8, "little"))
        h.update(a.tobytes())
    return h.hexdigest()


def cache_folder(cache_dir: str | Path, tag: str, model_fp: str, hookpoint: str, tokens_hash: str,
                 chunk_docs: int) -> Path:
    """``<cache_dir>/<tag>-<hash>``: the folder of one hookpoint's cached activations of one document list."""
    key = json.dumps([model_fp, hookpoint, tokens_hash, chunk_docs, "float32"])
    return Path(cache_dir) / f"{tag}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _chunk_path(folder: Path, c: int) -> Path:
    return folder / f"chunk-{c:05d}.safetensors"


def _read_chunk(path: Path) -> tuple[Tensor, Tensor] | None:
    try:
        t = load_file(path)
        return t["values"], t["offsets"]
    except Exception as e:  # a damaged file: collect that chunk again
        log.warning("cached chunk %s unreadable (%s); collecting it again", path, e)
        return None


def _carriers(model, hookpoints) -> dict[Key, TopKSAE]:
    """``{key: TopKSAE}`` to attach: the user's autoencoders, or a 1-latent one of the hookpoint's width (only
    carries the hook: record=False and :meth:`Hooked.run`'s ``visit`` read the activation itself). A width
    unknown before a forward (a sub-module's output) is taken to be the hidden size; the first forward says
    so if it is not (then pass ``{key: autoencoder}``)."""
    if isinstance(hookpoints, Mapping):
        return dict(hookpoints)
    m = unwrap(model)
    out = {}
    for key in hookpoints:
        width = resolve(m, key).width or hidden_size_of(m)
        if width is None:
            raise ValueError(f"the width of hookpoint {key!r} is unknown before a forward and the model declares no "
                             f"hidden size; pass {{key: autoencoder}} instead of a key list")
        out[key] = TopKSAE(width, 1, 1)
    return out


@torch.no_grad()
def _collect(hooked, docs: Sequence[Sequence[int]], batch_size: int, bar) -> dict[Key, tuple[Tensor, Tensor]]:
    """One chunk: ``{key: (values, offsets)}`` of ``docs``, batched by length (less padding), right-padded."""
    order = sorted(range(len(docs)), key=lambda i: len(docs[i]))
    rows: dict[Key, list] = {key: [None] * len(docs) for key in hooked.saes}
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        T = max(max(len(docs[i]) for i in idx), 1)
        ids = torch.zeros(len(idx), T, dtype=torch.long)
        mask = torch.zeros(len(idx), T, dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, :len(docs[i])], mask[r, :len(docs[i])] = torch.as_tensor(list(docs[i]), dtype=torch.long), 1

        def visit(key, x, valid, idx=idx):
            for r, i in enumerate(idx):
                rows[key][i] = x[r][valid[r]].float().cpu()

        hooked.run({"input_ids": ids, "attention_mask": mask}, skip_positions=0, visit=visit)
        bar.update(int(mask.sum()))
    out = {}
    for key, per_doc in rows.items():
        d = per_doc[0].shape[-1]
        lengths = torch.tensor([len(r) for r in per_doc], dtype=torch.long)
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        out[key] = (torch.cat(per_doc) if per_doc else torch.zeros(0, d), offsets)
    return out


def token_activations(model, hookpoints: Sequence[Key] | Mapping[Key, TopKSAE], docs: Sequence[Sequence[int]], *,
                      cache_dir: str | Path | None = None, tag: str = "acts", batch_size: int = 8,
                      chunk_docs: int = CHUNK_DOCS, progress: bool = True) -> dict[Key, Ragged]:
    """Every real token's activation at each hookpoint, per document: ``{key: Ragged(values [T, d], offsets)}``.

    Args:
        model: a Hugging Face causal LM (or a wrapper saehook unwraps).
        hookpoints: keys as :func:`saehook.attach` takes them (layer index, module path, ``"path:input"``), or
            ``{key: autoencoder}`` (its width then gives the hookpoint's).
        docs: token-id lists, one per document, of any length (a BOS first if the model expects one).
        cache_dir: keep the activations there (see the module docstring) and reuse finished chunks; None
            collects in memory only.
        tag: the cache folders' prefix (e.g. ``"bbc"``).
        batch_size: documents per forward.
        chunk_docs: documents per cache chunk.
        progress: a tqdm bar over the tokens still to collect (rate and time estimate), on stderr.

    Raises ``ValueError`` for no documents or an empty one, ``RuntimeError`` if a forward never reaches a
    hookpoint.
    """
    docs = [list(map(int, d)) for d in docs]
    if not docs:
        raise ValueError("token_activations needs at least one document")
    if any(len(d) == 0 for d in docs):
        raise ValueError(f"document {next(i for i, d in enumerate(docs) if not d)} has no tokens; drop empty documents")
    saes = _carriers(model, hookpoints)
    n_chunks = (len(docs) + chunk_docs - 1) // chunk_docs
    spans = [(c * chunk_docs, min((c + 1) * chunk_docs, len(docs))) for c in range(n_chunks)]
    hooked = attach(model, saes, record=False)
    try:
        folders: dict[Key, Path] = {}
        if cache_dir is not None:
            fp, th = _model_fingerprint(model), _tokens_hash(docs)
            for key, hp in hooked.hookpoints.items():
                folders[key] = cache_folder(cache_dir, tag, fp, str(hp), th, chunk_docs)
                folders[key].mkdir(parents=True, exist_ok=True)
                write_file(folders[key] / "meta.json", json_bytes({
                    "hookpoint": str(hp), "model": _model_name(model),
                    "documents": len(docs), "chunk_docs": chunk_docs, "chunks": n_chunks, "dtype": "float32"}))
        chunks: dict[Key, list] = {key: [None] * n_chunks for key in saes}
        todo = []
        for c in range(n_chunks):
            for key in saes:
                if key in folders and _chunk_path(folders[key], c).exists():
                    chunks[key][c] = _read_chunk(_chunk_path(folders[key], c))
            if any(chunks[key][c] is None for key in saes):
                todo.append(c)
        from tqdm.auto import tqdm

        total = sum(len(docs[i]) for c in todo for i in range(*spans[c]))
        with tqdm(total=total, unit="tok", unit_scale=True, disable=not progress,
                  desc=f"activations ({tag}, {len(saes)} hookpoint{'s' * (len(saes) > 1)})") as bar:
            for c in todo:
                got = _collect(hooked, docs[spans[c][0]:spans[c][1]], batch_size, bar)
                for key, (values, offsets) in got.items():
                    chunks[key][c] = (values, offsets)
                    if key in folders:
                        write_file(_chunk_path(folders[key], c),
                                   safetensors_bytes({"values": values, "offsets": offsets}))
    finally:
        hooked.detach()
    out = {}
    for key, parts in chunks.items():
        starts = torch.tensor([0] + [len(v) for v, _ in parts]).cumsum(0)
        offsets = torch.cat([torch.zeros(1, dtype=torch.long)] + [o[1:] + starts[c] for c, (_, o) in enumerate(parts)])
        out[key] = Ragged(torch.cat([v for v, _ in parts]), offsets)
    log.info("activations of %d documents at %d hookpoints (%d chunks collected, %d cached)", len(docs), len(saes),
             len(todo), n_chunks - len(todo))
    return out
