"""Mixtral: Mistral attention (sliding window), mixture-of-experts MLP; PhiMoE likewise."""

from .spec import ArchSpec

SPEC = ArchSpec(model_types=("mixtral", "phimoe"), sliding_window="sliding_window")
