"""saehook: TopK sparse autoencoders attached to live Hugging Face language models.

Train them online from streamed forward passes, splice their reconstructions in, and steer or ablate
single latents during generation. The method is Gao et al. (2024), "Scaling and Evaluating Sparse
Autoencoders".
"""

from . import corpus, envoy, formats, hub
from .config import TrainConfig
from .corpus import Corpus
from .formats import FormatError, LayerNormTopKSAE, LNCodes, load
from .hooks import Hooked, attach
from .models import load_model
from .sae import Codes, SAEConfigError, SAEOutput, TopKSAE, fvu, geometric_median
from .trainer import NonFiniteError, SAETrainer
from .training import TrainReport

__all__ = [
    "Codes",
    "Corpus",
    "FormatError",
    "LNCodes",
    "LayerNormTopKSAE",
    "Hooked",
    "NonFiniteError",
    "SAEConfigError",
    "SAEOutput",
    "SAETrainer",
    "TopKSAE",
    "TrainConfig",
    "TrainReport",
    "attach",
    "corpus",
    "envoy",
    "formats",
    "hub",
    "load",
    "fvu",
    "geometric_median",
    "load_model",
]
__version__ = "0.1.0"
