"""The fused CPU forward of GAPE attention: build, load and call ``attention_cpu.cpp``.

The kernel computes ``softmax(scale q k^T - lambda (1 - pi) phi(delta)) v``
the FlashAttention way: BLAS for ``Q K^T`` and ``P V`` per block, the GAPE
bias, masks and an online softmax in vector registers between them, so the
bias never goes to memory (its speed against PyTorch's no-bias flash
attention and the pure-PyTorch tiles is in docs/benchmarks.md, "Attention on the CPU").

It is compiled at first use with :func:`torch.utils.cpp_extension.load` (needs
a C++ compiler and ninja; about a minute, once per machine, torch version
and source; later processes load the cached library in well under a second)
into ``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``), one
process at a time: a build killed half-way leaves torch's ``lock`` file behind,
which the next load recognises as its owner's (gone) and removes; a build still
running elsewhere is waited for at most ``GAPE_CPU_BUILD_WAIT`` seconds. The
vector width follows :func:`torch.backends.cpu.get_cpu_capability` (AVX512,
AVX2 or portable C++). Without a compiler, or with ``GAPE_CPU_KERNEL=0``,
:func:`available` is False (with one warning saying why) and the torch
backend keeps its pure-PyTorch tiles.

The backward (:func:`attention_backward`) is FlashAttention-2's with the same
bias recomputed in registers, from the forward's output and log-sum-exp.

Learned sinks and the logit soft-cap (``sinks=``, ``softcap=`` of both) are in the
kernel too: the cap as a template flag of its logit loop, the sink folded into each
row's denominator and log-sum-exp (docs/kernels.md).

bfloat16 and float16 inputs are read in place (no float32 copy of q/k/v) and
computed in float32 (softmax, bias, gate reductions, accumulators, the output
and the gradients). Their ``Q K^T`` and ``P V`` products (and the backward's
four) either run on the half-precision operands with float32 accumulation
(MKL's ``gemm_bf16bf16f32`` / ``gemm_f16f16f32``), where the CPU multiplies
that type natively (:func:`native_half`: AVX512-BF16 or AMX for bfloat16,
AVX512-FP16 or AMX-FP16 for float16), or widen each operand block to float32
for SGEMM elsewhere, where half-precision products would be emulated and
slower. :func:`half_dot` decides per call; ``GAPE_CPU_DOT`` overrides it.

Under ``torch.compile`` the kernel runs as the functional custom ops
``gape::cpu_attention_fused`` and ``gape::cpu_attention_fused_bwd`` (fake
implementations give their shapes; autograd is registered on the first), so a
compiled graph calls it as one opaque op and its memory stays linear in L
(:func:`fused_attention`; docs/kernels.md).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch

from .._io import FolderLockedError, lock_folder

SOURCE = Path(__file__).with_name("attention_cpu.cpp")
ENV_SWITCH = "GAPE_CPU_KERNEL"  # "0" disables the kernel
ENV_CAPABILITY = "GAPE_CPU_CAPABILITY"  # force "AVX512", "AVX2" or "DEFAULT" (testing other builds)
ENV_BUILD_WAIT = "GAPE_CPU_BUILD_WAIT"  # seconds to wait for another process's build of the kernel
BUILD_WAIT = 600.0  # a build takes about a minute; ten leave room for a loaded machine
BUILD_LOCK = "gape.build.lock"  # gape's flock, beside torch's ``lock`` in the build folder

# Query rows and keys per block; the score block (64 or 256 x 512 floats, 128 or
# 512 KB) stays in L2 next to the K/V blocks. Long queries take 256 rows, so each
# K/V block is read from memory 4x less often once K/V outgrow the cache (the
# measurements behind these sizes: docs/kernels.md, "The torch backend").
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

HALF_DTYPES = (torch.bfloat16, torch.float16)
ENV_DOT = "GAPE_CPU_DOT"  # "auto" (default), "half" (half-precision products) or "float" (widen to float32)
_DOT_CHOICES = ("auto", "half", "float")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The kernel's compute (and output, lse, gradient) dtype for inputs of ``dtype``."""
    return torch.float32 if dtype in HALF_DTYPES else dtype


@functools.cache
def _cpu_flags() -> frozenset:
    """The CPU feature flags Linux reports (empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_half(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies ``dtype`` (bfloat16, float16) matrices in hardware:
    AVX512-BF16 or AMX-BF16 for bfloat16, AVX512-FP16 or AMX-FP16 for float16."""
    flags = _cpu_flags()
    if dtype == torch.bfloat16:
        return bool({"avx512_bf16", "amx_bf16"} & flags) or torch.cpu._is_avx512_bf16_supported()
    if dtype == torch.float16:
        return bool({"avx512_fp16", "amx_fp16"} & flags) or torch.cpu._is_amx_fp16_supported()
    return False


def half_gemm_linked(dtype: torch.dtype) -> bool:
    """Whether torch's BLAS has the ``dtype x dtype -> float32`` GEMM (MKL does; needs the kernel loaded)."""
    if dtype not in HALF_DTYPES or not available():
        return False
    bits = int(torch.ops.gape.cpu_attention_half_gemms())
    return bool(bits & (1 if dtype == torch.bfloat16 else 2))


def half_dot(dtype: torch.dtype, dot: bool | None = None) -> bool:
    """Whether a call on ``dtype`` inputs takes half-precision products (True) or widens its
    operand blocks to float32 (False). ``dot`` None: :data:`ENV_DOT` if set, else "auto"
    (native hardware and a linked GEMM). True where impossible raises ValueError."""
    if dtype not in HALF_DTYPES:
        if dot:
            raise ValueError(f"dot=True takes bfloat16 or float16 inputs, got {dtype}")
        return False
    if dot is None:
        choice = os.environ.get(ENV_DOT, "auto").strip().lower() or "auto"
        if choice not in _DOT_CHOICES:
            raise ValueError(f"{ENV_DOT} must be one of {_DOT_CHOICES}, got {choice!r}")
        if choice == "float":
            return False
        if choice == "auto":
            return native_half(dtype) and half_gemm_linked(dtype)
        dot = True
    if dot and not half_gemm_linked(dtype):
        raise ValueError(f"half-precision products for {dtype} need a BLAS with that GEMM (MKL); this torch has none")
    return bool(dot)


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


def _build_wait() -> float:
    raw = os.environ.get(ENV_BUILD_WAIT, "").strip()
    if not raw:
        return BUILD_WAIT
    try:
        wait = float(raw)
    except ValueError:
        wait = float("nan")
    if not wait >= 0:
        raise ValueError(f"{ENV_BUILD_WAIT}={raw!r}: expected a number of seconds >= 0")
    return wait


def _lock_holders(path: Path) -> list[int] | None:
    """Pids of the other processes that have ``path`` open, None where ``/proc`` cannot tell.

    torch's ``FileBaton`` keeps its lock file open for the whole build, so a lock
    file that no process has open was left by a build that died."""
    if not os.path.isdir("/proc/self/fd"):
        return None
    target = os.path.realpath(path)
    holders = []
    for proc in os.scandir("/proc"):
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            fds = list(os.scandir(f"/proc/{proc.name}/fd"))
        except OSError:  # exited meanwhile, or another user's
            continue
        for fd in fds:
            with contextlib.suppress(OSError):
                if os.readlink(fd.path) == target:
                    holders.append(int(proc.name))
                    break
    return holders


def _clear_stale_lock(build_dir: Path, deadline: float) -> None:
    """Remove torch's ``lock`` in ``build_dir`` if its owner is gone, else wait for it until ``deadline``.

    Called holding :data:`BUILD_LOCK`, so no gape process is building here: the
    file belongs to a killed build (its ``FileBaton.wait`` would otherwise spin
    forever in every later process), or to a live process outside gape's lock,
    which ``/proc`` shows holding it open. Without ``/proc`` gape's lock is the
    only evidence, and the file is taken as stale."""
    lock = build_dir / "lock"
    while lock.exists():
        holders = _lock_holders(lock)
        if not holders:
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
            print(f"gape: removed {lock}, left by a build of the CPU kernel that was killed; rebuilding",
                  file=sys.stderr, flush=True)
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"{lock} is held by pid {', '.join(map(str, holders))}, building the CPU kernel for longer than "
                f"{ENV_BUILD_WAIT} allows; if no build is running, delete {lock}"
            )
        time.sleep(0.2)


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
        wait = _build_wait()
        deadline = time.monotonic() + wait
        try:
            # the flock dies with its process, so a lock that outlives it is torch's alone
            with lock_folder(str(build_dir), name=BUILD_LOCK, wait=wait):
                _clear_stale_lock(build_dir, deadline)
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
        except FolderLockedError as exc:
            raise TimeoutError(
                f"{exc.path}: pid {exc.holder} is still building the CPU kernel after {wait:g} s "
                f"({ENV_BUILD_WAIT}); let it finish or stop it"
            ) from None
    except Exception as exc:  # no compiler, no ninja, a build error: fall back, say so once
        lines = str(exc).strip().splitlines() or [""]
        # the first line, and the compiler's first error when there is one
        first_error = next((ln.strip() for ln in lines[1:] if "error" in ln.lower()), "")
        reason = f"{type(exc).__name__}: {lines[0]}" + (f" ... {first_error}" if first_error else "")
        warnings.warn(
            f"gape: the fused CPU attention kernel could not be built ({reason}); the torch backend falls back "
            f"to its pure-PyTorch tiles (slower; docs/benchmarks.md). Set {ENV_SWITCH}=0 to skip the build.",
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
    """Whether :func:`attention_forward` can take these tensors (float32, float64,
    bfloat16 or float16): CPU tensors whose lengths and row strides fit BLAS's int32."""
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


# "No bound" for the allowed signed distances; far beyond any int32 position, far from int64 overflow.
UNBOUNDED = 1 << 40


def dense_segments(b: int, lq: int, lk: int, query_offset=None) -> torch.Tensor:
    """The kernel's segments for a dense batch: one per batch element, query row ``i``
    at position ``i + query_offset[b]`` (None: ``lk - lq``, bottom-right)."""
    seg = torch.empty(b, 6, dtype=torch.int64)
    seg[:, 0] = torch.arange(b)
    seg[:, 1], seg[:, 2], seg[:, 3], seg[:, 4] = 0, lq, 0, lk
    if query_offset is None:
        seg[:, 5] = lk - lq
    elif isinstance(query_offset, torch.Tensor):
        seg[:, 5] = query_offset.to(device="cpu", dtype=torch.int64).reshape(-1).expand(b)
    else:
        seg[:, 5] = int(query_offset)
    return seg


def varlen_segments(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor) -> torch.Tensor:
    """Segments of packed sequences (batch element 0), each bottom-right aligned."""
    cq = cu_seqlens_q.to(device="cpu", dtype=torch.int64)
    ck = cu_seqlens_k.to(device="cpu", dtype=torch.int64)
    nq, nk = cq[1:] - cq[:-1], ck[1:] - ck[:-1]
    return torch.stack((torch.zeros_like(nq), cq[:-1], nq, ck[:-1], nk, nk - nq), dim=1).contiguous()


def delta_bounds(lo: int | None, hi: int | None) -> tuple[int, int]:
    """``gape.core.reference.delta_range`` as the kernel's ints (unbounded = +-UNBOUNDED)."""
    return (-UNBOUNDED if lo is None else int(lo)), (UNBOUNDED if hi is None else int(hi))


def read_range(segments: torch.Tensor, dlo: int, dhi: int) -> tuple[int, int] | None:
    """``(min, max)`` of the signed distances the kernel reads from the phi table
    (pairs a row may attend), or None when no row sees any key."""
    nq, nk, off = segments[:, 2], segments[:, 4], segments[:, 5]
    # rows with a key: e(i) = i + off - dlo + 1 > 0 and a(i) = i + off - dhi < nk
    first = torch.clamp(dlo - off, min=0)
    last = torch.minimum(nq - 1, nk + dhi - off - 1)
    ok = (first <= last) & (nk > 0)
    if not bool(ok.any()):
        return None
    first, last, nk, off = first[ok], last[ok], nk[ok], off[ok]
    a_last = torch.clamp(last + off - dhi, min=0)
    e_first = torch.clamp(first + off - dlo + 1, max=nk)
    return int((first + off - e_first + 1).min()), int((last + off - a_last).max())


def phi_table(dmin: int, dmax: int, distance: str, dtype) -> torch.Tensor:
    """``t[x] = phi(|dmax - x|)`` for ``x`` in ``[0, dmax - dmin]``, i.e. ``phi(delta) = t[dmax - delta]``."""
    from gape.core.reference import phi

    delta = torch.arange(dmax, dmin - 1, -1, dtype=torch.int64).abs_()
    return phi(delta, distance, dtype)


def _prepare(query, key, value, query_gate, keep, phi_reversed, attn_mask, is_causal, segments, delta_lo, delta_hi,
             phi_zero):
    b, hq, lq, _ = query.shape
    lk = key.shape[2]
    dt = compute_dtype(query.dtype)
    query, key, value = (blas_rows(t) for t in (query, key, value))
    query_gate = query_gate.to(dt).contiguous()
    keep = keep.to(dt).contiguous()
    phi_reversed = phi_reversed.to(dt).contiguous()
    if segments is None:
        segments = dense_segments(b, lq, lk)
    segments = segments.to(torch.int64).contiguous()
    if delta_lo is None and delta_hi is None:
        dlo, dhi = delta_bounds(0 if is_causal else None, None)
    else:
        dlo, dhi = int(delta_lo), int(delta_hi)
    zero = lk - 1 if phi_zero is None else int(phi_zero)  # the bottom-right default table
    need = read_range(segments, dlo, dhi)
    if need is not None and (zero - need[1] < 0 or zero - need[0] >= phi_reversed.numel()):
        raise ValueError(
            f"phi_reversed has {phi_reversed.numel()} entries with delta 0 at index {zero}; the kernel reads "
            f"distances {need[0]}..{need[1]}, i.e. indices {zero - need[1]}..{zero - need[0]}"
        )
    if attn_mask is not None:
        attn_mask = attn_mask.expand(b, hq, lq, lk)
    return query, key, value, query_gate, keep, phi_reversed, zero, attn_mask, segments, dlo, dhi


def _terms(sinks, softcap, hq: int, dt) -> tuple[torch.Tensor | None, float]:
    """``sinks`` as a contiguous ``[Hq]`` tensor of the compute dtype, and ``softcap`` as the
    kernel's float (0.0: none); checked."""
    if sinks is not None:
        if not isinstance(sinks, torch.Tensor) or not sinks.is_floating_point() or tuple(sinks.shape) != (hq,):
            got = f"{tuple(sinks.shape)} {sinks.dtype}" if isinstance(sinks, torch.Tensor) else type(sinks).__name__
            raise ValueError(f"sinks must be a floating [Hq={hq}] tensor, got {got}")
        sinks = sinks.detach().to(device="cpu", dtype=dt).contiguous()
    if softcap is None:
        return sinks, 0.0
    cap = float(softcap)
    if not (cap > 0 and cap < float("inf")):
        raise ValueError(f"softcap must be None or a positive finite float, got {softcap!r}")
    return sinks, cap


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
    *,
    segments: torch.Tensor | None = None,
    delta_lo: int | None = None,
    delta_hi: int | None = None,
    phi_zero: int | None = None,
    dot: bool | None = None,
    sinks: torch.Tensor | None = None,
    softcap: float | None = None,
):
    """GAPE attention forward on validated CPU tensors of one floating dtype.

    Args:
        query ``[B, Hq, Lq, D]``, key ``[B, Hkv, Lk, D]``, value ``[B, Hkv, Lk, Dv]``:
            any strides with a contiguous last dim (a transposed HF query is read in place).
        query_gate: lambda ``[B, Hq, Lq]``.
        keep: ``1 - pi``, ``[B, Hkv, Lk]``.
        phi_reversed: ``phi(delta) = phi_reversed[phi_zero - delta]`` for every signed
            distance ``delta = pos_q - pos_k`` of an attended pair (:func:`read_range`;
            :func:`phi_table` builds one); checked.
        attn_mask: bool, broadcastable to ``[B, Hq, Lq, Lk]`` (True = may attend), or None.
        return_lse: also return the log-sum-exp of each row's logits ``[B, Hq, Lq]``
            (``+inf`` for a row with no allowed key), which :func:`attention_backward` needs.
        segments: int64 ``[S, 6]`` rows ``(batch, q0, nq, k0, nk, offset)``: query rows
            ``[q0, q0 + nq)`` of that batch element attend its keys ``[k0, k0 + nk)``, local
            row ``i`` at position ``i + offset``, local key ``j`` at ``j``. Rows of no
            segment are left unwritten. Default: :func:`dense_segments` (bottom-right).
        delta_lo, delta_hi: the allowed ``pos_q - pos_k``, both or neither
            (:func:`delta_bounds`); default ``[0, UNBOUNDED]`` causal, all otherwise.
        phi_zero: index of ``delta = 0`` in ``phi_reversed``; default ``Lk - 1``
            (the bottom-right table ``phi(delta(i, j)) = phi_reversed[Lq - 1 - i + j]``).
        out: optional ``[B, Hq, Lq, Dv]`` buffer of the query dtype with a contiguous last
            dim, any other strides (e.g. a transposed ``[B, Lq, Hq, Dv]``): the kernel writes
            there, so a caller that needs another layout pays no copy. Of the compute dtype
            (:func:`compute_dtype`: float32 for bfloat16/float16 inputs).
        dot: half-precision products for bfloat16/float16 inputs (:func:`half_dot`; None: auto).
        sinks: optional ``[Hq]`` learned sink logits: ``exp(sinks[h])`` joins every row's
            softmax denominator (no value); the returned ``lse`` includes it.
        softcap: optional positive cap: the content logit is ``softcap * tanh(scale <q, k> / softcap)``,
            the GAPE bias added after it (docs/maths.md).

    Returns:
        ``[B, Hq, Lq, Dv]`` in the compute dtype (``out`` when given, else contiguous); rows with no
        allowed key are zeros (with or without sinks). With ``return_lse``, ``(out, lse)``.
    """
    b, hq, lq, _ = query.shape
    dv = value.shape[3]
    query, key, value, query_gate, keep, phi_reversed, zero, attn_mask, segments, dlo, dhi = _prepare(
        query, key, value, query_gate, keep, phi_reversed, attn_mask, is_causal, segments, delta_lo, delta_hi, phi_zero
    )
    cdt = compute_dtype(query.dtype)
    sinks, cap = _terms(sinks, softcap, hq, cdt)
    if out is None:
        out = torch.empty(b, hq, lq, dv, dtype=cdt)
    elif tuple(out.shape) != (b, hq, lq, dv) or out.dtype != cdt or out.stride(-1) != 1:
        raise ValueError(
            f"out must be [B, Hq, Lq, Dv] = {(b, hq, lq, dv)} of {cdt} with a contiguous last dim, "
            f"got {tuple(out.shape)} {out.dtype} strides {out.stride()}"
        )
    # +inf (no key) for rows of no segment too, which the kernel leaves unwritten
    lse = torch.full((b, hq, lq), float("inf"), dtype=cdt) if return_lse else None
    torch.ops.gape.cpu_attention_fwd(
        query, key, value, query_gate, keep, phi_reversed, zero, attn_mask, segments, dlo, dhi, out, lse,
        float(scale), _q_block(int(segments[:, 2].max()) if len(segments) else lq), K_BLOCK,
        half_dot(query.dtype, dot), sinks, cap,
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
    *,
    segments: torch.Tensor | None = None,
    delta_lo: int | None = None,
    delta_hi: int | None = None,
    phi_zero: int | None = None,
    dot: bool | None = None,
    sinks: torch.Tensor | None = None,
    softcap: float | None = None,
):
    """Gradients ``(d query, d key, d value, d query_gate, d pi)`` of :func:`attention_forward`
    (``d pi`` with respect to the key gate ``pi = 1 - keep``, what callers train), and
    ``d sinks`` ``[Hq]`` after them when ``sinks`` is given.

    ``out`` and ``lse`` are the forward's outputs. FlashAttention-2's backward
    with the GAPE bias recomputed in registers: one pass per (batch, query head);
    ``d key``, ``d value`` and ``d pi`` are accumulated per query head and
    summed over each GQA group here. Positions as :func:`attention_forward`;
    gradients of rows and keys outside every segment are zero. The gradients are in the
    compute dtype (float32 for bfloat16/float16 inputs; ``grad_out`` is read in the input dtype).

    ``sinks`` and ``softcap`` must be the forward's. The sink needs nothing in the kernel (its
    share is in ``lse``): ``d sinks[h] = -sum_{b, i} exp(sinks[h] - lse) * rowsum(dO * O)``,
    formed here; a row with no key (``lse = +inf``) adds nothing.
    """
    b, hq, lq, d = query.shape
    hkv, lk, dv = key.shape[1], key.shape[2], value.shape[3]
    dt = compute_dtype(query.dtype)
    sinks, cap = _terms(sinks, softcap, hq, dt)
    query, key, value, query_gate, keep, phi_reversed, zero, attn_mask, segments, dlo, dhi = _prepare(
        query, key, value, query_gate, keep, phi_reversed, attn_mask, is_causal, segments, delta_lo, delta_hi, phi_zero
    )
    grad_out = blas_rows(grad_out.to(query.dtype))
    delta = (grad_out.to(dt) * out).sum(-1).contiguous()  # rowsum(dO * O)
    dq = torch.zeros(b, hq, lq, d, dtype=dt)
    dk_h = torch.zeros(b, hq, lk, d, dtype=dt)
    dv_h = torch.zeros(b, hq, lk, dv, dtype=dt)
    dlam = torch.zeros(b, hq, lq, dtype=dt)
    dpi_h = torch.zeros(b, hq, lk, dtype=dt)
    torch.ops.gape.cpu_attention_bwd(
        query, key, value, query_gate, keep, phi_reversed, zero, attn_mask, segments, dlo, dhi, grad_out,
        lse.contiguous(), delta, dq, dk_h, dv_h, dlam, dpi_h, float(scale),
        _q_block(int(segments[:, 2].max()) if len(segments) else lq), K_BLOCK, half_dot(query.dtype, dot), cap,
    )  # fmt: skip
    rep = hq // hkv
    dk = dk_h.view(b, hkv, rep, lk, d).sum(2)
    dvv = dv_h.view(b, hkv, rep, lk, dv).sum(2)
    # d pi_h holds sum_i dS lambda phi = d/d pi
    dpi = dpi_h.view(b, hkv, rep, lk).sum(2)
    if sinks is None:
        return dq, dk, dvv, dlam, dpi
    p_sink = torch.exp(sinks.view(1, hq, 1) - lse.to(dt))
    # where, not a product: a row of no segment (lse +inf, p_sink 0) may hold garbage in delta
    dsinks = torch.where(p_sink > 0, p_sink * delta, 0).sum((0, 2)).neg_()
    return dq, dk, dvv, dlam, dpi, dsinks


# ---------------------------------------------------------------------------------------------
# torch.compile: the kernel as functional custom ops with fake (shape-only) implementations, so
# a compiled graph calls the kernel itself (memory linear in L) instead of tracing a formulation
# that materialises the [Lq, Lk] scores. The ops' bodies run eagerly (position tables, phi
# table, the C++ call); autograd is registered on the forward op.


def _offset_args(query_offset) -> tuple[int | None, torch.Tensor | None]:
    if isinstance(query_offset, torch.Tensor):
        return None, query_offset
    return (None if query_offset is None else int(query_offset)), None


def _positions(query, key, is_causal, offset_int, offset_tensor, window):
    from gape.core.torch_backend import _kernel_positions

    offset = offset_tensor if offset_tensor is not None else offset_int
    return _kernel_positions(query.shape[0], query.shape[2], key.shape[2], is_causal, offset,
                             None if window is None else tuple(window))


@torch.library.custom_op("gape::cpu_attention_fused", mutates_args=(), device_types="cpu")
def _fused_fwd(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, query_gate: torch.Tensor,
               key_gate: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool, scale: float, distance: str,
               offset_int: int | None, offset_tensor: torch.Tensor | None, window: list[int] | None,
               sinks: torch.Tensor | None = None,
               softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    from gape.core.torch_backend import _kernel_forward

    pos = _positions(query, key, is_causal, offset_int, offset_tensor, window)
    return _kernel_forward(query, key, value, query_gate, key_gate, attn_mask, is_causal, scale, distance, True, pos,
                           sinks, softcap)


@_fused_fwd.register_fake
def _(query, key, value, query_gate, key_gate, attn_mask, is_causal, scale, distance, offset_int, offset_tensor,
      window, sinks=None, softcap=None):
    b, hq, lq, dv = query.shape[0], query.shape[1], query.shape[2], value.shape[3]
    cdt = compute_dtype(query.dtype)
    # the same strides as the real output: [B, Lq, Hq, Dv] storage seen as [B, Hq, Lq, Dv]
    out = query.new_empty(b, lq, hq, dv, dtype=cdt).transpose(1, 2)
    return out, query.new_empty(b, hq, lq, dtype=cdt)


@torch.library.custom_op("gape::cpu_attention_fused_bwd", mutates_args=(), device_types="cpu")
def _fused_bwd(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, query_gate: torch.Tensor,
               key_gate: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool, scale: float, distance: str,
               offset_int: int | None, offset_tensor: torch.Tensor | None, window: list[int] | None,
               out: torch.Tensor, lse: torch.Tensor, grad_out: torch.Tensor, sinks: torch.Tensor | None = None,
               softcap: float | None = None) -> list[torch.Tensor]:
    from gape.core.torch_backend import _kernel_backward

    pos = _positions(query, key, is_causal, offset_int, offset_tensor, window)
    grads = _kernel_backward(query, key, value, query_gate, key_gate, attn_mask, is_causal, scale, distance, out, lse,
                             grad_out, pos, sinks, softcap)
    like = (query, key, value, query_gate, key_gate) + (() if sinks is None else (sinks,))
    return [g.view(t.shape).to(t.dtype) for g, t in zip(grads, like)]


@_fused_bwd.register_fake
def _(query, key, value, query_gate, key_gate, attn_mask, is_causal, scale, distance, offset_int, offset_tensor,
      window, out, lse, grad_out, sinks=None, softcap=None):
    like = (query, key, value, query_gate, key_gate) + (() if sinks is None else (sinks,))
    return [torch.empty_like(t, memory_format=torch.contiguous_format) for t in like]


def _fused_setup(ctx, inputs, output):
    (query, key, value, query_gate, key_gate, attn_mask, is_causal, scale, distance, off_i, off_t, window, sinks,
     softcap) = inputs
    ctx.save_for_backward(query, key, value, query_gate, key_gate, attn_mask, off_t, sinks, *output)
    ctx.args = (is_causal, scale, distance, off_i, window)
    ctx.softcap = softcap


def _fused_backward(ctx, grad_out, grad_lse):
    query, key, value, query_gate, key_gate, attn_mask, off_t, sinks, out, lse = ctx.saved_tensors
    is_causal, scale, distance, off_i, window = ctx.args
    grads = _fused_bwd(query, key, value, query_gate, key_gate, attn_mask, is_causal, scale, distance, off_i, off_t,
                       window, out, lse, grad_out.to(query.dtype), sinks, ctx.softcap)
    dsinks = grads[5] if sinks is not None else None
    return (*grads[:5], None, None, None, None, None, None, None, dsinks, None)


_fused_fwd.register_autograd(_fused_backward, setup_context=_fused_setup)


@torch.compiler.assume_constant_result
def compiled_kernel_ready() -> bool:
    """:func:`available`, evaluated once while torch.compile traces (a constant of the graph)."""
    return available()


def fused_attention(query, key, value, query_gate, key_gate, attn_mask, is_causal, scale, distance, *,
                    query_offset=None, window=None, sinks=None, softcap=None) -> torch.Tensor:
    """The torch backend's kernel path as one opaque op (what a compiled graph calls):
    arguments as :func:`gape.core.torch_backend.torch_attention`, output in the query dtype."""
    off_i, off_t = _offset_args(query_offset)
    out, _ = _fused_fwd(query, key, value, query_gate, key_gate, attn_mask, bool(is_causal), float(scale), distance,
                        off_i, off_t, None if window is None else [int(w) for w in window], sinks,
                        None if softcap is None else float(softcap))
    return out.to(query.dtype)
