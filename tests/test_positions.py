"""Positions mean the model's token positions however it is called (issue 15, kinds 1, 4 and 5).

Every test names the fault kind it guards; each compares with numbers computed without saehook's
position logic (a row run alone, Python's own indexing, a plain torch hook).
"""

import warnings

import numpy as np
import pytest
import torch
from conftest import VOCAB, tiny_model
from test_matrix import build

from saehook import TopKSAE, attach
from saehook.edits import check_positions

TOL = dict(atol=1e-5, rtol=1e-5)
GEN = dict(max_new_tokens=4, do_sample=False, min_new_tokens=4, output_logits=True, return_dict_in_generate=True)


def sae_for(seed=1):
    torch.manual_seed(seed)
    return TopKSAE(32, 64, 4)


def left_padded(lengths=(8, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(3, VOCAB, (n,), generator=g) for n in lengths]
    T = max(lengths)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, T - len(r):], mask[i, T - len(r):] = r, 1
    return rows, ids, mask


# ---------------------------------------------------------------------------------------------- kind 1
def test_left_padding_without_position_ids_edits_each_rows_own_positions():
    """Kind 1 (failed before: row 1 differed from row 1 alone by 0.5): a left-padded batch called without
    ``position_ids`` edits, in each row, the positions it edits in the row alone."""
    model, sae = tiny_model("llama"), sae_for()
    rows, ids, mask = left_padded()
    with attach(model, {1: sae}) as hooked, hooked.steer({1: {3: 6.0}}, positions=slice(0, 2)):
        both = model(ids, attention_mask=mask).logits
        alone = [model(r[None]).logits[0] for r in rows]
    for i, r in enumerate(rows):
        torch.testing.assert_close(both[i, -len(r):], alone[i], **TOL)
    assert (alone[1] - model(rows[1][None]).logits[0]).abs().max() > 1e-2  # the steer acts


@pytest.mark.parametrize("how", [{"use_cache": False}, {"prefill_chunk_size": 2}])
def test_generated_positions_without_cache_and_with_chunked_prefill(how):
    """Kind 1 (failed before: without the cache nothing was steered; with chunked prefill the prompt after
    the first chunk was): ``positions="generated"`` steers the same tokens as with the cache."""
    model, sae = tiny_model("llama"), sae_for()
    _, ids, mask = left_padded((6, 3))
    clean = model.generate(ids, attention_mask=mask, **GEN)
    with attach(model, {1: sae}) as hooked, hooked.steer({1: {3: 6.0}}, positions="generated"):
        cached = model.generate(ids, attention_mask=mask, **GEN)
        other = model.generate(ids, attention_mask=mask, **GEN, **how)
    torch.testing.assert_close(torch.stack(other.logits), torch.stack(cached.logits), **TOL)
    torch.testing.assert_close(other.logits[0], clean.logits[0], **TOL)  # the prompt is not steered
    assert (torch.stack(cached.logits[1:]) - torch.stack(clean.logits[1:])).abs().max() > 1e-2


@pytest.mark.parametrize("arch", ["gpt_neo", "bloom"])
def test_positions_under_the_cache_on_models_whose_layers_get_no_position_ids(arch):
    """Kind 1 (failed before: every decoding step looked like position 0): GPT-Neo's and Bloom's decoder
    layers receive no ``position_ids``; positions still follow the cache: a step at position 6 is 6."""
    model, sae = build(arch), sae_for()
    prompt = torch.randint(3, VOCAB, (1, 5), generator=torch.Generator().manual_seed(4))
    with attach(model, {1: sae}) as hooked, hooked.steer({1: {3: 6.0}}, positions=[6, 7]):
        out = model.generate(prompt, **GEN)
        full = model(out.sequences).logits[0, 4:-1]
    torch.testing.assert_close(torch.stack(out.logits, 1)[0], full, **TOL)
    clean = model(out.sequences).logits[0, 4:-1]
    assert (full[2:4] - clean[2:4]).abs().max() > 1e-2 and (full[:2] - clean[:2]).abs().max() < 1e-5


# ---------------------------------------------------------------------------------------------- kind 4
FORMS = [None, 0, 2, -2, -100, slice(1, 3), slice(-2, None), slice(None, -1), slice(-3, -1), slice(None, None, 2),
         slice(1, None, 3), slice(None, None, -1), slice(-1, 0, -2), slice(5, 1, -1), slice(-2, None, -1),
         [0, -1], (1,), [-1], [-5, 2], [], [10], np.int64(-1), torch.tensor(-2), [np.int64(1), np.int64(-2)],
         torch.tensor([0, -1]), np.array([1, -1]), np.array(-1), slice(np.int64(1), torch.tensor(3)), "generated"]


def expected(form, n: int) -> set[int]:
    """The positions Python's own indexing picks in a row of ``n`` tokens."""
    r = range(n)
    if form is None:
        return set(r)
    if isinstance(form, str):
        return set()  # a plain forward is a prompt: nothing is generated
    if isinstance(form, slice):
        return set(r[form])
    if getattr(form, "ndim", 1) == 0 or isinstance(form, int):
        return set(r[int(form):])  # an int i means positions[i:]
    return {r[int(i)] for i in form if -n <= int(i) < n}


@pytest.mark.parametrize("form", FORMS, ids=repr)
def test_every_form_of_positions_acts_as_python_indexing_reads(form):
    """Kind 4 (failed before: ``[-1]`` edited nothing, ``slice(-2, None)`` everything): each form of
    ``positions`` edits, in each row of a left-padded batch, the tokens Python's indexing of that row's
    real tokens picks (negative indices count from the row's end)."""
    model, sae = tiny_model("llama"), sae_for()
    rows, ids, mask = left_padded()
    layer = model.model.layers[1]
    seen = []
    with attach(model, {1: sae}) as hooked:
        h = layer.register_forward_hook(lambda m, a, out: seen.append(out.clone()))
        model(ids, attention_mask=mask)
        with hooked.steer({1: {3: 6.0}}, positions=form):
            model(ids, attention_mask=mask)
        h.remove()
    changed = (seen[1] - seen[0]).abs().amax(-1) > 1e-4  # [B, T]
    T = ids.shape[1]
    for i, r in enumerate(rows):
        got = {p for p in range(len(r)) if changed[i, T - len(r) + p]}
        assert got == expected(form, len(r)), (form, i)
        if form is not None:
            assert not changed[i, :T - len(r)].any()  # never the padding


@pytest.mark.parametrize("bad, error", [(slice(0, 4, 0), ValueError), ([1.0], TypeError), (True, TypeError),
                                        ([True], TypeError), ("prompt", ValueError), (slice(0.5, 2), TypeError),
                                        (torch.tensor([[1]]), TypeError), (1.0, TypeError), ({1: 2}, TypeError),
                                        (np.array([1.0]), TypeError), (np.bool_(True), TypeError),
                                        (torch.tensor([True]), TypeError), (b"\x01", TypeError)],
                         ids=repr)
def test_positions_that_cannot_act_as_they_read_are_refused(bad, error):
    """Kind 4: a ``positions`` value with no clear meaning raises when the context is entered."""
    with pytest.raises(error, match="positions"):
        check_positions(bad)
    model = tiny_model("llama")
    with attach(model, {1: sae_for()}) as hooked, pytest.raises(error):
        with hooked.steer({1: {3: 1.0}}, positions=bad):
            pass


def test_negative_positions_mean_the_prompts_end_however_generate_runs():
    """Kind 4: under ``generate`` negative positions count from the end of the prompt, so ``[-1]`` edits
    the last prompt token with the cache, without it and with chunked prefill alike."""
    model, sae = tiny_model("llama"), sae_for()
    _, ids, mask = left_padded((6, 3))
    outs = []
    with attach(model, {1: sae}) as hooked, hooked.splice(positions=[-1]):
        for how in ({}, {"use_cache": False}, {"prefill_chunk_size": 2}):
            outs.append(torch.stack(model.generate(ids, attention_mask=mask, **GEN, **how).logits))
    clean = torch.stack(model.generate(ids, attention_mask=mask, **GEN).logits)
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], **TOL)
    assert (outs[0] - clean).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------- kind 5
def test_an_edit_on_a_module_the_forward_never_runs_raises():
    """Kind 5 (failed before: clean logits under steer, silently): when the hooked layer was replaced after
    attach (as peft or a user may do), a forward under an edit raises and says why and what to do."""
    model = tiny_model("llama")
    with attach(model, {1: sae_for()}) as hooked:
        old = model.model.layers[1]
        model.model.layers[1] = torch.nn.Module.__new__(type(old))
        model.model.layers[1].__dict__.update(old.__dict__)
        model.model.layers[1]._forward_hooks = type(old._forward_hooks)()  # a copy without our hooks
        ids = torch.randint(3, VOCAB, (1, 6))
        model(ids)  # no edit active: nothing to warn about
        with hooked.steer({1: {3: 6.0}}), pytest.raises(RuntimeError, match=r"never ran .*replaced.*Attach again"):
            model(ids)
        with hooked.splice(), pytest.raises(RuntimeError, match="model.layers.1"):
            model.model(ids)  # the backbone called alone checks too
        model.model.layers[1] = old
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with hooked.steer({1: {3: 6.0}}):
                model(ids)  # reached again: fine


def test_an_edit_on_a_module_this_forward_skips_warns():
    """Kind 5: a module still in the model that a forward does not run (an MoE expert without tokens, an early
    exit; here the last layer of a model run with fewer layers) warns that the edit had no effect."""
    model = tiny_model("llama")
    ids = torch.randint(3, VOCAB, (1, 6))
    with attach(model, {2: sae_for()}) as hooked, hooked.steer({2: {3: 6.0}}):
        model.config.num_hidden_layers = 2  # Llama runs layers[:num_hidden_layers]: the third stays, unused
        try:
            with pytest.warns(RuntimeWarning, match=r"model.layers.2.*never ran it") as caught:
                model(ids)
        finally:
            model.config.num_hidden_layers = 3
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1  # once per forward


def test_latents_of_a_hookpoint_the_last_forward_skipped_are_not_kept():
    """Kind 5: ``hooked.latents[key]`` is the code of the most recent forward; a forward that skips the hookpoint
    leaves no older code there to be read as if it were this forward's."""
    model = tiny_model("llama")
    ids = torch.randint(3, VOCAB, (1, 6))
    with attach(model, {1: sae_for(), 2: sae_for(2)}) as hooked:
        model(ids)
        assert set(hooked.latents) == {1, 2}
        model.config.num_hidden_layers = 2
        try:
            model(ids[:, :4])
        finally:
            model.config.num_hidden_layers = 3
        assert set(hooked.latents) == {1} and hooked.latents[1].indices.shape[1] == 4
        run = hooked.run(ids[:, :3].expand(2, 3))  # stops after the deepest hookpoint, which is recorded too
        assert run.output is None
        assert {k: tuple(c.indices.shape) for k, c in hooked.latents.items()} == {1: (2, 3, 4), 2: (2, 3, 4)}


def test_attach_refuses_a_model_that_cannot_run_and_warns_about_a_compiled_one():
    """Kind 5: a model whose weights are all on the meta device (e.g. an nnsight LanguageModel not yet
    dispatched, which runs a newly loaded model) is refused at attach; a model compiled before attach warns
    that its compiled graphs may skip the hooks."""
    with torch.device("meta"):
        meta = tiny_model("llama")
    with pytest.raises(ValueError, match="meta device"):
        attach(meta, {1: sae_for()})
    model = tiny_model("llama")
    model.compile()  # lazy: nothing is compiled until a call
    with pytest.warns(UserWarning, match="torch.compile"):
        attach(model, {1: sae_for()}).detach()
    plain = tiny_model("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attach(plain, {1: sae_for()}).detach()
