"""Mistral: Llama layout plus a sliding window on every layer; Ministral (window on some
layers), Ministral 3, StarCoder2 (biases, LayerNorm) and CWM attend the same way."""

from .spec import ArchSpec

SPEC = ArchSpec(model_types=("mistral", "ministral", "ministral3", "starcoder2", "cwm"), sliding_window="sliding_window")
