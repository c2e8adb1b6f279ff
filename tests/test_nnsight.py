"""nnsight as a first-class citizen, checked against numbers on the plain model.

Two ways in: ``saehook.attach`` on the nnsight wrapper (its hooks act on every forward a trace or a
generation runs), and the ``saehook.envoy`` helpers called inside a trace body.
"""

import subprocess
import sys
import warnings

import pytest
import torch
from conftest import VOCAB, tiny_model

import saehook
import saehook.envoy as sev
from saehook import TopKSAE, attach
from saehook.hookpoints import find_layers

nnsight = pytest.importorskip("nnsight")

TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def tok():
    """An offline word-level tokenizer over the tiny models' 128 ids: "w5 w6" -> [5, 6]."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, VOCAB)}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


def wrap(model, tok, cls=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # LanguageModel is deprecated in nnsight 0.8
        return (cls or nnsight.LanguageModel)(model, tokenizer=tok)


def sae_for(model, k=4, n=64, seed=1):
    torch.manual_seed(seed)
    return TopKSAE(model.config.get_text_config().hidden_size, n, k)


def envoy_at(lm, name):
    """The envoy of a module path of the wrapped model, e.g. ``model.layers.1``."""
    e = lm
    for part in name.split("."):
        e = e[int(part)] if part.isdigit() else getattr(e, part)
    return e


def layer_path(model, i):
    return f"{find_layers(model)[0]}.{i}"


@pytest.fixture
def setup(arch, tok):
    model = tiny_model(arch)
    return model, wrap(model, tok), sae_for(model)


def hooked_logits(model, sae, ids, ctx, key=1):
    """Logits of the plain model under ``ctx(hooked)`` (a saehook sub-context)."""
    with attach(model, {key: sae}) as hooked, ctx(hooked):
        return model(ids).logits


# ---------------------------------------------------------------------------- attach on the wrapper


def test_attach_unwraps_and_records_latents_of_the_saved_output(setup, ids):
    model, lm, sae = setup
    clean = model(ids).logits
    layer = envoy_at(lm, layer_path(model, 1))
    with attach(lm, {1: sae}) as hooked:
        assert hooked.model is model and hooked.hookpoints[1].module is layer._module
        with lm.trace(ids):
            x = layer.output.save()
            logits = lm.output.logits.save()
        codes = hooked.latents[1]
    ref = sae.encode(x)
    assert torch.equal(codes.indices, ref.indices)
    torch.testing.assert_close(codes.values, ref.values)
    assert torch.equal(logits, clean)  # recording alone changes nothing
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == 0


SUBCONTEXTS = {
    "splice": lambda h: h.splice(),
    "splice_keep_error": lambda h: h.splice(keep_error=True),
    "steer": lambda h: h.steer({1: {5: 8.0, 9: -2.0}}),
    "clamp": lambda h: h.steer({1: {5: 3.0}}, mode="clamp"),
    "ablate": lambda h: h.ablate({1: list(range(0, 64, 2))}),
}


@pytest.mark.parametrize("edit", list(SUBCONTEXTS))
def test_hooked_edits_act_inside_a_trace_like_on_the_plain_model(setup, ids, edit):
    model, lm, sae = setup
    ctx = SUBCONTEXTS[edit]
    ref = hooked_logits(model, sae, ids, ctx)
    clean = model(ids).logits
    with attach(lm, {1: sae}) as hooked, ctx(hooked):
        with lm.trace(ids):
            logits = lm.output.logits.save()
    torch.testing.assert_close(logits, ref, **TOL)
    if edit == "splice_keep_error":
        torch.testing.assert_close(logits, clean, **TOL)
    else:
        assert (logits - clean).abs().max() > 1e-3


def test_nnsight_reads_before_and_downstream_sees_after_the_saehook_edit(setup, ids):
    """nnsight serves ``.output`` from inside the module's forward, torch's forward hooks run after it:
    a layer's ``.output`` is the clean activation, the next layer's ``.input`` the steered one."""
    model, lm, sae = setup
    with attach(lm, {1: sae}) as hooked, hooked.steer({1: {5: 8.0}}):
        with lm.trace(ids):
            x = envoy_at(lm, layer_path(model, 1)).output.save()
            nxt = envoy_at(lm, layer_path(model, 2)).input.save()
    torch.testing.assert_close(nxt, x + 8.0 * sae.W_dec[5])


def test_an_nnsight_write_is_what_the_autoencoder_records(setup, ids):
    model, lm, sae = setup
    layer = envoy_at(lm, layer_path(model, 1))
    with attach(lm, {1: sae}) as hooked:
        with lm.trace(ids):
            x = layer.output.save()
            layer.output = layer.output * 2
        codes = hooked.latents[1]
    ref = sae.encode(2 * x)
    assert torch.equal(codes.indices, ref.indices)
    torch.testing.assert_close(codes.values, ref.values)


def test_a_context_entered_inside_the_trace_body_is_active_while_the_body_waits(setup, ids):
    model, lm, sae = setup
    ref = hooked_logits(model, sae, ids, SUBCONTEXTS["steer"])
    with attach(lm, {1: sae}) as hooked:
        with lm.trace(ids):
            with SUBCONTEXTS["steer"](hooked):
                logits = lm.output.logits.save()  # the body waits here for the end of the forward
    torch.testing.assert_close(logits, ref, **TOL)


@pytest.mark.parametrize("positions", [None, "generated"])
def test_generation_with_steer_equals_plain_model_generation(setup, ids, positions):
    model, lm, sae = setup
    prompt = ids[:1, :5]
    kw = dict(max_new_tokens=6, do_sample=False)
    clean = model.generate(prompt, **kw)
    with attach(model, {1: sae}) as hooked, hooked.steer({1: {5: 8.0}}, positions=positions):
        ref = model.generate(prompt, **kw)
    with attach(lm, {1: sae}) as hooked, hooked.steer({1: {5: 8.0}}, positions=positions):
        with lm.generate(prompt, **kw) as tracer:
            out = tracer.result.save()
        codes = hooked.latents[1]
    assert torch.equal(out, ref) and not torch.equal(out, clean)
    assert codes.indices.shape[:2] == (1, 1)  # the last decode step: one new token under the KV cache


def test_text_prompts_through_the_wrapper_tokenizer(tok):
    model = tiny_model("llama")
    lm, sae = wrap(model, tok), sae_for(model)
    assert tok("w5 w6 w7 w8")["input_ids"] == [5, 6, 7, 8]
    with attach(lm, {1: sae}) as hooked, hooked.steer({1: {5: 8.0}}):
        with lm.trace("w5 w6 w7 w8"):
            logits = lm.output.logits.save()
        via_nnsight = hooked.latents[1]
        ref = model(torch.tensor([[5, 6, 7, 8]])).logits
        assert torch.equal(hooked.latents[1].indices, via_nnsight.indices)
    torch.testing.assert_close(logits, ref, **TOL)


def test_transformers_model_wrapper(tok, ids):
    model = tiny_model("gpt2")
    lm, sae = wrap(model, tok, nnsight.TransformersModel), sae_for(model)
    ref = hooked_logits(model, sae, ids, SUBCONTEXTS["splice"])
    with attach(lm, {1: sae}) as hooked, hooked.splice():
        with lm.trace(ids):
            logits = lm.output.logits.save()
    torch.testing.assert_close(logits, ref, **TOL)


# ---------------------------------------------------------------------------- saehook.envoy helpers


def test_envoy_encode_equals_recorded_latents(setup, ids):
    model, lm, sae = setup
    layer = envoy_at(lm, layer_path(model, 1))
    with attach(model, {1: sae}) as hooked:
        model(ids)
        ref = hooked.latents[1]
    with lm.trace(ids):
        codes = nnsight.save(sev.encode(sae, layer))
        x = layer.output.save()
        x_hat = sev.reconstruct(sae, layer).save()
    assert torch.equal(codes.indices, ref.indices)
    torch.testing.assert_close(codes.values, ref.values)
    torch.testing.assert_close(x_hat, sae.decode(sae.encode(x)))
    # a value (tensor or tuple output) works as well as the envoy, and so does a smaller k
    assert torch.equal(sev.encode(sae, (x, None)).indices, ref.indices)
    assert torch.equal(sev.encode(sae, x, k=2).indices, ref.indices[..., :2])


ENVOY_EDITS = {  # (saehook.envoy call, the equivalent Hooked sub-context)
    "splice": (lambda sae, e: sev.splice(sae, e), SUBCONTEXTS["splice"]),
    "splice_keep_error": (lambda sae, e: sev.splice(sae, e, keep_error=True), SUBCONTEXTS["splice_keep_error"]),
    "steer": (lambda sae, e: sev.steer(sae, e, {5: 8.0, 9: -2.0}), SUBCONTEXTS["steer"]),
    "clamp": (lambda sae, e: sev.steer(sae, e, {5: 3.0}, mode="clamp"), SUBCONTEXTS["clamp"]),
    "ablate": (lambda sae, e: sev.ablate(sae, e, list(range(0, 64, 2))), SUBCONTEXTS["ablate"]),
}


@pytest.mark.parametrize("edit", list(ENVOY_EDITS))
def test_envoy_edit_equals_hooked_edit_on_the_plain_model(setup, ids, edit):
    model, lm, sae = setup
    call, ctx = ENVOY_EDITS[edit]
    sae.input_scale.fill_(0.5)  # the 1/s factors must agree too
    ref = hooked_logits(model, sae, ids, ctx)
    with lm.trace(ids):
        codes = nnsight.save(call(sae, envoy_at(lm, layer_path(model, 1))))
        logits = lm.output.logits.save()
    torch.testing.assert_close(logits, ref, **TOL)
    with attach(model, {1: sae}) as hooked:
        model(ids)
    assert torch.equal(codes.indices, hooked.latents[1].indices)  # the code of the clean activation
    if edit != "splice_keep_error":
        assert (logits - model(ids).logits).abs().max() > 1e-3


def test_envoy_edits_on_a_tuple_output(tok, ids):
    """Llama's attention returns ``(attn_output, attn_weights)``: the first element is edited, the
    rest passes through."""
    model = tiny_model("llama")
    lm, sae = wrap(model, tok), sae_for(model)
    path = "model.layers.0.self_attn"
    clean = model(ids).logits
    cases = ((lambda e: sev.splice(sae, e), lambda h: h.splice()),
             (lambda e: sev.steer(sae, e, {5: 8.0, 9: -2.0}), lambda h: h.steer({path: {5: 8.0, 9: -2.0}})))
    for call, ctx in cases:
        ref = hooked_logits(model, sae, ids, ctx, key=path)
        with lm.trace(ids):
            out = envoy_at(lm, path).output
            kinds = nnsight.save([type(v).__name__ for v in out])
            call(envoy_at(lm, path))
            logits = lm.output.logits.save()
        assert kinds == ["Tensor", "NoneType"]
        torch.testing.assert_close(logits, ref, **TOL)
        assert (logits - clean).abs().max() > 1e-3


def test_envoy_splice_at_an_input_site(tok, ids):
    model = tiny_model("gpt_neox")
    lm, sae = wrap(model, tok), sae_for(model)
    ref = hooked_logits(model, sae, ids, lambda h: h.splice(), key="lm_head:input")
    with lm.trace(ids):
        sev.splice(sae, lm.lm_head, site="input")
        logits = lm.output.logits.save()
    torch.testing.assert_close(logits, ref, **TOL)


def test_envoy_steer_every_generation_step_equals_hooked_generation(setup, ids):
    model, lm, sae = setup
    prompt, n = ids[:1, :5], 6
    kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False)
    with attach(model, {1: sae}) as hooked, hooked.ablate({1: [3]}), hooked.steer({1: {5: 8.0}}):
        ref = model.generate(prompt, **kw)
    with lm.generate(prompt, **kw) as tracer:
        for _ in tracer.iter[:n]:  # one forward per new token
            layer = envoy_at(lm, layer_path(model, 1))
            sev.ablate(sae, layer, [3])
            sev.steer(sae, layer, {5: 8.0})
        out = tracer.result.save()
    assert torch.equal(out, ref) and not torch.equal(out, model.generate(prompt, **kw))


def test_envoy_steer_in_an_open_ended_loop_with_the_result_read_in_another_invoke(tok, ids):
    model = tiny_model("llama")
    lm, sae = wrap(model, tok), sae_for(model)
    prompt, kw = ids[:1, :5], dict(max_new_tokens=6, do_sample=False)
    with attach(model, {1: sae}) as hooked, hooked.steer({1: {5: 8.0}}):
        ref = model.generate(prompt, **kw)
    with pytest.warns(UserWarning, match="never reached"):  # nnsight: the open loop was cut short
        with lm.generate(**kw) as tracer:
            with tracer.invoke(prompt):
                for _ in tracer.iter[:]:
                    sev.steer(sae, lm.model.layers[1], {5: 8.0})
            with tracer.invoke():
                out = tracer.result.save()
    assert torch.equal(out, ref)


def test_envoy_bf16_activation_fp32_autoencoder(tok, ids):
    model = tiny_model("llama").to(torch.bfloat16)
    lm, sae = wrap(model, tok), sae_for(model)
    ref = hooked_logits(model, sae, ids, SUBCONTEXTS["steer"])
    with lm.trace(ids):
        sev.steer(sae, lm.model.layers[1], {5: 8.0, 9: -2.0})
        x = lm.model.layers[1].output.save()
        logits = lm.output.logits.save()
    assert x.dtype == torch.bfloat16 and sae.W_enc.dtype == torch.float32
    torch.testing.assert_close(logits, ref)


def test_wrapper_over_a_disk_offloaded_model(tok, ids, tmp_path):
    """nnsight over a model loaded with an accelerate device map (layer 1 on "disk", its weights on
    meta): both ways in give the plain model's numbers."""
    import logging

    import transformers

    plain = tiny_model("llama")
    plain.save_pretrained(tmp_path / "m")
    dm = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu",
          "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "cpu"}
    logging.disable(logging.WARNING)
    try:
        placed = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", device_map=dm,
                                                                   offload_folder=tmp_path / "off")
    finally:
        logging.disable(logging.NOTSET)
    assert {p.device.type for p in placed.model.layers[1].parameters()} == {"meta"}
    lm, sae = wrap(placed, tok), sae_for(plain)
    ref = hooked_logits(plain, sae, ids, SUBCONTEXTS["steer"])
    with attach(lm, {1: sae}) as hooked, SUBCONTEXTS["steer"](hooked):
        with lm.trace(ids):
            via_attach = lm.output.logits.save()
    with lm.trace(ids):
        sev.steer(sae, lm.model.layers[1], {5: 8.0, 9: -2.0})
        via_envoy = lm.output.logits.save()
    torch.testing.assert_close(via_attach, ref, **TOL)
    torch.testing.assert_close(via_envoy, ref, **TOL)


def test_envoy_errors(tok, ids):
    model = tiny_model("llama")
    lm, sae = wrap(model, tok), sae_for(model)
    x = torch.randn(2, 3, 32)
    with pytest.raises(TypeError, match="needs the envoy itself"):
        sev.splice(sae, x)
    with pytest.raises(ValueError, match="d_in=16, but the activation has width 32"):
        sev.encode(TopKSAE(16, 32, 4), x)
    with pytest.raises(ValueError, match="site must be one of"):
        sev.encode(sae, lm.model.layers[1], site="middle")
    with pytest.raises(TypeError, match="first element is a tensor"):
        sev.encode(sae, (None, x))
    with pytest.raises(TypeError, match="expected a TopKSAE"):
        sev.encode("sae", x)
    layer = lm.model.layers[1]
    for bad, exc, msg in ((lambda: sev.steer(sae, layer, {64: 1.0}), IndexError, r"latents \[64\] out of range"),
                          (lambda: sev.ablate(sae, layer, [-1]), IndexError, r"latents \[-1\] out of range"),
                          (lambda: sev.steer(sae, layer, {1: 1.0}, mode="mul"), ValueError, "mode must be"),
                          (lambda: sev.steer(sae, layer, [1]), TypeError, "expected {latent: value}")):
        with pytest.raises(exc, match=msg):
            with lm.trace(ids):
                bad()


def test_saehook_imports_without_nnsight():
    code = "import sys, saehook, saehook.envoy; assert 'nnsight' not in sys.modules, 'nnsight imported'"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert saehook.envoy is sev
