"""OpenAI ``sparse_autoencoder`` state dicts, as released (e.g. ``gpt2-small/resid_post_v5_32k/.../<layer>.pt``).

A ``torch.save``'d dict: ``encoder.weight [n, d]``, ``latent_bias [n]``, ``pre_bias [d]``, ``decoder.weight
[d, n]`` (absent when the decoder is tied to the encoder), statistics buffers (``stats_last_nonzero``,
``latents_activation_frequency``, ``latents_mean_square``), and the activation as plain strings and ints:
``activation: "TopK"``, ``activation_state_dict: {"k": 32, "postact_fn": "ReLU"}``. Its formula:

    x', mu, std = LN(x)                                        (per row; see saehook.formats.layernorm)
    z     = ReLU(TopK(encoder(x' - pre_bias) + latent_bias))
    x_hat = (decoder(z) + pre_bias) * std + mu

OpenAI's ``Autoencoder.from_state_dict`` reads ``state_dict.pop("activation", "ReLU")`` and sets
``normalize = activation == "TopK"``: the layer norm is on exactly when the file says ``TopK``. A file without
``activation`` is, by that rule, a ReLU autoencoder without layer norm. :func:`load_openai` follows the same rule:
``TopK`` -> layer norm on; no ``activation`` -> refused (saehook loads TopK only) unless you pass ``k=``, and then
no layer norm (``layernorm=True`` turns it on); any other activation -> refused.

The file is read with ``torch.load(weights_only=True)``: torch's restricted unpickler, which rebuilds
tensors, numbers, strings, lists and dicts and refuses any other object, so loading runs no code from it.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import torch

from ..sae import TopKSAE
from ._common import FormatError, build_sae
from .layernorm import LayerNormTopKSAE

STATS = {"stats_last_nonzero", "latents_activation_frequency", "latents_mean_square"}


def is_torch_file(path: Path) -> bool:
    """A ``torch.save`` file (a zip archive, or the legacy pickle format by suffix)."""
    return path.is_file() and (zipfile.is_zipfile(path) or path.suffix in (".pt", ".pth"))


def load_openai(path: str | os.PathLike, *, k: int | None = None, layernorm: bool | None = None,
                device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> TopKSAE:
    """An OpenAI ``sparse_autoencoder`` TopK state dict -> :class:`~saehook.formats.LayerNormTopKSAE`
    (or a plain :class:`~saehook.TopKSAE` with ``layernorm=False``) giving the same latents and reconstructions.

    ``k`` comes from ``activation_state_dict["k"]``; pass it when the file lacks the activation entries.
    ``layernorm`` defaults to OpenAI's rule: on when ``activation`` is ``"TopK"``, off when the entry is missing
    (``Autoencoder.from_state_dict`` then builds a ReLU autoencoder with ``normalize=False``).

    Raises :class:`FormatError` for a file without ``activation`` and no ``k=`` (OpenAI's loader reads it as a
    ReLU autoencoder, which saehook cannot represent), a non-TopK activation, or unknown entries.
    """
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise FormatError(
            f"{where} holds objects other than tensors, numbers, strings, lists and dicts, so the restricted "
            f"(weights_only) unpickler refused it; saehook never fully unpickles files. ({e})".replace("\n", " ")
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise FormatError(f"{where} is not a readable torch.save file ({e})") from None
    if not isinstance(sd, dict):
        raise FormatError(f"{where} holds a {type(sd).__name__}, expected an OpenAI autoencoder state dict")
    sd = dict(sd)
    activation = sd.pop("activation", None)
    act_sd = sd.pop("activation_state_dict", None) or {}
    if activation not in (None, "TopK"):
        raise FormatError(f"{where} is an OpenAI autoencoder with activation {activation!r}; saehook loads TopK "
                          f"autoencoders only")
    postact = act_sd.get("postact_fn", "ReLU")
    if postact != "ReLU":
        raise FormatError(f"{where}: TopK with post-activation {postact!r}; saehook's TopK applies ReLU")
    if activation is None and k is None:
        raise FormatError(f"{where} has no 'activation' entry, so OpenAI's Autoencoder.from_state_dict reads it as a "
                          f"ReLU autoencoder without layer norm, which saehook cannot load (TopK only); if it is a "
                          f"TopK autoencoder whose activation entries were dropped, pass load_openai(path, k=...) "
                          f"(and layernorm=True if it expects OpenAI's layer norm)")
    k = k if k is not None else act_sd.get("k")
    if k is None:
        raise FormatError(f"{where} does not say its k (no activation_state_dict['k']); pass "
                          f"load_openai(path, k=...)")
    required = {"encoder.weight", "latent_bias", "pre_bias"}
    missing = sorted(required - sd.keys())
    if missing:
        raise FormatError(f"{where} is not an OpenAI sparse_autoencoder state dict: {missing} missing; it has "
                          f"{sorted(sd)}")
    extra = sorted(sd.keys() - required - STATS - {"decoder.weight"})
    if extra:
        raise FormatError(f"{where} has entries saehook does not know how to use: {extra}")
    bad = sorted(n for n in sd if not isinstance(sd[n], torch.Tensor))
    if bad:
        raise FormatError(f"{where}: entries {bad} are not tensors")
    W_enc = sd["encoder.weight"]
    W_dec = sd["decoder.weight"].T if "decoder.weight" in sd else W_enc  # tied: decoder = encoder^T
    layernorm = activation == "TopK" if layernorm is None else bool(layernorm)  # OpenAI: normalize = (act == TopK)
    meta = {"source_format": "openai", "source_file": path.name}
    return build_sae(W_enc, sd["latent_bias"], W_dec, sd["pre_bias"], int(k), where=where,
                     cls=LayerNormTopKSAE if layernorm else TopKSAE, dtype=dtype or W_enc.dtype, device=device,
                     metadata=meta)
