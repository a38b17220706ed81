"""The lm-eval model ``gape``: Hugging Face's HFLM on a model loaded by ``gape.load_model``
and switched to a positional-encoding method (GAPE, RoPE scaling, or plain RoPE).

model_args (``--model_args key=value,...``):
    pretrained   HF folder or .gguf path (default: the embedded SmolLM2-135M-Instruct)
    gguf_file    GGUF file inside ``pretrained``
    method       rope | gape | yarn | dynamic | linear | gape+yarn (default gape)
    gates        trained gate file for gape (default: the constant-rate gape of gape niah)
    gape_lambda  forgetting rate of the constant-rate gape (default 0.05)
    distance     log | linear (constant-rate gape)
    rope_type    linear | dynamic | yarn: RoPE scaling on top of ``method`` (alias of the
                 method names; ``method=gape,rope_type=yarn`` equals ``method=gape+yarn``)
    rope_factor  RoPE scaling factor (default 2)
    dtype        auto (default: bfloat16 where the CPU multiplies bfloat16 natively, AVX512-BF16
                 or AMX, else float32: gape.hf.models.auto_dtype) | float32 | bfloat16 | float16
Everything else goes to HFLM (batch_size, max_length, device, ...).
"""

from __future__ import annotations

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from gape import _args as A
from gape.hf.models import load_model, resolve_dtype
from gape.tasks.methods import DEFAULT_GAPE_LAMBDA, MethodOptions, apply_method


def resolve_method(method: str, rope_type: str | None) -> str:
    if rope_type in (None, "", "none", "default"):
        return method
    if rope_type not in ("linear", "dynamic", "yarn"):
        raise ValueError(f"rope_type must be linear, dynamic or yarn, got {rope_type!r}")
    if method == "rope":
        return rope_type
    if method == "gape" and rope_type == "yarn":
        return "gape+yarn"
    if method == rope_type:
        return method
    raise ValueError(f"method={method!r} cannot be combined with rope_type={rope_type!r} (gape supports rope_type=yarn)")


@register_model("gape")
class GapeLM(HFLM):
    """HFLM on a GAPE-patched (or RoPE-scaled, or plain) model."""

    def __init__(
        self,
        pretrained: str | None = None,
        gguf_file: str | None = None,
        method: str = "gape",
        gates: str | None = None,
        gape_lambda: float = DEFAULT_GAPE_LAMBDA,
        distance: str = "log",
        rope_type: str | None = None,
        rope_factor: float = 2.0,
        dtype: str | torch.dtype = A.DEFAULT_DTYPE,
        device: str | None = None,
        **kwargs,
    ) -> None:
        if isinstance(dtype, str) and dtype not in A.DTYPE_CHOICES:
            raise ValueError(f"dtype must be one of {A.DTYPE_CHOICES}, got {dtype!r}")
        dtype = resolve_dtype(dtype, device if device and str(device).startswith("cuda") and torch.cuda.is_available() else "cpu")
        model, tokenizer = load_model(pretrained or None, gguf_file=gguf_file or None, dtype=dtype)
        # lm-eval's CLI defaults to cuda:0; like HFLM, fall back to the CPU when there is no GPU
        if device and not (str(device).startswith("cuda") and not torch.cuda.is_available()):
            model.to(device)
        self.gape_method = resolve_method(method, rope_type)
        self.gape_options = MethodOptions(rope_factor=float(rope_factor), gates=gates or None, gape_lambda=float(gape_lambda), distance=distance)
        apply_method(model, self.gape_method, self.gape_options)
        # HFLM's own knobs that do not apply to an already-built model
        for ignored in ("backend", "revision", "trust_remote_code", "parallelize"):
            kwargs.pop(ignored, None)
        super().__init__(pretrained=model, tokenizer=tokenizer, **kwargs)
