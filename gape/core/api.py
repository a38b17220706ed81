"""The public GAPE attention function: validation and backend dispatch.

Every backend receives already-validated tensors and the same arguments:

    fn(query, key, value, query_gate, key_gate, attn_mask, is_causal, scale, distance,
       *, query_offset=None, window=None, sinks=None, softcap=None)

with ``attn_mask`` either None or a 4-D bool tensor broadcastable (not
expanded) to ``[B, Hq, Lq, Lk]``, and ``scale`` a float. ``query_offset`` is
None (bottom-right), an int or an int64 ``[B]`` tensor; ``window`` is None
(unbounded) or ``(left, right)`` ints with ``-1`` = unbounded on that side;
``sinks`` None or a ``[Hq]`` tensor of learned sink logits, ``softcap`` None or
a positive float. The keywords are only passed when they differ from their
defaults, and a backend whose ``supports`` does not refuse them implements them.
"""

from __future__ import annotations

import functools
import importlib
import math
import operator
import os

import torch

from .reference import DISTANCES

# name -> (module, function, one-line description). Each module also defines
# ``supports(call) -> reason | None`` next to its function: what a backend can
# serve is decided there and nowhere else. Imported lazily so that a missing
# optional dependency only matters for the backend that needs it.
_BACKENDS = {
    "reference": ("gape.core.reference", "reference_backend", "materialized scores in float32 or float64; the test oracle"),
    "torch": ("gape.core.torch_backend", "torch_attention", "fused C++ CPU forward (or PyTorch tiles), recomputing backward; CPU default"),
    "sdpa": ("gape.core.sdpa_backend", "sdpa_attention", "augmented channels into F.scaled_dot_product_attention; linear distance"),
    "triton": ("gape.kernels.attention", "triton_attention", "fused Triton kernel; CUDA (or TRITON_INTERPRET=1 on CPU)"),
}
BACKENDS = ("auto",) + tuple(_BACKENDS)
# name -> (module, function) of the packed-sequence entry points
_VARLEN = {
    "reference": ("gape.core.reference", "reference_attention_varlen_backend"),
    "torch": ("gape.core.torch_backend", "torch_attention_varlen"),
    "triton": ("gape.kernels.attention", "triton_attention_varlen"),
}
VARLEN_BACKENDS = ("auto",) + tuple(_VARLEN)


def _name(t) -> str:
    return f"{tuple(t.shape)} {t.dtype} on {t.device}"


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_tensor(name: str, t, ndim: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(t).__name__}")
    _check_dense(name, t)
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype (float16, bfloat16, float32, float64), got {t.dtype}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}; cast it with .float()")


def _check_dense(name: str, t: torch.Tensor, kind: str = "(strided) tensor") -> None:
    """Refuse a sparse or nested tensor, naming it (a nested tensor reports a strided layout)."""
    if t.is_nested:
        raise TypeError(f"{name} must be a dense {kind}, got a nested tensor; pad it (.to_padded_tensor), or "
                        "pack the sequences for gape.attention_varlen")
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense {kind}, got layout {t.layout}; call .to_dense() first")


def _type_name(x) -> str:
    """``x``'s type as an error names it: module-qualified unless a builtin (numpy.bool, not bool)."""
    t = type(x)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def _float_or_inf(x) -> float:
    """``float(x)``, with an int beyond float range as inf (for the caller's range check)."""
    try:
        return float(x)
    except OverflowError:
        return math.inf


def _check_scale(scale, d: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(d)
    # bool is an int subclass: scale=True would silently mean 1.0
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None (1/sqrt(D)), got {type(scale).__name__} {scale!r}")
    value = _float_or_inf(scale)
    if not math.isfinite(value):
        raise ValueError(f"scale must be a finite float or None (1/sqrt(D)), got {scale!r}")
    return value


def _validate(query, key, value, query_gate, key_gate, attn_mask, is_causal, scale, distance, backend):
    _check_tensor("query", query, 4, "[B, Hq, Lq, D]")
    _check_tensor("key", key, 4, "[B, Hkv, Lk, D]")
    _check_tensor("value", value, 4, "[B, Hkv, Lk, Dv]")
    _check_tensor("query_gate", query_gate, 3, "[B, Hq, Lq]")
    _check_tensor("key_gate", key_gate, 3, "[B, Hkv, Lk]")
    b, hq, lq, d = query.shape
    bk, hkv, lk, dk = key.shape
    if key.dtype != query.dtype or value.dtype != query.dtype:
        raise TypeError(
            f"query, key and value must share one dtype, got query {query.dtype}, key {key.dtype}, value {value.dtype}"
        )
    for name, t in (("key", key), ("value", value), ("query_gate", query_gate), ("key_gate", key_gate)):
        if t.device != query.device:
            raise ValueError(f"{name} is on {t.device} but query is on {query.device}; move all inputs to one device")
    if bk != b or value.shape[0] != b:
        raise ValueError(f"batch sizes differ: query {b}, key {bk}, value {value.shape[0]}")
    if d == 0 or value.shape[3] == 0:
        raise ValueError(
            f"head dims must be >= 1, got query/key D={d} and value Dv={value.shape[3]} "
            f"(query {tuple(query.shape)}, value {tuple(value.shape)})"
        )
    if dk != d:
        raise ValueError(f"key head dim {dk} must equal query head dim {d} (query {tuple(query.shape)}, key {tuple(key.shape)})")
    if value.shape[1] != hkv or value.shape[2] != lk:
        raise ValueError(f"value must be [B, Hkv={hkv}, Lk={lk}, Dv], got {tuple(value.shape)}")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(
            f"query heads ({hq}) must be a multiple of key/value heads ({hkv}) for grouped-query attention"
        )
    if lk == 0:
        raise ValueError("key must hold at least one position (Lk >= 1)")
    if tuple(query_gate.shape) != (b, hq, lq):
        raise ValueError(f"query_gate must be [B, Hq, Lq] = {(b, hq, lq)}, got {tuple(query_gate.shape)}")
    if tuple(key_gate.shape) != (b, hkv, lk):
        raise ValueError(f"key_gate must be [B, Hkv, Lk] = {(b, hkv, lk)}, got {tuple(key_gate.shape)}")
    for name, g in (("query_gate", query_gate), ("key_gate", key_gate)):
        if g.dtype not in (query.dtype, torch.float32):
            raise TypeError(f"{name} must be {query.dtype} (the query dtype) or float32, got {g.dtype}")
    if not isinstance(distance, str) or distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {_type_name(is_causal)} {is_causal!r}; pass bool(...)")
    scale = _check_scale(scale, d)
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")

    if attn_mask is not None:
        if isinstance(attn_mask, torch.Tensor) and (attn_mask.layout != torch.strided or attn_mask.is_nested):
            raise TypeError(f"attn_mask must be a dense (strided) bool tensor, got layout {attn_mask.layout}")
        if not isinstance(attn_mask, torch.Tensor) or attn_mask.dtype != torch.bool:
            raise TypeError(
                "attn_mask must be a bool tensor (True = may attend); for an additive float mask "
                "pass `attn_mask=(mask == 0)`"
                + (f", got {attn_mask.dtype}" if isinstance(attn_mask, torch.Tensor) else f", got {type(attn_mask).__name__}")
            )
        if attn_mask.device != query.device:
            raise ValueError(f"attn_mask is on {attn_mask.device} but query is on {query.device}")
        if attn_mask.dim() > 4:
            raise ValueError(f"attn_mask must broadcast to [B, Hq, Lq, Lk], got shape {tuple(attn_mask.shape)}")
        while attn_mask.dim() < 4:
            attn_mask = attn_mask.unsqueeze(0)
        for got, want, axis in zip(attn_mask.shape, (b, hq, lq, lk), ("B", "Hq", "Lq", "Lk")):
            if got not in (1, want):
                raise ValueError(
                    f"attn_mask shape {tuple(attn_mask.shape)} does not broadcast to [B, Hq, Lq, Lk] = "
                    f"{(b, hq, lq, lk)} (axis {axis}: {got} vs {want})"
                )
    if query.device.type != "meta":
        _check_gate_range(query_gate, key_gate)
    return attn_mask, scale


_LAMBDA_RANGE = "query_gate (lambda) must be finite and >= 0"
_PI_RANGE = "key_gate (pi) must lie in [0, 1]"


def _check_gate_range(query_gate, key_gate) -> None:
    """Gates out of range are an error, not clamped: a negative forgetting rate
    would amplify distant tokens and pi > 1 would invert the bias, both silently.
    While torch.compile traces, the same condition becomes a compiled assert
    (``torch._assert_async``: a RuntimeError when the compiled graph runs)."""
    if os.environ.get("GAPE_SKIP_GATE_CHECK") == "1":
        return
    if torch.compiler.is_compiling():
        # No no_grad block here: compiled, an assert raising inside it would leave grad mode off.
        # (Comparisons build no autograd graph anyway.)
        torch._assert_async((torch.isfinite(query_gate) & (query_gate >= 0)).all(), _LAMBDA_RANGE)
        torch._assert_async(((key_gate >= 0) & (key_gate <= 1)).all(), _PI_RANGE)
        return
    with torch.no_grad():
        if query_gate.numel() and not bool(torch.isfinite(query_gate).all() and (query_gate >= 0).all()):
            lo = float(query_gate.min())
            raise ValueError(f"{_LAMBDA_RANGE}, got min {lo}")
        if key_gate.numel() and not bool(((key_gate >= 0) & (key_gate <= 1)).all()):
            raise ValueError(
                f"{_PI_RANGE}, got range [{float(key_gate.min())}, {float(key_gate.max())}]"
            )


def double_backward_error(backend: str) -> str:
    """The error of a backend whose backward is not itself differentiable."""
    return (
        f'the "{backend}" GAPE backend has no double backward (autograd.grad(..., create_graph=True), e.g. a '
        "gradient penalty): its backward is a fused kernel that autograd cannot differentiate. Use "
        'backend="reference" (materialised scores, fully differentiable) for higher-order gradients'
    )


def _is_empty(query, key, value) -> bool:
    return query.numel() == 0 or key.numel() == 0 or value.numel() == 0


class AttentionCall:
    """What a backend's ``supports`` reads about one call: the inputs, and the
    mask analysed into key ranges at most once (the analysis reads the mask's
    values, a host sync on CUDA), whoever asks first."""

    def __init__(self, query, key, value, attn_mask, is_causal: bool, distance: str, query_offset=None, window=None,
                 varlen: bool = False, sinks=None, softcap=None):
        self.query, self.key, self.value = query, key, value
        self.attn_mask, self.is_causal, self.distance = attn_mask, is_causal, distance
        self.query_offset, self.window, self.varlen = query_offset, window, varlen
        self.sinks, self.softcap = sinks, softcap
        self._ranges = _UNSET

    @property
    def terms(self) -> str | None:
        """The optional logit terms of the call, named as the API names them (None without)."""
        names = [n for n, v in (("sinks", self.sinks), ("softcap", self.softcap)) if v is not None]
        return " and ".join(names) or None

    @property
    def key_ranges(self):
        """``gape.kernels.key_ranges.KeyRanges`` equivalent to the mask (AND the
        causal rule, offsets and window), None without a mask, or the reason string when the mask
        is not a key-range pattern."""
        if self._ranges is _UNSET:
            if self.attn_mask is None:
                self._ranges = None
            else:
                from gape.kernels.key_ranges import analyse_mask

                lk = None if self.key is None else self.key.shape[2]  # None: the mask's own length
                self._ranges = analyse_mask(self.attn_mask, self.query.shape[2], lk, self.is_causal,
                                           self.query_offset, self.window)
        return self._ranges


_UNSET = object()


_MODULES: dict = {}
_LOADED = _MODULES  # the name tests clear it by (replacing it leaves _MODULES as is; functions are looked up per call)


def _module(name: str):
    """The backend's module, or the reason it cannot be imported."""
    # a dict lookup once loaded, which torch.compile traces (import_module it cannot)
    module = _MODULES.get(name)
    if module is None:
        try:
            module = importlib.import_module(_BACKENDS[name][0])
        except ImportError as e:
            module = f'the "{name}" backend cannot be imported ({e}); install what it needs (e.g. pip install triton)'
        _MODULES[name] = module
    return module


# Positions enter the kernels as int32 (Triton) and the bias as float32 distances:
# |query_offset| + the sequence lengths must stay below 2**31.
MAX_POSITION = 2**31 - 1


def _check_query_offset(query_offset, b: int, lq: int, lk: int, device):
    """None, an int, or an integer tensor of shape [] / [B] (returned as int64 [B]); range-checked."""
    if query_offset is None:
        return None
    if isinstance(query_offset, bool):
        raise TypeError("query_offset must be an int or an integer tensor of shape [B], got a bool")
    if isinstance(query_offset, torch.Tensor):
        if (query_offset.is_floating_point() or query_offset.is_complex() or query_offset.dtype == torch.bool
                or query_offset.dtype == torch.uint64):  # uint64 past 2**63 would wrap in the int64 cast
            raise TypeError(f"query_offset must be an integer tensor (int32 or int64), got {query_offset.dtype}")
        _check_dense("query_offset", query_offset, "integer tensor")
        if query_offset.dim() > 1 or (query_offset.dim() == 1 and query_offset.shape[0] not in (1, b)):
            raise ValueError(f"query_offset must be an int or an integer tensor of shape [B={b}], got shape "
                             f"{tuple(query_offset.shape)}")
        if query_offset.device != device and query_offset.device.type != "cpu":
            raise ValueError(f"query_offset is on {query_offset.device} but query is on {device}")
        off = query_offset.to(dtype=torch.int64).reshape(-1).expand(b)
        if torch.compiler.is_compiling() or off.device.type == "meta":
            return off
        lo, hi = (int(off.min()), int(off.max())) if b else (0, 0)
    else:
        try:  # an int, or an integer scalar of another library (numpy.int64)
            lo = hi = off = operator.index(query_offset)
        except TypeError:
            raise TypeError(f"query_offset must be None, an int or an integer torch tensor of shape [B], got "
                            f"{_type_name(query_offset)}") from None
    if max(abs(lo), abs(hi)) + lq + lk > MAX_POSITION:
        raise ValueError(
            f"query_offset must satisfy |query_offset| + Lq + Lk <= 2**31 - 1 (positions are int32 in the kernels), "
            f"got offsets in [{lo}, {hi}] with Lq={lq}, Lk={lk}"
        )
    return off


def _check_window(window_size, is_causal: bool):
    """``(left, right)`` ints >= -1 (FlashAttention's convention); None when unbounded."""
    if window_size is None:
        return None
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or not all(isinstance(w, int) and not isinstance(w, bool) for w in window_size)):
        raise TypeError(f"window_size must be a pair of ints (left, right), -1 = unbounded, got {window_size!r}")
    left, right = (int(w) for w in window_size)
    if left < -1 or right < -1:
        raise ValueError(f"window_size entries must be >= -1 (-1 = unbounded), got {window_size!r}")
    if is_causal:
        right = -1  # the causal rule already stops at the query
    if left == -1 and right == -1:
        return None
    if left > MAX_POSITION or right > MAX_POSITION:
        raise ValueError(f"window_size entries must be below 2**31, got {window_size!r}")
    return (left, right)


def flash_cuda_window(window_size, seqlen_q: int, seqlen_k: int, is_causal: bool = False) -> tuple[int, int]:
    """The ``window_size`` FlashAttention's CUDA entry point actually applies, in
    this package's convention (pass the result as ``window_size``).

    gape follows FlashAttention's docstring exactly: query ``i`` (at position
    ``i + seqlen_k - seqlen_q`` by default) sees keys in ``[pos_q - left, pos_q + right]``,
    ``-1`` unbounded. FlashAttention's C++ entry point (``mha_fwd`` /
    ``mha_varlen_fwd``) first rewrites a side ``>= seqlen_k`` into ``-1``, then a
    missing side of a bounded window into ``seqlen_k``, and a causal call's
    right side into ``0``. When ``seqlen_q > seqlen_k`` (or with
    ``left >= seqlen_k``) that is a different window than the docstring's. Users
    who need FlashAttention's numbers bit for bit pass
    ``window_size=flash_cuda_window(window_size, Lq, Lk, is_causal)``; for varlen
    calls FlashAttention uses ``max_seqlen_k`` as ``seqlen_k``.
    """
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or not all(isinstance(w, int) and not isinstance(w, bool) for w in window_size)):
        raise TypeError(f"window_size must be a pair of ints (left, right), -1 = unbounded, got {window_size!r}")
    for name, n in (("seqlen_q", seqlen_q), ("seqlen_k", seqlen_k)):
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"{name} must be an int >= 0, got {n!r}")
    left, right = (int(w) for w in window_size)
    if left < -1 or right < -1:
        raise ValueError(f"window_size entries must be >= -1 (-1 = unbounded), got {window_size!r}")
    if left >= seqlen_k:
        left = -1
    if right >= seqlen_k:
        right = -1
    if is_causal:
        right = 0
    if left < 0 and right >= 0:
        left = seqlen_k
    if left >= 0 and right < 0:
        right = seqlen_k
    return (left, right)


def _position_kwargs(query_offset, window, sinks=None, softcap=None) -> dict:
    kw = {}
    if query_offset is not None:
        kw["query_offset"] = query_offset
    if window is not None:
        kw["window"] = window
    if sinks is not None:
        kw["sinks"] = sinks
    if softcap is not None:
        kw["softcap"] = softcap
    return kw


def _check_terms(sinks, softcap, query):
    """``sinks``: None or a floating ``[Hq]`` tensor on the query's device (finite);
    ``softcap``: None or a positive finite float. Returns ``(sinks, softcap)``."""
    hq = query.shape[1]
    if sinks is not None:
        if not isinstance(sinks, torch.Tensor) or not sinks.is_floating_point():
            raise TypeError(f"sinks must be None or a floating tensor of shape [Hq={hq}], got "
                            f"{sinks.dtype if isinstance(sinks, torch.Tensor) else _type_name(sinks)}")
        _check_dense("sinks", sinks)
        if sinks.dim() != 1 or sinks.shape[0] != hq:
            raise ValueError(f"sinks must have shape [Hq={hq}] (one logit per query head), got {tuple(sinks.shape)}")
        if sinks.device != query.device:
            raise ValueError(f"sinks is on {sinks.device} but query is on {query.device}")
        if sinks.device.type != "meta" and not torch.compiler.is_compiling():
            # finite where the backends use them: in the accumulation dtype (a float64 sink of
            # 1e39 is finite, and inf in float32)
            acc = torch.float64 if query.dtype == torch.float64 else torch.float32
            if not bool(torch.isfinite(sinks.detach().to(acc)).all()):
                raise ValueError(f"sinks must be finite in {acc} (the dtype attention accumulates in), got values "
                                 f"in [{float(sinks.min())}, {float(sinks.max())}]; a -inf sink is no sink: pass "
                                 "sinks=None")
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
            raise TypeError(f"softcap must be None or a positive float, got {type(softcap).__name__} {softcap!r}")
        cap = _float_or_inf(softcap)
        if not (math.isfinite(cap) and cap > 0):
            raise ValueError(f"softcap must be a positive finite float (None: no soft-capping), got {softcap!r}")
        softcap = cap
    return sinks, softcap


def _load(name: str):
    """Backend ``name``'s attention function (looked up on each call, so a test's spy is seen)."""
    return getattr(_module(name), _BACKENDS[name][1])


def _on_gpu(query) -> bool:
    """Whether ``backend="auto"`` tries the GPU kernel first (a function so tests can take the CUDA route)."""
    return query.device.type == "cuda"


def auto_order(query) -> tuple[str, ...]:
    """The backends ``"auto"`` tries, in order: Triton first on CUDA, else the torch backend."""
    return ("triton", "torch") if _on_gpu(query) else ("torch",)


class Selection:
    """A chosen backend: ``name`` and ``fn`` taking the standard arguments
    ``(query, key, value, query_gate, key_gate, attn_mask, is_causal, scale, distance)``."""

    __slots__ = ("name", "fn")

    def __init__(self, name: str, fn):
        self.name, self.fn = name, fn

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"Selection({self.name!r})"


def select(backend: str, query, key=None, value=None, *, attn_mask=None, is_causal: bool = True,
           distance: str = "log", query_offset=None, window=None, varlen: bool = False, sinks=None,
           softcap=None) -> Selection:
    """The backend that serves this call, ready to run (the one place a backend is chosen).

    ``"auto"`` takes the first of :func:`auto_order` whose ``supports`` accepts
    the call (so on CUDA a mask that is not key ranges or a head dim the kernel
    does not take falls back to the torch backend); a named backend that cannot
    serve the call raises ValueError with its reason. Inputs must be validated
    already (``attn_mask`` bool, broadcastable to ``[B, Hq, Lq, Lk]``;
    ``query_offset``/``window``/``sinks``/``softcap`` as checked by
    :func:`attention`; each backend's ``supports`` says whether it implements
    sinks and soft-capping). ``varlen``: the packed entry point of
    :func:`attention_varlen` (its own table).
    """
    table = VARLEN_BACKENDS if varlen else BACKENDS
    if backend not in table:
        raise ValueError(f"backend must be one of {table}, got {backend!r}")
    key = query if key is None else key
    value = key if value is None else value
    call = AttentionCall(query, key, value, attn_mask, is_causal, distance, query_offset, window, varlen, sinks,
                         softcap)
    names = auto_order(query) if backend == "auto" else (backend,)
    for name in names:
        reason = _reason(name, call)
        if reason is None:
            return Selection(name, _bind(name, call))
    raise ValueError(f"backend={backend!r} cannot serve this call: {reason}")


def _reason(name: str, call: AttentionCall) -> str | None:
    if call.varlen and name not in _VARLEN:
        return f"attention_varlen runs on backends {VARLEN_BACKENDS}, not {name!r}"
    module = _module(name)
    return module if isinstance(module, str) else module.supports(call)


def _bind(name: str, call: AttentionCall):
    if call.varlen:
        fn = getattr(_module(name), _VARLEN[name][1])
        kwargs = _position_kwargs(None, None, call.sinks, call.softcap)
        return functools.partial(fn, **kwargs) if kwargs else fn
    fn = _load(name)
    kwargs = _position_kwargs(call.query_offset, call.window, call.sinks, call.softcap)
    if name == "triton" and call.attn_mask is not None:
        # the mask was analysed by supports; the kernel takes the key ranges
        kwargs["key_ranges"] = call.key_ranges
    return functools.partial(fn, **kwargs) if kwargs else fn


def unsupported_reason(name: str, query, distance: str, attn_mask, is_causal: bool = True, varlen: bool = False,
                       query_offset=None, window=None, key=None) -> str | None:
    """Why backend ``name`` cannot serve this call (None when it can)."""
    call = AttentionCall(query, key, query if key is None else key, attn_mask, is_causal, distance, query_offset,
                         window, varlen)
    return _reason(name, call)


def resolve_backend(backend: str, query, distance: str = "log", attn_mask=None, query_offset=None, window=None,
                    is_causal: bool = True) -> str:
    """The concrete backend ``attention`` would run for these inputs."""
    if backend != "auto":
        return backend
    return select(backend, query, attn_mask=attn_mask, is_causal=is_causal, distance=distance,
                  query_offset=query_offset, window=window).name


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    query_gate: torch.Tensor,
    key_gate: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = True,
    scale: float | None = None,
    distance: str = "log",
    backend: str = "auto",
    query_offset: int | torch.Tensor | None = None,
    window_size: tuple[int, int] = (-1, -1),
    sinks: torch.Tensor | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """GAPE attention: scaled dot-product attention plus a gated distance bias.

    ``softmax(scale * q k^T - lambda_m (1 - pi_n) phi(delta_mn)) v`` per head,
    as defined in docs/maths.md. A drop-in for
    :func:`torch.nn.functional.scaled_dot_product_attention` with two gates.

    Args:
        query: ``[B, Hq, Lq, D]`` post-RoPE queries.
        key: ``[B, Hkv, Lk, D]`` post-RoPE keys, ``Hq % Hkv == 0``
            (grouped-query attention: query head ``h`` reads kv head ``h // (Hq // Hkv)``).
        value: ``[B, Hkv, Lk, Dv]``.
        query_gate: ``[B, Hq, Lq]`` forgetting rate ``lambda >= 0``, finite.
        key_gate: ``[B, Hkv, Lk]`` protection ``pi`` in ``[0, 1]``.
            Out-of-range gates raise ValueError (they are never clamped).
            Gates may be float32 or the query dtype.
        attn_mask: optional bool tensor broadcastable to ``[B, Hq, Lq, Lk]``;
            True = may attend. Combined (AND) with the causal rule. A query row
            with no allowed key returns zeros, never NaN.
        is_causal: causal masking (keys with ``pos_q - pos_k < 0`` masked).
            Distances are ``pos_q - pos_k`` (causal) or ``|pos_q - pos_k|`` (non-causal).
        scale: logit scale, default ``1/sqrt(D)``.
        distance: ``"log"`` (``log(1 + delta)``) or ``"linear"`` (``delta``).
        backend: ``"auto"`` (Triton on CUDA, tiled torch elsewhere),
            ``"reference"``, ``"torch"``, ``"sdpa"`` (linear distance, causal only) or
            ``"triton"``.
        query_offset: position of query row 0 minus position of key column 0:
            query ``i`` sits at ``i + query_offset``, key ``j`` at ``j``. An int, an
            integer ``[B]`` tensor (one offset per batch element), or None for the
            bottom-right default ``Lk - Lq`` (a decode step sees the whole cache).
            Negative and larger-than-``Lk`` offsets are allowed (rows that see no
            key are zeros); ``|query_offset| + Lq + Lk`` must stay below ``2**31``.
        window_size: ``(left, right)`` local window in FlashAttention's convention:
            query ``i`` sees keys at positions ``[pos_q - left, pos_q + right]``,
            ``-1`` = unbounded on that side (``right`` is moot when causal).
            This is FlashAttention's documented window, applied exactly for
            every shape. FlashAttention's CUDA entry point rewrites the window
            first (a side ``>= Lk`` becomes unbounded, an unbounded side of a
            bounded window becomes ``Lk``), which differs when ``Lq > Lk``
            or ``left >= Lk``; :func:`flash_cuda_window` gives the window it
            applies, to reproduce its numbers.
        sinks: optional ``[Hq]`` learned attention sinks (gpt-oss): one extra
            logit per query head in every row's softmax denominator, with no
            value, so a row may give less than all its weight to the keys. Its
            gradient flows (``sinks.requires_grad``). Finite.
        softcap: optional logit soft-cap ``c > 0`` (Gemma 2): the content logit
            becomes ``c * tanh(scale <q, k> / c)``; the GAPE bias is added after
            the cap (docs/maths.md says why).

    Sinks and soft-capping run on the ``"reference"``, ``"torch"`` (the fused C++
    CPU kernel, or the GEMM tiles where the kernel cannot run) and ``"triton"``
    backends (constexpr variants of the fused kernels), forward and backward;
    ``"sdpa"`` refuses them. ``"auto"`` takes the Triton kernel for them on CUDA,
    the torch backend elsewhere.

    Returns:
        ``[B, Hq, Lq, Dv]`` in the query dtype.

    Any strided layout is accepted (expanded, overlapping or transposed inputs
    are copied where a kernel cannot read them). Zero-size and meta inputs run
    the reference (empty or meta output, with autograd). NaN/inf in the query,
    key or value propagate as in the reference. Double backward
    (``create_graph=True``) needs ``backend="reference"``; the fused backends
    raise RuntimeError. Under ``torch.compile`` the gate range check is a
    compiled assert (RuntimeError when the graph runs).

    Example:
        >>> import torch, gape
        >>> q = torch.randn(1, 9, 128, 64); k = torch.randn(1, 3, 128, 64); v = torch.randn_like(k)
        >>> lam = torch.rand(1, 9, 128) * 0.1; pi = torch.rand(1, 3, 128)
        >>> gape.attention(q, k, v, lam, pi).shape
        torch.Size([1, 9, 128, 64])
    """
    attn_mask, scale = _validate(
        query, key, value, query_gate, key_gate, attn_mask, is_causal, scale, distance, backend
    )
    b, lq, lk = query.shape[0], query.shape[2], key.shape[2]
    query_offset = _check_query_offset(query_offset, b, lq, lk, query.device)
    window = _check_window(window_size, is_causal)
    sinks, softcap = _check_terms(sinks, softcap, query)
    if query.device.type == "meta" or _is_empty(query, key, value):
        # Shapes only (meta) or nothing to compute: the reference handles both exactly,
        # with autograd, and no kernel sees a zero-size or data-less tensor.
        return _load("reference")(query, key, value, query_gate, key_gate, attn_mask, is_causal, scale, distance,
                                  **_position_kwargs(query_offset, window, sinks, softcap))
    chosen = select(backend, query, key, value, attn_mask=attn_mask, is_causal=is_causal, distance=distance,
                    query_offset=query_offset, window=window, sinks=sinks, softcap=softcap)
    return chosen(query, key, value, query_gate, key_gate, attn_mask, is_causal, scale, distance)


def _check_cu_seqlens(name: str, cu, total: int, total_name: str, device, max_seqlen, max_name: str):
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be an int32 tensor of shape [N + 1], got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must be int32 (FlashAttention's layout), got {cu.dtype}")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device} but query is on {device}; move it to the query's device")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name} must be 1-D of length N + 1 >= 2, got shape {tuple(cu.shape)}")
    if not isinstance(max_seqlen, int) or isinstance(max_seqlen, bool) or max_seqlen < 0:
        raise TypeError(f"{max_name} must be a non-negative int, got {max_seqlen!r}")
    if torch.compiler.is_compiling():
        return
    c = cu.to("cpu", torch.int64)
    if int(c[0]) != 0:
        raise ValueError(f"{name} must start at 0, got {int(c[0])}")
    if int(c[-1]) != total:
        raise ValueError(f"{name} must end at {total_name} = {total}, got {int(c[-1])}")
    lens = c[1:] - c[:-1]
    if bool((lens < 0).any()):
        i = int((lens < 0).nonzero()[0])
        raise ValueError(f"{name} must be non-decreasing, got {int(c[i])} then {int(c[i + 1])} at index {i}")
    longest = int(lens.max())
    if longest > max_seqlen:
        raise ValueError(f"{max_name} = {max_seqlen} is smaller than the longest sequence in {name} ({longest})")


def attention_varlen(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    query_gate: torch.Tensor,
    key_gate: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    is_causal: bool = True,
    scale: float | None = None,
    distance: str = "log",
    window_size: tuple[int, int] = (-1, -1),
    backend: str = "auto",
    sinks: torch.Tensor | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """GAPE attention over packed variable-length sequences (FlashAttention's varlen layout).

    Sequence ``s`` owns query rows ``cu_seqlens_q[s]:cu_seqlens_q[s + 1]`` and keys
    ``cu_seqlens_k[s]:cu_seqlens_k[s + 1]``; it is bottom-right aligned on its own
    (as :func:`attention` with ``query_offset=None``) and never attends another
    sequence. A sequence with no query rows is allowed; one with no keys gives zeros.

    Args:
        query: ``[Tq, Hq, D]``; key, value: ``[Tk, Hkv, D]`` / ``[Tk, Hkv, Dv]``.
        query_gate: ``[Tq, Hq]`` (``lambda >= 0``); key_gate: ``[Tk, Hkv]`` (``pi`` in ``[0, 1]``).
        cu_seqlens_q, cu_seqlens_k: int32 ``[N + 1]`` on the query's device, starting
            at 0, non-decreasing, ending at ``Tq`` / ``Tk``.
        max_seqlen_q, max_seqlen_k: ints at least the longest sequence (Triton sizes its grid by them).
        is_causal, scale, distance, window_size: as :func:`attention`.
        backend: ``"auto"``, ``"reference"``, ``"torch"`` (the C++ kernel walks the
            sequences natively) or ``"triton"``.
        sinks, softcap: as :func:`gape.attention` (``sinks [Hq]``, shared by every
            sequence); the ``"reference"`` and ``"torch"`` backends serve them.

    Returns:
        ``[Tq, Hq, Dv]`` in the query dtype.

    Example:
        >>> import torch, gape
        >>> cu = torch.tensor([0, 5, 12], dtype=torch.int32)
        >>> q = torch.randn(12, 4, 16); k = torch.randn(12, 2, 16); v = torch.randn_like(k)
        >>> out = gape.attention_varlen(q, k, v, torch.rand(12, 4) * 0.1, torch.rand(12, 2), cu, cu, 7, 7)
        >>> out.shape
        torch.Size([12, 4, 16])
    """
    _check_tensor("query", query, 3, "[Tq, Hq, D]")
    _check_tensor("key", key, 3, "[Tk, Hkv, D]")
    _check_tensor("value", value, 3, "[Tk, Hkv, Dv]")
    _check_tensor("query_gate", query_gate, 2, "[Tq, Hq]")
    _check_tensor("key_gate", key_gate, 2, "[Tk, Hkv]")
    tq, tk = query.shape[0], key.shape[0]
    if key.shape[0] != value.shape[0]:
        raise ValueError(f"key and value must hold the same tokens, got key {tuple(key.shape)}, value {tuple(value.shape)}")
    if tuple(query_gate.shape) != tuple(query.shape[:2]):
        raise ValueError(f"query_gate must be [Tq, Hq] = {tuple(query.shape[:2])}, got {tuple(query_gate.shape)}")
    if tuple(key_gate.shape) != tuple(key.shape[:2]):
        raise ValueError(f"key_gate must be [Tk, Hkv] = {tuple(key.shape[:2])}, got {tuple(key_gate.shape)}")
    if backend not in VARLEN_BACKENDS:
        raise ValueError(f"backend must be one of {VARLEN_BACKENDS} for attention_varlen, got {backend!r}")
    # the dense checks on the [1, H, T, D] views (dtypes, devices, heads, head dims, gates, scale)
    q4, k4, v4 = (t.transpose(0, 1).unsqueeze(0) for t in (query, key, value))
    if tk == 0:
        raise ValueError("key must hold at least one token (Tk >= 1)")
    _, scale = _validate(q4, k4, v4, query_gate.t().unsqueeze(0), key_gate.t().unsqueeze(0), None, is_causal, scale,
                         distance, "auto")
    _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, tq, "Tq", query.device, max_seqlen_q, "max_seqlen_q")
    if isinstance(cu_seqlens_k, torch.Tensor) and cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must both have N + 1 entries, got shapes "
                         f"{tuple(cu_seqlens_q.shape)} and {tuple(cu_seqlens_k.shape)}")
    _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, tk, "Tk", query.device, max_seqlen_k, "max_seqlen_k")
    if max(max_seqlen_q, max_seqlen_k) > MAX_POSITION:
        raise ValueError("max_seqlen_q and max_seqlen_k must be below 2**31")
    window = _check_window(window_size, is_causal)
    sinks, softcap = _check_terms(sinks, softcap, q4)
    fn = select(backend, query, key, value, is_causal=is_causal, distance=distance, window=window, varlen=True,
                sinks=sinks, softcap=softcap)
    return fn(query, key, value, query_gate, key_gate, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
              is_causal, scale, distance, window)
