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
