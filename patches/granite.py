"""Granite: Llama layout with attention_multiplier as the logit scale (passed as scaling);
GraniteMoE and GraniteMoE-Shared only change the MLP."""

from .spec import ArchSpec

SPEC = ArchSpec(model_types=("granite", "granitemoe", "granitemoeshared"))
