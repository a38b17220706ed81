"""Moved to :mod:`gape.tasks.methods` (lmeval uses it too); kept for old imports."""

from gape.tasks.methods import (
    DEFAULT_GAPE_LAMBDA,
    METHODS,
    MethodOptions,
    apply_gape,
    apply_method,
    default_gape_config,
    parse_methods,
)

__all__ = ["DEFAULT_GAPE_LAMBDA", "METHODS", "MethodOptions", "apply_gape", "apply_method", "default_gape_config",
           "parse_methods"]
