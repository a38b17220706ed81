"""Granite: Llama layout with attention_multiplier as the logit scale (passed as scaling)."""

from .spec import ArchSpec

SPEC = ArchSpec(model_types=("granite",))
