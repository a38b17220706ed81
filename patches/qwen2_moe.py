"""Qwen2-MoE: Qwen2 attention (q/k/v biases), mixture-of-experts MLP."""

from .spec import ArchSpec

SPEC = ArchSpec(model_types=("qwen2_moe",), sliding_window="sliding_window")
