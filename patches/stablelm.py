"""StableLM: partial rotary (partial_rotary_factor of each head, default 0.25)."""

from .spec import ArchSpec

SPEC = ArchSpec(model_types=("stablelm",), partial_rotary=True)
