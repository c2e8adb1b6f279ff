"""Re-export of :mod:`saehook.layernorm_sae`, where :class:`LayerNormTopKSAE` lives beside
:class:`~saehook.TopKSAE` (it differs from it only in ``normalise`` / ``unnormalise``). Kept so that
``from saehook.formats.layernorm import LayerNormTopKSAE`` keeps working."""

from ..layernorm_sae import LN_EPS, LN_FORMAT, LayerNormTopKSAE, LNCodes, RowStats

__all__ = ["LN_EPS", "LN_FORMAT", "LNCodes", "LayerNormTopKSAE", "RowStats"]
