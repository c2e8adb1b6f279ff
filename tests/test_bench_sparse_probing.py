"""saehook.bench.sparse_probing: the probe math on planted features, and a planted topic latent on a tiny model."""

import random

import pytest
import torch

from saehook import TopKSAE
from saehook.bench.activations import token_activations
from saehook.bench.sparse_probing import (
    SparseProbingConfig,
    balanced_task,
    fit_logistic,
    probe_accuracies,
    rank_by_mean_diff,
    run,
)


def test_fit_logistic_matches_the_l2_optimum():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 3, generator=g)
    y = (x @ torch.tensor([2.0, -1.0, 0.0]) + 0.3 * torch.randn(200, generator=g) > 0).float()
    w, b = fit_logistic(x, y, C=1.0)
    z = x.double() @ w + b  # gradient of ||w||^2/2 + C sum BCE is 0 at the optimum
    r = torch.sigmoid(z) - y.double()
    assert (w + x.double().T @ r).abs().max() < 1e-4 and r.sum().abs() < 1e-4
    assert w[0] > 1.0 and w[1] < -0.5


def test_balanced_task_as_saebench_draws_it():
    labels = ["a"] * 12 + ["b"] * 30 + ["c"] * 30 + ["d"] * 2
    idx, y = balanced_task(labels, "a", random.Random(0))
    assert y.sum() == 12 and len(y) == 24 and len(set(idx)) == 24
    neg = [labels[i] for i in idx[12:]]
    assert neg.count("d") == 2 and neg.count("b") + neg.count("c") == 10  # ceil(12 / 3) = 4 each, d has 2: topped up


def test_planted_feature_wins_top_1_and_noise_is_chance():
    g = torch.Generator().manual_seed(0)
    labels = [c for c in "abc" for _ in range(60)]
    y = torch.tensor([c == "a" for c in labels]).float()
    x = torch.randn(180, 40, generator=g)
    x[:, 7] += 3 * y  # feature 7 separates label a
    order = rank_by_mean_diff(x, y)
    assert int(order[0]) == 7
    tr = [i for i in range(180) if i % 5]
    te = [i for i in range(180) if i % 5 == 0]
    res = probe_accuracies(x[tr], [labels[i] for i in tr], x[te], [labels[i] for i in te], k_values=(1, 5))
    a = res["tasks"]["a"]
    assert a["top_features"][0] == 7 and a["top_1_test_accuracy"] > 0.9
    noise = probe_accuracies(torch.randn(180, 40, generator=g)[tr], [labels[i] for i in tr],
                             torch.randn(36, 40, generator=g), [labels[i] for i in te], k_values=(1,))
    assert abs(noise["top_1_test_accuracy"] - 0.5) < 0.15  # mean of the three tasks on pure noise


def _topic_model(alpha=0.06):
    """A random 2-layer Llama (hidden 64) whose tokens 3..64 (the topic's words) share a direction ``v``: their
    embeddings move by ``alpha v`` (3 times an embedding entry's standard deviation, 0.02)."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval().requires_grad_(False)
    v = torch.randn(64)
    model.model.embed_tokens.weight[3:65] += alpha * v / v.norm()
    return model


def _topic_docs(n=60, length=6, seed=0):
    """Label ``a``: tokens 3..64 (the topic's); labels ``b`` / ``c``: tokens 65..127; a BOS first."""
    g = torch.Generator().manual_seed(seed)
    docs = []
    for c in "abc":
        lo, hi = (3, 65) if c == "a" else (65, 128)
        docs += [([1] + torch.randint(lo, hi, (length,), generator=g).tolist(), c) for _ in range(n)]
    return docs


def _planted_and_random(model, docs):
    """A dictionary whose latent 0 is the direction separating label a's documents (mean-pooled layer-0
    activations, its threshold half-way), and the random dictionary it was built from (64 latents, k = 4)."""
    acts = token_activations(model, [0], [d for d, _ in docs], progress=False)[0]
    pooled = acts.pooled("mean", 1)
    is_a = torch.tensor([c == "a" for _, c in docs])
    u = pooled[is_a].mean(0) - pooled[~is_a].mean(0)
    mid = 0.5 * (pooled[is_a].mean(0) + pooled[~is_a].mean(0)) @ (u / u.norm())
    torch.manual_seed(0)
    random_sae = TopKSAE(64, 64, 4)
    planted = TopKSAE(64, 64, 4)
    with torch.no_grad():
        planted.W_enc.copy_(random_sae.W_enc)
        planted.W_enc[0] = 50 * u / u.norm()
        planted.b_enc[0] = -50 * mid
    return planted, random_sae


def test_planted_topic_latent_wins_at_k_1_on_a_tiny_model():
    model = _topic_model()
    docs = _topic_docs()
    planted, random_sae = _planted_and_random(model, docs)

    config = SparseProbingConfig(k_values=(1, 5), test_fraction=0.25)
    res = {name: run(model, None, {0: sae}, config=config, documents=docs, progress=False)[0]
           for name, sae in [("planted", planted), ("random", random_sae)]}
    p = res["planted"]["eval_result_details"][0]["saehook_tasks"]["a"]
    r = res["random"]["eval_result_details"][0]["saehook_tasks"]["a"]
    assert p["saehook_top_latents"][0] == 0
    assert p["sae_top_1_test_accuracy"] >= 0.95, p  # measured 1.0
    assert r["sae_top_1_test_accuracy"] <= 0.7, r  # measured 0.57: near chance
    assert p["sae_test_accuracy"] >= 0.95 and p["llm_test_accuracy"] >= 0.95  # the full probes see it too
    m = res["planted"]["eval_result_metrics"]
    assert res["planted"]["eval_type_id"] == "sparse_probing"
    assert set(m["llm"]) == {"llm_test_accuracy", "llm_top_1_test_accuracy", "llm_top_5_test_accuracy"}
    assert set(m["sae"]) == {"sae_test_accuracy", "sae_top_1_test_accuracy", "sae_top_5_test_accuracy"}
    assert m["llm"]["llm_test_accuracy"] == res["random"]["eval_result_metrics"]["llm"]["llm_test_accuracy"]


def _word_tokenizer():
    """A word-level tokenizer: w0..w123 are ids 4..127 (<pad> 0, <s> 1, </s> 2, <unk> 3)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(124)]
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


def test_run_suite_writes_saebench_json_plots_and_the_cli_runs_it(tmp_path, capsys):
    import json

    import saehook
    from saehook.bench import parse_suites, run_suite
    from saehook.bench.results import plot_against_l0, read_results
    from saehook.cli import main

    model, tok = _topic_model(), _word_tokenizer()
    docs = _topic_docs()
    labelled = tmp_path / "topics.jsonl"  # the same documents as text: id i is word w(i - 4)
    labelled.write_text("\n".join(json.dumps({"text": " ".join(f"w{i - 4}" for i in ids[1:]), "label": c})
                                   for ids, c in docs))
    assert tok(" ".join(f"w{i - 4}" for i in docs[0][0][1:]), add_special_tokens=False)["input_ids"] == docs[0][0][1:]
    planted, random_sae = _planted_and_random(model, docs)
    config = {"sparse_probing": SparseProbingConfig(source=str(labelled), k_values=(1, 2), test_fraction=0.25)}
    records = {}
    for name, sae in [("planted", planted), ("random", random_sae)]:
        res = run_suite(model, {0: sae}, "sparse_probing", tokenizer=tok, out=tmp_path / "bench", name=name,
                        configs=config, progress=False)
        records[name] = res["sparse_probing"][0]
    assert len(list((tmp_path / "bench" / "cache").glob("sparse_probing-topics-*"))) == 1  # collected once
    written = read_results(tmp_path / "bench", "sparse_probing")
    assert sorted(written) == ["planted_layer0", "random_layer0"]
    rec = written["planted_layer0"]
    for field in ("eval_type_id", "eval_config", "eval_id", "datetime_epoch_millis", "eval_result_metrics",
                  "eval_result_details", "sae_bench_commit_hash", "sae_cfg_dict"):
        assert field in rec
    assert rec["sae_cfg_dict"]["d_sae"] == 64 and rec["eval_result_details"][0]["dataset_name"] == "topics"
    assert rec["eval_result_details"][0]["saehook_tasks"]["a"]["sae_top_1_test_accuracy"] >= 0.95
    assert 0 < rec["saehook_l0"] <= 4
    png = plot_against_l0(written, "sae_top_1_test_accuracy", tmp_path / "probe.png")
    assert png.stat().st_size > 1000
    png = plot_against_l0(written, "sae_top_1_test_accuracy", tmp_path / "probe-grouped.png",
                          groups={"planted_layer0": "family", "random_layer0": "family"})
    assert png.stat().st_size > 1000
    with pytest.raises(ValueError, match="unknown benchmark suite"):
        parse_suites("sparse_probing,bogus")

    run = tmp_path / "run"  # the command line on a saved model and autoencoder
    model.save_pretrained(run / "model")
    tok.save_pretrained(run / "model")
    planted.metadata["hookpoint"] = "model.layers.0"
    planted.save(run / "model.layers.0")
    assert main(["eval", "--sae", str(run / "model.layers.0"), "--model", str(run / "model"), "--suite",
                 "sparse_probing", "--labelled", str(labelled), "--max-documents-per-label", "50",
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "sparse_probing model.layers.0" in printed and "sae_top_1_test_accuracy" in printed
    (cli_rec,) = read_results(run / "saebench", "sparse_probing").values()
    assert cli_rec["saehook_hookpoint"] == "model.layers.0" and cli_rec["eval_config"]["max_documents_per_label"] == 50
    assert cli_rec["eval_result_details"][0]["saehook_tasks"]["a"]["saehook_top_latents"][0] == 0
    assert not (run / "report.json").exists()  # --suite without core: no core report
    assert isinstance(saehook.TopKSAE.load(run / "model.layers.0"), saehook.TopKSAE)


def test_max_documents_per_label_collects_only_the_documents_kept(tmp_path):
    import json

    model, docs = _topic_model(), _topic_docs()
    config = SparseProbingConfig(k_values=(1,), max_documents_per_label=20, test_fraction=0.25)
    res = run(model, None, {0: TopKSAE(64, 32, 4)}, config=config, documents=docs, progress=False,
              cache_dir=tmp_path)[0]
    task = res["eval_result_details"][0]["saehook_tasks"]["a"]
    assert (task["saehook_train_docs"], task["saehook_test_docs"]) == (30, 10)  # 15 + 15 train, 5 + 5 test
    (meta,) = tmp_path.glob("*/meta.json")
    assert json.loads(meta.read_text())["documents"] == 60  # 3 labels x 20, not all 180
