"""Positional scheme + GAPE patch of a freshly built model, through the package's API."""

from __future__ import annotations


def apply(model, scheme: str, config):
    from .. import hf

    if scheme != "rope":
        raise NotImplementedError(f"scheme {scheme!r} needs the positional schemes of issue 14")
    if config is not None:
        hf.patch(model, config)
    return model
