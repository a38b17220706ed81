"""benchmarks/niah_window_oracle.py: the masked attention it swaps in is what it claims."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "niah_window_oracle.py"


@pytest.fixture(scope="module")
def oracle():
    spec = importlib.util.spec_from_file_location("niah_window_oracle", PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _qkv(lq=5, lk=9, hq=4, hkv=2, d=8):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(1, hq, lq, d, generator=g), torch.randn(1, hkv, lk, d, generator=g),
            torch.randn(1, hkv, lk, d, generator=g))


def test_wide_window_is_causal_attention_bottom_right(oracle):
    q, k, v = _qkv()
    out, _ = oracle.window_attention(window=100, sinks=0)(None, q, k, v, None, scaling=0.5)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    keep = torch.ones(5, 9, dtype=torch.bool).tril(diagonal=9 - 5)
    want = F.scaled_dot_product_attention(q, kk, vv, attn_mask=keep, scale=0.5)
    torch.testing.assert_close(out, want.transpose(1, 2))


def test_window_one_sees_only_itself_and_sinks_stay_visible(oracle):
    q, k, v = _qkv()
    out, _ = oracle.window_attention(window=1, sinks=0)(None, q, k, v, None)
    # each query row i sits at key position i + 4 and sees that key alone
    torch.testing.assert_close(out, v.repeat_interleave(2, 1)[:, :, 4:].transpose(1, 2))
    out2, _ = oracle.window_attention(window=1, sinks=2)(None, q, k, v, None)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    keep = torch.zeros(5, 9, dtype=torch.bool)
    keep[:, :2] = True
    keep[torch.arange(5), torch.arange(5) + 4] = True
    want = F.scaled_dot_product_attention(q, kk, vv, attn_mask=keep)
    torch.testing.assert_close(out2, want.transpose(1, 2))
