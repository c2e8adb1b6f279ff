"""Shared fixtures: tiny random Hugging Face models of several architectures, built from configs."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VOCAB = 128


def tiny_model(arch: str, seed: int = 0, layers: int = 3):
    """A random causal LM with hidden size 32, ``layers`` layers (3), vocab 128, in eval mode, fp32."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "llama":
        cfg = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=256, **common)
    elif arch == "gpt2":
        cfg = tf.GPT2Config(n_embd=32, n_layer=3, n_head=4, n_positions=256, **common)
    elif arch == "gpt_neox":
        cfg = tf.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                               max_position_embeddings=256, **common)
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=256, **common)
    elif arch == "gemma":
        cfg = tf.GemmaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=8, max_position_embeddings=256, **common)
    else:
        raise ValueError(arch)
    model = tf.AutoModelForCausalLM.from_config(cfg)
    model.generation_config.pad_token_id = 0
    return model.eval().requires_grad_(False)


ARCHS = ["llama", "gpt2", "gpt_neox"]


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


@pytest.fixture
def model(arch):
    return tiny_model(arch)


@pytest.fixture
def ids():
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, VOCAB, (2, 12), generator=g)


def source(n=40, seed=0):
    """``n`` seeded batches of token ids [8, 32] for tiny models (vocabulary 3..127)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (8, 32), generator=g) for _ in range(n)]


class Interrupt(Exception):
    """Raised by :func:`dying`'s reader: a run killed mid-way, for resume tests."""


def dying(n):
    """:func:`source` (60 batches) whose reader dies after ``n`` batches."""
    for i, b in enumerate(source(60)):
        if i == n:
            raise Interrupt
        yield b


def module_output(module, run):
    """What ``module`` outputs (its first element when it returns a tuple, detached) while ``run()`` runs: a user's
    own forward hook, registered after saehook's, so it sees what flows downstream. One output per call, in order."""
    outs = []
    handle = module.register_forward_hook(
        lambda m, a, o: outs.append((o[0] if isinstance(o, tuple) else o).detach()))
    try:
        run()
    finally:
        handle.remove()
    return outs
