"""Phi-3: fused qkv projection, optional partial rotary (rope_parameters)."""

from .spec import ArchSpec

SPEC = ArchSpec(model_types=("phi3",), sliding_window="sliding_window", partial_rotary=True)
