"""Share autoencoders on the Hugging Face Hub: a model card from the autoencoder's metadata, and an upload.

``huggingface_hub`` is imported only by :func:`push_to_hub`; :func:`model_card` and :func:`save_with_card`
work offline.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from . import atomic
from .hookpoints import hookpoint_dirname
from .sae import TopKSAE

CARD_NAME = "README.md"
_SHOWN = {"model", "hookpoint", "hook_name", "tokens", "steps", "source_format", "source_file"}
_HUB_ID_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_./")


def _cell(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _normalisation(sae: TopKSAE) -> str:
    if getattr(sae, "normalize", None) == "layernorm":
        return "per-row layer norm (OpenAI's LN: mean 0, std 1 per row; reconstructions un-normalised)"
    if sae.per_channel_scale:
        s = sae.input_scale
        return (f"per-channel input scale s [{sae.d_in}] (1 / std of each channel; s in [{float(s.min()):.4g}, "
                f"{float(s.max()):.4g}]; applied by encode, undone by decode)")
    s = float(sae.input_scale)
    return "none" if s == 1.0 else f"scalar input scale s = {s:.6g} (applied by encode, undone by decode)"


def model_card(sae: TopKSAE, *, repo_id: str | None = None, hookpoint: str | None = None) -> str:
    """A markdown model card (Hub README) for an autoencoder, from its shape and ``sae.metadata``.

    ``sae.metadata`` keys used: ``model``, ``hookpoint`` (or ``hook_name``), ``tokens``, ``steps``,
    ``source_format``; every other scalar entry is listed as a metric. ``repo_id`` and ``hookpoint`` (the
    repo sub-folder it lives in) go into the loading example.
    """
    md = sae.metadata or {}
    model = md.get("model")
    site = md.get("hookpoint") or md.get("hook_name") or hookpoint
    front = ["---", "library_name: saehook", "tags:", "- saehook", "- sparse-autoencoder", "- topk-sae",
             "- interpretability"]
    if isinstance(model, str) and "/" in model and set(model) <= _HUB_ID_CHARS:
        front.append(f"base_model: {model}")
    front.append("---")

    title = "TopK sparse autoencoder"
    if model:
        title += f" for {model}"
    if site:
        title += f" at `{site}`"
    rows = [
        ("Model", f"`{model}`" if model else "not recorded"),
        ("Hookpoint", f"`{site}`" if site else "not recorded"),
        ("Input width (d_in)", sae.d_in),
        ("Latents (n_latents)", sae.n_latents),
        ("Active latents per row (k)", sae.k),
        ("Multi-TopK", sae.multi_topk),
        ("Input normalisation", _normalisation(sae)),
        ("Parameter dtype", str(sae.W_enc.dtype).removeprefix("torch.")),
        ("Tokens trained on", md["tokens"] if "tokens" in md else "not recorded"),
    ]
    if "steps" in md:
        rows.append(("Optimizer steps", md["steps"]))
    if md.get("source_format"):
        rows.append(("Converted from", f"{md['source_format']} format"))
    metrics = [(key, v) for key, v in sorted(md.items())
               if key not in _SHOWN and isinstance(v, (int, float, str, bool)) and v is not None]

    if getattr(sae, "normalize", None) == "layernorm":
        formula = ("`x' = (x - mean(x)) / (std(x) + 1e-5)` per row, `z = ReLU(TopK(W_enc (x' - b_dec) + b_enc))`, "
                   "`x_hat = (W_dec^T z + b_dec) * std(x) + mean(x)`")
    else:
        formula = "`z = ReLU(TopK(W_enc (s x - b_dec) + b_enc))`, `x_hat = (W_dec^T z + b_dec) / s`"
        if sae.per_channel_scale:
            formula += " (`s` per channel, elementwise)"
    where = repo_id or "path/to/this/folder"
    key = site if isinstance(site, str) and md.get("source_format") in (None, "saehook") else "model.layers.N"
    load_args = f'"{where}"' + (f', hookpoint="{hookpoint}"' if hookpoint else "")
    lines = [
        *front,
        "",
        f"# {title}",
        "",
        "A TopK sparse autoencoder (Gao et al., 2024, *Scaling and Evaluating Sparse Autoencoders*) in saehook "
        f"format: {formula}.",
        "",
        "| | |",
        "|---|---|",
        *(f"| {name} | {_cell(v)} |" for name, v in rows),
        "",
        "## Metrics",
        "",
    ]
    if metrics:
        lines += ["| metric | value |", "|---|---|", *(f"| {_cell(n)} | {_cell(v)} |" for n, v in metrics)]
    else:
        lines.append("No evaluation metrics were recorded in this autoencoder's metadata.")
    lines += [
        "",
        "## Usage",
        "",
        "```python",
        "import saehook",
        "",
        f"sae = saehook.load({load_args})",
        f'model, tokenizer = saehook.load_model("{model or "<the model it was trained on>"}")',
        'input_ids = tokenizer("Hello world", return_tensors="pt").input_ids',
        f'with saehook.attach(model, {{"{key}": sae}}) as hooked:',
        "    model(input_ids)",
        f'    codes = hooked.latents["{key}"]  # values and indices of the k active latents per token',
        "```",
        "",
        "## Files",
        "",
        "`cfg.json` (configuration and metadata, JSON) and `sae.safetensors` (tensors `W_enc [n_latents, d_in]`, "
        "`b_enc`, `W_dec [n_latents, d_in]`, `b_dec`, `input_scale` (a scalar, or `[d_in]` per channel)). "
        "Nothing is pickled.",
        "",
    ]
    return "\n".join(lines)


def save_with_card(sae: TopKSAE, path: str | os.PathLike, *, repo_id: str | None = None,
                   hookpoint: str | None = None) -> Path:
    """``sae.save(path)`` plus ``path/README.md`` = :func:`model_card`, written as one unit
    (:func:`saehook.atomic.write_folder`). Returns ``path``."""
    card = model_card(sae, repo_id=repo_id, hookpoint=hookpoint).encode()
    return atomic.write_folder(path, {**sae.to_files(), CARD_NAME: card})


def push_to_hub(sae: TopKSAE, repo_id: str, *, hookpoint: str | None = None, private: bool = False,
                token: str | None = None, commit_message: str | None = None) -> str:
    """Upload an autoencoder to a Hub model repo (created if needed) and return the commit URL.

    The repo gets the files of :meth:`TopKSAE.save` and a README model card, at its root or, with
    ``hookpoint="layers.20"``, in that sub-folder (so one repo can hold every hookpoint of a run; a root README
    is written only if the repo has none). Load it back with ``saehook.load(repo_id, hookpoint=...)``.
    ``private`` applies when the repo is created; ``token`` defaults to the logged-in one.
    """
    try:
        from huggingface_hub import HfApi
    except ImportError as e:  # pragma: no cover - transformers depends on it
        raise ImportError("push_to_hub needs huggingface_hub (pip install huggingface_hub)") from e
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    folder = hookpoint_dirname(hookpoint) if hookpoint is not None else None
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        save_with_card(sae, root / folder if folder else root, repo_id=repo_id, hookpoint=folder)
        if folder and not api.file_exists(repo_id, CARD_NAME):
            (root / CARD_NAME).write_text(model_card(sae, repo_id=repo_id, hookpoint=folder))
        info = api.upload_folder(
            repo_id=repo_id, folder_path=str(root),
            commit_message=commit_message or f"Upload saehook autoencoder{f' for {folder}' if folder else ''}",
        )
    return str(getattr(info, "commit_url", info))
