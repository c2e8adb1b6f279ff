"""Feature absorption (saehook.bench.absorption) against planted ground truth.

Synthetic first-letter activations: word ``w`` of letter ``c`` is ``x = 3 e_c + noise``; 30% of letter a's
words also carry a marker ``h`` and their own identity direction ``g_w``. A dictionary whose latent ``c`` is the
probe direction of letter ``c`` scores no absorption; one whose letter-a latent is switched off by ``h`` while a
word-specific latent (firing on ``g_w``, decoder row = letter a's probe direction) takes over scores letter a's
absorption at exactly the planted 30%.
"""

from __future__ import annotations

import math

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import saehook
from saehook.bench import absorption as ab
from saehook.bench.first_letter import LETTERS, alpha_words, first_letter_task
from saehook.bench.letter_probes import fit_balanced_logreg, train_letter_probe

N_OTHER, N_A, ABSORBED = 20, 100, 30  # words per letter and split; letter a's; letter a's absorbed words per split


def planted_words(seed: int = 0):
    """``(x_train, y_train, x_test, y_test, absorbed_train, absorbed_test, dims)``; ``dims`` names the directions."""
    g = torch.Generator().manual_seed(seed)
    n_id = 2 * ABSORBED
    d = 26 + 1 + n_id + 5
    h, ident = 26, list(range(27, 27 + n_id))
    splits, next_id = [], 0
    for _ in ("train", "test"):
        xs, ys, absorbed = [], [], []
        for c in range(26):
            n = N_A if c == 0 else N_OTHER
            x = 0.01 * torch.randn(n, d, generator=g)
            x[:, c] += 3.0
            flag = torch.zeros(n, dtype=torch.bool)
            if c == 0:
                for i in range(ABSORBED):
                    x[i, h] += 1.0
                    x[i, ident[next_id]] += 1.0
                    next_id += 1
                flag[:ABSORBED] = True
            xs.append(x), ys.append(torch.full((n,), c)), absorbed.append(flag)
        splits.append((torch.cat(xs), torch.cat(ys), torch.cat(absorbed)))
    (xtr, ytr, atr), (xte, yte, ate) = splits
    return xtr, ytr, xte, yte, atr, ate, {"h": h, "ident": ident, "d": d}


@pytest.fixture(scope="module")
def planted():
    xtr, ytr, xte, yte, atr, ate, dims = planted_words()
    probe = train_letter_probe(xtr, ytr, epochs=20)
    return xtr, ytr, xte, yte, ate, dims, probe


def letter_dictionary(probe, dims, absorbing: bool) -> saehook.TopKSAE:
    """Latent c = letter c's probe direction (encoder and decoder), k = 1. With ``absorbing``: letter a's latent
    is switched off by the marker ``h``, and one latent per marked word fires on its identity direction with
    letter a's probe direction as its decoder row."""
    u = probe[0] / probe[0].norm(dim=1, keepdim=True)
    extra = len(dims["ident"]) if absorbing else 0
    sae = saehook.TopKSAE(dims["d"], 26 + extra, k=1)
    with torch.no_grad():
        sae.W_enc.zero_(), sae.W_dec.zero_(), sae.b_enc.zero_(), sae.b_dec.zero_()
        sae.W_enc[:26], sae.W_dec[:26] = u, u
        if absorbing:
            sae.W_enc[0, dims["h"]] -= 10.0
            for j, col in enumerate(dims["ident"]):
                sae.W_enc[26 + j, col] = 5.0
                sae.W_dec[26 + j] = u[0]
    return sae


def test_clean_letter_latents_score_no_absorption(planted):
    xtr, ytr, xte, yte, _, dims, probe = planted
    out = ab.absorption_scores(xtr, ytr, xte, yte, letter_dictionary(probe, dims, absorbing=False), probe)
    mean = out["eval_result_metrics"]["mean"]
    assert len(out["eval_result_details"]) == 26
    assert mean["mean_absorption_fraction_score"] == 0.0
    assert mean["mean_full_absorption_score"] == 0.0
    assert mean["mean_num_split_features"] == 1.0  # each letter's main latent is its own, alone
    assert all(o["split_feats"] == [c] for c, o in enumerate(out["saehook_letters"]))


def test_planted_absorption_scores_the_fraction_built_in(planted):
    xtr, ytr, xte, yte, absorbed_test, dims, probe = planted
    out = ab.absorption_scores(xtr, ytr, xte, yte, letter_dictionary(probe, dims, absorbing=True), probe)
    by_letter = {d["first_letter"]: d for d in out["eval_result_details"]}
    a = by_letter["a"]
    assert a["num_probe_true_positives"] == N_A  # the probe finds every a-word
    assert out["saehook_letters"][0]["split_feats"] == [0]  # the absorbers cover one word each: no split
    assert a["mean_absorption_fraction"] == pytest.approx(ABSORBED / N_A, abs=0.01)  # 0.30 built in
    assert a["full_absorption_rate"] == pytest.approx(ABSORBED / N_A, abs=0.01)
    assert a["num_full_absorption"] == ABSORBED
    assert all(d["mean_absorption_fraction"] == 0.0 for k, d in by_letter.items() if k != "a")
    mean = out["eval_result_metrics"]["mean"]
    assert mean["mean_absorption_fraction_score"] == pytest.approx(ABSORBED / N_A / 26, abs=1e-3)
    assert mean["std_dev_absorption_fraction_score"] == pytest.approx(0.3 / math.sqrt(26), abs=2e-3)  # sample std


def test_word_absorption_partial_fraction_and_thresholds():
    # d = 2: probe along e0. Main latent 0 (decoder e0), absorber 1 (decoder e0), a misaligned latent 2.
    dec = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    u, main = torch.tensor([2.0, 0.0]), torch.tensor([0])
    x = torch.tensor([[4.0, 0.0]] * 4)
    values = torch.tensor([[1.0, 2.0], [3.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    indices = torch.tensor([[0, 1], [0, 1], [0, 2], [0, 1]])
    frac, full = ab.word_absorption(x, values, indices, u, dec, main)
    # row 0: M = 1, A = 2, P = 4 -> min(2, 3) / (2 + 1) = 2/3; row 1: A/P = 0 < 0.4 -> 0;
    # row 2: only a misaligned latent -> 0; row 3: A/P = 0.25 < 0.4 -> 0
    assert frac.tolist() == pytest.approx([2 / 3, 0.0, 0.0, 0.0])
    assert full.tolist() == [False, False, False, False]
    # the main latent silent and the absorber carrying >= 40% of P: full absorption, fraction 1
    frac, full = ab.word_absorption(x[:1], torch.tensor([[0.0, 2.0]]), torch.tensor([[0, 1]]), u, dec, main)
    assert frac.tolist() == [1.0] and full.tolist() == [True]


def test_main_latents_follow_the_f1_jump_rule():
    lat = [[5], [5, 7], [5, 7, 9], [5, 7, 9, 1]]
    assert ab.main_latents([0.50, 0.60, 0.62, 0.90], lat, 0.03) == [5, 7]  # +0.02 stops the walk
    assert ab.main_latents([0.9, 0.9, 0.9, 0.9], lat, 0.03) == [5]


def test_balanced_logreg_matches_its_optimality_conditions():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 200, 2, generator=g)
    y = (x[..., 0] + 0.5 * torch.randn(3, 200, generator=g)) > 0.8  # imbalanced
    w, b = fit_balanced_logreg(x, y)
    xd, yd = x.double(), y.double()
    n, npos = 200, yd.sum(1, keepdim=True)
    s = torch.where(y, n / (2 * npos), n / (2 * (n - npos)))
    r = s * (torch.sigmoid(torch.einsum("pnk,pk->pn", xd, w.double()) + b.double().unsqueeze(1)) - yd)
    assert torch.einsum("pn,pnk->pk", r, xd).add(w.double()).abs().max() < 1e-4  # grad wrt w: w + X^T r = 0
    assert r.sum(1).abs().max() < 1e-4  # grad wrt the intercept


# ---------------------------------------------------------------------------------------------- on a tiny model
def word_tokenizer() -> PreTrainedTokenizerFast:
    words = [f"{c}{v}" for c in LETTERS for v in ("ab", "ox")] + ["has", "the", "first", "letter", ":"]
    words += [c.upper() for c in LETTERS] + ["x1", "a-b"]  # two non-words the filter drops
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for w in words:
        vocab.setdefault(w, len(vocab))
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


def test_task_words_prompts_and_position():
    tok = word_tokenizer()
    words = alpha_words(tok)
    assert "x1" not in words and "a-b" not in words and "cab" in words and "has" in words
    task = first_letter_task(tok, seed=0)
    assert len(task.words) == len(words) and task.n_dropped == 0 and task.n_train == int(0.8 * len(words))
    for word, label, doc in zip(task.words, task.labels, task.docs):
        assert tok.convert_ids_to_tokens(doc[-1]) == word and LETTERS[label] == word[0].lower()
        assert len(doc) == 10 * 7 + 1  # ten answered examples ("cab has the first letter : C"), then the word
    text = tok.decode(task.docs[0])
    assert text.count("has the first letter :") == 10


def test_run_on_a_tiny_model(tmp_path):
    from conftest import tiny_model

    tok, model = word_tokenizer(), tiny_model("llama", layers=2)
    sae = saehook.TopKSAE(32, 64, k=4)
    cfg = ab.AbsorptionConfig(min_GT_probe_f1=-1.0, min_feats_for_eval=1, probe_num_epochs=5, max_k_value=3,
                              k_sparse_probe_num_epochs=5)
    out = ab.run(model, tok, {0: sae}, config=cfg, cache_dir=tmp_path, progress=False)[0]
    assert out["eval_type_id"] == "absorption_first_letter"
    assert out["eval_config"]["saehook_max_words"] == 5000 and out["eval_config"]["f1_jump_threshold"] == 0.03
    assert set(out["eval_result_metrics"]["mean"]) == {
        "mean_absorption_fraction_score", "mean_full_absorption_score", "mean_num_split_features",
        "std_dev_absorption_fraction_score", "std_dev_full_absorption_score", "std_dev_num_split_features"}
    for d in out["eval_result_details"]:
        assert 0.0 <= d["mean_absorption_fraction"] <= 1.0 and 1 <= d["num_split_features"] <= 3
    assert out["wall_seconds"] > 0 and out["saehook_words"]["dropped"] == 0
    # the activation read is the word's: the decoder layer 0 output at the prompt's word position
    task = first_letter_task(tok, seed=cfg.random_seed)
    acts = ab._word_activations(model, {0: sae}, task.docs[:3], cfg, tmp_path, False)[0]
    for i in range(3):
        with torch.no_grad():
            hs = model(torch.tensor([task.docs[i]]), output_hidden_states=True).hidden_states[1]
        torch.testing.assert_close(acts[i], hs[0, -1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="only 0 letters have a first-letter probe"):
        ab.run(model, tok, {0: sae}, config=ab.AbsorptionConfig(min_GT_probe_f1=1.0, probe_num_epochs=1,
                                                                  max_k_value=1, k_sparse_probe_num_epochs=1),
               cache_dir=tmp_path, progress=False)



def test_projections_are_in_the_activation_units():
    # input_scale 4: the codes are in normalised units (4x), decode divides by 4. x = 4 e0 is rebuilt exactly
    # from the main latent (1/4 of it) and an absorber (3/4). p_j in the activation's units gives the fraction
    # 0.75; SAEBench's a_j cos_j (meant for unscaled inputs) would give M = 4 >= P = 4, i.e. 0
    sae = saehook.TopKSAE(2, 3, k=2)
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[0.25, 0.0], [0.75, 0.0], [0.0, 1.0]]))
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
        sae.b_enc.zero_(), sae.b_dec.zero_(), sae.input_scale.fill_(4.0)
    x = torch.tensor([[4.0, 0.0]])
    torch.testing.assert_close(sae.decode(sae.encode(x)), x)
    frac, full = ab.sae_word_absorption(sae, x, torch.tensor([1.0, 0.0]), torch.tensor([0]))
    assert frac.tolist() == pytest.approx([0.75]) and full.tolist() == [False]
