"""Top-activating examples (exact against brute force), logit effects, and N2G explanations of a planted latent."""

import pytest
import torch
from conftest import tiny_model

from saehook import TopKSAE, attach
from saehook.evaluate import position_masks
from saehook.examples import final_norm, logit_effects, top_examples, top_tokens
from saehook.explain import WILDCARD, Trie, explain, pattern_text

TOK, PLANTED = 7, 5  # the planted latent fires exactly where token TOK appears


def planted_sae(model, n_latents: int = 64, k: int = 4, seed: int = 0) -> TopKSAE:
    """An autoencoder for ``model.embed_tokens`` whose latent PLANTED is aligned with the embedding of TOK, with
    a bias halfway between TOK's projection and the largest projection of any other token: it is > 0 on TOK
    only, and the largest pre-activation there."""
    E = model.get_input_embeddings().weight
    torch.manual_seed(seed)
    sae = TopKSAE(E.shape[1], n_latents, k)
    with torch.no_grad():
        sae.W_enc.mul_(0.1)
        u = E[TOK] / E[TOK].norm()
        proj = E @ u
        others = torch.cat([proj[:TOK], proj[TOK + 1:]]).max()
        sae.W_enc[PLANTED] = 10 * u
        sae.b_enc[PLANTED] = -10 * (others + proj[TOK]) / 2
    sae.metadata["hookpoint"] = "model.embed_tokens"
    return sae


def token_batches(seed: int, n: int, rows: int = 4, length: int = 32, p: float = 0.05) -> list:
    """Random ids with BOS at position 0 and TOK at about a fraction p of the positions."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 128, (rows, length), generator=g)
        ids[torch.rand(ids.shape, generator=g) < p] = TOK
        ids[:, 0] = 1
        out.append(ids)
    return out


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def dense_codes(model, key, sae, batch: dict) -> torch.Tensor:
    with attach(model, {key: sae}) as h:
        model(**batch)
        c = h.latents[key]
    return torch.zeros(*c.indices.shape[:-1], sae.n_latents).scatter(-1, c.indices, c.values)


def test_top_examples_match_brute_force(llama):
    torch.manual_seed(0)
    sae = TopKSAE(32, 48, 4)
    g = torch.Generator().manual_seed(1)
    batches = []
    for i in range(5):  # left padding in some rows: padded positions are never examples
        ids = torch.randint(3, 128, (3, 20), generator=g)
        mask = torch.ones_like(ids)
        mask[0, : 2 + i] = 0
        ids[0, : 2 + i] = 0
        batches.append({"input_ids": ids, "attention_mask": mask,
                        "position_ids": (mask.cumsum(-1) - 1).clamp_min(0)})
    n, left, right = 6, 4, 2
    ex = top_examples(llama, {1: sae}, batches, tokens=10**6, n_examples=n, context=(left, right))[1]
    dense, ids_all, ev_all = [], [], []
    for b in batches:
        evaluated, _ = position_masks(b, 1)
        dense.append(dense_codes(llama, 1, sae, b))
        ids_all.append(torch.where(b["attention_mask"].bool(), b["input_ids"], -1))
        ev_all.append(evaluated)
    D, ids, ev = torch.cat(dense), torch.cat(ids_all), torch.cat(ev_all)  # rows in source order
    flat = D[ev]  # [N, n_latents] over evaluated positions
    assert ex.n_tokens == len(flat) and ex.n_rows == len(ids)
    want = flat.topk(n, dim=0).values.T
    assert torch.equal(ex.values, want)  # exact top-n per latent (0 = empty slot)
    assert torch.allclose(ex.density, (flat > 0).float().mean(0))
    fires = (flat > 0).sum(0)
    mean = flat.sum(0) / fires.clamp_min(1)
    assert torch.allclose(ex.mean_activation, mean, atol=1e-6)
    # every filled slot points at its token, and the context is the right slice of the row
    for lat in range(48):
        for e, item in enumerate(ex.examples(lat)):
            w, p = int(ex.windows[lat, e]), int(ex.positions[lat, e])
            assert D[w, p, lat] == item["value"] and ev[w, p]
            for o in range(-left, right + 1):
                q = p + o
                tok = int(ex.tokens[lat, e, left + o])
                assert tok == (int(ids[w, q]) if 0 <= q < ids.shape[1] else -1)
                act = float(ex.acts[lat, e, left + o])
                assert act == (float(D[w, q, lat]) if 0 <= q < ids.shape[1] and ev[w, q] else 0.0)
    # tracking a subset gives the same rows for those latents
    sub = top_examples(llama, {1: sae}, batches, tokens=10**6, n_examples=n, context=(left, right),
                       latents=[3, 40])[1]
    assert sub.latents.tolist() == [3, 40] and torch.equal(sub.values, ex.values[[3, 40]])
    assert torch.equal(sub.tokens, ex.tokens[[3, 40]]) and sub.row(40) == 1
    with pytest.raises(KeyError, match="not tracked"):
        sub.row(4)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_logit_effects_equal_brute_force(arch):
    model = tiny_model(arch)
    torch.manual_seed(0)
    sae = TopKSAE(32, 16, 4)
    sae.input_scale.fill_(2.5)
    lats = [0, 3, 9]
    got = logit_effects(model, sae, lats)
    norm = final_norm(model)
    d = sae.W_dec[lats] / 2.5
    if isinstance(norm, torch.nn.LayerNorm):
        d = d - d.mean(-1, keepdim=True)
    want = (d * norm.weight) @ model.get_output_embeddings().weight.T
    assert got.shape == (3, 128) and torch.allclose(got, want, atol=1e-5)
    raw = logit_effects(model, sae, lats, through_norm=False)
    assert torch.allclose(raw, (sae.W_dec[lats] / 2.5) @ model.get_output_embeddings().weight.T, atol=1e-5)
    tops = top_tokens(got, None, k=10)
    assert tops[1]["promoted"][0] == (f"<{int(got[1].argmax())}>", pytest.approx(float(got[1].max())))
    assert tops[1]["suppressed"][0] == (f"<{int(got[1].argmin())}>", pytest.approx(float(got[1].min())))
    assert len(tops[2]["promoted"]) == 10


def test_trie_predicts_backward_patterns_with_wildcards():
    trie = Trie()
    trie.insert((5,), 1.0)              # fires on 5
    trie.insert((9, WILDCARD, 4), 0.4)  # "4 * 9": fires on 9 two tokens after a 4
    trie.insert((9, WILDCARD, 4), 0.3)
    ids = torch.tensor([[4, 1, 9, 5, 9, -1], [-1, 4, 9, 9, 4, 8]])
    pred = trie.predict(ids)
    assert torch.allclose(pred, torch.tensor([[0, 0, 0.4, 1, 0, 0], [0, 0, 0, 0.4, 0, 0]]))
    assert [(p, a, c) for p, a, c in trie.patterns()] == [((5,), 1.0, 1), ((9, WILDCARD, 4), 0.4, 2)]
    assert pattern_text((9, WILDCARD, 4)) == "'<4>' * ['<9>']"


def test_planted_latent_is_explained_and_scores_near_one(llama):
    sae = planted_sae(llama)
    saes = {"model.embed_tokens": sae}
    examples_text, held_out = token_batches(0, 6), token_batches(1, 6)
    ex = top_examples(llama, saes, examples_text, tokens=10**6, n_examples=10)
    assert (ex["model.embed_tokens"].tokens[PLANTED, :, 16] == TOK).all()  # every top example is on TOK
    rep = explain(llama, saes, ex, held_out, tokens=10**6, latents=[PLANTED])
    e = rep["model.embed_tokens"][PLANTED]
    assert [p for p, _, _ in e.trie.patterns()] == [(TOK,)]  # the explanation is "the token TOK"
    assert all(x["suffix"] == [TOK] and x["reached"] for x in e.examples)
    assert e.counts["fires"] > 20
    assert e.precision >= 0.95 and e.recall >= 0.95 and e.f1 >= 0.95
    assert e.precision_any >= 0.95 and e.recall_any >= 0.95
    # the same text as the examples, after the rows they came from
    rep2 = explain(llama, saes, ex, examples_text + held_out, tokens=10**6, latents=[PLANTED],
                   skip_rows=ex["model.embed_tokens"].n_rows)
    assert rep2["model.embed_tokens"][PLANTED].counts == e.counts
    assert rep.summary("model.embed_tokens")["recall"] == e.recall
    # one autoencoder is keyed by its metadata's hookpoint
    single = top_examples(llama, sae, examples_text, tokens=10**6, n_examples=10)
    assert list(single) == ["model.embed_tokens"]
    assert torch.equal(single["model.embed_tokens"].values, ex["model.embed_tokens"].values)


def test_random_latents_score_lower(llama):
    torch.manual_seed(1)
    saes = {2: TopKSAE(32, 64, 4), "model.embed_tokens": planted_sae(llama)}
    ex = top_examples(llama, saes, token_batches(0, 6), tokens=10**6, n_examples=10)
    rep = explain(llama, saes, ex, token_batches(1, 6), tokens=10**6,
                  latents={2: None, "model.embed_tokens": [PLANTED]}, n_latents=12)
    assert len(rep[2]) == 12
    random_f1 = rep.summary(2)["f1"]
    planted_f1 = rep.summary("model.embed_tokens")["f1"]
    assert planted_f1 >= 0.95 and random_f1 < 0.8, (planted_f1, random_f1)
    for e in rep[2].values():  # every pattern of a contextual latent ends at the activating token
        for p, a, c in e.trie.patterns():
            assert p[0] != WILDCARD or len(p) > 1
            assert p[-1] != WILDCARD and 0 < a <= 1 and c >= 1
