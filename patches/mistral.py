"""Mistral: Llama layout plus a sliding window on every layer."""

from .spec import ArchSpec

SPEC = ArchSpec(model_types=("mistral",), sliding_window="sliding_window")
