"""SAELens: ``cfg.json`` + ``sae_weights.safetensors`` (``W_enc [d_in, d_sae]``, ``b_enc``, ``W_dec [d_sae, d_in]``,
``b_dec``).

SAELens's TopK autoencoder, with ``a = apply_b_dec_to_input`` and ``N``/``N^-1`` its activation normalisation:

    z     = ReLU(TopK((N(x) - a b_dec) W_enc + b_enc))
    x_hat = N^-1(z W_dec + b_dec)

Read into saehook's ``z = ReLU(TopK(W(s x - b_dec) + b)), x_hat = (W_dec^T z + b_dec) / s`` by

- transposing ``W_enc``;
- ``apply_b_dec_to_input = false``: folding ``b_dec`` into the encoder bias, ``b = b_enc + W_enc b_dec``;
- ``normalize_activations``: ``"none"`` -> s = 1; ``"expected_average_only_in"`` -> s = 1 as SAELens's
  ``SAE.load_from_disk`` reads it (its run-time normalisation is the identity in this mode: the trainer folds
  the factor into the weights when training ends, keeps the config and writes ``activation_scaler.json`` with
  ``"scaling_factor": null``), except where a factor is stored for weights it was not folded into: a mid-training
  checkpoint's ``activation_scaler.json["scaling_factor"]`` (what SAELens's trainer multiplies the inputs by),
  ``cfg.json["norm_scaling_factor"]`` or a scalar ``norm_scaling_factor`` tensor -> s = that factor;
  ``"layer_norm"`` -> a :class:`~saehook.formats.LayerNormTopKSAE`; ``"constant_norm_rescale"`` -> refused;
  a boolean (SAELens before 6.0) means ``"expected_average_only_in"`` (true) or ``"none"``;
- a per-latent ``scaling_factor`` / ``finetuning_scaling_factor`` (older SAELens) is folded into ``W_dec``; a
  ``scaling_factor`` other than all ones with ``finetuning_scaling_factor`` false is refused, as SAELens does;
- architecture and k as SAELens reads them (:func:`architecture_and_k`): ``k`` defaults to 100;
- ``rescale_acts_by_decoder_norm = true`` (pre-activations times ``||W_dec[i]||``, divided again before
  decoding) is folded: ``W_enc[i] *= ||W_dec[i]||``, ``b_enc[i] *= ||W_dec[i]||``, ``W_dec[i] /= ||W_dec[i]||``.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import torch

from .. import atomic
from ..sae import TopKSAE
from ._common import (
    FormatError,
    build_sae,
    check_tensors,
    dtype_name,
    folded_weights,
    read_json,
    read_safetensors,
)
from .layernorm import LayerNormTopKSAE

CFG = "cfg.json"
WEIGHTS = "sae_weights.safetensors"
SCALER = "activation_scaler.json"  # SAELens checkpoints: {"scaling_factor": f}
TENSORS = {"W_enc", "b_enc", "W_dec", "b_dec"}
TOPK_DEFAULT_K = 100  # SAELens's TopKSAEConfig.k, used when a TopK cfg.json has no k
OPTIONAL = {"scaling_factor", "finetuning_scaling_factor", "norm_scaling_factor"}


def is_saelens_dir(path: Path) -> bool:
    """Whether ``path`` holds a SAELens ``cfg.json`` and ``sae_weights.safetensors``."""
    return (path / CFG).is_file() and (path / WEIGHTS).is_file()


def architecture_and_k(cfg: dict, where: str) -> tuple[str, int | None]:
    """The architecture and k SAELens's ``SAE.load_from_disk`` (6.x) reads from ``cfg``, by its rules:

    - a config without ``sae_lens_version`` (also under ``metadata``) or older than 6.0 goes through
      ``handle_pre_6_0_config``: ``activation_fn_str`` is renamed ``activation_fn``, ``architecture`` defaults to
      ``"standard"``, and ``activation_fn == "topk"`` with ``activation_fn_kwargs["k"]`` makes it ``"topk"`` with
      that k (an explicit ``architecture: "topk"`` also takes ``activation_fn_kwargs["k"]`` when present);
    - a 6.x config must name its ``architecture``;
    - a TopK config without k takes ``TopKSAEConfig``'s default, 100.
    """
    version = cfg.get("sae_lens_version") or (cfg.get("metadata") or {}).get("sae_lens_version")
    try:
        pre6 = not version or _version(str(version)) < (6,)
    except ValueError:
        raise FormatError(f"{where}: cfg.json has sae_lens_version {version!r}, not a version number") from None
    kwargs = cfg.get("activation_fn_kwargs") or {}
    if pre6:
        arch = cfg.get("architecture", "standard")
        act = cfg.get("activation_fn", cfg.get("activation_fn_str", "relu"))
        if act == "topk" and kwargs.get("k") is not None:
            return "topk", kwargs["k"]
        if arch == "topk" and "activation_fn_kwargs" in cfg:
            return arch, kwargs.get("k", cfg.get("k", TOPK_DEFAULT_K))
    elif "architecture" not in cfg:
        raise FormatError(f"{where}: a SAELens {version} cfg.json must say its 'architecture' (SAELens's loader "
                          f"fails without it); it has {sorted(cfg)}")
    else:
        arch = cfg["architecture"]
    return arch, cfg.get("k", TOPK_DEFAULT_K) if arch == "topk" else None


def _version(text: str) -> tuple[int, ...]:
    """``"6.0.0-rc.0"`` -> ``(6, 0, 0)``: the leading numbers of a version string."""
    nums = []
    for part in text.replace("-", ".").split("."):
        if not part.isdigit():
            break
        nums.append(int(part))
    if not nums:
        raise ValueError(text)
    return tuple(nums)


def _meta(cfg: dict, key: str):
    value = cfg.get(key)
    return value if value is not None else (cfg.get("metadata") or {}).get(key)


def load_saelens(path: str | os.PathLike, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> TopKSAE:
    """A SAELens TopK autoencoder folder -> :class:`~saehook.TopKSAE` with the same latents and reconstructions.

    Folding (see the module docstring) is computed in float64 and cast to ``dtype`` (default: the file's).
    ``metadata`` gets ``model`` and ``hook_name`` (SAELens/TransformerLens names such as
    ``blocks.8.hook_resid_post``), ``source_format`` and the original ``saelens_cfg``. Other architectures
    (``standard``, ``gated``, ``jumprelu``, ...) are refused: saehook loads TopK autoencoders only.
    """
    path = atomic.committed(path)
    cfg = read_json(path / CFG)
    where = str(path)
    arch, k = architecture_and_k(cfg, where)
    if arch != "topk":
        act = cfg.get("activation_fn_str", cfg.get("activation_fn")) or "relu"
        raise FormatError(f"{where} is a SAELens {arch!r} autoencoder (activation {act!r}) by SAELens's own reading "
                          f"of its cfg.json; saehook loads TopK autoencoders only (architecture 'topk')")
    t = read_safetensors(path / WEIGHTS)
    check_tensors(t, TENSORS, OPTIONAL, where, "SAELens")
    file_dtype = t["W_dec"].dtype
    W_enc, b_enc, W_dec, b_dec = (t[n].to(torch.float64) for n in ("W_enc", "b_enc", "W_dec", "b_dec"))
    if W_enc.dim() != 2:
        raise FormatError(f"{where}: W_enc has shape {tuple(W_enc.shape)}, expected [d_in, d_sae]")
    d_in, d_sae = cfg.get("d_in", W_enc.shape[0]), cfg.get("d_sae", W_enc.shape[1])
    if tuple(W_enc.shape) != (d_in, d_sae):
        raise FormatError(f"{where}: W_enc has shape {tuple(W_enc.shape)}, but cfg.json says [d_in, d_sae] = "
                          f"[{d_in}, {d_sae}] (SAELens stores W_enc as [d_in, d_sae])")
    W_enc = W_enc.T  # saehook: [n, d]
    if not cfg.get("apply_b_dec_to_input", True):
        b_enc = b_enc + W_enc @ b_dec  # W_enc(x - b_dec) + b_enc' == W_enc x + b_enc
    ones = "scaling_factor" not in t or bool((t["scaling_factor"] == 1).all())
    if not ones and not cfg.get("finetuning_scaling_factor"):
        raise FormatError(f"{where} has a per-latent scaling_factor other than ones but finetuning_scaling_factor is "
                          f"false; SAELens's loader refuses this combination, so saehook does too")
    for name in ("scaling_factor", "finetuning_scaling_factor"):
        if name in t:  # z -> z * f before decoding
            W_dec = W_dec * t[name].to(torch.float64).reshape(-1, 1)
    if cfg.get("rescale_acts_by_decoder_norm"):
        norms = W_dec.norm(dim=1)
        W_enc, b_enc, W_dec = W_enc * norms[:, None], b_enc * norms, W_dec / norms[:, None]

    norm = cfg.get("normalize_activations") or "none"
    if isinstance(norm, bool):  # SAELens before 6.0: True meant expected_average_only_in
        norm = "expected_average_only_in" if norm else "none"
    scale, layernorm = 1.0, False
    if norm == "expected_average_only_in":
        f = cfg.get("norm_scaling_factor")
        if f is None and "norm_scaling_factor" in t:
            if t["norm_scaling_factor"].numel() != 1:
                raise FormatError(f"{where}: norm_scaling_factor has shape {tuple(t['norm_scaling_factor'].shape)}, "
                                  f"expected a scalar")
            f = float(t["norm_scaling_factor"].reshape(()))
        if f is None and (path / SCALER).is_file():
            f = read_json(path / SCALER).get("scaling_factor")
        # No factor (or {SCALER} saying null): SAELens's SAE.load_from_disk applies no normalisation in this mode,
        # and its trainer folds the factor into the weights when training ends (writing "scaling_factor": null).
        try:
            scale = 1.0 if f is None else float(f)
        except (TypeError, ValueError):
            scale = float("nan")
        if not (math.isfinite(scale) and scale > 0):
            raise FormatError(f"{where}: norm_scaling_factor must be a positive number, got {f!r}")
    elif norm == "layer_norm":
        layernorm = True
    elif norm != "none":
        raise FormatError(f"{where} uses normalize_activations={norm!r}, which saehook does not support (it reads "
                          f"'none', 'expected_average_only_in' and 'layer_norm')")
    meta = {"model": _meta(cfg, "model_name"), "hook_name": _meta(cfg, "hook_name"),
            "source_format": "saelens", "saelens_cfg": cfg}
    meta = {key: v for key, v in meta.items() if v is not None}
    return build_sae(W_enc, b_enc, W_dec, b_dec, int(k), where=where, input_scale=scale,
                     cls=LayerNormTopKSAE if layernorm else TopKSAE, dtype=dtype or file_dtype, device=device,
                     metadata=meta)


def save_saelens(sae: TopKSAE, path: str | os.PathLike, *, hook_name: str | None = None,
                 model_name: str | None = None, hook_layer: int | None = None) -> Path:
    """Write ``path/cfg.json`` + ``path/sae_weights.safetensors`` as SAELens's ``SAE.load_from_disk`` reads them.

    ``architecture: "topk"``, ``k`` both top-level and in ``activation_fn_kwargs``, ``apply_b_dec_to_input:
    true``. A scalar input scale s != 1 is folded into the weights exactly as SAELens's own
    ``fold_activation_norm_scaling_factor`` does (``W_enc * s``, ``W_dec / s``, ``b_dec / s``) and written as
    ``normalize_activations: "none"``: same latents, same reconstructions. A per-channel scale ``s [d_in]`` is
    folded the same way, channel by channel (``W_enc diag(s)``, ``W_dec diag(1/s)``, ``b_dec / s``). A
    :class:`~saehook.formats.LayerNormTopKSAE` is written with ``normalize_activations: "layer_norm"``.
    ``hook_name`` / ``model_name`` default to the autoencoder's metadata; ``hook_layer`` to the number in a
    ``blocks.<n>.`` hook name. Both files are written as one unit (:func:`saehook.atomic.write_folder`): a
    failed save leaves the previous contents of ``path``.
    """
    md = sae.metadata
    hook_name = hook_name or md.get("hook_name") or md.get("hookpoint")
    model_name = model_name or md.get("model")
    if hook_layer is None and hook_name:
        m = re.match(r"blocks\.(\d+)\.", str(hook_name))
        hook_layer = int(m.group(1)) if m else None
    W_enc, b_enc, W_dec, b_dec = folded_weights(sae)
    layernorm = isinstance(sae, LayerNormTopKSAE)
    tensors = {"W_enc": W_enc.T.contiguous(), "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    cfg = {
        "architecture": "topk",
        "d_in": sae.d_in,
        "d_sae": sae.n_latents,
        "k": sae.k,
        "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": sae.k},
        "apply_b_dec_to_input": True,
        "normalize_activations": "layer_norm" if layernorm else "none",
        "finetuning_scaling_factor": False,
        "rescale_acts_by_decoder_norm": False,
        "dtype": dtype_name(sae.W_enc.dtype),
        "device": "cpu",
        "model_name": model_name,
        "hook_name": hook_name,
        "hook_layer": hook_layer,
        "hook_head_index": None,
        "context_size": md.get("context_size"),
        "prepend_bos": True,
        "dataset_path": md.get("dataset", ""),
        "dataset_trust_remote_code": False,
        "sae_lens_training_version": None,
        "model_from_pretrained_kwargs": {},
        "reshape_activations": "none",
        "metadata": {"model_name": model_name, "hook_name": hook_name, "hook_head_index": None,
                     "prepend_bos": True},
    }
    return atomic.write_folder(path, {WEIGHTS: atomic.safetensors_bytes(tensors), CFG: atomic.json_bytes(cfg)})
