"""Shared pieces of the format readers and writers: errors, safe file reading, building a TopKSAE."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import Tensor

from .. import atomic
from ..sae import SAEConfigError, TopKSAE


class FormatError(SAEConfigError):
    """A file or folder that is not an autoencoder saehook can read, or one it cannot represent."""


KNOWN_FORMATS = (
    "saehook (cfg.json + sae.safetensors with W_enc, b_enc, W_dec, b_dec, input_scale)",
    "EleutherAI sparsify (cfg.json + sae.safetensors with encoder.weight, encoder.bias, W_dec, b_dec)",
    "SAELens (cfg.json + sae_weights.safetensors)",
    "OpenAI sparse_autoencoder (a torch.save'd state dict, .pt)",
    "a folder of <hookpoint>/ subfolders in any of these",
)


def listing(path: Path, limit: int = 30) -> list[str]:
    """Names in a folder (sub-folders with a trailing ``/``), for error messages."""
    if not path.is_dir():
        return [path.name] if path.exists() else []
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    return names[:limit] + ([f"... {len(names) - limit} more"] if len(names) > limit else [])


def committed_file(path: Path) -> Path:
    """``path`` inside the folder a reader should read (:func:`saehook.atomic.committed`): the previous save's
    aside copy when a save was killed between its two renames."""
    return atomic.committed(path.parent) / path.name


def read_json(path: Path) -> dict:
    path = committed_file(path)
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing; found in {path.parent}: {listing(path.parent)}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise FormatError(f"{path} holds a JSON {type(cfg).__name__}, expected an object")
    return cfg


def tensor_names(path: Path) -> set[str]:
    """The tensor names in a safetensors file, read from its header only."""
    path = committed_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return set(f.keys())
    except (SafetensorError, OSError) as e:
        raise FormatError(f"{path} is unreadable or not a safetensors file ({e})") from None


def read_safetensors(path: Path) -> dict[str, Tensor]:
    path = committed_file(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; found in {path.parent}: {listing(path.parent)}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise FormatError(f"{path} is unreadable or truncated ({e})") from None


def check_tensors(tensors: dict[str, Tensor], required: set[str], allowed: set[str], where: str, fmt: str) -> None:
    missing = sorted(required - tensors.keys())
    if missing:
        raise FormatError(f"{where} is not a {fmt} autoencoder: tensors {missing} are missing; it has "
                          f"{sorted(tensors)}")
    extra = sorted(tensors.keys() - required - allowed)
    if extra:
        raise FormatError(f"{where} has tensors saehook does not know how to use: {extra} (a {fmt} autoencoder "
                          f"has {sorted(required | allowed)}); refusing to load it and silently ignore them")


def build_sae(
    W_enc: Tensor,
    b_enc: Tensor,
    W_dec: Tensor,
    b_dec: Tensor,
    k: int,
    *,
    where: str,
    input_scale: float | Tensor = 1.0,
    multi_topk: bool = False,
    cls: type[TopKSAE] = TopKSAE,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    metadata: dict | None = None,
) -> TopKSAE:
    """A ``cls`` (:class:`TopKSAE`, or a subclass such as :class:`~saehook.formats.LayerNormTopKSAE`) holding
    these tensors, in saehook's orientation (``W_enc`` and ``W_dec`` both ``[n_latents, d_in]``). ``input_scale``
    is a number or a ``[d_in]`` tensor of per-channel scales. ``dtype`` defaults to ``W_dec``'s."""
    if W_enc.dim() != 2:
        raise FormatError(f"{where}: the encoder weight has shape {tuple(W_enc.shape)}, expected 2 dimensions")
    n, d = W_enc.shape
    expected = {"W_enc": (n, d), "b_enc": (n,), "W_dec": (n, d), "b_dec": (d,)}
    got = {"W_enc": tuple(W_enc.shape), "b_enc": tuple(b_enc.shape), "W_dec": tuple(W_dec.shape),
           "b_dec": tuple(b_dec.shape)}
    if got != expected:
        bad = {name: (expected[name], got[name]) for name in expected if expected[name] != got[name]}
        raise FormatError(f"{where}: tensor shapes do not fit together (n_latents={n}, d_in={d}); "
                          f"(expected, found) in saehook's orientation: {bad}")
    if isinstance(k, bool) or not isinstance(k, int):
        raise FormatError(f"{where}: k must be an integer, got {k!r}")
    if isinstance(input_scale, Tensor):
        if tuple(input_scale.shape) not in ((), (d,)):
            raise FormatError(f"{where}: the input scale has shape {tuple(input_scale.shape)}, expected a scalar "
                              f"or [d_in] = [{d}]")
        if not bool((torch.isfinite(input_scale) & (input_scale > 0)).all()):
            raise FormatError(f"{where}: every input scale must be a positive finite number")
    elif not (math.isfinite(input_scale) and input_scale > 0):
        raise FormatError(f"{where}: the input scale must be a positive finite number, got {input_scale}")
    dtype = dtype or W_dec.dtype
    if not dtype.is_floating_point:
        raise FormatError(f"{where}: weights have dtype {dtype}, expected a floating-point type")
    try:
        sae = cls(d, n, k, multi_topk=multi_topk, dtype=dtype, device="meta")
    except SAEConfigError as e:
        raise FormatError(f"{where}: {e}") from None
    if isinstance(input_scale, Tensor):
        sae._set_scale_shape(tuple(input_scale.shape))
    sae = sae.to_empty(device=device or "cpu")
    with torch.no_grad():
        sae.W_enc.copy_(W_enc)
        sae.b_enc.copy_(b_enc)
        sae.W_dec.copy_(W_dec)
        sae.b_dec.copy_(b_dec)
        sae.input_scale.copy_(torch.as_tensor(input_scale, dtype=torch.float64))
    sae.metadata = dict(metadata or {})
    return sae


@torch.no_grad()
def folded_weights(sae: TopKSAE) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(W_enc, b_enc, W_dec, b_dec)`` with the input scale ``s`` folded in, for formats without one:

        W_enc' = W_enc diag(s),  b_enc' = b_enc,  W_dec' = W_dec diag(1/s),  b_dec' = b_dec / s

    so that ``W_enc'(x - b_dec') + b_enc' = W_enc(s x - b_dec) + b_enc`` (the same latents) and
    ``W_dec'^T z + b_dec' = (W_dec^T z + b_dec) / s`` (the same reconstruction). ``s`` is a scalar or a
    ``[d_in]`` vector (``diag(s)`` then scales each input channel, i.e. each column of ``W_enc`` and ``W_dec``).
    Computed in float64 and cast back to the autoencoder's dtype, on the CPU."""
    s = sae.input_scale.detach().to("cpu", torch.float64)  # [] or [d_in]: broadcasts over the d_in columns
    dt = sae.W_enc.dtype
    W_enc, b_enc, W_dec, b_dec = (t.detach().to("cpu", torch.float64) for t in (sae.W_enc, sae.b_enc, sae.W_dec,
                                                                                   sae.b_dec))
    return (W_enc * s).to(dt), b_enc.to(dt), (W_dec / s).to(dt), (b_dec / s).to(dt)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
