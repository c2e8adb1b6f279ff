"""The folder name of a hookpoint and its inverse are defined once, in saehook.hookpoints."""

from pathlib import Path

import pytest
from conftest import tiny_model

import saehook.dashboard
import saehook.formats.detect
import saehook.hub
import saehook.session
from saehook.hookpoints import hookpoint_dirname, hookpoint_of_dirname, resolve, saved_key


@pytest.mark.parametrize("key", [1, "model.layers.0.mlp", "lm_head:input", "model.norm:input"])
def test_folder_name_round_trips_to_the_hookpoint(key):
    model = tiny_model("llama")
    hp = resolve(model, key)
    name = hookpoint_dirname(hp)
    assert "/" not in name and ":" not in name
    assert hookpoint_of_dirname(name) == str(hp)
    assert saved_key(Path("runs/x") / name, {}) == str(hp)
    assert saved_key(Path("runs/x") / name, {"hookpoint": "model.layers.2"}) == "model.layers.2"  # metadata wins
    back = resolve(model, hookpoint_of_dirname(name))
    assert (back.module, back.site) == (hp.module, hp.site)


def test_every_user_shares_the_one_definition():
    for module in (saehook.session, saehook.formats.detect, saehook.hub, saehook.dashboard):
        assert module.hookpoint_dirname is hookpoint_dirname, module.__name__
    assert saehook.dashboard.saved_key is saved_key


def test_paths_inside_the_base_model_resolve_as_sparsify_names_them(tmp_path):
    """sparsify saves `layers.20/` for `model.layers.20` (its hookpoints are paths in model.base_model): such a
    key resolves to the full path, and a sparsify folder of that name attaches and splices (it did not)."""
    import torch

    import saehook
    from saehook.formats.sparsify import save_sparsify

    model = tiny_model("llama")
    hp = resolve(model, "layers.1")
    assert (hp.name, hp.layer, hp.width) == ("model.layers.1", 1, model.config.hidden_size)
    assert resolve(model, "layers.1.mlp").name == "model.layers.1.mlp"
    with pytest.raises(KeyError, match="no module named 'layers.9'"):
        resolve(model, "layers.9")
    sae = saehook.TopKSAE(model.config.hidden_size, 64, 4)
    save_sparsify(sae, tmp_path / "run" / "layers.1")
    loaded = saehook.load(tmp_path / "run" / "layers.1")
    assert saved_key(tmp_path / "run" / "layers.1", loaded.metadata) == "layers.1"
    ids = torch.randint(0, model.config.vocab_size, (1, 6))
    with saehook.attach(model, {"layers.1": loaded}) as hooked:
        hooked.run({"input_ids": ids})
        assert hooked.latents["layers.1"].indices.shape[-1] == 4
