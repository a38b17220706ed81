"""Qwen3: Qwen2 plus per-head RMSNorm on q and k before RoPE."""

from .spec import ArchSpec

SPEC = ArchSpec(model_types=("qwen3",), sliding_window="sliding_window", qk_norm=True)
