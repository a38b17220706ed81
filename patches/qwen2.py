"""Qwen2: Llama layout, q/k/v biases, optional sliding window on some layers (config.layer_types)."""

from .spec import ArchSpec

SPEC = ArchSpec(model_types=("qwen2",), sliding_window="sliding_window")
