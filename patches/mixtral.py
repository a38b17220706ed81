"""Mixtral: Mistral attention (sliding window), mixture-of-experts MLP."""

from .spec import ArchSpec

SPEC = ArchSpec(model_types=("mixtral",), sliding_window="sliding_window")
