"""saehook's C kernels for training steps on the CPU: built on first use, loaded with ctypes, optional.

``csrc/cpu_kernels.c`` holds the three sparse parts of a step that torch has no fast CPU operator for:

- ``topk_rows``: the top-k of each row of a pre-activation chunk (bf16 or fp32), or over a subset of
  columns (AuxK's dead latents). Two levels of strided group maxima bound the k-th value, and a radix
  select over the few candidates (over all the gathered columns for a subset) picks the k. Exactly the
  values of ``torch.topk`` (ties may pick other indices of the same value).
- ``sampled_dots_f32``: ``<a_i, b[idx_ij]>`` (what ``torch.sparse.sampled_addmm`` does here).
- ``scatter_rows_f32``: ``sum_i w_ij dense_i`` into row ``idx_ij`` (the weight gradients): a counting sort
  by latent that leaves out zero weights, then whole output rows summed in cache.

Measured on the 2-vCPU benchmark machine (8192 rows, n = 16384, d = 576): the top-k of the 16 bf16
chunks 13 ms in cache, against about 80 ms for the grouped ``torch.topk``; AuxK's top-k (288 of 1,638
dead columns) 40 ms against 128 ms; sampled dots 14.5 ms against 19 ms; the scatter at K = 288 67 ms
against 116 ms. A whole bf16 training step: 307 ms instead of 390 ms, 525 ms instead of 766 ms with 10%
dead latents (``docs/performance.md``).

The library is compiled once per machine with the system C compiler (``$CC``, else ``cc``/``gcc``/
``clang``; ``-O3 -march=native``, about a second) into ``$SAEHOOK_CACHE`` (default
``~/.cache/saehook/kernels``), under a name that hashes the source, the flags, the compiler and the CPU.
Without a compiler, or with ``SAEHOOK_CPU_KERNELS=0``, every caller falls back to the torch operators
with the same results; :func:`status` says which is in use and why.

ctypes releases the GIL during each call; each kernel splits its rows over ``torch.get_num_threads()``
pthreads.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "cpu_kernels.c"
FLAGS = ["-O3", "-shared", "-fPIC", "-pthread"]
NATIVE = ["-march=native"]
"""Tried first; dropped if the compiler refuses it (the kernels are plain C and vectorise either way)."""

_lib: ctypes.CDLL | None = None
_why = "not loaded yet"
_tried = False
_enabled = os.environ.get("SAEHOOK_CPU_KERNELS", "1") != "0"


def cache_dir() -> Path:
    """Where built libraries are kept: ``$SAEHOOK_CACHE``, else ``$XDG_CACHE_HOME/saehook/kernels``."""
    if os.environ.get("SAEHOOK_CACHE"):
        return Path(os.environ["SAEHOOK_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "saehook" / "kernels"


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc.split()[0]):
            return cc
    return None


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def _build(cc: str) -> Path:
    """Compile (or find in the cache) the shared library; raises ``RuntimeError`` with the compiler's
    message when it cannot."""
    version = _run([*cc.split(), "--version"]).stdout.splitlines()[:1]
    src = SOURCE.read_bytes()
    builds = []
    for flags in (NATIVE + FLAGS, FLAGS):
        key = hashlib.sha256(b"\0".join([src, " ".join(flags).encode(), cc.encode(), str(version).encode(),
                                         platform.machine().encode(), _cpu_id().encode()])).hexdigest()[:20]
        builds.append((flags, cache_dir() / f"cpu_kernels-{key}.so"))
    for _, out in builds:  # a cached build of either kind: no compiler run (not even a failing -march=native)
        if out.exists():
            return out
    for flags, out in builds:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        try:
            res = _run([*cc.split(), *flags, "-o", tmp, str(SOURCE)])
            if res.returncode == 0:
                os.replace(tmp, out)  # atomic: a concurrent build or a crash never leaves half a library
                log.info("saehook: built CPU kernels %s", out)
                return out
            err = res.stderr.strip()
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
    raise RuntimeError(f"{cc} could not build {SOURCE.name}: {err[-500:]}")


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    P, I, C = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.topk_rows.argtypes = [P, I, I, I, P, C, C, C, P, I, P, I, C]
    lib.topk_rows.restype = C
    lib.sampled_dots_f32.argtypes = [P, I, P, I, P, I, I, I, P, C]
    lib.sampled_dots_f32.restype = None
    lib.scatter_rows_f32.argtypes = [P, P, I, I, I, P, I, I, P, C]
    lib.scatter_rows_f32.restype = C
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernels, building them on first use; None when disabled or unavailable (see :func:`status`)."""
    global _lib, _why, _tried
    if not _enabled:
        return None
    if _tried:
        return _lib
    _tried = True
    if sys.platform == "win32":
        _why = "not built on Windows (torch operators in use)"
        return None
    cc = _compiler()
    if cc is None:
        _why = "no C compiler found ($CC, cc, gcc, clang): torch operators in use"
        log.warning("saehook: %s; install gcc for 20-30%% faster CPU training steps", _why)
        return None
    try:
        _lib = _declare(ctypes.CDLL(str(_build(cc))))
        _why = f"loaded ({cc})"
    except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as e:
        _why = f"build or load failed, torch operators in use: {e}"
        log.warning("saehook: CPU kernels %s", _why)
    return _lib


def status() -> str:
    """One line: whether the C kernels are in use, and if not, why."""
    if not _enabled:
        return "disabled (SAEHOOK_CPU_KERNELS=0 or set_enabled(False)): torch operators in use"
    library()
    return _why


def set_enabled(flag: bool) -> bool:
    """Use the C kernels (True, the default) or torch's operators (False); returns the previous setting."""
    global _enabled
    prev, _enabled = _enabled, bool(flag)
    return prev


@contextlib.contextmanager
def enabled(flag: bool):
    """``with enabled(False): ...`` runs a block on torch's operators (tests compare the two paths)."""
    prev = set_enabled(flag)
    try:
        yield
    finally:
        set_enabled(prev)


# ---------------------------------------------------------------------- typed entry points
def _rows_ok(t: Tensor) -> bool:
    """A CPU matrix whose rows are contiguous (any row stride)."""
    return t.device.type == "cpu" and t.dim() == 2 and (t.stride(1) == 1 or t.shape[1] <= 1)


def topk(x: Tensor, k: int, out_v: Tensor, out_i: Tensor, cols: Tensor | None = None, sorted: bool = True) -> bool:
    """Top-k of each row of ``x [R, n]`` (bf16 or fp32) into ``out_v [R, k]`` (fp32) and ``out_i [R, k]``
    (int64 column indices), over all columns or over the columns ``cols`` (int64). False (nothing
    written) when the kernels are off or the tensors do not fit them."""
    lib = library()
    if lib is None or x.dtype not in (torch.bfloat16, torch.float32) or not _rows_ok(x) or x.shape[0] == 0:
        return False
    if out_v.dtype != torch.float32 or out_i.dtype != torch.int64 or not (_rows_ok(out_v) and _rows_ok(out_i)):
        return False
    n = x.shape[1] if cols is None else cols.numel()
    if not 1 <= k <= min(n, 1024):
        return False
    if cols is not None:
        cols = cols.contiguous()
        if cols.dtype != torch.int64:
            return False
    rc = lib.topk_rows(x.data_ptr(), x.shape[0], n, x.stride(0), cols.data_ptr() if cols is not None else None, k,
                       int(sorted), int(x.dtype == torch.bfloat16), out_v.data_ptr(), out_v.stride(0),
                       out_i.data_ptr(), out_i.stride(0), torch.get_num_threads())
    if rc != 0:
        raise MemoryError(f"saehook CPU top-k kernel failed (code {rc})")
    return True


def sampled_dots(a: Tensor, b: Tensor, idx: Tensor) -> Tensor | None:
    """``out[i, j] = <a_i, b[idx_ij]>`` for fp32 ``a [N, d]``, ``b [n, d]``, int64 ``idx [N, K]`` (indices
    already known to be in range); None when the kernels are off or the tensors do not fit them."""
    lib = library()
    if lib is None or a.dtype != torch.float32 or b.dtype != torch.float32 or idx.dtype != torch.int64:
        return None
    if not (_rows_ok(a) and _rows_ok(b)) or idx.device.type != "cpu":
        return None
    idx = idx.contiguous()
    N, K = idx.shape
    out = torch.empty(N, K, dtype=torch.float32)
    lib.sampled_dots_f32(a.data_ptr(), a.stride(0), b.data_ptr(), b.stride(0), idx.data_ptr(), N, K, a.shape[1],
                         out.data_ptr(), torch.get_num_threads())
    return out


def scatter_rows(idx: Tensor, w: Tensor, n: int, dense: Tensor) -> Tensor | None:
    """``out[r] = sum over idx[i, j] == r of w[i, j] dense[i]`` for int64 ``idx [N, K]``, fp32 ``w [N, K]``
    and ``dense [N, d]``: ``out [n, d]``. None when the kernels are off or the tensors do not fit them."""
    lib = library()
    if lib is None or w.dtype != torch.float32 or dense.dtype != torch.float32 or not _rows_ok(dense):
        return None
    if idx.dtype != torch.int64 or idx.device.type != "cpu" or w.device.type != "cpu":
        return None
    idx, w = idx.contiguous(), w.contiguous()
    N, K = idx.shape
    out = torch.empty(n, dense.shape[1], dtype=torch.float32)
    rc = lib.scatter_rows_f32(idx.data_ptr(), w.data_ptr(), N, K, n, dense.data_ptr(), dense.stride(0),
                              dense.shape[1], out.data_ptr(), torch.get_num_threads())
    if rc == -3:
        raise IndexError(f"latent index out of range [0, {n}) in a sparse gradient")
    if rc != 0:
        raise MemoryError(f"saehook CPU scatter kernel failed (code {rc})")
    return out
