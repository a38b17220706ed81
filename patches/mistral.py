"""Mistral: Llama layout plus a sliding window on every layer; Ministral (window on some
layers), Ministral 3 and StarCoder2 (biases, LayerNorm) attend the same way."""

from .spec import ArchSpec

SPEC = ArchSpec(model_types=("mistral", "ministral", "ministral3", "starcoder2"), sliding_window="sliding_window")
