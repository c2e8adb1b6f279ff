"""The static HTML dashboard: files, HTML escaping, the rendered DOM in headless Chromium (search included),
the `saehook dashboard` command, and the density plot."""

import json
import random
import re
import shutil
import subprocess
import urllib.parse

import pytest
import torch
from conftest import tiny_model
from test_explain import PLANTED, TOK, planted_sae, token_batches
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from saehook import TopKSAE
from saehook.cli import main
from saehook.dashboard import build_dashboard, load_saes
from saehook.examples import top_examples
from saehook.features import search_contexts
from saehook.plots import plot_density

EVIL = "<script>alert(1)</script>"  # the string of token TOK: it must be shown, never run


def make_tokenizer():
    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(4, 128)]
    words[TOK] = EVIL
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<pad>")
    return tok, words


def chromium_dom(url: str, tmp_path, wait_ms: int = 0) -> str:
    exe = shutil.which("chromium")
    if exe is None:
        pytest.fail("chromium is not installed: this test renders the dashboard in headless Chromium. Install it "
                    "with `apt-get install -y chromium` (Debian/Ubuntu; make test does this when it is missing)")
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", "--dump-dom", url]
    if wait_ms:  # let scripts the page loads (its data files) run before the DOM is dumped
        cmd.insert(-2, f"--virtual-time-budget={wait_ms}")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "<html" in res.stdout, res.stderr[-2000:]
    return res.stdout


def labelled():
    """16 documents of BOS + 20 random token ids; the 8 of label "a" contain the planted latent's token twice."""
    rng = random.Random(0)
    texts, labels = [], []
    for label in "ab":
        for _ in range(8):
            doc = [1] + [rng.randrange(8, 128) for _ in range(20)]
            if label == "a":
                doc[4] = doc[12] = TOK
            texts.append(doc)
            labels.append(label)
    return texts, labels


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory):
    out = tmp_path_factory.mktemp("dash")
    model = tiny_model("llama")
    tok, _ = make_tokenizer()
    torch.manual_seed(3)
    saes = {"model.embed_tokens": planted_sae(model), 1: TopKSAE(32, 64, 4)}
    index = build_dashboard(saes, out, model, tok, token_batches(0, 12), tokens=700, score_tokens=700,
                            n_latents_shown=6, n_explained=6, n_examples=8, context=(6, 2),
                            latents={"model.embed_tokens": [PLANTED, 11, 20]}, labels=labelled())
    return out, index, model, tok, saes


def test_files_and_summary(dashboard):
    out, index, *_ = dashboard
    assert index == out / "index.html" and index.is_file()
    for name in ("model.embed_tokens", "1"):
        assert (out / name / "density.png").stat().st_size > 1000
    pages = sorted(p.name for p in (out / "model.embed_tokens").glob("latent-*.html"))
    assert pages == ["latent-11.html", "latent-20.html", f"latent-{PLANTED}.html"]
    assert len(list((out / "1").glob("latent-*.html"))) == 6
    summary = json.loads((out / "summary.json").read_text())
    s = summary["hookpoints"]["model.embed_tokens"]
    assert s["shown"] == 3 and s["explained"] == 3 and s["tokens"] >= 700 and s["score_tokens"] >= 700
    assert 0 <= s["explainability"]["precision"] <= 1 and summary["hookpoints"]["1"]["explained"] == 6
    assert set(summary["timings"]) >= {"examples_s", "explain_s", "pages_s", "total_s"}
    for page in (out / "model.embed_tokens").glob("*.html"):  # self-contained: no external asset
        text = page.read_text()
        assert not re.search(r"(src|href)=['\"]?(https?:)?//", text)


def test_token_strings_are_escaped(dashboard):
    out, *_ = dashboard
    page = (out / "model.embed_tokens" / f"latent-{PLANTED}.html").read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and EVIL not in page
    assert "<script" not in page  # latent pages carry no script at all
    index = (out / "index.html").read_text()
    assert EVIL not in index and "alert(1)" in index  # inside the JSON index, as \u003cscript\u003e...
    assert "precision <b>1.000</b>, recall <b>1.000</b>" in page  # the planted latent, explained exactly


def test_latent_page_renders_in_chromium(dashboard, tmp_path):
    out, *_ = dashboard
    dom = chromium_dom((out / "model.embed_tokens" / f"latent-{PLANTED}.html").as_uri(), tmp_path)
    examples = dom.split('id="examples"', 1)[1]
    assert examples.count('class="ex"') == 8  # every top example is in the rendered page
    assert examples.count('class="t hit"') == 8 and "&lt;script&gt;alert(1)&lt;/script&gt;" in examples
    assert "<script>alert" not in dom  # the token became text, not an element
    assert "promoted" in dom and "suppressed" in dom


def rows(dom: str) -> list[tuple[str, str]]:
    return re.findall(r'<tr class="latent" data-key="([^"]*)" data-id="(\d+)"', dom)


def test_index_search_filters_in_chromium(dashboard, tmp_path):
    out, index, *_ = dashboard
    every = rows(chromium_dom(index.as_uri(), tmp_path))
    assert len(every) == 128  # every latent of both autoencoders, not only the 3 + 6 shown
    by_id = rows(chromium_dom(index.as_uri() + "?q=" + urllib.parse.quote(f"#{PLANTED}"), tmp_path))
    assert ("model.embed_tokens", str(PLANTED)) in by_id and {i for _, i in by_id} == {str(PLANTED)}
    by_token = rows(chromium_dom(index.as_uri() + "?q=script", tmp_path))  # top token of the planted latent
    assert ("model.embed_tokens", str(PLANTED)) in by_token and len(by_token) < len(every)
    assert rows(chromium_dom(index.as_uri() + "?q=no-such-thing", tmp_path)) == []


def index_data(index) -> dict:
    text = index.read_text()
    raw = text.split('<script id="latent-index" type="application/json">', 1)[1].split("</script>", 1)[0]
    return json.loads(raw)


def test_index_sorts_every_column_in_chromium(dashboard, tmp_path):
    """Rows follow the column asked for (?sort=...&order=..., as a click on its header sets): the rendered order
    equals the index's latents sorted in Python; the planted latent, fired only by label "a"'s token, has the
    highest label specificity and "a" as its top label."""
    out, index, *_ = dashboard
    latents = index_data(index)["latents"]
    assert len(latents) == 128
    for col, order in (("density", "desc"), ("density", "asc"), ("max", "desc"), ("specificity", "desc")):
        dom = chromium_dom(index.as_uri() + f"?sort={col}&order={order}", tmp_path)
        sign = -1 if order == "desc" else 1
        missing = float("inf") if order == "asc" else float("-inf")
        want = sorted(latents, key=lambda e: (sign * (e[col] if e[col] is not None else -missing), e["key"], e["id"]))
        assert rows(dom) == [(e["key"], str(e["id"])) for e in want], col
        assert f'data-sort="{col}" data-order="{order}"' in dom
    top = next(e for e in latents if e["key"] == "model.embed_tokens" and e["id"] == PLANTED)
    assert top["top_label"] == "a" and top["specificity"] == max(e["specificity"] or 0 for e in latents)
    # it fires, at one value v, on 2 of the 20 evaluated tokens of every "a" document and never on "b": Cohen's d
    # = (0.1 v - 0) / sqrt((0.09 v^2 + 0) / 2)
    assert top["specificity"] == pytest.approx(0.1 / 0.045 ** 0.5, abs=1e-4)
    first = rows(chromium_dom(index.as_uri() + "?sort=specificity&order=desc", tmp_path))[0]
    assert first == ("model.embed_tokens", str(PLANTED))


def test_phrase_search_matches_search_contexts_in_chromium(dashboard, tmp_path):
    """The page's phrase search over the top examples (loaded from the data files) finds the same latents, in the
    same order, with the same match counts, as saehook.features.search_contexts on the same examples."""
    out, index, model, tok, saes = dashboard
    exs = top_examples(model, saes, token_batches(0, 12), tokens=700, n_examples=8, context=(6, 2))
    for phrase in ("w1", "w4 w", "SCRIPT>ALERT"):
        want = search_contexts(exs, phrase, tok, top=None)
        assert want, phrase
        dom = chromium_dom(index.as_uri() + "?phrase=" + urllib.parse.quote(phrase), tmp_path, wait_ms=10_000)
        assert f'data-phrase="{html_attr(phrase)}"' in dom  # the search ran to its end
        assert rows(dom) == [(str(m.key), str(m.latent)) for m in want], phrase
        shown = re.findall(r'<td class="ctx">(\d+)/(\d+): ', dom)
        assert shown == [(str(m.hits), str(m.examples)) for m in want]
    planted = search_contexts(exs, "SCRIPT>ALERT", tok, top=1)[0]
    assert (planted.key, planted.latent, planted.hits) == ("model.embed_tokens", PLANTED, 8)


def html_attr(text: str) -> str:
    return text.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;").replace(">", "&gt;")


def test_every_latent_page_in_chromium(dashboard, tmp_path):
    """latent.html renders any latent from its data file: statistics, per-label rates, a histogram whose counts add
    up to the latent's firings, quantile examples, top examples."""
    out, index, *_ = dashboard
    latents = {(e["key"], e["id"]): e for e in index_data(index)["latents"]}
    dom = chromium_dom((out / "latent.html").as_uri() + f"?h=model.embed_tokens&id={PLANTED}", tmp_path, 10_000)
    assert 'data-ready="1"' in dom and f"Latent {PLANTED} at model.embed_tokens" in dom
    labels = re.findall(r"<tr><td>(a|b)</td><td class=\"num\">([\d.]+)%</td>", dom)
    assert [lab for lab, _ in labels] == ["a", "b"] and float(labels[1][1]) == 0 < float(labels[0][1])
    summary = json.loads((out / "summary.json").read_text())["hookpoints"]["model.embed_tokens"]
    bars = re.findall(r'title="(\d+) firings with activation', dom)
    assert len(bars) == 20
    assert sum(map(int, bars)) == round(latents[("model.embed_tokens", PLANTED)]["density"] * summary["tokens"])
    quant = dom.split('id="quantiles"', 1)[1].split("<h2>", 1)[0]
    assert quant.count("<h3>") == 4 and quant.count('class="t hit"') >= 4
    assert dom.split('id="examples"', 1)[1].count('class="ex"') == 8
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom and "<script>alert" not in dom
    dom = chromium_dom((out / "latent.html").as_uri() + "?h=1&id=63", tmp_path, 10_000)  # the other hookpoint's
    assert 'data-ready="1"' in dom and "Latent 63 at 1" in dom and 'id="examples"' in dom


def test_dashboard_command(tmp_path, capsys):
    model = tiny_model("llama")
    tok, words = make_tokenizer()
    path = tmp_path / "tiny"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    text = tmp_path / "text"
    text.mkdir()
    for d, ids in enumerate(token_batches(5, 1, rows=12, length=120)[0]):
        (text / f"{d}.txt").write_text(" ".join(words[i] for i in ids[1:]).replace(EVIL, "w9"))
    run = tmp_path / "run"
    planted_sae(model).save(run / "model.embed_tokens")
    assert list(load_saes(run)) == ["model.embed_tokens"]
    out = tmp_path / "dash"
    assert main(["dashboard", str(run), "--out", str(out), "--model", str(path), "--corpus", str(text),
                 "--holdout", "0.5", "--context", "32", "--tokens", "300", "--latents", "4", "--explain", "2",
                 "--examples", "5", "--batch-size", "2", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "model.embed_tokens" in printed and "precision" in printed and "index.html" in printed
    assert (out / "index.html").is_file() and len(list((out / "model.embed_tokens").glob("latent-*.html"))) == 4


def test_plot_density(tmp_path):
    density = torch.cat([torch.zeros(5), torch.logspace(-4, -1, 40)])
    png = plot_density(density, tmp_path / "d" / "density.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plot_density(torch.zeros(3), tmp_path / "dead.png")  # all dead: nothing to histogram, still a figure


def test_dictionary_variants_and_a_transcoder_get_a_dashboard(tmp_path):
    """BatchTopK, JumpReLU and a transcoder (its latents: codes of the MLP's input) through the same dashboard."""
    from saehook import BatchTopKSAE, JumpReLUSAE
    from saehook.transcoder import Transcoder

    model = tiny_model("llama")
    tok, _ = make_tokenizer()
    torch.manual_seed(0)
    saes = {0: BatchTopKSAE(32, 64, 4), 1: JumpReLUSAE(32, 64, 8, threshold_init=1e-3),
            "model.layers.2.mlp": Transcoder(32, 64, 4)}
    index = build_dashboard(saes, tmp_path / "dash", model, tok, token_batches(0, 6), tokens=300, score_tokens=300,
                            n_latents_shown=4, n_explained=2, n_examples=4)
    summary = json.loads((tmp_path / "dash" / "summary.json").read_text())
    assert sorted(summary["hookpoints"]) == ["0", "1", "model.layers.2.mlp"]
    for key, entry in summary["hookpoints"].items():
        assert entry["tokens"] >= 300 and entry["shown"] == 4, key
        assert len(list((tmp_path / "dash" / entry["dir"]).glob("latent-*.html"))) == 4, key
    assert index.is_file()
