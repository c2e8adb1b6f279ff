"""saehook: TopK sparse autoencoders attached to live Hugging Face language models.

Train them online from streamed forward passes, splice their reconstructions in, and steer or ablate
single latents during generation. The method is Gao et al. (2024), "Scaling and Evaluating Sparse
Autoencoders".
"""

from .sae import Codes, SAEConfigError, SAEOutput, TopKSAE, fvu, geometric_median

__all__ = ["Codes", "SAEConfigError", "SAEOutput", "TopKSAE", "fvu", "geometric_median"]
__version__ = "0.1.0"
