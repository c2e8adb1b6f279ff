"""Saves that are one unit: every file of a save is replaced together, or none is.

Every writer of saved state (``TopKSAE.save``, the exports to sparsify / SAELens, training checkpoints and
their ``LATEST`` pointer) goes through this module:

1. serialise everything in memory first (:func:`json_bytes`, :func:`safetensors_bytes`): a value JSON cannot
   encode fails here, before anything on disk changed;
2. :func:`write_folder` writes the folder's new contents into a hidden sibling ``.<name>.saehook-new-<pid>-<id>``
   (each file flushed to disk), then :func:`replace_folder` swaps it in with two renames:
   ``<name> -> .<name>.saehook-old`` (the *aside* copy), ``new -> <name>``, then removes the aside copy;
3. one file on its own (``LATEST``) is written by :func:`write_file`: a temporary sibling, flushed, then
   ``os.replace`` (atomic on POSIX and Windows).

A failure (an exception) at any step leaves ``<name>`` as it was: the second rename's failure renames the aside
copy back. A crash (the process killed) between the two renames leaves no ``<name>`` but a complete aside copy:
:func:`committed`, which every saehook reader calls, then reads the aside copy (the previous state), and the next
save puts it back first (:func:`recover`). A crash after the second rename leaves the new ``<name>`` and a stale
aside copy, which :func:`recover` removes.

Files already in the folder that the save does not write (a ``README.md`` model card, say) are carried into the
new folder by hard link (a copy where the file system has none). A folder holding sub-folders is refused: it is not
one save's folder, and swapping it would move them.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path

from safetensors.torch import save as _safetensors_save
from torch import Tensor

ASIDE = ".saehook-old"
_NO_LINKS = {errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EACCES}
NEW = ".saehook-new-"


def json_bytes(obj, *, indent: int | None = 2, sort_keys: bool = False) -> bytes:
    """``obj`` as UTF-8 JSON bytes; raises ``TypeError`` / ``ValueError`` naming the value JSON cannot encode."""
    try:
        return json.dumps(obj, indent=indent, sort_keys=sort_keys).encode()
    except (TypeError, ValueError) as e:
        raise type(e)(f"cannot save this as JSON ({e}); keep metadata to str, int, float, bool, None, "
                      f"lists and dicts") from None


def safetensors_bytes(tensors: Mapping[str, Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """A safetensors file's bytes for ``tensors`` (detached, made contiguous, moved to the CPU)."""
    return _safetensors_save({n: t.detach().contiguous().cpu() for n, t in tensors.items()}, metadata=metadata)


def _aside(path: Path) -> Path:
    return path.with_name(f".{path.name}{ASIDE}")


def _fresh(path: Path) -> Path:
    return path.with_name(f".{path.name}{NEW}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _write_new(path: Path, data: bytes) -> None:
    """Create ``path`` (it must not exist) holding ``data``, flushed to disk."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    if not hasattr(os, "O_DIRECTORY"):  # Windows: directories cannot be opened for fsync
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def committed(path: str | os.PathLike) -> Path:
    """The folder a reader should read for ``path``: ``path`` itself, or its aside copy when a save was killed
    between its two renames (then the aside copy is the complete previous state)."""
    path = Path(path)
    aside = _aside(path)
    if not path.exists() and aside.is_dir():
        return aside
    return path


def recover(path: str | os.PathLike) -> None:
    """Finish what a killed save left: put an aside copy back when ``path`` is missing, remove it otherwise;
    remove the temporary folders of saves whose process is gone (or, from this process, of saves that failed
    without cleaning up: saves of one path are not run concurrently)."""
    path = Path(path)
    _settle_aside(path)
    prefix = f".{path.name}{NEW}"
    if path.parent.is_dir():
        for p in path.parent.iterdir():
            if p.name.startswith(prefix) and not _alive_elsewhere(p.name[len(prefix):].split("-")[0]):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else _unlink_quietly(p)


def _settle_aside(path: Path) -> None:
    aside = _aside(path)
    if aside.is_dir():
        if path.exists():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.rename(aside, path)


def _alive_elsewhere(pid: str) -> bool:
    """Whether ``pid`` is another process that is still running (its save may be in progress)."""
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but not ours to signal
        return True
    return True


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def replace_folder(new: str | os.PathLike, path: str | os.PathLike) -> None:
    """Swap the complete folder ``new`` in as ``path`` (see the module docstring); ``new`` is consumed.
    Raises what the renames raise, with ``path`` unchanged."""
    new, path = Path(new), Path(path)
    _settle_aside(path)
    aside = _aside(path)
    had_old = path.exists()
    if had_old:
        os.rename(path, aside)
    try:
        os.rename(new, path)
    except BaseException:
        if had_old:
            os.rename(aside, path)
        raise
    try:
        _fsync_dir(path.parent)
    except OSError:  # the rename is done; durability of the parent's entry is best effort
        pass
    shutil.rmtree(aside, ignore_errors=True)


def _carried(path: Path, names) -> list[str]:
    """Files of an existing folder ``path`` that a save writing ``names`` keeps; refuses sub-folders."""
    if not path.exists():
        return []
    if not path.is_dir():
        raise NotADirectoryError(f"cannot save into {path}: it is a file, not a folder; choose another path")
    cwd = Path.cwd().resolve()
    if cwd == path or path in cwd.parents:
        raise ValueError(f"cannot save into {path}: it is (or holds) the current working directory, which the "
                         f"save would replace; save into a sub-folder instead")
    subs = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.is_symlink())
    if subs:
        raise IsADirectoryError(f"cannot save into {path}: it holds sub-folders {subs}, so it is not one "
                                f"autoencoder's folder; save into a folder of its own")
    return sorted(p.name for p in path.iterdir() if p.name not in names)


def write_folder(path: str | os.PathLike, files: Mapping[str, bytes]) -> Path:
    """Make ``path`` a folder holding ``files`` (``{name: bytes}``) plus the other files it already had, all
    replaced at once; on any failure ``path`` keeps its previous contents. Returns ``path``."""
    path = Path(os.path.abspath(path))
    if path.is_symlink():
        path = path.resolve()
    bad = [n for n in files if not n or "/" in n or "\\" in n or n in (".", "..")]
    if bad:
        raise ValueError(f"file names {bad} are not plain names inside one folder")
    recover(path)
    carried = _carried(path, files)
    if not path.parent.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _fresh(path)
    os.mkdir(tmp)
    try:
        for name, data in files.items():
            _write_new(tmp / name, data)
        for name in carried:
            try:
                os.link(path / name, tmp / name, follow_symlinks=False)
            except OSError as e:
                if e.errno not in _NO_LINKS:
                    raise
                _write_new(tmp / name, (path / name).read_bytes())  # no hard links on this file system: copy
        _fsync_dir(tmp)
        replace_folder(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def write_into(folder: str | os.PathLike, files: Mapping[str, bytes]) -> None:
    """Add ``files`` to a folder that is itself still being built (e.g. a checkpoint's temporary folder, later
    swapped in by :func:`replace_folder`): creates it if needed; each file is new and flushed to disk."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        _write_new(folder / name, data)


def write_file(path: str | os.PathLike, data: bytes) -> None:
    """Replace the single file ``path`` by ``data`` atomically (temporary sibling, flushed, ``os.replace``)."""
    path = Path(path)
    recover(path)
    tmp = _fresh(path)
    try:
        _write_new(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
