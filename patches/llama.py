"""Llama (and SmolLM2, which is a Llama)."""

from .spec import ArchSpec

SPEC = ArchSpec(model_types=("llama",))
