"""Positional scheme + GAPE patch of a freshly built model, through the package's API
(:func:`gape.hf.positional.with_positional`, :func:`gape.hf.patch`)."""

from __future__ import annotations

# p-RoPE keeps this fraction of the rotary frequencies (Barbero et al.'s p; their
# recommended 0.75): with 32-wide heads, 12 of 16 frequencies rotate, the lowest 4 do not.
PROPE_P = 0.75


def apply(model, scheme: str, config):
    from gape import hf
    from gape.hf.positional import with_positional

    if scheme == "prope":
        with_positional(model, "prope", p=PROPE_P)
    elif scheme == "alibi":
        with_positional(model, "alibi", backend="torch")
    elif scheme == "nope":
        with_positional(model, "nope")
    if config is not None:
        hf.patch(model, config)
    return model
