"""``gape.kernels`` and ``gape.patches`` when gape runs from a source checkout.

The repository keeps the kernels and the architecture specs in ``kernels/`` and
``patches/`` beside ``gape/``; a wheel installs them as ``gape/kernels`` and
``gape/patches`` (pyproject.toml's package-dir). Neither folder has an
``__init__.py``: a regular package named ``kernels`` at the clone root would be
found before site-packages whenever the clone root is on ``sys.path``
(``python -c``, ``python -m pytest``, a notebook started there) and would hide
Hugging Face's ``kernels``, which transformers imports. A folder without
``__init__.py`` is at most a namespace portion, and the import system prefers
any regular package of the same name over it, wherever it sits on the path.

Without an ``__init__.py`` setuptools' editable finder cannot map the folders
under ``gape`` either, so this module does: when ``gape`` itself is imported
from a checkout, ``gape.kernels`` and ``gape.patches`` resolve to the folders
beside it. Installed from a wheel, the folders are inside ``gape/`` and the
ordinary path search finds them first.
"""

from __future__ import annotations

import os
import sys
from importlib.machinery import ModuleSpec, PathFinder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# gape sub-package -> its folder at the root of a checkout (pyproject.toml's package-dir)
SUBPACKAGES = {"gape.kernels": "kernels", "gape.patches": "patches"}


class CheckoutFinder:
    """A meta-path finder for the sub-packages that live beside ``gape/`` in a checkout."""

    root = ROOT

    @classmethod
    def find_spec(cls, fullname: str, path=None, target=None) -> ModuleSpec | None:
        folder = SUBPACKAGES.get(fullname)
        if folder is None:
            return None
        # a namespace spec named gape.<folder> whose __path__ is the folder at the root
        spec = PathFinder.find_spec(fullname, [cls.root])
        if spec is None or list(spec.submodule_search_locations or ()) != [os.path.join(cls.root, folder)]:
            return None
        return spec


def is_checkout(root: str = ROOT) -> bool:
    """Whether ``gape`` was imported from a source tree (kernels/ beside gape/, not inside it)."""
    here = os.path.join(root, "gape")
    return all(os.path.isdir(os.path.join(root, d)) and not os.path.isdir(os.path.join(here, d))
               for d in SUBPACKAGES.values())


def install() -> None:
    if is_checkout() and CheckoutFinder not in sys.meta_path:
        sys.meta_path.append(CheckoutFinder)
