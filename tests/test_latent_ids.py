"""Every form of latent id that reads as an integer acts as that integer; every other form is refused
with a one-sentence error naming the value (``steer`` / ``ablate`` of ``attach`` and of
:mod:`saehook.envoy`). Negative ids are refused: a latent id names a latent, it is not counted from the end.
"""

import numpy as np
import pytest
import torch
from conftest import tiny_model

import saehook.envoy as sev
from saehook import TopKSAE, attach
from saehook.edits import latent_ids

N = 64


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def sae():
    torch.manual_seed(1)
    return TopKSAE(32, N, 4)


ONE = {  # one latent, 5, written every way that reads as the integer 5
    "int": 5, "np.int64": np.int64(5), "np.int32": np.int32(5), "0-d tensor": torch.tensor(5),
    "0-d int32 tensor": torch.tensor(5, dtype=torch.int32), "0-d array": np.array(5),
}
MANY = {  # latents 5 and 9
    "list": [5, 9], "tuple": (5, 9), "1-d tensor": torch.tensor([5, 9]), "array": np.array([5, 9]),
    "list of np.int64": [np.int64(5), np.int64(9)], "list of 0-d tensors": [torch.tensor(5), torch.tensor(9)],
    "range": range(5, 10, 4),
}
REFUSED = {  # value -> (exception, message pattern)
    "True": (True, TypeError, r"latent id True is a bool"),
    "np.bool_": (np.bool_(True), TypeError, r"is a bool"),
    "bool tensor": (torch.tensor(True), TypeError, r"is a bool"),
    "5.0": (5.0, TypeError, r"latent id 5\.0 is not an integer"),
    "np.float64": (np.float64(5.0), TypeError, r"is not an integer"),
    "float tensor": (torch.tensor(5.0), TypeError, r"is not an integer"),
    "str": ("5", TypeError, r"is not an integer"),
    "negative": (-1, IndexError, r"latents \[-1\] out of range .*n_latents=64.*not counted from the end"),
    "too large": (64, IndexError, r"latents \[64\] out of range .*n_latents=64"),
}


@pytest.mark.parametrize("form", list(ONE))
def test_one_integer_like_id_is_that_integer(form):
    assert latent_ids(ONE[form], N, "ablate") == [5]
    assert latent_ids([ONE[form]], N, "ablate") == [5]


@pytest.mark.parametrize("form", list(MANY))
def test_sequences_of_ids(form):
    assert latent_ids(MANY[form], N, "ablate") == [5, 9]


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_ids_say_what_and_what_to_pass(case):
    value, exc, msg = REFUSED[case]
    with pytest.raises(exc, match=msg):
        latent_ids(value, N, "steer")
    with pytest.raises(exc, match=msg):
        latent_ids([3, value], N, "steer")
    if exc is TypeError:  # the sentence also says what to pass
        with pytest.raises(TypeError, match=r"pass an integer latent index"):
            latent_ids(value, N, "steer")


def test_other_shapes_and_repeats_are_refused():
    with pytest.raises(TypeError, match=r"1-d"):
        latent_ids(torch.tensor([[5, 9]]), N, "ablate")
    with pytest.raises(ValueError, match=r"latents \[5\] given more than once"):
        latent_ids([5, np.int64(5)], N, "ablate")  # ablating 5 twice would remove its share twice
    assert latent_ids([], N, "ablate") == []
    with pytest.raises(TypeError, match=r"latent id True is a bool"):
        latent_ids(torch.tensor([True, False]), N, "ablate")
    with pytest.raises(TypeError, match=r"latent id 5\.0 is not an integer"):
        latent_ids(np.array([5.0]), N, "ablate")
    assert latent_ids(torch.arange(N), N, "ablate") == list(range(N))


def logits(model, ids, sae, ctx):
    with attach(model, {1: sae}) as hooked, ctx(hooked):
        return model(ids).logits


@pytest.mark.parametrize("form", [f for f in ONE if f != "0-d array"])  # an array cannot be a dict key
@pytest.mark.parametrize("mode", ["add", "clamp"])
def test_steer_with_any_integer_like_id_equals_steer_with_the_int(llama, sae, ids, form, mode):
    ref = logits(llama, ids, sae, lambda h: h.steer({1: {5: 3.0}}, mode=mode))
    got = logits(llama, ids, sae, lambda h: h.steer({1: {ONE[form]: 3.0}}, mode=mode))
    assert torch.equal(got, ref)
    assert (ref - llama(ids).logits).abs().max() > 1e-3


@pytest.mark.parametrize("form", list(ONE) + list(MANY))
def test_ablate_with_any_form_equals_ablate_with_ints(llama, sae, ids, form):
    value = ONE.get(form, MANY.get(form))
    ref = logits(llama, ids, sae, lambda h: h.ablate({1: [5] if form in ONE else [5, 9]}))
    got = logits(llama, ids, sae, lambda h: h.ablate({1: value}))
    assert torch.equal(got, ref)


@pytest.mark.parametrize("case", list(REFUSED))
def test_hooked_steer_and_ablate_refuse_before_any_forward(llama, sae, case):
    value, exc, msg = REFUSED[case]
    with attach(llama, {1: sae}) as hooked:
        with pytest.raises(exc, match=msg):
            hooked.steer({1: {value: 1.0}})
        with pytest.raises(exc, match=msg):
            hooked.ablate({1: value})
        with pytest.raises(exc, match=msg):
            hooked.ablate({1: [value]})
        assert not hooked._edits


@pytest.mark.parametrize("form", [np.int64, torch.tensor])
def test_envoy_helpers_take_integer_like_ids(sae, form):
    """The nnsight helpers share the parser (an envoy stand-in: its ``.output`` is read and written)."""

    class Envoy:  # what saehook.envoy reads and writes: a module's output
        def __init__(self, output):
            self.output = output

    x = torch.randn(2, 12, 32)
    j = int(sae.encode(x).indices[0, 0, 0])  # active at the first token: ablating it changes the output
    for call in (lambda e, i: sev.steer(sae, e, {i: 3.0}), lambda e, i: sev.ablate(sae, e, i)):
        ref, got = Envoy(x), Envoy(x)
        call(ref, j)
        call(got, form(j))
        assert torch.equal(got.output, ref.output) and not torch.equal(got.output, x)
    for value, exc, msg in REFUSED.values():
        with pytest.raises(exc, match=msg):
            sev.ablate(sae, Envoy(x), value)
        with pytest.raises(exc, match=msg):
            sev.steer(sae, Envoy(x), {value: 1.0})


def test_top_examples_takes_integer_like_ids_and_refuses_the_rest(llama, sae, ids):
    from saehook.examples import top_examples

    def run(latents):
        return top_examples(llama, {1: sae}, [ids], tokens=10, n_examples=2, context=(1, 1), latents=latents)[1]

    ref = run([3, 9])
    got = run([np.int64(3), torch.tensor(9)])
    assert torch.equal(got.latents, ref.latents) and torch.equal(got.values, ref.values)
    assert torch.equal(run(torch.tensor([3, 9])).latents, ref.latents)
    for value, exc, msg in REFUSED.values():
        with pytest.raises(exc, match=msg):
            run([value])
