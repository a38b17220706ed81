"""Gemma 2: sliding window on alternate layers and attention logit soft-capping
(``attn_logit_softcapping``), which the attention function receives as ``softcap=`` and
GAPE's backends apply to the content logit before the bias (docs/maths.md). VaultGemma
attends the same way."""

from .spec import ArchSpec

SPEC = ArchSpec(model_types=("gemma2", "vaultgemma"), sliding_window="sliding_window", softcap="attn_logit_softcapping")
