"""Setting torch's CPU thread count without slowing PyTorch's fused attention."""

from __future__ import annotations

import torch


def set_threads(n: int | None) -> None:
    """``torch.set_num_threads(n)``, skipped when ``n`` is None or already the count.

    On this project's 2-core machine an explicit ``torch.set_num_threads(2)``,
    even though 2 was already the default, made PyTorch's CPU flash attention
    (``F.scaled_dot_product_attention``, which the torch backend calls per tile)
    13-29% slower for the rest of the process; ``OMP_NUM_THREADS=2`` did not.
    """
    if n is not None and int(n) != torch.get_num_threads():
        torch.set_num_threads(max(1, int(n)))
