"""saehook: TopK sparse autoencoders attached to live Hugging Face language models.

Train them online from streamed forward passes, splice their reconstructions in, and steer or ablate
single latents during generation. The method is Gao et al. (2024), "Scaling and Evaluating Sparse
Autoencoders".
"""

import os as _os

# Idle OpenMP threads spinning on a small shared machine can cost 100x on sorts and top-k; a passive wait
# policy must be set before torch loads its OpenMP runtime. A user's own setting always wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from . import corpus, envoy, formats, hub
from .ablation import ablation_sparsity
from .batchtopk import BatchTopKSAE
from .config import TrainConfig
from .corpus import Corpus
from .evaluate import EvalReport, evaluate
from .formats import FormatError, load
from .hooks import Hooked, attach
from .jumprelu import JumpReLUSAE
from .layernorm_sae import LayerNormTopKSAE, LNCodes
from .matryoshka import MatryoshkaBatchTopKSAE
from .models import load_model
from .probe import probe_loss
from .sae import Codes, SAEConfigError, SAEOutput, TopKSAE, fvu, geometric_median
from .trainer import NonFiniteError, SAETrainer
from .training import TrainReport

__all__ = [
    "BatchTopKSAE",
    "Codes",
    "Corpus",
    "EvalReport",
    "FormatError",
    "LNCodes",
    "LayerNormTopKSAE",
    "MatryoshkaBatchTopKSAE",
    "Hooked",
    "JumpReLUSAE",
    "NonFiniteError",
    "SAEConfigError",
    "SAEOutput",
    "SAETrainer",
    "TopKSAE",
    "TrainConfig",
    "TrainReport",
    "ablation_sparsity",
    "attach",
    "corpus",
    "envoy",
    "evaluate",
    "formats",
    "hub",
    "load",
    "fvu",
    "geometric_median",
    "load_model",
    "probe_loss",
]
__version__ = "0.1.0"
