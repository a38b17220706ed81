"""Granite: Llama layout with attention_multiplier as the logit scale (passed as scaling);
GraniteMoE and GraniteMoE-Shared only change the MLP; Granite SWA and GraniteMoE SWA add a
sliding window on some layers."""

from .spec import ArchSpec

SPEC = ArchSpec(model_types=("granite", "granitemoe", "granitemoeshared", "granite_swa", "granitemoe_swa"),
                sliding_window="sliding_window")
