"""gape: Gated Adaptive Positional Encoding for Llama-style language models.

Attention:  ``gape.attention`` (a drop-in for ``F.scaled_dot_product_attention``
with a query gate and a key gate) and ``gape.attention_varlen`` (packed sequences). Models: ``gape.load_model``, ``gape.patch``,
``gape.unpatch``, ``gape.GapeConfig``, ``gape.save_gates``, ``gape.load_gates``,
``gape.save_pretrained``, ``gape.from_pretrained``, ``gape.with_rope_scaling``,
``gape.with_positional``. Context parallelism over ``torch.distributed``:
``gape.distributed``. Heavy dependencies (transformers) load on first use.

The ``"gape"`` attention implementation is registered with transformers by
``import gape.hf`` (and by every function above that needs it). ``import gape``
registers it too when transformers is already imported; it never imports
transformers itself, so it stays light.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING

from . import _checkout, _moved

_checkout.install()  # before anything imports gape.kernels or gape.patches
_moved.install()  # the earlier flat module paths (gape.models, gape.ops, ...) stay importable

from .core.api import BACKENDS, attention, attention_varlen  # noqa: E402

__version__ = "0.1.0"

# public name -> module that defines it (imported on first access)
_LAZY = {
    "GapeConfig": "gape.hf.config",
    "patch": "gape.hf",
    "unpatch": "gape.hf",
    "save_gates": "gape.hf",
    "load_gates": "gape.hf",
    "save_pretrained": "gape.hf.pretrained",
    "from_pretrained": "gape.hf.pretrained",
    "load_model": "gape.hf.models",
    "with_rope_scaling": "gape.hf.models",
    "with_positional": "gape.hf.positional",
}

# public sub-modules reachable as attributes of `gape` without an import
_SUBPACKAGES = {"distributed": "gape.distributed", "hf": "gape.hf", "ops": "gape.core.ops"}

__all__ = ["attention", "attention_varlen", "BACKENDS", "__version__", *_LAZY]

if TYPE_CHECKING:  # the lazy names, for type checkers and the API reference (never run)
    from gape.hf.config import GapeConfig
    from .hf import load_gates, patch, save_gates, unpatch
    from gape.hf.models import load_model, with_rope_scaling
    from gape.hf.positional import with_positional
    from gape.hf.pretrained import from_pretrained, save_pretrained


def __getattr__(name: str):
    if name in _SUBPACKAGES:  # torch.distributed and transformers load only when asked for
        return importlib.import_module(_SUBPACKAGES[name])
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gape' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public names, the lazy ones included, so ``dir(gape)`` and tab completion list them
    without importing them (as scipy does for its lazy sub-modules)."""
    return sorted(set(__all__) | set(_SUBPACKAGES))


if "transformers" in sys.modules:
    importlib.import_module("gape.hf")  # registers "gape" with the transformers already in use
