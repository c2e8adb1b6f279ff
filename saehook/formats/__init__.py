"""Read and write the sparse-autoencoder formats of the ecosystem (see ``docs/formats.md``).

- :func:`load`: detect and load saehook, EleutherAI sparsify, SAELens and OpenAI ``sparse_autoencoder``
  autoencoders, one or a folder of hookpoints, from a path or a Hugging Face Hub repo.
- :func:`load_sparsify`, :func:`load_sparsify_dir`, :func:`save_sparsify`: sparsify's layout.
- :func:`load_saelens`, :func:`save_saelens`: SAELens's layout.
- :func:`load_openai`: OpenAI's released ``.pt`` state dicts (read with a weights-only unpickler).
- ``saehook.formats.dictionary_learning``: its ``ae.pt`` runs are recognised and refused (pickles);
  ``from_state_dict`` converts a state dict you unpickled.
- :class:`LayerNormTopKSAE`: a :class:`~saehook.TopKSAE` with OpenAI's per-row layer-norm preprocessing.

Only safetensors, JSON and (for OpenAI's files) weights-only ``torch.load`` are read: nothing is unpickled.
"""

from ._common import FormatError
from .detect import FORMATS, detect_format, find_hookpoints, load
from .layernorm import LN_FORMAT, LayerNormTopKSAE, LNCodes
from .openai import load_openai
from .saelens import load_saelens, save_saelens
from .sparsify import load_sparsify, load_sparsify_dir, save_sparsify

__all__ = [
    "FORMATS",
    "LN_FORMAT",
    "FormatError",
    "LNCodes",
    "LayerNormTopKSAE",
    "detect_format",
    "find_hookpoints",
    "load",
    "load_openai",
    "load_saelens",
    "load_sparsify",
    "load_sparsify_dir",
    "save_saelens",
    "save_sparsify",
]
