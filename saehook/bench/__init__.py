"""SAEBench's metrics (Karvonen et al. 2025), offline, on any attached dictionary: sparse probing, feature
absorption and autointerp detection, from one activation cache (:mod:`saehook.bench.activations`)."""

from .activations import Ragged, pooled_codes, token_activations

__all__ = ["Ragged", "pooled_codes", "token_activations"]
