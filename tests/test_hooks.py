"""attach / splice / steer / ablate on tiny Llama, GPT-2 and GPT-NeoX models, checked against numbers."""

import pytest
import torch
from conftest import VOCAB, tiny_model

import saehook
from saehook import TopKSAE, attach


def sae_for(model, k=4, n=64, seed=1):
    torch.manual_seed(seed)
    return TopKSAE(model.config.get_text_config().hidden_size, n, k)


def layer_module(hooked, key):
    return hooked.hookpoints[key].module


class Capture:
    """A user's own forward hook, registered after ours: it sees what flows downstream."""

    def __init__(self, module):
        self.outs = []
        self.handle = module.register_forward_hook(lambda m, a, o: self.outs.append(o.detach().clone()))


def hook_counts(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_record_latents_keyed_by_user_keys(model, ids):
    sae, sae2 = sae_for(model), sae_for(model, seed=2)
    layers_name = saehook.hookpoints.find_layers(model)[0]
    with attach(model, {1: sae, f"{layers_name}.2": sae2}) as hooked:
        model(ids)
        assert set(hooked.latents) == {1, f"{layers_name}.2"}
        codes = hooked.latents[1]
        assert codes.values.shape == (2, 12, 4) and codes.indices.shape == (2, 12, 4)
    # the recorded code is the autoencoder's code of the clean layer output
    cap = Capture(layer_module(hooked, 1))
    model(ids)
    cap.handle.remove()
    ref = sae.encode(cap.outs[0])
    torch.testing.assert_close(codes.values, ref.values)
    assert torch.equal(codes.indices, ref.indices)


def test_keep_error_splice_gives_clean_logits_and_plain_splice_changes_them(model, ids):
    clean = model(ids).logits
    with attach(model, {1: sae_for(model)}) as hooked:
        with hooked.splice(keep_error=True):
            kept = model(ids).logits
        with hooked.splice():
            spliced = model(ids).logits
        assert torch.equal(model(ids).logits, clean)  # recording alone changes nothing
    torch.testing.assert_close(kept, clean, atol=1e-5, rtol=1e-5)
    assert (spliced - clean).abs().max() > 1e-2


def test_plain_splice_writes_exactly_x_hat(model, ids):
    sae = sae_for(model)
    with attach(model, {1: sae}) as hooked:
        mod = layer_module(hooked, 1)
        pre = Capture(mod)  # registered after ours: sees the spliced output
        with hooked.splice():
            model(ids)
        pre.handle.remove()
    clean = Capture(mod)
    model(ids)
    clean.handle.remove()
    torch.testing.assert_close(pre.outs[0], sae.decode(sae.encode(clean.outs[0])))


@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_steer_adds_exactly_value_times_decoder_row(model, ids, scale):
    sae = sae_for(model)
    sae.input_scale.fill_(scale)
    clean_cap = Capture(saehook.hookpoints.resolve(model, 1).module)
    model(ids)
    clean_cap.handle.remove()
    with attach(model, {1: sae}) as hooked:
        cap = Capture(layer_module(hooked, 1))
        with hooked.steer({1: {5: 8.0, 9: -2.0}}):
            model(ids)
        cap.handle.remove()
    expected = clean_cap.outs[0] + (8.0 * sae.W_dec[5] - 2.0 * sae.W_dec[9]) / scale
    torch.testing.assert_close(cap.outs[0], expected)
    if scale == 1.0:  # the documented identity for a fresh autoencoder
        torch.testing.assert_close(cap.outs[0] - clean_cap.outs[0], (8.0 * sae.W_dec[5] - 2.0 * sae.W_dec[9])
                                   .expand_as(cap.outs[0]), atol=1e-5, rtol=1e-5)


def test_clamp_sets_latent_value(model, ids):
    sae = sae_for(model)
    with attach(model, {1: sae}) as hooked:
        cap = Capture(layer_module(hooked, 1))
        model(ids)
        codes = hooked.latents[1]
        j = int(codes.indices[0, 3, 0])  # an active latent at one position
        with hooked.steer({1: {j: 5.0}}, mode="clamp"):
            model(ids)
        cap.handle.remove()
    clean, clamped = cap.outs
    current = ((codes.indices == j) * codes.values).sum(-1, keepdim=True)  # [B, T, 1], 0 where inactive
    torch.testing.assert_close(clamped, clean + (5.0 - current) * sae.W_dec[j])
    assert (current > 0).any() and (current == 0).any()  # both cases occur: set, and added where silent


def test_ablate_active_latent_removes_exactly_its_contribution(model, ids):
    sae = sae_for(model)
    with attach(model, {1: sae}) as hooked:
        cap = Capture(layer_module(hooked, 1))
        model(ids)
        codes = hooked.latents[1]
        j, i2 = int(codes.indices[1, 4, 0]), int(codes.indices[0, 0, 1])
        with hooked.ablate({1: [j, i2]}):
            model(ids)
        cap.handle.remove()
    clean, ablated = cap.outs
    share = sum(((codes.indices == t) * codes.values).sum(-1, keepdim=True) * sae.W_dec[t] for t in (j, i2))
    assert share.abs().max() > 0
    torch.testing.assert_close(ablated, clean - share)


def never_firing(sae, model, ids, hooked):
    model(ids)
    used = set(hooked.latents[1].indices.flatten().tolist())
    return next(j for j in range(sae.n_latents) if j not in used)


def test_steer_zero_and_ablating_silent_latent_leave_generation_unchanged(model, ids):
    sae = sae_for(model)
    prompt = ids[:1, :6]
    ref = model.generate(prompt, max_new_tokens=8, do_sample=False)
    with attach(model, {1: sae}) as hooked:
        with hooked.steer({1: {3: 0.0}}):
            a = model.generate(prompt, max_new_tokens=8, do_sample=False)
        # a latent that never fires on the prompt nor on the generated text
        dead = never_firing(sae, model, ref, hooked)
        with hooked.ablate({1: [dead]}):
            b = model.generate(prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(a, ref) and torch.equal(b, ref)


def test_kv_cache_generation_matches_full_forward(model, ids):
    sae = sae_for(model)
    prompt = ids[:1, :5]
    with attach(model, {1: sae}) as hooked, hooked.steer({1: {7: 6.0}}):
        out = model.generate(prompt, max_new_tokens=6, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        full = model(out.sequences).logits
    gen_logits = torch.stack(out.logits, 1)[0]  # [6, V]: logits that chose each new token
    torch.testing.assert_close(gen_logits, full[0, 4:-1], atol=1e-4, rtol=1e-4)
    clean_full = model(out.sequences).logits
    assert (clean_full - full).abs().max() > 1e-3  # the steer really acted at every position


def test_generated_positions_only(model, ids):
    sae = sae_for(model)
    prompt = ids[:1, :5]
    with attach(model, {1: sae}) as hooked:
        with hooked.steer({1: {7: 6.0}}, positions="generated"):
            out = model.generate(prompt, max_new_tokens=5, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
        # the same edit expressed as absolute positions reproduces it with one full forward
        with hooked.steer({1: {7: 6.0}}, positions=5):
            full = model(out.sequences).logits
    torch.testing.assert_close(torch.stack(out.logits, 1)[0], full[0, 4:-1], atol=1e-4, rtol=1e-4)
    # the first generated token comes from the unedited prompt
    clean_first = model(prompt).logits[0, -1]
    torch.testing.assert_close(out.logits[0][0], clean_first, atol=1e-5, rtol=1e-5)


def test_left_padded_batch_generation(model):
    sae = sae_for(model)
    g = torch.Generator().manual_seed(3)
    long, short = torch.randint(3, VOCAB, (1, 7), generator=g), torch.randint(3, VOCAB, (1, 4), generator=g)
    batch = torch.cat([long, torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    with attach(model, {1: sae}) as hooked, hooked.steer({1: {2: 4.0}}, positions="generated"):
        both = model.generate(batch, attention_mask=mask, max_new_tokens=4, do_sample=False,
                              output_logits=True, return_dict_in_generate=True)
        alone = model.generate(short, max_new_tokens=4, do_sample=False, output_logits=True,
                               return_dict_in_generate=True)
    torch.testing.assert_close(torch.stack(both.logits, 1)[1], torch.stack(alone.logits, 1)[0],
                               atol=2e-4, rtol=2e-4)


def test_contexts_nest_and_unwind(model, ids):
    sae = sae_for(model)
    with attach(model, {1: sae}) as hooked:
        mod = layer_module(hooked, 1)
        cap = Capture(mod)
        with hooked.steer({1: {1: 2.0}}):
            with hooked.ablate({1: [int(sae.encode(torch.zeros(32)).indices[0])]}):
                model(ids)
            model(ids)
        model(ids)
        cap.handle.remove()
    inner, outer, none = cap.outs
    assert not torch.equal(inner, outer) and not torch.equal(outer, none)
    torch.testing.assert_close(outer - none, (2.0 * sae.W_dec[1]).expand_as(none), atol=1e-5, rtol=1e-5)


def test_no_hooks_remain_after_exit_or_exception(model, ids):
    def user_hook(m, a, o):
        return None

    layers = saehook.hookpoints.find_layers(model)[1]
    mine = layers[1].register_forward_hook(user_hook)
    before = hook_counts(model)
    clean = model(ids).logits
    with attach(model, {0: sae_for(model), 1: sae_for(model), "lm_head:input": None or sae_for(model)}) as h:
        assert hook_counts(model) > before
    assert hook_counts(model) == before and not h.attached
    for exc in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            with attach(model, {1: sae_for(model)}) as h2, h2.splice(), h2.steer({1: {0: 3.0}}):
                model(ids)
                raise exc
        assert hook_counts(model) == before
    assert torch.equal(model(ids).logits, clean)
    assert user_hook in layers[1]._forward_hooks.values()
    mine.remove()


def test_failed_attach_rolls_back(model, ids):
    before = hook_counts(model)
    with pytest.raises(ValueError, match="d_in=16"):
        attach(model, {0: sae_for(model), 1: TopKSAE(16, 32, 4)})
    assert hook_counts(model) == before


def test_input_site_and_module_path(model, ids):
    """A string path with ':input' hooks the module's input: splicing the lm_head input == final hidden."""
    name = "lm_head" if hasattr(model, "lm_head") else "embed_out"
    sae = sae_for(model)
    clean = model(ids, output_hidden_states=True)
    with attach(model, {f"{name}:input": sae}) as hooked:
        with hooked.splice():
            spliced = model(ids).logits
    head = model.get_submodule(name)
    torch.testing.assert_close(spliced, head(sae.decode(sae.encode(clean.hidden_states[-1]))))


def test_errors_before_any_forward(model):
    sae = sae_for(model)
    layers_name = saehook.hookpoints.find_layers(model)[0]
    with pytest.raises(IndexError, match=r"layer index 7 is out of range: the model has 3 decoder layers"):
        attach(model, {7: sae})
    with pytest.raises(KeyError, match=rf"nearest valid paths: .*'{layers_name}.1'"):
        attach(model, {f"{layers_name}.1x": sae})
    with pytest.raises(ValueError, match=r"d_in=16, but hookpoint .* has width 32"):
        attach(model, {1: TopKSAE(16, 32, 4)})
    with pytest.raises(ValueError, match="unknown site"):
        attach(model, {f"{layers_name}.1:middle": sae})
    with pytest.raises(TypeError, match="not a TopKSAE"):
        attach(model, {1: "sae"})
    with attach(model, {-1: sae}) as hooked:
        assert hooked.hookpoints[-1].name == f"{layers_name}.2"
        with pytest.raises(IndexError, match=r"latents \[64\] out of range .*n_latents=64"):
            hooked.steer({-1: {64: 1.0}})
        with pytest.raises(KeyError, match=r"not attached: \[5\]; attached keys are \[-1\]"):
            hooked.ablate({5: [1]})
        with pytest.raises(ValueError, match="mode must be"):
            hooked.steer({-1: {1: 1.0}}, mode="multiply")


def test_width_mismatch_at_runtime_names_both(model, ids):
    """A module whose width is unknown before the forward is checked at the first forward."""
    layers_name = saehook.hookpoints.find_layers(model)[0]
    attn = next(n for n, _ in model.named_modules()
                if n.startswith(f"{layers_name}.0.") and n.rsplit(".", 1)[-1] in ("self_attn", "attn", "attention"))
    with attach(model, {attn: TopKSAE(16, 32, 4)}):
        with pytest.raises(ValueError, match=r"d_in=16, but hookpoint .* produced width 32"):
            model(ids)


def test_more_architectures_qwen_gemma(ids):
    for arch in ("qwen2", "gemma"):
        m = tiny_model(arch)
        clean = m(ids).logits
        with attach(m, {1: sae_for(m)}) as hooked, hooked.splice(keep_error=True):
            torch.testing.assert_close(m(ids).logits, clean, atol=1e-5, rtol=1e-5)


def test_bf16_model_fp32_autoencoder(ids):
    m = tiny_model("llama").to(torch.bfloat16)
    sae = sae_for(m)
    with attach(m, {1: sae}) as hooked:
        cap = Capture(layer_module(hooked, 1))
        with hooked.splice():
            out = m(ids).logits
        cap.handle.remove()
    assert out.dtype == torch.bfloat16 and cap.outs[0].dtype == torch.bfloat16
    assert sae.W_enc.dtype == torch.float32 and hooked.latents[1].values.dtype == torch.float32


def test_one_token_prompt_generated_positions(model):
    """A one-token prompt is still a prefill: 'generated' edits leave the prompt token alone."""
    sae = sae_for(model)
    prompt = torch.tensor([[5]])
    clean_first = model(prompt).logits[0, -1]
    with attach(model, {1: sae}) as hooked, hooked.steer({1: {7: 6.0}}, positions="generated"):
        out = model.generate(prompt, max_new_tokens=3, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    torch.testing.assert_close(out.logits[0][0], clean_first)
    assert (out.logits[1][0] - model(out.sequences[:, :2]).logits[0, -1]).abs().max() > 1e-3


def test_positions_after_the_layer_stack_follow_the_cache(model, ids):
    """Hookpoints after the layers (lm_head input) use the model's positions under a KV cache too."""
    name = "lm_head" if hasattr(model, "lm_head") else "embed_out"
    sae = sae_for(model)
    prompt = ids[:1, :5]
    with attach(model, {f"{name}:input": sae}) as hooked:
        with hooked.steer({f"{name}:input": {3: 5.0}}, positions=6):
            out = model.generate(prompt, max_new_tokens=4, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
            full = model(out.sequences).logits
    gen = torch.stack(out.logits, 1)[0]
    torch.testing.assert_close(gen, full[0, 4:-1], atol=1e-4, rtol=1e-4)
    clean = model(out.sequences).logits
    assert torch.equal(gen[:2], clean[0, 4:6]) or (gen[:2] - clean[0, 4:6]).abs().max() < 1e-5
    assert (gen[2:] - clean[0, 6:8]).abs().max() > 1e-3  # positions 6, 7 steered through the cache


@pytest.mark.parametrize("order", ["steer_outside", "splice_outside"])
def test_splice_and_steer_compose_in_any_order(model, ids, order):
    sae = sae_for(model)
    with attach(model, {1: sae}) as hooked:
        cap = Capture(layer_module(hooked, 1))
        a, b = (hooked.steer({1: {4: 3.0}}), hooked.splice()) if order == "steer_outside" else \
            (hooked.splice(), hooked.steer({1: {4: 3.0}}))
        with a, b:
            model(ids)
        with hooked.splice():
            model(ids)
        cap.handle.remove()
    both, spliced = cap.outs
    torch.testing.assert_close(both - spliced, (3.0 * sae.W_dec[4]).expand_as(both), atol=1e-5, rtol=1e-5)


def test_steer_add_without_recording_skips_the_encoder(model, ids):
    sae = sae_for(model)
    calls = []
    orig = sae.encode
    sae.encode = lambda *a, **k: calls.append(1) or orig(*a, **k)
    with attach(model, {1: sae}, record=False) as hooked, hooked.steer({1: {2: 1.0}}):
        model(ids)
    assert calls == [] and hooked.latents == {}
    with attach(model, {1: sae}, record=False) as hooked, hooked.ablate({1: [2]}):
        model(ids)
    assert calls == [1]
