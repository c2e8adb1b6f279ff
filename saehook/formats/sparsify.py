"""EleutherAI sparsify: ``<hookpoint>/cfg.json`` + ``<hookpoint>/sae.safetensors``.

sparsify's ``SparseCoder`` computes ``z = TopK(ReLU(encoder(x - b_dec)))`` and ``x_hat = z W_dec + b_dec``
with ``encoder.weight [n, d]``, ``encoder.bias [n]``, ``W_dec [n, d]``, ``b_dec [d]`` and no input
normalisation. ReLU is monotone, so ReLU-then-TopK and saehook's TopK-then-ReLU give the same values; the two
only differ in which zero-valued latents fill the k slots of a row with fewer than k positive
pre-activations, which changes no reconstruction.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .. import atomic
from ..sae import TopKSAE
from ._common import (
    FormatError,
    build_sae,
    check_tensors,
    folded_weights,
    listing,
    read_json,
    read_safetensors,
    tensor_names,
)

CFG = "cfg.json"
WEIGHTS = "sae.safetensors"
TENSORS = {"encoder.weight", "encoder.bias", "W_dec", "b_dec"}
DEFAULT_K = 32  # sparsify's SparseCoderConfig.k, used by load_from_disk when cfg.json has no "k"
DEFAULT_EXPANSION = 32  # SparseCoderConfig.expansion_factor (num_latents = d_in * it when num_latents is 0)


def is_sparsify_dir(path: Path) -> bool:
    """``cfg.json`` + ``sae.safetensors`` holding sparsify's tensor names (not saehook's)."""
    return (path / CFG).is_file() and (path / WEIGHTS).is_file() and "encoder.weight" in tensor_names(path / WEIGHTS)


def load_sparsify(path: str | os.PathLike, *, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> TopKSAE:
    """One sparsify autoencoder folder -> :class:`~saehook.TopKSAE` (same latents and reconstructions).

    ``dtype`` defaults to the file's. ``metadata`` gets ``hookpoint`` (the folder name, which is how sparsify
    names them), ``source_format`` and the original ``sparsify_cfg``. Missing keys take sparsify's own defaults
    (``SparseCoderConfig``): ``k`` 32, ``activation`` ``"topk"``, ``num_latents`` ``d_in * expansion_factor``
    (32). A ``cfg.json`` without ``d_in`` (which sparsify's loader cannot read either), transcoders
    (``transcode``), skip connections (``W_skip``) and non-TopK activations are refused with the reason.
    """
    name = Path(path).name  # the hookpoint, even when reading a killed save's aside copy
    path = atomic.committed(path)
    cfg = read_json(path / CFG)
    where = str(path)
    activation = cfg.get("activation", "topk")
    if activation != "topk":
        raise FormatError(f"{where} is a sparsify autoencoder with activation {activation!r}; saehook loads TopK "
                          f"autoencoders only")
    t = read_safetensors(path / WEIGHTS)
    transcode = bool(cfg.get("transcode"))
    if (cfg.get("skip_connection") or "W_skip" in t) and not transcode:
        raise FormatError(f"{where} has a skip connection (W_skip) but is no transcoder; saehook's TopKSAE has none, "
                          f"so it cannot be loaded without changing its reconstructions")
    check_tensors(t, TENSORS, {"W_skip"} if transcode else set(), where, "sparsify")
    if "d_in" not in cfg:
        raise FormatError(f"{path / CFG} has no 'd_in', which sparsify's SparseCoder.load_from_disk requires (it "
                          f"fails on such a folder); it has {sorted(cfg)}")
    W_enc = t["encoder.weight"]
    n, d = W_enc.shape
    # sparsify's rules (SparseCoderConfig defaults): k = 32; num_latents = num_latents or d_in * expansion_factor
    k = cfg.get("k", DEFAULT_K)
    expected_n = cfg.get("num_latents") or cfg["d_in"] * cfg.get("expansion_factor", DEFAULT_EXPANSION)
    if cfg["d_in"] != d or expected_n != n:
        raise FormatError(f"{where}: cfg.json (d_in={cfg['d_in']}, num_latents={cfg.get('num_latents')}, "
                          f"expansion_factor={cfg.get('expansion_factor')}: {expected_n} latents as sparsify counts "
                          f"them) does not match encoder.weight of shape {tuple(W_enc.shape)} [num_latents, d_in]")
    meta = {"hookpoint": name, "source_format": "sparsify", "sparsify_cfg": cfg}
    if transcode:
        return _transcoder(t, k, bool(cfg.get("multi_topk", False)), meta, dtype, device)
    return build_sae(W_enc, t["encoder.bias"], t["W_dec"], t["b_dec"], k, where=where,
                     multi_topk=bool(cfg.get("multi_topk", False)), dtype=dtype, device=device, metadata=meta)


def _transcoder(t: dict, k: int, multi_topk: bool, meta: dict, dtype, device) -> TopKSAE:
    """A sparsify transcoder (``transcode``; with ``W_skip``: a skip-transcoder) as saehook's class, scales 1."""
    from ..transcoder import SkipTranscoder, Transcoder

    cls = SkipTranscoder if "W_skip" in t else Transcoder
    n, d = t["encoder.weight"].shape
    dt = dtype or t["encoder.weight"].dtype
    tc = cls(d, n, k, multi_topk=multi_topk, dtype=dt, device="meta").to_empty(device=device or "cpu")
    state = {"W_enc": t["encoder.weight"], "b_enc": t["encoder.bias"], "W_dec": t["W_dec"], "b_dec": t["b_dec"],
             "input_scale": torch.ones(()), "output_scale": torch.ones(())}
    if "W_skip" in t:
        state["W_skip"] = t["W_skip"]
    tc.load_state_dict({name: v.to(dt) for name, v in state.items()})
    tc.metadata = meta
    return tc


def _transcoder_tensors(sae) -> dict:
    """A transcoder's tensors in sparsify's layout, its scales folded in (float64, cast back):
    ``encoder.weight = s_in W_enc``, ``W_dec / s_out``, ``b_dec / s_out``, ``W_skip s_in / s_out``."""
    s_in, s_out = float(sae.input_scale), float(sae.output_scale)
    dt = sae.W_enc.dtype
    f = {n: p.detach().to("cpu", torch.float64) for n, p in sae.named_parameters()}
    out = {"encoder.weight": f["W_enc"] * s_in, "encoder.bias": f["b_enc"], "W_dec": f["W_dec"] / s_out,
           "b_dec": f["b_dec"] / s_out}
    if "W_skip" in f:
        out["W_skip"] = f["W_skip"] * (s_in / s_out)
    return {n: v.to(dt) for n, v in out.items()}


def load_sparsify_dir(path: str | os.PathLike, *, device: torch.device | str | None = None,
                      dtype: torch.dtype | None = None) -> dict[str, TopKSAE]:
    """A sparsify run folder (one ``<hookpoint>/`` sub-folder per hookpoint) -> ``{hookpoint: TopKSAE}``.

    A single autoencoder folder gives a one-entry dict keyed by its folder name.
    """
    path = Path(path)
    if is_sparsify_dir(path):
        return {path.name: load_sparsify(path, device=device, dtype=dtype)}
    subs = sorted(p for p in path.iterdir() if p.is_dir() and is_sparsify_dir(p)) if path.is_dir() else []
    if not subs:
        raise FormatError(f"{path} holds no sparsify autoencoder (<hookpoint>/cfg.json + sae.safetensors with "
                          f"encoder.weight); found {listing(path)}")
    return {p.name: load_sparsify(p, device=device, dtype=dtype) for p in subs}


def save_sparsify(sae: TopKSAE, path: str | os.PathLike) -> Path:
    """Write ``path/cfg.json`` + ``path/sae.safetensors`` in sparsify's layout (``SparseCoder.load_from_disk``).

    sparsify has no input normalisation, so an ``input_scale`` s != 1, scalar or per channel, is folded into the
    weights (``encoder.weight = W_enc diag(s)``, ``W_dec diag(1/s)``, ``b_dec / s``; see "EleutherAI sparsify"
    in docs/formats.md): latents and reconstructions are unchanged.
    ``normalize_decoder`` is written true only if the (folded) decoder rows have unit norm, since sparsify
    renormalises them after every training step. A layer-norm or a BatchTopK autoencoder cannot be represented: error.
    Both files are written as one unit (:func:`saehook.atomic.write_folder`): a failed save leaves the previous
    contents of ``path``.
    """
    from ..batchtopk import BatchTopKSAE
    from .layernorm import LayerNormTopKSAE

    if isinstance(sae, LayerNormTopKSAE):
        raise FormatError("sparsify has no per-row layer-norm input normalisation, so this LayerNormTopKSAE cannot "
                          "be written in its format without changing its outputs; use save_saelens (layer_norm) "
                          "or sae.save")
    if isinstance(sae, BatchTopKSAE):
        raise FormatError(f"sparsify has no thresholded (BatchTopK) autoencoder, and its per-row TopK would change "
                          f"this {type(sae).__name__}'s codes; use save_saelens (a jumprelu at its threshold) or "
                          "sae.save")
    if sae.transcoder:
        tensors = _transcoder_tensors(sae)
        W_enc, b_enc, W_dec, b_dec = (tensors[n] for n in ("encoder.weight", "encoder.bias", "W_dec", "b_dec"))
    else:
        W_enc, b_enc, W_dec, b_dec = folded_weights(sae)
        tensors = {"encoder.weight": W_enc, "encoder.bias": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    unit = bool(torch.allclose(W_dec.double().norm(dim=1), torch.ones(sae.n_latents, dtype=torch.float64),
                               atol=1e-3))
    cfg = {
        "activation": "topk",
        "expansion_factor": max(1, sae.n_latents // sae.d_in),
        "normalize_decoder": unit,
        "num_latents": sae.n_latents,
        "k": sae.k,
        "multi_topk": sae.multi_topk,
        "skip_connection": "W_skip" in tensors,
        "transcode": bool(sae.transcoder),
        "d_in": sae.d_in,
    }
    return atomic.write_folder(path, {WEIGHTS: atomic.safetensors_bytes(tensors, metadata={"format": "pt"}),
                                      CFG: atomic.json_bytes(cfg)})
