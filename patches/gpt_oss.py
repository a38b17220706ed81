"""gpt-oss: learned attention sinks (one logit per head, handed to the attention function as
``s_aux``), sliding window on alternate layers, YaRN RoPE, mixture-of-experts MLP."""

from .spec import ArchSpec

SPEC = ArchSpec(model_types=("gpt_oss",), sliding_window="sliding_window")
