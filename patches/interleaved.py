"""Llama layout with RoPE on interleaved channel pairs (x_2i, x_2i+1): Llama 4 (text;
complex-number rotation, NoPE layers, chunked attention on some layers), Helium,
ERNIE 4.5 and ERNIE 4.5 MoE."""

from .spec import ArchSpec

SPEC = ArchSpec(model_types=("llama4_text", "helium", "ernie4_5", "ernie4_5_moe"), rope_layout="interleaved")
