"""Training progress tells the truth: the phases appear in order, and the bar's clock (rate, ETA) starts at the
first optimizer step, not while the shuffle buffer fills."""

import logging
import re
import time

import torch
from conftest import source, tiny_model

import saehook
from saehook import TopKSAE, TrainConfig

# the scale and b_dec are fitted once init_samples (512) rows are in, while the buffer (1,128 rows) still fills
PHASES = ["filling shuffle buffer", "initialising scale and b_dec", "filling shuffle buffer", "training", "end-to-end"]


def slow_fill(n_slow: int, pause: float):
    """:func:`source` batches of [8, 32] ids (248 training rows each); the first ``n_slow`` take ``pause`` s each."""
    for i, b in enumerate(source(60)):
        if i < n_slow:
            time.sleep(pause)
        yield b


def run(capsys, caplog, cfg, tokens, batches):
    model = tiny_model("llama")
    torch.manual_seed(0)
    with caplog.at_level(logging.INFO, logger="saehook.progress"), saehook.attach(model, {1: TopKSAE(32, 64, 4)}) as h:
        h.train(batches, tokens=tokens, config=cfg, progress=True)
    err = capsys.readouterr().err
    logged = [r.getMessage() for r in caplog.records if r.name == "saehook.progress"]
    return err, logged


def test_phases_in_order(capsys, caplog):
    cfg = TrainConfig(batch_tokens=128, shuffle_buffer=1000, init_samples=512, e2e_fraction=0.25, log_every=1)
    err, logged = run(capsys, caplog, cfg, 128 * 32, source(60))  # a quarter of 4,096 leaves the 1,000-row buffer
    assert [m.split("phase: ")[1].split(" (")[0] for m in logged] == PHASES
    # the bar's description shows each phase, in the same order, with the fill counted in rows
    first = [err.find(f"saehook train: {p}") for p in dict.fromkeys(PHASES)]
    assert all(i >= 0 for i in first) and first == sorted(first), first
    fills = [tuple(int(x.replace(",", "")) for x in m) for m in
             re.findall(r"filling shuffle buffer \(([\d,]+)/([\d,]+) rows\)", err)]
    assert fills[0] == (248, 1128) and fills[-1] == (1240, 1128)  # 1,000 buffer + 128 batch rows; 248 per batch
    assert [h for h, _ in fills] == [248 * i for i in range(1, len(fills) + 1)]


def test_eta_not_from_buffer_fill(capsys, caplog):
    """The fill (5 batches of 2 s) takes 10 s. The bar's final elapsed time is the training's alone (wall time minus
    the fill, to the second), and the first training refresh shows no ETA; before, the fill counted as training
    time (elapsed = wall time) and the first step's ETA was extrapolated from it."""
    cfg = TrainConfig(batch_tokens=128, shuffle_buffer=1000, init_samples=512, log_every=1)
    t0 = time.perf_counter()
    err, _ = run(capsys, caplog, cfg, 128 * 32, slow_fill(5, 2.0))
    wall = time.perf_counter() - t0
    lines = err.replace("\r", "\n").strip().splitlines()
    m = re.search(r"\[(\d+):(\d+)<[^,]*, ([\d.]+)(k?)tok/s", lines[-1])
    assert m, lines[-1]
    elapsed = 60 * int(m[1]) + int(m[2])
    assert elapsed <= wall - 10 + 1, (wall, lines[-1])
    first_train = next(ln for ln in lines if "saehook train: training" in ln)
    assert "<?" in first_train, first_train  # no rate yet after the first step: no ETA
