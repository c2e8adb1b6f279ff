"""Which dtype a device multiplies fastest: ``"auto"`` dtypes resolved per device (model and encoder matmul)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
"""CPU feature flags (as in Linux ``/proc/cpuinfo``) whose presence means native bfloat16 products."""


def cpu_flags() -> frozenset[str]:
    """This machine's CPU feature flags from the ``flags`` line of ``/proc/cpuinfo`` (empty where there is none,
    e.g. macOS or Windows)."""
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(next((line for line in f if line.startswith("flags")), "").split(":")[-1].split())
    except OSError:
        return frozenset()


def bf16_native(flags: str | Iterable[str]) -> bool:
    """Whether a CPU with these feature ``flags`` (a ``/proc/cpuinfo`` flags line or a set of names, any case)
    multiplies bfloat16 natively: it has ``avx512_bf16`` or ``amx_bf16``. A pure function of its argument."""
    names = flags.split() if isinstance(flags, str) else flags
    return not BF16_CPU_FLAGS.isdisjoint(n.lower() for n in names)


def fast_bf16(device: torch.device | str = "cpu", *, flags: str | Iterable[str] | None = None) -> bool:
    """Whether bfloat16 matmuls run natively (faster than float32) on ``device``.

    CUDA: ``torch.cuda.is_bf16_supported()``. CPU: :func:`bf16_native` of ``flags`` (default: this machine's
    :func:`cpu_flags`). Without them torch emulates bf16 products: measured 0.4 GFLOP/s against
    25 GFLOP/s in float32 on a 2-vCPU AVX2 EPYC (a [2048, 576] x [576, 1536] product), so a bf16 model
    or encoder matmul there is ~60x slower, not faster. Anything else (MPS, other CPUs): False.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if dev.type != "cpu":
        return False
    return bf16_native(cpu_flags() if flags is None else flags)


def auto_dtype(name: str, device: torch.device | str = "cpu", *, flags: str | Iterable[str] | None = None) -> str:
    """``"auto"`` -> ``"bfloat16"`` where :func:`fast_bf16` holds on ``device`` (with CPU ``flags`` if given,
    else this machine's), else ``"float32"``; any other name is returned unchanged. E.g.
    ``auto_dtype("auto", "cpu", flags={"avx2", "amx_bf16"}) == "bfloat16"``."""
    if name != "auto":
        return name
    return "bfloat16" if fast_bf16(device, flags=flags) else "float32"
