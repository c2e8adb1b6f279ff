"""saehook.bench.activations: per-document activations, their safetensors cache, resume, and pooling."""

import torch
from conftest import module_output, tiny_model

from saehook import TopKSAE
from saehook.bench.activations import Ragged, pooled_codes, token_activations


def _docs(n=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, 128, (int(torch.randint(2, 20, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def _chunks(tmp_path):
    return sorted(tmp_path.glob("*/chunk-*.safetensors"))


def test_values_equal_a_forward_hook_on_each_doc_alone_padding_excluded():
    model = tiny_model("llama", layers=2)
    docs = _docs()
    acts = token_activations(model, [0, "model.layers.1.mlp"], docs, batch_size=4, progress=False)
    assert set(acts) == {0, "model.layers.1.mlp"}
    assert len(acts[0]) == len(docs) and acts[0].values.shape == (sum(map(len, docs)), 32)
    assert acts[0].values.dtype == torch.float32
    for i in (0, 5, 10):  # batched with padding vs the document alone, through a plain forward hook
        ids = torch.tensor([docs[i]])
        (alone,) = module_output(model.model.layers[0], lambda ids=ids: model(ids))
        (mlp,) = module_output(model.model.layers[1].mlp, lambda ids=ids: model(ids))
        torch.testing.assert_close(acts[0].doc(i), alone[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(acts["model.layers.1.mlp"].doc(i), mlp[0], atol=1e-5, rtol=1e-5)


def test_cache_round_trip_resume_and_miss(tmp_path):
    model = tiny_model("llama", layers=2)
    docs = _docs()
    first = token_activations(model, [1], docs, cache_dir=tmp_path, tag="t", chunk_docs=4, progress=False)[1]
    files = _chunks(tmp_path)
    assert [f.name for f in files] == ["chunk-00000.safetensors", "chunk-00001.safetensors", "chunk-00002.safetensors"]
    stamps = [f.stat().st_mtime_ns for f in files]
    again = token_activations(model, [1], docs, cache_dir=tmp_path, tag="t", chunk_docs=4, progress=False)[1]
    assert [f.stat().st_mtime_ns for f in _chunks(tmp_path)] == stamps  # read, not rewritten
    assert torch.equal(again.values, first.values) and torch.equal(again.offsets, first.offsets)

    files[-1].unlink()  # a collection killed before its last chunk: resumed, the rest read back
    resumed = token_activations(model, [1], docs, cache_dir=tmp_path, tag="t", chunk_docs=4, progress=False)[1]
    assert [f.stat().st_mtime_ns for f in _chunks(tmp_path)[:2]] == stamps[:2]
    assert torch.equal(resumed.values, first.values) and torch.equal(resumed.offsets, first.offsets)

    changed = [list(d) for d in docs]
    changed[3][-1] = 5 if changed[3][-1] != 5 else 6  # one token differs: another folder, collected afresh
    other = token_activations(model, [1], changed, cache_dir=tmp_path, tag="t", chunk_docs=4, progress=False)[1]
    assert len(list(tmp_path.glob("t-*"))) == 2
    assert not torch.equal(other.doc(3), first.doc(3)) and torch.equal(other.doc(4), first.doc(4))

    other_model = tiny_model("llama", seed=1, layers=2)  # same config, other weights: not served from the cache
    token_activations(other_model, [1], docs, cache_dir=tmp_path, tag="t", chunk_docs=4, progress=False)
    assert len(list(tmp_path.glob("t-*"))) == 3


def test_pooling_and_pooled_codes():
    values = torch.tensor([[1.0, 0.0], [3.0, 2.0], [5.0, -4.0], [7.0, 1.0], [2.0, 2.0]])
    r = Ragged(values, torch.tensor([0, 3, 4, 5]))
    assert len(r) == 3 and torch.equal(r.doc(1), values[3:4])
    torch.testing.assert_close(r.pooled("mean", 1), torch.tensor([[4.0, -1.0], [0.0, 0.0], [0.0, 0.0]]))
    torch.testing.assert_close(r.pooled("max", 0), torch.tensor([[5.0, 2.0], [7.0, 1.0], [2.0, 2.0]]))

    torch.manual_seed(0)
    sae = TopKSAE(2, 6, 2)
    dense = torch.zeros(5, 6)
    codes = sae.encode(values)
    dense.scatter_(1, codes.indices, codes.values)
    torch.testing.assert_close(pooled_codes(sae, r, reduce="mean", skip_positions=1, batch_rows=2)[0],
                               dense[1:3].mean(0))
    torch.testing.assert_close(pooled_codes(sae, r, reduce="max", skip_positions=0, batch_rows=2)[0],
                               dense[0:3].amax(0).clamp_min(0))
    assert pooled_codes(sae, r, skip_positions=1)[1:].abs().sum() == 0  # one-token docs: nothing left after BOS
