"""Gemma: Llama layout (head_dim in the config, scaled embeddings, GeGLU MLP)."""

from .spec import ArchSpec

SPEC = ArchSpec(model_types=("gemma",))
