"""Gemma 2: sliding window on alternate layers and attention logit soft-capping.

GAPE's kernels do not implement the soft-cap, so a config with
``attn_logit_softcapping`` set (the released models) is refused; with it set to
None the model is patched like Gemma."""

from .spec import ArchSpec

SPEC = ArchSpec(model_types=("gemma2",), sliding_window="sliding_window", softcap="attn_logit_softcapping")
