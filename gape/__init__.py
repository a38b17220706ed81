"""gape: Gated Adaptive Positional Encoding for Llama-style language models.

Attention:  ``gape.attention`` (a drop-in for ``F.scaled_dot_product_attention``
with a query gate and a key gate). Models: ``gape.load_model``, ``gape.patch``,
``gape.unpatch``, ``gape.GapeConfig``, ``gape.save_gates``, ``gape.load_gates``,
``gape.with_rope_scaling``, ``gape.with_positional``. Heavy dependencies (transformers) load on first use.
"""

from __future__ import annotations

import importlib

from .api import BACKENDS, attention

__version__ = "0.1.0"

# public name -> module that defines it (imported on first access)
_LAZY = {
    "GapeConfig": "gape.config",
    "patch": "gape.hf",
    "unpatch": "gape.hf",
    "save_gates": "gape.hf",
    "load_gates": "gape.hf",
    "load_model": "gape.models",
    "with_rope_scaling": "gape.models",
    "with_positional": "gape.positional",
}

__all__ = ["attention", "BACKENDS", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gape' has no attribute {name!r}")
