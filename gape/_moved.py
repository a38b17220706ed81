"""The package's earlier module paths, kept working.

The modules were grouped into wings (``gape.core``, ``gape.hf``, ``gape.tasks``,
``gape.experiments``). Code written against the earlier flat layout
(``gape.models``, ``gape.training_free``, ``gape.attention_probe``, ``gape.ops``,
...) keeps working: each earlier path is an alias of the module at its new home,
the same module object (so ``monkeypatch`` and ``isinstance`` see one module),
sub-modules included (``gape.niah.runner`` is ``gape.tasks.niah.runner``).
This table is the one place that lists them.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from importlib.machinery import ModuleSpec

# earlier path -> home (a package's sub-modules follow it)
MOVED = {
    "gape.api": "gape.core.api",
    "gape.reference": "gape.core.reference",
    "gape.torch_backend": "gape.core.torch_backend",
    "gape.torch_tiles": "gape.core.torch_tiles",
    "gape.sdpa_backend": "gape.core.sdpa_backend",
    "gape.ops": "gape.core.ops",
    "gape.gates": "gape.hf.gates",
    "gape.config": "gape.hf.config",
    "gape.compat": "gape.hf.compat",
    "gape.pretrained": "gape.hf.pretrained",
    "gape.attention_probe": "gape.hf.attention_probe",
    "gape.positional": "gape.hf.positional",
    "gape.models": "gape.hf.models",
    "gape.niah": "gape.tasks.niah",
    "gape.lmeval": "gape.tasks.lmeval",
    "gape.prompts": "gape.tasks.prompts",
    "gape.methods": "gape.tasks.methods",
    "gape.synthetic": "gape.experiments.synthetic",
    "gape.extrapolate": "gape.experiments.extrapolate",
    "gape.calibrate": "gape.experiments.calibrate",
    "gape.training_free": "gape.experiments.training_free",
    "gape.inspect": "gape.experiments.inspect",
}


def home(name: str) -> str | None:
    """The module an earlier path now names, or None when ``name`` did not move."""
    parts = name.split(".")
    key = ".".join(parts[:2])  # every earlier path is gape.<name>; "gape.niah.runner" -> "gape.niah"
    return MOVED[key] + name[len(key):] if key in MOVED else None


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str):
        self.target = target
        self._spec = None

    def create_module(self, spec):
        module = importlib.import_module(self.target)
        self._spec = module.__spec__
        return module

    def exec_module(self, module):
        # loading stamped the alias's spec on the module; it keeps its own
        module.__spec__ = self._spec


class MovedFinder(importlib.abc.MetaPathFinder):
    @classmethod
    def find_spec(cls, fullname: str, path=None, target=None):
        new = home(fullname)
        if new is None:
            return None
        if new in sys.modules:
            is_package = hasattr(sys.modules[new], "__path__")
        else:
            found = importlib.util.find_spec(new)
            if found is None:
                return None
            is_package = found.submodule_search_locations is not None
        return ModuleSpec(fullname, _AliasLoader(new), is_package=is_package)


def install() -> None:
    if MovedFinder not in sys.meta_path:
        sys.meta_path.insert(0, MovedFinder)  # ahead of the path search, which would load a second copy
