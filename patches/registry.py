"""The registry of per-architecture specs read by the generic patcher in ``gape.hf``.

Adding an architecture: a module in ``patches/`` with ``SPEC = ArchSpec(...)``
(or ``SPECS``, a tuple of them) saying what differs from Llama, its name in ``_MODULES``, and a tiny-config test
in tests/test_archs.py. At run time, ``register(ArchSpec(...))`` adds one.

``patches/`` has no ``__init__.py`` on purpose (see ``gape/_checkout.py``): it is
``gape.patches``, never a top-level package of the clone root.
"""

from __future__ import annotations

import importlib

from .spec import ArchSpec

_MODULES = (
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "olmo2", "granite", "cohere",
    "stablelm", "gpt_neox", "qwen2_moe", "mixtral", "interleaved", "glm", "partial_rotary", "exaone4", "phi", "gpt_oss",
    "hybrid", "hybrid_qk_norm", "nemotron_h", "mla", "hunyuan",
)

REGISTRY: dict[str, ArchSpec] = {}


def register(spec: ArchSpec) -> ArchSpec:
    """Add (or replace) the spec for each of ``spec.model_types``."""
    for model_type in spec.model_types:
        REGISTRY[model_type] = spec
    return spec


def supported_model_types() -> tuple[str, ...]:
    return tuple(sorted(REGISTRY))


def get_spec(model_type: str) -> ArchSpec:
    """The spec for ``model_type``; ValueError listing the supported ones otherwise."""
    try:
        return REGISTRY[model_type]
    except KeyError:
        raise ValueError(
            f"GAPE has no patch for model_type {model_type!r}; supported: {', '.join(supported_model_types())}. "
            "GAPE needs a RoPE decoder whose attention goes through transformers' AttentionInterface "
            "(add a spec under patches/)"
        ) from None


for _name in _MODULES:
    _module = importlib.import_module(f"gape.patches.{_name}")
    for _spec in getattr(_module, "SPECS", None) or (_module.SPEC,):
        register(_spec)

__all__ = ["ArchSpec", "REGISTRY", "register", "get_spec", "supported_model_types"]
