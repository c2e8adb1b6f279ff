"""Autointerp detection scoring (saehook.bench.autointerp) on a tiny Llama with planted latents.

The hookpoint is the embedding's output, so a latent whose encoder row is a token's embedding (scaled, with a
negative bias) fires on exactly that token: latent 0 on "zebra", latent 1 on "quartz", the others never.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from conftest import tiny_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from saehook import TopKSAE
from saehook.bench import autointerp as ai
from saehook.bench.autointerp_examples import iw_windows, quiet_windows, top_windows, window_centers
from saehook.bench.autointerp_prompts import parse_explanation, scoring_prompt, split_scoring_prompt
from saehook.bench.judges import KeywordJudge, LocalLM, OpenAIChat, parse_yes

WORDS = ["<pad>", "<s>", "</s>", "<unk>", "Yes", "No", "zebra", "quartz", "never"] + [f"w{i}" for i in range(9, 128)]
ZEBRA, QUARTZ = WORDS.index("zebra"), WORDS.index("quartz")
HOOK = "model.embed_tokens"
CFG = dict(buffer=4, n_top_ex_for_generation=6, n_iw_sampled_ex_for_generation=0, n_top_ex_for_scoring=4,
           n_iw_sampled_ex_for_scoring=0, n_random_ex_for_scoring=4, max_tokens_in_explanation=8)


def make_tokenizer():
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


def make_docs(n=40, length=48, seed=0):
    """BOS + random filler words (ids 9..127); documents 0..29 hold one trigger (zebra in even, quartz in odd ones)
    at a position 8..39, the last 10 none."""
    g = torch.Generator().manual_seed(seed)
    docs = []
    for i in range(n):
        d = [1] + torch.randint(9, 128, (length - 1,), generator=g).tolist()
        if i < 30:
            d[8 + int(torch.randint(0, 32, (1,), generator=g))] = ZEBRA if i % 2 == 0 else QUARTZ
        docs.append(d)
    return docs


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("llama", layers=2)
    emb = model.model.embed_tokens.weight
    sae = TopKSAE(32, 6, k=1)
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.b_enc.fill_(-1.0)
        sae.b_dec.zero_()
        for j, t in enumerate([ZEBRA, QUARTZ]):  # pre-activation 1 - 0.5 on the trigger, ~ -0.5 +- 0.2 elsewhere
            sae.W_enc[j] = emb[t] / emb[t].pow(2).sum()
            sae.b_enc[j] = -0.5
    return model, make_tokenizer(), {HOOK: sae}


def test_planted_latents_fire_exactly_on_their_trigger(setup):
    model, tok, saes = setup
    docs = torch.tensor(make_docs())
    counts, a = ai.latent_codes(saes[HOOK], model.model.embed_tokens(docs.view(-1)), [0, 1])
    flat = docs.view(-1)
    assert torch.equal(a[:, 0] > 0, flat == ZEBRA) and torch.equal(a[:, 1] > 0, flat == QUARTZ)
    assert counts.tolist() == [15, 15, 0, 0, 0, 0]


def test_keyword_judge_scores_the_named_trigger_100_and_a_wrong_explanation_50(setup):
    model, tok, saes = setup
    judge = KeywordJudge()
    cfg = ai.AutoInterpConfig(dead_latent_threshold=10, **CFG)
    res = ai.run(model, tok, saes, config=cfg, docs=make_docs(), explainer=judge, scorer=judge, progress=False)[HOOK]
    assert res["eval_type_id"] == "autointerp"
    m = res["eval_result_metrics"]["autointerp"]
    assert m["autointerp_score"] == 1.0 and m["autointerp_std_dev"] == 0.0 and m["saehook_auroc"] == 1.0
    assert m["saehook_n_latents_scored"] == 2 and m["saehook_n_latents_skipped"] == 0  # the 4 dead ones not drawn
    per = res["eval_result_unstructured"]
    assert per["0"]["explanation"] == "the token 'zebra'" and per["1"]["explanation"] == "the token 'quartz'"
    for r in per.values():  # balanced: 4 active, 4 quiet windows, held out from the 6 explanation windows
        assert len(r["correct seqs"]) == 4 and len(r["saehook_examples"]) == 8
    json.dumps(res)  # JSON-ready

    wrong = ai.run(model, tok, saes, config=cfg, docs=make_docs(), explainer=judge, scorer=judge, progress=False,
                   explanations={0: "the token 'never'", 1: "the token 'zebra'"})[HOOK]
    wm = wrong["eval_result_metrics"]["autointerp"]
    assert wm["autointerp_score"] == 0.5  # always "no": the 4 quiet windows right, the 4 active ones wrong
    assert wm["saehook_true_positive_rate"] == 0.0 and wm["saehook_true_negative_rate"] == 1.0
    assert wm["saehook_auroc"] == 0.5  # all P(yes) = 0: ties


def test_local_lm_pipeline_end_to_end(setup):
    model, tok, saes = setup
    judge = LocalLM(tiny_model("llama", seed=1, layers=2), tok)
    cfg = ai.AutoInterpConfig(override_latents=(0, 1, 2), **CFG)
    res = ai.run(model, tok, saes, config=cfg, docs=make_docs(), explainer=judge, scorer=judge, progress=False)[HOOK]
    m = res["eval_result_metrics"]["autointerp"]
    assert m["saehook_n_latents_scored"] == 2 and m["saehook_n_latents_skipped"] == 1  # latent 2 never fires
    assert 0.0 <= m["autointerp_score"] <= 1.0 and 0.0 <= m["autointerp_std_dev"] <= 1.0
    for r in res["eval_result_unstructured"].values():
        assert isinstance(r["explanation"], str) and all(0.0 <= p <= 1.0 for p in r["saehook_p_yes"])
    # batched (right-padded) judgements equal one-at-a-time ones
    prompts = [scoring_prompt("the token 'zebra'", "w9 w10 zebra"), scoring_prompt("x", "w9 " * 30)]
    batched = judge.yes_probabilities(prompts)  # the shared system prompt through one key/value cache
    single = [judge.yes_probabilities([p])[0] for p in prompts]
    whole = LocalLM(judge.model, tok, prefix_cache=False).yes_probabilities(prompts)
    assert batched == pytest.approx(single, abs=1e-5) and batched == pytest.approx(whole, abs=1e-5)
    assert batched[0] != pytest.approx(batched[1], abs=1e-7)


class _Judge(BaseHTTPRequestHandler):
    """A real OpenAI-compatible endpoint: answers "Yes." when the example holds "zebra", "No." otherwise; 401 without
    the right key; sleeps for model "slow"; answers non-JSON for model "broken"."""

    seen: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append((self.path, self.headers.get("Authorization"), body))
        if self.headers.get("Authorization") != "Bearer sk-test":
            return self._send(401, b'{"error": "bad key"}')
        if body["model"] == "slow":
            time.sleep(1.0)
        if body["model"] == "broken":
            return self._send(200, b"<html>not json</html>")
        text = body["messages"][-1]["content"]
        answer = "Yes." if "Here is the example" in text and "zebra" in text.split("Here is the example")[1] else "No."
        self._send(200, json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]}).encode())

    def _send(self, code, data):
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        try:
            self.wfile.write(data)
        except BrokenPipeError:  # the client gave up (the timeout test)
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    finally:
        srv.shutdown()
        srv.server_close()


def test_openai_endpoint_round_trip(server, setup):
    _Judge.seen.clear()
    judge = OpenAIChat(server, "judge-1", "sk-test", timeout=5)
    assert judge.complete([{"role": "user", "content": "hi"}], 7) == "No."
    path, auth, body = _Judge.seen[-1]
    assert path == "/v1/chat/completions" and auth == "Bearer sk-test"
    assert body["model"] == "judge-1" and body["max_tokens"] == 7 and body["temperature"] == 0
    assert judge.yes_probabilities([scoring_prompt("z", "w9 zebra"), scoring_prompt("z", "w9 w10")]) == [1.0, 0.0]

    model, tok, saes = setup  # the whole metric through HTTP: the server's rule is the keyword rule for latent 0
    cfg = ai.AutoInterpConfig(override_latents=(0, 1), **CFG)
    res = ai.run(model, tok, saes, config=cfg, docs=make_docs(), explainer=judge, scorer=judge, progress=False,
                 explanations={0: "zebra", 1: "quartz"})[HOOK]
    per = res["eval_result_unstructured"]
    assert per["0"]["score"] == 1.0 and per["1"]["score"] == 0.5
    assert res["eval_config"]["saehook_scorer"] == f"openai:judge-1@{server}"

    with pytest.raises(RuntimeError, match="HTTP 401"):
        OpenAIChat(server, "judge-1", "wrong").complete([{"role": "user", "content": "hi"}], 3)
    with pytest.raises(RuntimeError, match="did not answer with a chat completion"):
        OpenAIChat(server, "broken", "sk-test").complete([{"role": "user", "content": "hi"}], 3)
    with pytest.raises(TimeoutError, match="did not answer within 0.2 s"):
        OpenAIChat(server, "slow", "sk-test", timeout=0.2).complete([{"role": "user", "content": "hi"}], 3)


def test_openai_errors_before_and_without_a_server(monkeypatch):
    monkeypatch.delenv("SAEHOOK_JUDGE_MODEL", raising=False)
    with pytest.raises(ValueError, match="needs a model name"):
        OpenAIChat("http://127.0.0.1:9/v1")
    with pytest.raises(ConnectionError, match="cannot reach http://127.0.0.1:9/v1/chat/completions"):
        OpenAIChat("http://127.0.0.1:9/v1", "m", timeout=2).complete([{"role": "user", "content": "hi"}], 3)
    monkeypatch.setenv("SAEHOOK_JUDGE_URL", "http://127.0.0.1:9/v1")  # how the CLI's autointerp reaches an endpoint
    monkeypatch.setenv("SAEHOOK_JUDGE_MODEL", "m")
    assert ai.make_judge(ai.AutoInterpConfig()).name == "openai:m@http://127.0.0.1:9/v1"
    assert ai.make_judge(ai.AutoInterpConfig(judge_model="x")).name == "openai:x@http://127.0.0.1:9/v1"


def test_window_sampling_on_planted_activations():
    offsets = torch.tensor([0, 10, 50])  # documents of 10 and 40 tokens
    valid = window_centers(offsets, 3)
    assert torch.nonzero(valid).squeeze(1).tolist() == [3, 4, 5, 6] + list(range(13, 47))
    a = torch.zeros(50)
    a[[4, 5, 14, 20, 24]] = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    assert top_windows(a, valid, 10, 3).tolist() == [4, 14, 20, 24]  # 5 lies within 3 of 4
    g = torch.Generator().manual_seed(0)
    draws = torch.cat([iw_windows(a, valid, 2, 3.5, g) for _ in range(300)])
    assert set(draws.tolist()) == {14, 20, 24}  # only 0 < a < 3.5
    freq = torch.bincount(draws, minlength=50).float() / len(draws)  # ∝ a²: 9 : 4 : 1 drawn two without replacement
    assert freq[14] > freq[20] > freq[24] > 0.05
    assert iw_windows(a, valid, 4, 3.5, g) is None
    quiet = quiet_windows(a, valid, 5, 3, 0.5, g)
    assert quiet is not None and all(q >= 28 and a[q - 3:q + 4].max() <= 0.5 for q in quiet.tolist())
    assert quiet_windows(a, valid, 50, 3, 0.5, g) is None


def test_rendering_prompts_and_parsing():
    tok = make_tokenizer()
    ids = tok.encode("w9 zebra w10", add_special_tokens=False)
    assert ai.render(tok, ids, [0.0, 2.0, 0.01], 0.02) == "w9<< zebra>> w10"
    assert ai.render(tok, ids) == "w9 zebra w10"
    assert parse_explanation("This neuron activates on the word 'zebra'.\nMore text") == "the word 'zebra'"
    assert split_scoring_prompt(scoring_prompt("a. b", "text\nx")) == ("a. b", "text\nx")
    assert parse_yes(' "Yes, it does') == 1.0 and parse_yes("No") == 0.0 and parse_yes("") == 0.0
    assert ai.detection_score([True, False, True, False], [0.9, 0.2, 0.4, 0.5]) == 0.75
    assert ai.detection_auroc([True, False, True, False], [0.9, 0.2, 0.4, 0.5]) == 0.75  # 0.4 < 0.5: 3 of 4 pairs
    assert ai.detection_auroc([True, False], [0.3, 0.3]) == 0.5 and ai.detection_auroc([True], [0.3]) is None
    with pytest.raises(ValueError, match="n_random_ex_for_scoring must be at least 1"):
        ai.AutoInterpConfig(n_random_ex_for_scoring=0)
    with pytest.raises(ValueError, match="distinct first tokens for yes"):
        raw = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
        LocalLM(tiny_model("llama", layers=1), PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>"))


def test_cli_flags_reach_the_autointerp_config(setup, tmp_path, capsys):
    """``saehook eval --suite autointerp --judge-url ... --judge-model ... --autointerp-latents/-docs`` builds the
    metric's config from its flags: the record names the endpoint's judge and the sizes asked for."""
    from saehook.bench.results import read_results
    from saehook.cli import main

    model, tok, saes = setup
    run = tmp_path / "run"
    model.save_pretrained(run / "model")
    tok.save_pretrained(run / "model")
    sae = saes[HOOK]
    sae.metadata["hookpoint"] = HOOK
    sae.save(run / HOOK)
    url = "http://127.0.0.1:9/v1"  # never called: BBC News is all <unk> to this tokenizer, so no latent fires
    assert main(["eval", "--sae", str(run / HOOK), "--model", str(run / "model"), "--suite", "autointerp",
                 "--judge-url", url, "--judge-model", "judge-1", "--autointerp-latents", "2", "--autointerp-docs", "12",
                 "--no-progress"]) == 0
    assert "autointerp model.embed_tokens" in capsys.readouterr().out
    (rec,) = read_results(run / "saebench", "autointerp").values()
    assert rec["eval_config"]["saehook_scorer"] == f"openai:judge-1@{url}"
    assert rec["eval_config"]["n_latents"] == 2 and rec["eval_config"]["n_docs"] == 12
