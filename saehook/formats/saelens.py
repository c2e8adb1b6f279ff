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

SAELens's ``jumprelu`` architecture (Gemma Scope's, whose ``params.npz`` holds the same names), with a per-latent
``threshold [d_sae]``: ``z = ReLU(pre) * (pre > threshold)``, ``pre`` as above, reads into a
:class:`~saehook.JumpReLUSAE` with ``log_threshold = log(max(threshold, 0))`` (a threshold <= 0 gates nothing
ReLU has not already zeroed, so ``theta = 0`` is the same function). The same folds apply (``b_dec``, the input
scale, per-latent scaling factors; ``rescale_acts_by_decoder_norm`` is a TopK field SAELens ignores for jumprelu).
Its cap ``k`` is ``cfg.json``'s ``"k"`` when present (saehook writes it), else ``d_sae``: no cap.

SAELens's ``batchtopk`` and ``matryoshka_batchtopk`` training checkpoints (``TrainingSAE.save_model``: the four
tensors and a scalar ``topk_threshold``, the moving average of each batch's smallest kept activation; ``k`` in
``cfg.json``, ``matryoshka_widths`` the nested prefixes) read into a :class:`~saehook.BatchTopKSAE` /
:class:`~saehook.MatryoshkaBatchTopKSAE` with ``threshold = topk_threshold``, the same folds (including
``rescale_acts_by_decoder_norm``, on by default there, whose units the threshold is in), ``k`` that must be an
integer, and the cap ``k_max = d_sae`` (SAELens's threshold has none) unless ``cfg.json`` names one. At inference
that is SAELens's own conversion: its ``save_inference_model`` writes them as a ``jumprelu`` whose every threshold
is ``topk_threshold`` (which loads as above).
"""

from __future__ import annotations

import functools
import math
import os
import re
from pathlib import Path

import torch

from .. import atomic
from ..batchtopk import BatchTopKSAE
from ..jumprelu import JumpReLUSAE
from ..matryoshka import MatryoshkaBatchTopKSAE
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
JUMPRELU_TENSORS = TENSORS | {"threshold"}
BATCHTOPK_TENSORS = TENSORS | {"topk_threshold"}
BATCH_ARCHITECTURES = ("batchtopk", "matryoshka_batchtopk")  # SAELens training checkpoints only
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
    """A SAELens TopK or JumpReLU autoencoder folder -> :class:`~saehook.TopKSAE` (or :class:`~saehook.JumpReLUSAE`)
    with the same latents and reconstructions.

    Folding (see the module docstring) is computed in float64 and cast to ``dtype`` (default: the file's).
    ``metadata`` gets ``model`` and ``hook_name`` (SAELens/TransformerLens names such as
    ``blocks.8.hook_resid_post``), ``source_format`` and the original ``saelens_cfg``. A ``jumprelu`` folder (Gemma
    Scope's layout) gives a :class:`~saehook.JumpReLUSAE` (see the module docstring); other architectures
    (``standard``, ``gated``, ...) are refused.
    """
    path = atomic.committed(path)
    cfg = read_json(path / CFG)
    where = str(path)
    arch, k = architecture_and_k(cfg, where)
    if arch not in ("topk", "jumprelu", *BATCH_ARCHITECTURES):
        act = cfg.get("activation_fn_str", cfg.get("activation_fn")) or "relu"
        raise FormatError(f"{where} is a SAELens {arch!r} autoencoder (activation {act!r}) by SAELens's own reading "
                          f"of its cfg.json; saehook loads the architectures 'topk', 'jumprelu', 'batchtopk' and "
                          f"'matryoshka_batchtopk' only")
    jump, batch = arch == "jumprelu", arch in BATCH_ARCHITECTURES
    t = read_safetensors(path / WEIGHTS)
    check_tensors(t, JUMPRELU_TENSORS if jump else BATCHTOPK_TENSORS if batch else TENSORS, OPTIONAL, where,
                  f"SAELens {arch}")
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
    if cfg.get("rescale_acts_by_decoder_norm") and not jump:  # topk and the batchtopk training checkpoints
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
    elif norm == "layer_norm" and jump:
        raise FormatError(f"{where} is a jumprelu autoencoder with normalize_activations='layer_norm', which saehook "
                          f"has no class for; it reads layer_norm for topk autoencoders only")
    elif norm == "layer_norm":
        layernorm = True
    elif norm != "none":
        raise FormatError(f"{where} uses normalize_activations={norm!r}, which saehook does not support (it reads "
                          f"'none', 'expected_average_only_in' and 'layer_norm')")
    meta = {"model": _meta(cfg, "model_name"), "hook_name": _meta(cfg, "hook_name"),
            "source_format": "saelens", "saelens_cfg": cfg}
    meta = {key: v for key, v in meta.items() if v is not None}
    if jump:
        return _jumprelu(cfg, t, (W_enc, b_enc, W_dec, b_dec), where=where, scale=scale, dtype=dtype or file_dtype,
                         device=device, metadata=meta)
    if batch:
        return _batchtopk(arch, cfg, t, (W_enc, b_enc, W_dec, b_dec), where=where, scale=scale,
                          dtype=dtype or file_dtype, device=device, metadata=meta)
    return build_sae(W_enc, b_enc, W_dec, b_dec, int(k), where=where, input_scale=scale,
                     cls=LayerNormTopKSAE if layernorm else TopKSAE, dtype=dtype or file_dtype, device=device,
                     metadata=meta)


def _jumprelu(cfg: dict, t: dict, weights: tuple, *, where: str, scale: float, dtype: torch.dtype, device,
              metadata: dict) -> JumpReLUSAE:
    """A :class:`~saehook.JumpReLUSAE` from folded float64 ``weights`` (saehook's orientation) and ``t["threshold"]``;
    the cap ``k`` from ``cfg["k"]``, else ``d_sae``. Raises ``FormatError`` for a bad threshold or k."""
    W_enc, b_enc, W_dec, b_dec = weights
    n = W_enc.shape[0]
    theta = t["threshold"].to(torch.float64)
    if tuple(theta.shape) != (n,) or not bool(torch.isfinite(theta).all()):
        raise FormatError(f"{where}: threshold must hold {n} finite numbers (one per latent, d_sae = {n}); it has "
                          f"shape {tuple(theta.shape)}")
    k = cfg.get("k", n)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise FormatError(f"{where}: cfg.json's k (saehook's cap of active latents per row) must be an integer in "
                          f"[1, d_sae = {n}], got {k!r}")
    sae = build_sae(W_enc, b_enc, W_dec, b_dec, k, where=where, input_scale=scale, cls=JumpReLUSAE, dtype=dtype,
                    device=device, metadata=metadata)
    with torch.no_grad():  # theta <= 0 and theta = 0 are the same function after SAELens's ReLU: log(0) = -inf
        sae.log_threshold.copy_(theta.clamp_min(0).log())
    return sae


def _batchtopk(arch: str, cfg: dict, t: dict, weights: tuple, *, where: str, scale: float, dtype: torch.dtype,
               device, metadata: dict) -> BatchTopKSAE:
    """A :class:`~saehook.BatchTopKSAE` (``arch == "batchtopk"``) or :class:`~saehook.MatryoshkaBatchTopKSAE` from
    folded float64 ``weights`` and ``t["topk_threshold"]``; ``k`` from ``cfg["k"]`` (SAELens's default 100), the cap
    ``k_max`` from ``cfg["k_max"]``, else ``d_sae``; the prefixes from ``cfg["matryoshka_widths"]`` (``d_sae``
    appended when missing, as SAELens does). Raises ``FormatError`` for a k that is not a whole number, a bad
    threshold or bad widths."""
    W_enc, b_enc, W_dec, b_dec = weights
    n = W_enc.shape[0]
    k = cfg.get("k", TOPK_DEFAULT_K)
    if isinstance(k, bool) or not isinstance(k, (int, float)) or k != int(k) or not 1 <= k <= n:
        raise FormatError(f"{where}: a SAELens {arch} k of {k!r} latents per row on average; saehook's BatchTopK "
                          f"takes a whole number in [1, d_sae = {n}]: round it in cfg.json to load the file")
    theta = t["topk_threshold"].to(torch.float64)
    if theta.numel() != 1 or not bool(torch.isfinite(theta).all()):
        raise FormatError(f"{where}: topk_threshold must be one finite number, got shape {tuple(theta.shape)}")
    kw = {"k_max": cfg.get("k_max", n)}
    if arch == "matryoshka_batchtopk":
        widths = list(cfg.get("matryoshka_widths") or [])
        kw["prefixes"] = widths if widths and widths[-1] == n else [*widths, n]
    cls = MatryoshkaBatchTopKSAE if arch == "matryoshka_batchtopk" else BatchTopKSAE
    sae = build_sae(W_enc, b_enc, W_dec, b_dec, int(k), where=where, input_scale=scale,
                    cls=functools.partial(cls, **kw), dtype=dtype, device=device, metadata=metadata)
    with torch.no_grad():  # SAELens starts it at 0 (not -1): a checkpoint before any batch gates at 0, as it would
        sae.threshold.copy_(theta.reshape(()))
    return sae


def save_saelens(sae: TopKSAE, path: str | os.PathLike, *, hook_name: str | None = None,
                 model_name: str | None = None, hook_layer: int | None = None) -> Path:
    """Write ``path/cfg.json`` + ``path/sae_weights.safetensors`` as SAELens's ``SAE.load_from_disk`` reads them.

    ``architecture: "topk"``, ``k`` both top-level and in ``activation_fn_kwargs``, ``apply_b_dec_to_input:
    true``. A scalar input scale s != 1 is folded into the weights exactly as SAELens's own
    ``fold_activation_norm_scaling_factor`` does (``W_enc * s``, ``W_dec / s``, ``b_dec / s``) and written as
    ``normalize_activations: "none"``: same latents, same reconstructions. A per-channel scale ``s [d_in]`` is
    folded the same way, channel by channel (``W_enc diag(s)``, ``W_dec diag(1/s)``, ``b_dec / s``). A
    :class:`~saehook.formats.LayerNormTopKSAE` is written with ``normalize_activations: "layer_norm"``.
    A :class:`~saehook.JumpReLUSAE` is written as ``architecture: "jumprelu"`` with ``threshold = exp(log_threshold)``
    and its cap as ``k`` (which SAELens ignores; its bandwidth and sparsity coefficient are not written). A
    :class:`~saehook.BatchTopKSAE` (or Matryoshka) is written as SAELens writes its own BatchTopK ones, a
    ``jumprelu`` whose every threshold is the inference ``threshold`` (the folds leave pre-activations unchanged),
    with ``k = k_max``: it loads back as a :class:`~saehook.JumpReLUSAE` with the same codes.
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
    batch = isinstance(sae, BatchTopKSAE)  # as SAELens saves its own BatchTopK: a jumprelu at the inference threshold
    if batch and float(sae.threshold) < 0:
        raise FormatError(f"this {type(sae).__name__} has no inference threshold yet (threshold < 0), so SAELens could "
                          "not run it; train it or call sae.fit_threshold_(x) on a sample first")
    jump = isinstance(sae, JumpReLUSAE) or batch
    if jump:
        theta = sae.threshold.expand(sae.n_latents) if batch else sae.threshold
        tensors["threshold"] = theta.detach().to("cpu", W_enc.dtype).contiguous()
    cfg = {
        "architecture": "jumprelu" if jump else "topk",
        "d_in": sae.d_in,
        "d_sae": sae.n_latents,
        "k": sae.k_max if batch else sae.k,
        "activation_fn_str": "relu" if jump else "topk",
        "activation_fn_kwargs": {} if jump else {"k": sae.k},
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
