"""The fused CPU forward of GAPE attention: build, load and call ``attention_cpu.cpp``.

The kernel computes ``softmax(scale q k^T - lambda (1 - pi) phi(delta)) v``
the FlashAttention way: BLAS for ``Q K^T`` and ``P V`` per block, the GAPE
bias, masks and an online softmax in vector registers between them, so the
bias never goes to memory (its speed against PyTorch's no-bias flash
attention and the pure-PyTorch tiles is in the README's CPU benchmark).

It is compiled at first use with :func:`torch.utils.cpp_extension.load` (needs
a C++ compiler and ninja; about a minute, once per machine, torch version
and source; later processes load the cached library in well under a second)
into ``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``). The
vector width follows :func:`torch.backends.cpu.get_cpu_capability` (AVX512,
AVX2 or portable C++). Without a compiler, or with ``GAPE_CPU_KERNEL=0``,
:func:`available` is False (with one warning saying why) and the torch
backend keeps its pure-PyTorch tiles.

The backward (:func:`attention_backward`) is FlashAttention-2's with the same
bias recomputed in registers, from the forward's output and log-sum-exp.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import sys
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("attention_cpu.cpp")
ENV_SWITCH = "GAPE_CPU_KERNEL"  # "0" disables the kernel
ENV_CAPABILITY = "GAPE_CPU_CAPABILITY"  # force "AVX512", "AVX2" or "DEFAULT" (testing other builds)

# Query rows and keys per block; the score block (64 or 256 x 512 floats, 128 or
# 512 KB) stays in L2 next to the K/V blocks. Long queries take 256 rows, so each
# K/V block is read from memory 4x less often once K/V outgrow the cache (the
# measurements behind these sizes: README, "The torch backend").
Q_BLOCK = 64
Q_BLOCK_LONG = 256
LONG_QUERY = 2048  # query rows from which Q_BLOCK_LONG is used
K_BLOCK = 512

_ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-DCPU_CAPABILITY_AVX2"],
    "DEFAULT": [],
}
_INT32_MAX = 2**31 - 1


def capability() -> str:
    """The instruction set the kernel is built for: AVX512, AVX2 or DEFAULT."""
    cap = os.environ.get(ENV_CAPABILITY) or torch.backends.cpu.get_cpu_capability()
    cap = cap.upper()
    return cap if cap in _ISA_FLAGS else "DEFAULT"


def _cflags(cap: str) -> list[str]:
    # -fopenmp: at::parallel_for is a header template that becomes an OpenMP
    # parallel region only when the extension itself is compiled with OpenMP
    # (without it the kernel silently runs on one thread).
    return ["-O3", "-fopenmp", f"-DCPU_CAPABILITY={cap}", *_ISA_FLAGS[cap]]


def build_name() -> str:
    """Extension name: instruction set plus a hash of the source and flags, so
    differing builds (another checkout, an edited kernel) never share a folder."""
    cap = capability()
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(_cflags(cap)).encode()).hexdigest()[:10]
    return f"gape_cpu_attention_{cap.lower()}_{digest}"


def _put_ninja_on_path() -> None:
    """cpp_extension runs ``ninja`` from PATH; the ``ninja`` wheel (a dependency)
    lives in the environment's bin folder, which is not on PATH unless the
    environment is activated."""
    if shutil.which("ninja") is None:
        try:
            from ninja import BIN_DIR
        except ImportError:
            return
        os.environ["PATH"] = BIN_DIR + os.pathsep + os.environ.get("PATH", "")


@functools.cache
def _load() -> str | None:
    """Build (first use) and load the kernel; None on success, else why not."""
    if os.environ.get(ENV_SWITCH, "1").strip() == "0":
        return f"disabled by {ENV_SWITCH}=0"
    try:
        from torch.utils import cpp_extension

        _put_ninja_on_path()
        cap, name = capability(), build_name()
        build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
        if not (build_dir / f"{name}.so").exists():
            print(f"gape: compiling the fused CPU attention kernel ({cap}), once per machine (under a minute) ...",
                  file=sys.stderr, flush=True)
        cpp_extension.load(
            name=name,
            sources=[str(SOURCE)],
            extra_cflags=_cflags(cap),
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
    except Exception as exc:  # no compiler, no ninja, a build error: fall back, say so once
        lines = str(exc).strip().splitlines() or [""]
        # the first line, and the compiler's first error when there is one
        first_error = next((ln.strip() for ln in lines[1:] if "error" in ln.lower()), "")
        reason = f"{type(exc).__name__}: {lines[0]}" + (f" ... {first_error}" if first_error else "")
        warnings.warn(
            f"gape: the fused CPU attention kernel could not be built ({reason}); the torch backend falls back "
            f"to its pure-PyTorch tiles (slower; README, CPU benchmark). Set {ENV_SWITCH}=0 to skip the build.",
            RuntimeWarning,
            stacklevel=3,
        )
        return reason
    return None


def available() -> bool:
    """True when the kernel is built and loaded (builds it on the first call)."""
    return _load() is None


def unavailable_reason() -> str | None:
    return _load()


def supports(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether :func:`attention_forward` can take these tensors once cast to
    float32/float64: CPU tensors whose lengths and row strides fit BLAS's int32."""
    if not (query.device.type == key.device.type == value.device.type == "cpu"):
        return False
    longest = max(query.shape[2], key.shape[2], query.stride(2), key.stride(2), value.stride(2))
    return longest <= _INT32_MAX // 2


def blas_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when BLAS can read its ``[L, D]`` planes in place, else a contiguous copy.

    BLAS takes a matrix as a pointer and a leading dimension: the last dim must
    be contiguous and rows must not overlap (``stride(-2) >= size(-1)``). An
    expanded (stride 0), ``as_strided`` or ``unfold`` input breaks the second
    rule; MKL then refuses the call (a message on stderr, the output left as
    zeros), so such inputs are copied here. Batch and head strides are free
    (plain pointer offsets; stride 0 there is a zero-copy GQA expand)."""
    if t.stride(-1) == 1 and t.stride(-2) >= max(1, t.shape[-1]):
        return t
    # not .contiguous(): it keeps a size-1 dim's odd stride, which BLAS still reads as the leading dim
    return t.clone(memory_format=torch.contiguous_format)


def _prepare(query, key, value, query_gate, keep, phi_reversed, attn_mask, is_causal):
    b, hq, lq, _ = query.shape
    lk = key.shape[2]
    dt = query.dtype
    query, key, value = (blas_rows(t) for t in (query, key, value))
    query_gate = query_gate.to(dt).contiguous()
    keep = keep.to(dt).contiguous()
    phi_reversed = phi_reversed.to(dt).contiguous()
    need = lk if is_causal else lq + lk - 1
    if phi_reversed.numel() < need:
        raise ValueError(f"phi_reversed has {phi_reversed.numel()} entries, the kernel reads {need}")
    if attn_mask is not None:
        attn_mask = attn_mask.expand(b, hq, lq, lk)
    return query, key, value, query_gate, keep, phi_reversed, attn_mask


def _q_block(lq: int) -> int:
    return Q_BLOCK_LONG if lq >= LONG_QUERY else Q_BLOCK


def attention_forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    query_gate: torch.Tensor,
    keep: torch.Tensor,
    phi_reversed: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
    return_lse: bool = False,
    out: torch.Tensor | None = None,
):
    """GAPE attention forward on validated CPU tensors of one floating dtype.

    Args:
        query ``[B, Hq, Lq, D]``, key ``[B, Hkv, Lk, D]``, value ``[B, Hkv, Lk, Dv]``:
            any strides with a contiguous last dim (a transposed HF query is read in place).
        query_gate: lambda ``[B, Hq, Lq]``.
        keep: ``1 - pi``, ``[B, Hkv, Lk]``.
        phi_reversed: ``phi(delta(i, j)) = phi_reversed[Lq - 1 - i + j]``, at least
            ``Lk`` long causal (only ``delta >= 0`` is read), ``Lq + Lk - 1`` otherwise.
        attn_mask: bool, broadcastable to ``[B, Hq, Lq, Lk]`` (True = may attend), or None.
        return_lse: also return the log-sum-exp of each row's logits ``[B, Hq, Lq]``
            (``+inf`` for a row with no allowed key), which :func:`attention_backward` needs.
        out: optional ``[B, Hq, Lq, Dv]`` buffer of the query dtype with a contiguous last
            dim, any other strides (e.g. a transposed ``[B, Lq, Hq, Dv]``): the kernel writes
            there, so a caller that needs another layout pays no copy.

    Returns:
        ``[B, Hq, Lq, Dv]`` (``out`` when given, else contiguous); rows with no allowed key are zeros. With
        ``return_lse``, ``(out, lse)``.
    """
    b, hq, lq, _ = query.shape
    dv = value.shape[3]
    query, key, value, query_gate, keep, phi_reversed, attn_mask = _prepare(
        query, key, value, query_gate, keep, phi_reversed, attn_mask, is_causal
    )
    if out is None:
        out = torch.empty(b, hq, lq, dv, dtype=query.dtype)
    elif tuple(out.shape) != (b, hq, lq, dv) or out.dtype != query.dtype or out.stride(-1) != 1:
        raise ValueError(
            f"out must be [B, Hq, Lq, Dv] = {(b, hq, lq, dv)} of {query.dtype} with a contiguous last dim, "
            f"got {tuple(out.shape)} {out.dtype} strides {out.stride()}"
        )
    lse = torch.empty(b, hq, lq, dtype=query.dtype) if return_lse else None
    torch.ops.gape.cpu_attention_fwd(
        query, key, value, query_gate, keep, phi_reversed, attn_mask, out, lse, float(scale), bool(is_causal),
        _q_block(lq), K_BLOCK,
    )  # fmt: skip
    return (out, lse) if return_lse else out


def attention_backward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    query_gate: torch.Tensor,
    keep: torch.Tensor,
    phi_reversed: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
):
    """Gradients ``(d query, d key, d value, d query_gate, d pi)`` of :func:`attention_forward`
    (``d pi`` with respect to the key gate ``pi = 1 - keep``, what callers train).

    ``out`` and ``lse`` are the forward's outputs. FlashAttention-2's backward
    with the GAPE bias recomputed in registers: one pass per (batch, query head);
    ``d key``, ``d value`` and ``d pi`` are accumulated per query head and
    summed over each GQA group here.
    """
    b, hq, lq, d = query.shape
    hkv, lk, dv = key.shape[1], key.shape[2], value.shape[3]
    dt = query.dtype
    query, key, value, query_gate, keep, phi_reversed, attn_mask = _prepare(
        query, key, value, query_gate, keep, phi_reversed, attn_mask, is_causal
    )
    grad_out = blas_rows(grad_out.to(dt))
    delta = (grad_out * out).sum(-1).contiguous()  # rowsum(dO * O)
    dq = torch.empty(b, hq, lq, d, dtype=dt)
    dk_h = torch.zeros(b, hq, lk, d, dtype=dt)
    dv_h = torch.zeros(b, hq, lk, dv, dtype=dt)
    dlam = torch.zeros(b, hq, lq, dtype=dt)
    dpi_h = torch.zeros(b, hq, lk, dtype=dt)
    torch.ops.gape.cpu_attention_bwd(
        query, key, value, query_gate, keep, phi_reversed, attn_mask, grad_out, lse.contiguous(), delta,
        dq, dk_h, dv_h, dlam, dpi_h, float(scale), bool(is_causal), _q_block(lq), K_BLOCK,
    )  # fmt: skip
    rep = hq // hkv
    dk = dk_h.view(b, hkv, rep, lk, d).sum(2)
    dvv = dv_h.view(b, hkv, rep, lk, dv).sum(2)
    # d pi_h holds sum_i dS lambda phi = d/d pi
    dpi = dpi_h.view(b, hkv, rep, lk).sum(2)
    return dq, dk, dvv, dlam, dpi
