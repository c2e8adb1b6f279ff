"""attach on models placed by accelerate (real accelerate, no mocks), checked against the plain model.

``cpu_offload`` and ``dispatch_model`` / ``from_pretrained(device_map=...)`` with disk offload leave the
weights on the meta device and bring them in at each forward from an ``AlignDevicesHook`` (accelerate
wraps ``module.forward``; saehook uses torch's own forward hooks, around it). With the autoencoder
attached, every number must equal what the same autoencoder gives on the plain, non-offloaded model,
and leaving ``attach`` must leave accelerate's hooks in place, untouched.
"""

import logging

import pytest
import torch
from conftest import tiny_model

accelerate = pytest.importorskip("accelerate")
transformers = pytest.importorskip("transformers")

from saehook import TopKSAE, attach  # noqa: E402
from saehook.hookpoints import find_layers, resolve  # noqa: E402
from saehook.hooks import _execution_device  # noqa: E402

TOL = dict(atol=1e-5, rtol=1e-5)
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _quiet():
    """Loading prints progress bars and an offload notice per model; keep the test log readable."""
    tlog = transformers.utils.logging
    bars, level = tlog.is_progress_bar_enabled(), logging.root.manager.disable
    tlog.disable_progress_bar()
    logging.disable(logging.WARNING)
    yield
    logging.disable(level)
    if bars:
        tlog.enable_progress_bar()


def sae_for(model, seed=1):
    torch.manual_seed(seed)
    return TopKSAE(model.config.get_text_config().hidden_size, 64, 4)


def head_name(model):
    return "lm_head" if hasattr(model, "lm_head") else "embed_out"


def hf_hooks(model):
    """Every accelerate hook and the forward accelerate installed, by module path."""
    return {n: (m._hf_hook, m.__dict__.get("forward")) for n, m in model.named_modules() if hasattr(m, "_hf_hook")}


def torch_hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def device_map_with_disk(model, disk=(1,)):
    """An explicit map: every decoder layer and every other top-level block on "cpu", layers in
    ``disk`` on "disk"."""
    layers_name, layers = find_layers(model)
    base_name, _, list_name = layers_name.rpartition(".")
    base = model.get_submodule(base_name)
    dm = {f"{base_name}.{n}": "cpu" for n, _ in base.named_children() if n != list_name}
    dm.update({f"{layers_name}.{i}": "disk" if i in disk else "cpu" for i in range(len(layers))})
    dm.update({n: "cpu" for n, _ in model.named_children() if n != base_name})
    return dm


def run_all(model, ids, saes, prompt):
    """Everything the checks compare, on one model: recorded latents, logits under each edit, a steered
    generation."""
    out = {"clean": model(ids).logits}
    with attach(model, saes) as hooked:
        out["logits_recording"] = model(ids).logits
        out["latents"] = dict(hooked.latents)
        with hooked.splice(keep_error=True):
            out["keep_error"] = model(ids).logits
        with hooked.splice([1]):
            out["splice"] = model(ids).logits
        with hooked.steer({1: {5: 8.0, 9: -2.0}}):
            out["steer"] = model(ids).logits
            out["generate"] = model.generate(prompt, max_new_tokens=5, do_sample=False)
        with hooked.ablate({1: list(range(0, 64, 2))}):
            out["ablate"] = model(ids).logits
        out["sae_devices"] = {k: sae.W_enc.device for k, sae in hooked.saes.items()}
    return out


def check_placed(plain, placed, ids, *, input_site=True):
    """The placed model, autoencoder attached at layer 1 (and the head's input), behaves exactly as the
    plain model with the same autoencoders; accelerate's hooks survive attach untouched."""
    name = resolve(placed, 1).name
    layer = placed.get_submodule(name)
    assert {p.device.type for p in layer.parameters()} == {"meta"}, "layer 1 should be offloaded"
    assert _execution_device(placed, name) == CPU  # accelerate's execution device, not meta
    before, n_torch_hooks = hf_hooks(placed), torch_hook_count(placed)
    assert before, "accelerate installed no hooks"

    def saes():
        s = {1: sae_for(plain)}
        if input_site:
            s[f"{head_name(plain)}:input"] = sae_for(plain, seed=2)
        return s

    prompt = ids[:1, :5]
    ref, got = run_all(plain, ids, saes(), prompt), run_all(placed, ids, saes(), prompt)

    torch.testing.assert_close(got["clean"], ref["clean"])
    assert set(got["latents"]) == set(ref["latents"])
    for k, codes in got["latents"].items():
        assert torch.equal(codes.indices, ref["latents"][k].indices)
        torch.testing.assert_close(codes.values, ref["latents"][k].values)
    assert all(d == CPU for d in got["sae_devices"].values())
    torch.testing.assert_close(got["logits_recording"], ref["clean"])
    torch.testing.assert_close(got["keep_error"], ref["clean"], **TOL)
    for what in ("splice", "steer", "ablate"):
        torch.testing.assert_close(got[what], ref[what], **TOL)
        assert (got[what] - ref["clean"]).abs().max() > 1e-3, what
    assert torch.equal(got["generate"], ref["generate"])

    # after attach: accelerate's hooks are the same objects, ours are gone, the model still offloads
    after = hf_hooks(placed)
    assert after.keys() == before.keys()
    assert all(after[n][0] is before[n][0] and after[n][1] is before[n][1] for n in before)
    assert torch_hook_count(placed) == n_torch_hooks
    torch.testing.assert_close(placed(ids).logits, ref["clean"])
    assert {p.device.type for p in layer.parameters()} == {"meta"}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "qwen2", "gemma"])
def test_cpu_offload(arch, ids):
    plain = tiny_model(arch)
    placed = accelerate.cpu_offload(tiny_model(arch), execution_device="cpu")
    check_placed(plain, placed, ids)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_dispatch_model_with_a_layer_on_disk(arch, ids, tmp_path):
    plain = tiny_model(arch)
    dm = device_map_with_disk(plain)
    assert dm[resolve(plain, 1).name] == "disk" and "cpu" in dm.values()
    placed = accelerate.dispatch_model(tiny_model(arch), device_map=dm, offload_dir=tmp_path)
    name = resolve(placed, 1).name
    # layer 1's weights are read from files in the offload folder at each forward
    assert all(m._hf_hook.offload for m in placed.get_submodule(name).modules()
               if next(m.parameters(recurse=False), None) is not None)
    assert {p.name for p in tmp_path.glob(f"{name}.*.dat")} == {f"{n}.dat" for n, _ in placed.named_parameters()
                                                               if n.startswith(name + ".")}
    check_placed(plain, placed, ids)


def saved(arch, tmp_path):
    plain = tiny_model(arch)
    plain.save_pretrained(tmp_path / "model")
    return plain, tmp_path / "model"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_from_pretrained_explicit_device_map_with_disk(arch, ids, tmp_path):
    plain, path = saved(arch, tmp_path)
    dm = device_map_with_disk(plain)
    placed = transformers.AutoModelForCausalLM.from_pretrained(path, device_map=dm,
                                                               offload_folder=tmp_path / "offload")
    assert placed.hf_device_map == dm
    check_placed(plain, placed.eval(), ids)


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_from_pretrained_device_map_auto_with_a_memory_cap(arch, ids, tmp_path):
    """"auto" under a CPU memory cap of half the model: part on "cpu", the rest (layer 1 included) on
    "disk"."""
    plain, path = saved(arch, tmp_path)
    size = sum(p.numel() * p.element_size() for p in plain.parameters())
    placed = transformers.AutoModelForCausalLM.from_pretrained(
        path, device_map="auto", max_memory={"cpu": size // 2}, offload_folder=tmp_path / "offload")
    assert set(placed.hf_device_map.values()) == {"cpu", "disk"}
    check_placed(plain, placed.eval(), ids)


def test_from_pretrained_device_map_auto_on_cpu_only(ids, tmp_path):
    """Plain "auto" on a CPU-only machine: everything fits on "cpu", attach works as on a plain model."""
    plain, path = saved("llama", tmp_path)
    placed = transformers.AutoModelForCausalLM.from_pretrained(path, device_map="auto").eval()
    assert {p.device for p in placed.parameters()} == {CPU}
    assert _execution_device(placed, resolve(placed, 1).name) == CPU
    sae, sae_ref = sae_for(plain), sae_for(plain)
    with attach(plain, {1: sae_ref}) as h, h.steer({1: {5: 8.0}}):
        ref = plain(ids).logits
    with attach(placed, {1: sae}) as h, h.steer({1: {5: 8.0}}):
        got = placed(ids).logits
    torch.testing.assert_close(got, ref, **TOL)


def test_execution_device_of_offloaded_modules(tmp_path):
    """cpu_offload hooks only the modules that own parameters (not the decoder layer itself), and wraps
    the root's hooks in a SequentialHook; dispatch_model hooks the mapped blocks. Either way the
    hookpoint's execution device is found, every weight of it being on meta."""
    off = accelerate.cpu_offload(tiny_model("llama"), execution_device="cpu")
    assert not hasattr(off.model.layers[1], "_hf_hook")
    for name in ("model.layers.1", "model.layers.1.mlp", "model.layers.1.self_attn.q_proj", "lm_head", ""):
        assert _execution_device(off, name) == CPU, name
    plain = tiny_model("gpt2")
    disp = accelerate.dispatch_model(tiny_model("gpt2"), device_map=device_map_with_disk(plain, disk=(0, 1, 2)),
                                     offload_dir=tmp_path)
    assert {p.device.type for p in disp.transformer.h.parameters()} == {"meta"}
    for name in ("transformer.h.0", "transformer.h.2.attn.c_attn", "transformer.h"):
        assert _execution_device(disp, name) == CPU, name
    # with attach the autoencoder is placed there (a fresh one lives on cpu; it must not go to meta)
    sae = sae_for(plain)
    with attach(disp, {2: sae}):
        assert sae.W_enc.device == CPU
