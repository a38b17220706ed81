"""Cohere (Command R): RoPE on interleaved channel pairs (x_2i, x_2i+1)."""

from .spec import ArchSpec

SPEC = ArchSpec(model_types=("cohere",), rope_layout="interleaved")
