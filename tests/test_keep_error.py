"""``splice(keep_error=True)`` as in attribution patching: ``x_hat + (x - x_hat).detach()``.

Numerically the clean activation; under autograd the gradient of anything downstream reaches the
autoencoder (and, upstream of the hookpoint, flows through it only). Checked against an independent
implementation (a plain forward hook writing ``x_hat + (x - x_hat).detach()``), on a tiny Llama, through
``attach`` and through the nnsight helpers of :mod:`saehook.envoy`.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, tiny_model

import saehook.envoy as sev
from saehook import TopKSAE, attach

TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture
def llama():
    return tiny_model("llama")


def sae_for(model, seed=1):
    torch.manual_seed(seed)
    sae = TopKSAE(model.config.hidden_size, 64, 4)
    sae.input_scale.fill_(0.5)  # the 1/s factors must be differentiated too
    return sae


def lm_loss(logits, ids):
    """Next-token cross-entropy."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def sae_grads(sae):
    return {n: p.grad.clone() for n, p in sae.named_parameters()}


def reference(model, sae, ids, layer=1):
    """Loss, SAE parameter gradients and the embedding gradient with the error term detached, by a
    hook written here, not saehook's."""

    def hook(mod, args, out):
        x = out if isinstance(out, torch.Tensor) else out[0]
        x_hat = sae.decode(sae.encode(x))
        y = x_hat + (x - x_hat).detach()
        return y if isinstance(out, torch.Tensor) else (y, *out[1:])

    sae.zero_grad(set_to_none=True)
    emb = model.get_input_embeddings()(ids).requires_grad_(True)
    h = model.model.layers[layer].register_forward_hook(hook)
    try:
        logits = model(inputs_embeds=emb).logits
    finally:
        h.remove()
    loss = lm_loss(logits, ids)
    loss.backward()
    return logits.detach(), sae_grads(sae), emb.grad.clone()


def test_keep_error_splice_passes_the_gradient_to_the_autoencoder(llama, ids):
    model, sae = llama, sae_for(llama)
    clean = model(ids).logits
    ref_logits, ref_grads, ref_emb_grad = reference(model, sae, ids)
    sae.zero_grad(set_to_none=True)
    emb = model.get_input_embeddings()(ids).requires_grad_(True)
    with attach(model, {1: sae}) as hooked, hooked.splice(keep_error=True):
        logits = model(inputs_embeds=emb).logits
    lm_loss(logits, ids).backward()
    torch.testing.assert_close(logits, clean, **TOL)  # values: the clean run
    torch.testing.assert_close(ref_logits, clean, **TOL)
    grads = sae_grads(sae)
    assert grads["W_dec"].norm() > 1e-3 and grads["W_enc"].norm() > 1e-3  # was exactly 0 for W_dec
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, **TOL, msg=f"gradient of {name}")
    # upstream of the hookpoint the gradient flows through the autoencoder only (the error is a constant)
    torch.testing.assert_close(emb.grad, ref_emb_grad, **TOL)


def test_keep_error_splice_after_a_steer_keeps_the_steer_and_the_gradient(llama, ids):
    """Composed with another edit, the splice swaps only the clean part: values stay those of the
    steered run, and the gradient on the autoencoder is that of a splice of the clean part alone."""
    model, sae = llama, sae_for(llama)
    with attach(model, {1: sae}) as hooked, hooked.steer({1: {5: 4.0}}):
        steered = model(ids).logits
        with hooked.splice(keep_error=True):
            logits = model(ids).logits
    lm_loss(logits, ids).backward()
    torch.testing.assert_close(logits, steered, **TOL)
    assert sae.W_dec.grad.norm() > 1e-3


def test_keep_error_latents_carry_the_gradient_of_a_metric(llama, ids):
    """Attribution through latents: under a splice ``hooked.latents[key].values`` are the activations
    the reconstruction was decoded from, so ``d metric / d z`` is one ``autograd.grad`` away, and
    equals ``grad_x . W_dec[j] / s`` at each active latent."""
    model, sae = llama, sae_for(llama)  # its parameters require grad, as a fresh or loaded one's do
    grad_at_x = []

    def keep_grad(mod, args, out):  # registered after saehook's hook: sees the spliced output
        out.register_hook(grad_at_x.append)

    with attach(model, {1: sae}) as hooked, hooked.splice(keep_error=True), torch.enable_grad():
        h = hooked.hookpoints[1].module.register_forward_hook(keep_grad)
        logits = model(ids).logits
        h.remove()
        z = hooked.latents[1]
        metric = logits[:, -1, 7].sum()
        (dz,) = torch.autograd.grad(metric, z.values)
    assert dz.shape == z.values.shape and dz.abs().max() > 0
    expected = torch.einsum("btd,btkd->btk", grad_at_x[0], sae.W_dec[z.indices]) / sae.input_scale
    torch.testing.assert_close(dz, expected, **TOL)


def test_recorded_latents_without_a_splice_stay_detached(llama, ids):
    model, sae = llama, sae_for(llama)
    with attach(model, {1: sae}) as hooked, torch.enable_grad():
        model(ids)
        assert not hooked.latents[1].values.requires_grad


def word_tokenizer():
    """An offline word-level tokenizer over the tiny models' ids (nnsight's wrapper wants one)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, VOCAB)}}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                   bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")


def test_envoy_keep_error_splice_gradient_equals_the_reference(llama, ids):
    nnsight = pytest.importorskip("nnsight")
    model, sae = llama, sae_for(llama)
    clean = model(ids).logits
    _, ref_grads, _ = reference(model, sae, ids)
    sae.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # LanguageModel is deprecated in nnsight 0.8
        lm = nnsight.LanguageModel(model, tokenizer=word_tokenizer())
    with lm.trace(ids):
        sev.splice(sae, lm.model.layers[1], keep_error=True)
        logits = lm.output.logits
        loss = lm_loss(logits, ids)
        loss.backward()
        logits = logits.save()
    torch.testing.assert_close(logits, clean, **TOL)
    grads = sae_grads(sae)
    assert grads["W_dec"].norm() > 1e-3
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, **TOL, msg=f"gradient of {name}")
