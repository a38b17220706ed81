"""Context parallelism for GAPE over ``torch.distributed`` (gloo on CPU, NCCL on CUDA).

- :func:`context_parallel_attention`: ring attention on sequence shards,
  equal to :func:`gape.attention` on the whole sequence.
- :func:`shard` / :func:`unshard`: cut a full tensor into this rank's shard
  and gather it back, in the ``"zigzag"`` or ``"contiguous"`` layout.
- :func:`context_parallel`: a context manager that runs a (GAPE-patched or
  plain) transformers model with its sequence split across a process group.
"""

from .attention import context_parallel_attention
from .hf import all_reduce_grads, causal_lm_loss, context_parallel, shift_labels
from .layout import LAYOUTS, global_positions, shard, shard_along, unshard, unshard_from

__all__ = [
    "LAYOUTS",
    "all_reduce_grads",
    "causal_lm_loss",
    "context_parallel",
    "context_parallel_attention",
    "shift_labels",
    "global_positions",
    "shard",
    "shard_along",
    "unshard",
    "unshard_from",
]
