"""Steering a latent of a fresh autoencoder at layer 20 of the embedded SmolLM2-135M during ``generate``."""

import pytest
import torch

import saehook
from saehook import TopKSAE, attach

pytestmark = pytest.mark.integration

LAYER = 20
PROMPT = "The capital of France is"
NEW_TOKENS = 8
# A fresh autoencoder has unit-norm decoder rows and input scale 1, so steering adds ``value * W_dec[j]``.
# The residual stream at layer 20 has norm ~200-270 on the prompt's tokens (the first token's is ~2e4),
# so a value of 200 is a push as large as the activation itself: enough to derail the continuation.
LATENT, VALUE = 0, 200.0


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = saehook.load_model()
    return model, tokenizer


@pytest.fixture(scope="module")
def prompt(smollm2):
    _, tokenizer = smollm2
    return tokenizer(PROMPT, return_tensors="pt")


@pytest.fixture(scope="module")
def clean(smollm2, prompt):
    """Greedy generation and logits of the model before anything is attached."""
    model, _ = smollm2
    out = model.generate(**prompt, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits, 1), model(**prompt).logits


def fresh_sae(seed=0):
    torch.manual_seed(seed)
    return TopKSAE(576, 4096, 32)


def generate(model, prompt, **kw):
    return model.generate(**prompt, max_new_tokens=NEW_TOKENS, do_sample=False, **kw)


def hook_counts(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_clean_generation_says_paris(smollm2, clean, prompt):
    _, tokenizer = smollm2
    seq, _, _ = clean
    assert "Paris" in tokenizer.decode(seq[0, prompt.input_ids.shape[1]:])


def test_steer_by_zero_leaves_generation_unchanged(smollm2, clean, prompt):
    model, tokenizer = smollm2
    with attach(model, {LAYER: fresh_sae()}) as hooked, hooked.steer({LAYER: {LATENT: 0.0}}):
        out = generate(model, prompt)
        # record mode under a KV cache: the last forward encoded one new token
        assert hooked.latents[LAYER].indices.shape == (1, 1, 32)
    assert torch.equal(out, clean[0])
    assert "Paris" in tokenizer.decode(out[0, prompt.input_ids.shape[1]:])


def test_large_steer_changes_continuation_and_generated_positions_keep_first_token(smollm2, clean, prompt):
    model, tokenizer = smollm2
    n_prompt = prompt.input_ids.shape[1]
    clean_seq, clean_logits, _ = clean
    with attach(model, {LAYER: fresh_sae()}) as hooked:
        with hooked.steer({LAYER: {LATENT: VALUE}}):
            steered = generate(model, prompt)
        with hooked.steer({LAYER: {LATENT: VALUE}}, positions="generated"):
            gen_only = generate(model, prompt, output_logits=True, return_dict_in_generate=True)
    assert not torch.equal(steered, clean_seq), tokenizer.decode(steered[0, n_prompt:])
    # steered everywhere, the first new token is already different ("Paris" is gone)
    assert steered[0, n_prompt] != clean_seq[0, n_prompt]
    # steered on generated tokens only: the first new token comes from the clean prompt...
    assert gen_only.sequences[0, n_prompt] == clean_seq[0, n_prompt]
    torch.testing.assert_close(gen_only.logits[0], clean_logits[:, 0], atol=1e-4, rtol=1e-4)
    # ...and the edit then acts on every cached decoding step, so the continuation departs from the clean one
    assert not torch.equal(gen_only.sequences, clean_seq), tokenizer.decode(gen_only.sequences[0, n_prompt:])


def test_keep_error_splice_keeps_clean_logits(smollm2, clean, prompt):
    model, _ = smollm2
    _, _, clean_logits = clean
    with attach(model, {LAYER: fresh_sae()}) as hooked:
        with hooked.splice(keep_error=True):
            kept = model(**prompt).logits
        with hooked.splice():
            spliced = model(**prompt).logits
    torch.testing.assert_close(kept, clean_logits, atol=5e-4, rtol=1e-5)
    assert (spliced - clean_logits).abs().max() > 1.0  # a random autoencoder's reconstruction is poor


def test_hooks_gone_after_exit(smollm2, clean, prompt):
    model, _ = smollm2
    seq, _, clean_logits = clean
    before = hook_counts(model)
    with pytest.raises(RuntimeError, match="boom"):
        with attach(model, {LAYER: fresh_sae()}) as hooked, hooked.steer({LAYER: {LATENT: VALUE}}):
            assert hook_counts(model) > before
            raise RuntimeError("boom")
    assert hook_counts(model) == before and not hooked.attached
    assert torch.equal(model(**prompt).logits, clean_logits)
    assert torch.equal(generate(model, prompt), seq)


def test_keep_error_splice_gradient_reaches_the_decoder(smollm2, prompt):
    """The LM loss's gradient on W_dec under splice(keep_error=True) equals that of an independent hook
    writing ``x_hat + (x - x_hat).detach()`` (it was exactly 0 when nothing was detached)."""
    model, _ = smollm2
    sae, ids = fresh_sae(), prompt.input_ids

    def loss_of(logits):
        return torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:])

    with attach(model, {LAYER: sae}) as hooked, hooked.splice(keep_error=True):
        (got,) = torch.autograd.grad(loss_of(model(**prompt).logits), sae.W_dec)

    def detached_error(mod, args, out):
        x = out if isinstance(out, torch.Tensor) else out[0]
        x_hat = sae.decode(sae.encode(x))
        y = x_hat + (x - x_hat).detach()
        return y if isinstance(out, torch.Tensor) else (y, *out[1:])

    handle = saehook.hookpoints.resolve(model, LAYER).module.register_forward_hook(detached_error)
    try:
        (ref,) = torch.autograd.grad(loss_of(model(**prompt).logits), sae.W_dec)
    finally:
        handle.remove()
    assert ref.norm() > 0.1
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
