"""A save is one unit: fail every save (autoencoder, each export format, model card, training checkpoint) at each
of its file-system writes in turn, and check that what loads afterwards is exactly the previous state (or, once the
save has committed, exactly the new one): same tensors, same config, never a mix, never unloadable.

Faults are injected by wrapping the low-level ``os`` functions every write goes through (open, write, fsync,
close, mkdir, rename, replace, link, unlink, rmdir) to raise at the i-th call, for every i. Two modes: ``"once"``
(only the i-th call fails: the save's own error handling runs) and ``"kill"`` (every call from the i-th on fails,
as if the process died there: no clean-up runs, so the readers must find the committed state on their own).
"""

import builtins
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import source, tiny_model

import saehook
from saehook import TopKSAE, TrainConfig
from saehook.formats import load_saelens, load_sparsify, save_saelens, save_sparsify
from saehook.hub import save_with_card
from saehook.session import TrainingSession

OPS = ("open", "write", "fsync", "close", "mkdir", "rename", "replace", "link", "unlink", "rmdir")


class Faults:
    """Counts the patched ``os`` calls made while armed; raises ``OSError`` at call ``fail_at`` (and, in kill
    mode, at every later one). Opening a file for writing with ``builtins.open`` while armed is an error: every
    write must go through the patched functions, so that no write escapes the injection."""

    def __init__(self, monkeypatch):
        self.armed, self.fail_at, self.kill, self.calls = False, None, False, []
        for op in OPS:
            monkeypatch.setattr(os, op, self._wrap(op, getattr(os, op)))
        real_open = builtins.open

        def guarded_open(file, mode="r", *a, **kw):
            if self.armed and any(c in mode for c in "wax+"):
                raise AssertionError(f"{file} opened for writing with builtins.open, bypassing saehook.atomic")
            return real_open(file, mode, *a, **kw)

        monkeypatch.setattr(builtins, "open", guarded_open)

    def _wrap(self, op, real):
        def call(*args, **kwargs):
            if self.armed:
                i = len(self.calls)
                self.calls.append((op, args))
                if self.fail_at is not None and (i == self.fail_at or (self.kill and i > self.fail_at)):
                    raise OSError(f"injected fault at call {i} ({op})")
            return real(*args, **kwargs)

        return call

    def run(self, fn, fail_at=None, kill=False):
        """Run ``fn()`` armed; returns the exception it raised (None if it returned)."""
        self.armed, self.fail_at, self.kill, self.calls = True, fail_at, kill, []
        try:
            fn()
            return None
        except OSError as e:
            return e
        finally:
            self.armed = False

    def index(self, pred) -> int:
        """The index of the first recorded call matching ``pred(op, args)``."""
        return next(i for i, (op, args) in enumerate(self.calls) if pred(op, args))


def renamed_to(target):
    target = os.path.abspath(target)
    return lambda op, args: op in ("rename", "replace") and os.path.abspath(args[1]) == target


def sae_state(sae):
    """What must survive: every tensor, the config (with metadata) and the class."""
    return type(sae), {n: t.clone() for n, t in sae.state_dict().items()}, json.dumps(sae.config(), sort_keys=True)


def same(a, b) -> bool:
    if a[0] is not b[0] or a[2] != b[2] or a[1].keys() != b[1].keys():
        return False
    return all(t.dtype == b[1][n].dtype and t.shape == b[1][n].shape and torch.equal(t, b[1][n])
               for n, t in a[1].items())


def make(d, n, k, seed, **meta):
    torch.manual_seed(seed)
    sae = TopKSAE(d, n, k)
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
        sae.input_scale.fill_(0.5 + seed)
    sae.metadata = {"hookpoint": "model.layers.1", "seed": seed, **meta}
    return sae


OLD = make(8, 16, 2, seed=0)
NEW_SAME_SHAPE = make(8, 16, 2, seed=1, note="new")
NEW_OTHER_SHAPE = make(8, 24, 3, seed=2)

# name: (save(sae, path), load(path))
UNITS = {
    "TopKSAE.save": (lambda sae, p: sae.save(p), TopKSAE.load),
    "save_sparsify": (save_sparsify, load_sparsify),
    "save_saelens": (save_saelens, load_saelens),
    "save_with_card": (save_with_card, saehook.load),
}


@pytest.mark.parametrize("kill", [False, True], ids=["once", "kill"])
@pytest.mark.parametrize("new", [NEW_SAME_SHAPE, NEW_OTHER_SHAPE], ids=["same-shape", "other-shape"])
@pytest.mark.parametrize("unit", list(UNITS))
def test_every_write_of_a_save_fails_safely(tmp_path, monkeypatch, unit, new, kill):
    save, load = UNITS[unit]
    faults = Faults(monkeypatch)
    base = tmp_path / "base" / "sae"
    save(OLD, base)
    (base / "notes.txt").write_text("a file of the user's")  # carried over by every save
    old = sae_state(load(base))
    # a counting run: how many writes, and which one commits (the rename of the new folder onto the path)
    probe = tmp_path / "probe" / "sae"
    shutil.copytree(base, probe)
    assert faults.run(lambda: save(new, probe)) is None
    n_calls, commit = len(faults.calls), faults.index(renamed_to(probe))
    want_new = sae_state(load(probe))
    assert not same(old, want_new)
    assert n_calls >= 12  # mkdir, 2 files x (open, write, fsync, close), link, dir fsync, 2 renames, rmtree...
    for i in range(n_calls):
        path = tmp_path / f"run{i}" / "sae"
        shutil.copytree(base, path)
        err = faults.run(lambda path=path: save(new, path), fail_at=i, kill=kill)
        if i > commit and not kill:
            assert err is None, f"fault at call {i} after the commit (clean-up) failed the save: {err}"
        got = sae_state(load(path))
        assert same(got, old if err is not None and i <= commit else want_new), (
            f"{unit}: fault at call {i} ({faults.calls[i][0]}, commit at {commit}) left "
            f"{'neither state' if not same(got, want_new) else 'the new state'}")
        assert (Path(saehook.atomic.committed(path)) / "notes.txt").read_text() == "a file of the user's"
        # the next save recovers from whatever the fault left, and succeeds
        save(new, path)
        assert same(sae_state(load(path)), want_new)
        left = sorted(p.name for p in path.parent.iterdir())
        assert left == ["sae"], f"fault at call {i}: a temporary or aside folder was left: {left}"


def test_unencodable_metadata_leaves_previous_save(tmp_path):
    """The reported case: the second save's metadata holds a value JSON cannot encode. Before, the weights were
    replaced before cfg.json was serialised: same shape -> new weights under the old config; other shape -> the
    folder no longer loaded."""
    for new in (make(8, 16, 2, seed=1), make(8, 24, 3, seed=2)):
        path = tmp_path / f"sae{new.n_latents}"
        OLD.save(path)
        before = sae_state(TopKSAE.load(path))
        new.metadata = {"when": object()}
        with pytest.raises(TypeError) as err:
            new.save(path)
        assert same(sae_state(TopKSAE.load(path)), before)
        assert "cannot save this as JSON" in str(err.value) and "object" in str(err.value)
        assert sorted(p.name for p in path.iterdir()) == ["cfg.json", "sae.safetensors"]
    with pytest.raises(TypeError, match="cannot save this as JSON"):
        save_saelens(make(8, 16, 2, seed=3, dataset=object()), tmp_path / "sl")
    assert not (tmp_path / "sl").exists()


def test_crash_between_the_two_renames_reads_the_aside_copy(tmp_path):
    """A kill after the old folder was renamed aside and before the new one came in: every reader finds the
    previous save in the aside copy; the next save puts it back first."""
    path = tmp_path / "sae"
    OLD.save(path)
    os.rename(path, tmp_path / ".sae.saehook-old")
    assert same(sae_state(TopKSAE.load(path)), sae_state(OLD))
    assert same(sae_state(saehook.load(path)), sae_state(OLD))
    NEW_SAME_SHAPE.save(path)
    assert same(sae_state(TopKSAE.load(path)), sae_state(NEW_SAME_SHAPE))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]


def test_refuses_a_folder_with_sub_folders(tmp_path):
    (tmp_path / "run" / "model.layers.1").mkdir(parents=True)
    with pytest.raises(IsADirectoryError, match=r"holds sub-folders \['model.layers.1'\].*folder of its own"):
        OLD.save(tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["model.layers.1"]


# ---------------------------------------------------------------------------------------------- checkpoints
def checkpoint_state(session, out):
    """What resume reads: the data position, the autoencoder, the optimizer / trainer state and the buffer."""
    position = session.load(out)
    (key, tr), = session.trainers.items()
    tensors = {**{f"sae.{n}": t.clone() for n, t in tr.sae.state_dict().items()},
               **{f"trainer.{n}": t.clone() for n, t in tr.state_tensors().items()},
               **{f"buffer.{n}": t.clone() for n, t in session.buffers[key].state().items()}}
    scalars = json.dumps({"position": position, "cfg": tr.sae.config(), "trainer": tr.state_scalars()},
                         sort_keys=True)
    return TopKSAE, tensors, scalars


@pytest.mark.parametrize("kill", [False, True], ids=["once", "kill"])
@pytest.mark.parametrize("same_step", [True, False], ids=["same-step", "next-step"])
def test_every_write_of_a_checkpoint_fails_safely(tmp_path, monkeypatch, same_step, kill):
    """Checkpoint (autoencoder, Adam state, buffer, state.json, LATEST) and the refreshed ``out/<hookpoint>``: a
    fault anywhere leaves the previous checkpoint what resume loads. Re-saving the step LATEST names (the final
    save after a periodic one) must not remove it first."""
    faults = Faults(monkeypatch)
    cfg = TrainConfig(batch_tokens=256, shuffle_buffer=512, checkpoint_every=1000)
    torch.manual_seed(0)
    with saehook.attach(tiny_model("llama"), {1: TopKSAE(32, 64, 4)}) as hooked:
        base = tmp_path / "base"
        hooked.train(source(6), tokens=1024, config=cfg, out=base, progress=False)
        session = TrainingSession(hooked, cfg, total_tokens=1024)
        old = checkpoint_state(session, base)
        old_sae = sae_state(TopKSAE.load(base / "model.layers.1"))
        (tr,) = session.trainers.values()

        def save_new(out, **fault):
            session.load(out)
            with torch.no_grad():
                tr.sae.W_enc.add_(1.0)
            tr.sae.metadata = {**tr.sae.metadata, "note": "new"}
            tr.step_count += 0 if same_step else 1
            tr.tokens += 7
            session.buffers[next(iter(session.buffers))].add(torch.ones(3, 32))
            return faults.run(lambda: session.save(out, position=99), **fault)

        probe = tmp_path / "probe"
        shutil.copytree(base, probe)
        assert save_new(probe) is None
        n_calls = len(faults.calls)
        # committed when LATEST names the new folder: its switch, or the swap of a re-saved step LATEST named
        latest = (base / "checkpoints" / "LATEST").read_text()
        commit = faults.index(lambda op, args: renamed_to(probe / "checkpoints" / "LATEST")(op, args)
                              or renamed_to(probe / "checkpoints" / latest)(op, args))
        commit_sae = faults.index(renamed_to(probe / "model.layers.1"))
        new = checkpoint_state(session, probe)
        new_sae = sae_state(TopKSAE.load(probe / "model.layers.1"))
        assert not same(old, new) and not same(old_sae, new_sae)
        for i in range(n_calls):
            out = tmp_path / f"run{i}"
            shutil.copytree(base, out)
            err = save_new(out, fail_at=i, kill=kill)
            got = checkpoint_state(session, out)
            assert same(got, old if err is not None and i <= commit else new), (
                f"checkpoint: fault at call {i} ({faults.calls[i][0]}, LATEST switched at {commit}) left "
                f"{'neither state' if not same(got, new) else 'the new state'}")
            got_sae = sae_state(TopKSAE.load(out / "model.layers.1"))
            assert same(got_sae, old_sae if err is not None and i <= commit_sae else new_sae), (
                f"out/model.layers.1, fault at call {i}")
