"""Whole GAPE models on disk: a transformers folder that says it is GAPE.

A patched model is self-describing: ``gape.patch`` writes two entries into
``model.config`` (and ``gape.unpatch`` removes them), so the model's own
``save_pretrained`` (and ``Trainer`` checkpoints, ``push_to_hub``...) write

- ``config.json`` ``"gape"``: the :class:`~gape.hf.config.GapeConfig`, the
  patched layer indices and how to load the folder;
- ``config.json`` ``"attn_implementation": "gape"``: plain transformers
  without GAPE registered refuses the folder loudly
  (``Specified attn_implementation="gape" is not supported``) instead of
  silently returning the unpatched model;
- the gate tensors beside the model weights, under their module names
  (``model.layers.3.self_attn.gape_gate.alpha``).

:func:`from_pretrained` (and ``gape.load_model``) loads such a folder: the
base model through transformers, then the patch with the saved config, then
the gates from the same safetensors files. A model loaded some other way
with ``attn_implementation="gape"`` (e.g. ``AutoModelForCausalLM`` after
``import gape.hf``) has no gates: its first forward raises an error naming
this function rather than run without them (see :func:`check_gate_missing`).
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch
from torch import nn

from .._io import UnreadableJsonError, read_json_object

from ._names import CONFIG_KEY, LOAD_HINT, check_gate_missing  # noqa: F401 (check_gate_missing: old import path)
from .config import GapeConfig

FORMAT = "gape-model"
FORMAT_VERSION = 1
GATE_MARK = ".gape_gate."


# --------------------------------------------------------------------------- the config.json entries


def describe(config: GapeConfig, layers: list[int]) -> dict:
    """The ``config.json`` ``"gape"`` entry of a model patched with ``config`` on ``layers``."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": config.to_dict(),
        "layers": list(layers),
        "load_with": LOAD_HINT,
    }


def mark(model: nn.Module, config: GapeConfig, layers: list[int]) -> None:
    """Write the GAPE entries into ``model.config`` (called by ``gape.patch``)."""
    model.config.gape = describe(config, layers)
    # A plain attribute, not the private _attn_implementation: PreTrainedConfig.to_dict
    # keeps it, and a config built from the saved dict takes it as attn_implementation.
    model.config.attn_implementation = "gape"


def unmark(model: nn.Module) -> None:
    """Remove what :func:`mark` wrote (called by ``gape.unpatch``)."""
    for name in (CONFIG_KEY, "attn_implementation"):
        model.config.__dict__.pop(name, None)


def read_description(config) -> dict | None:
    """The validated ``"gape"`` entry of a transformers config (or its dict), or None."""
    entry = config.get(CONFIG_KEY) if isinstance(config, dict) else getattr(config, CONFIG_KEY, None)
    if entry is None:
        return None
    if not isinstance(entry, dict) or entry.get("format") != FORMAT:
        raise ValueError(f'config "gape" entry is not a GAPE model description (format {FORMAT!r} expected), got {entry!r}')
    version = entry.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f'config "gape" entry has format_version {version!r}; this gape reads version {FORMAT_VERSION} (upgrade gape)'
        )
    layers = entry.get("layers")
    if not isinstance(layers, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
        raise ValueError(f'config "gape" entry has invalid "layers" {layers!r} (a list of layer indices expected)')
    GapeConfig.from_dict(entry.get("config"))  # raises naming the bad field
    return entry


# --------------------------------------------------------------------------- save


def save_pretrained(model: nn.Module, path: str | os.PathLike, tokenizer=None, **kwargs) -> None:
    """Save a GAPE-patched model as a self-describing transformers folder.

    ``model.save_pretrained(path)`` does the same (patched models carry the
    GAPE entries in their config); this checks the model is patched, accepts a
    PEFT-wrapped model (saving the base model with its gates; save the adapter
    with ``peft_model.save_pretrained``) and saves ``tokenizer`` too.

    Args:
        model: a model patched with :func:`gape.patch` (or a PEFT model around one).
        path: output folder.
        tokenizer: optional tokenizer saved into the same folder.
        kwargs: passed to ``PreTrainedModel.save_pretrained`` (``max_shard_size``...).

    Example:
        >>> gape.save_pretrained(model, "my-gape-model", tokenizer=tok)
        >>> model = gape.from_pretrained("my-gape-model")
    """
    from gape import hf
    from .compat import unwrap

    base = unwrap(model)
    if not hf.is_patched(base):
        raise ValueError("gape.save_pretrained needs a model patched with gape.patch (use model.save_pretrained otherwise)")
    from .models import quantization_method

    method = quantization_method(base)
    if method is not None:
        raise ValueError(
            f"gape.save_pretrained cannot save a {method}-quantized model: transformers does not serialize it. "
            "Load it dense instead (gape.load_model(path) unpacks GGUF weights; for a model from "
            "AutoModelForCausalLM.from_pretrained(..., gguf_file=...) call model = gape.models.dense(model) "
            "before gape.patch), or save the gates alone with gape.save_gates(model, 'gates.safetensors')"
        )
    state = hf._state(base)
    mark(base, state["config"], state["layers"])  # refresh: the config object may have been replaced
    if getattr(base.config, "_attn_implementation", None) != hf.IMPLEMENTATION:
        raise ValueError(
            f"the model is patched but runs attn_implementation={base.config._attn_implementation!r}, "
            "so its gates are not in use; call model.set_attn_implementation('gape') or gape.unpatch(model) first"
        )
    base.save_pretrained(os.fspath(path), **kwargs)
    if tokenizer is not None:
        tokenizer.save_pretrained(os.fspath(path))


# --------------------------------------------------------------------------- load


def _safetensors_keys(path: str) -> list[str]:
    """The tensor names of a safetensors file; a damaged file is a ValueError naming it."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return list(f.keys())
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types, without the path
        raise ValueError(f"{path}: not a readable safetensors file (truncated or damaged?): {exc}") from None


def _weight_files(folder: str) -> dict[str, str]:
    """``{tensor name: file}`` of the safetensors weights in ``folder`` (every file's header checked)."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            weight_map = read_json_object(index).get("weight_map")
        except UnreadableJsonError as exc:
            raise ValueError(f"{exc}: not a safetensors index (JSON with a \"weight_map\" object)") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f'{index}: field "weight_map" must map tensor names to file names')
        files = {k: os.path.join(folder, v) for k, v in weight_map.items()}
        for path in sorted(set(files.values())):
            if not os.path.isfile(path):
                raise FileNotFoundError(f'{index}: field "weight_map" names {os.path.basename(path)}, which is missing')
            _safetensors_keys(path)
        return files
    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(single):
        return {k: single for k in _safetensors_keys(single)}
    raise FileNotFoundError(f"{folder} holds no model.safetensors(.index.json): GAPE gates are read from safetensors only")


def _gate_tensors(folder: str, names: list[str]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    files = _weight_files(folder)
    missing = [n for n in names if n not in files]
    if missing:
        raise ValueError(
            f"{folder} describes a GAPE model but its weights lack {len(missing)} gate tensors "
            f"(first: {missing[0]}); was it saved from a patched model?"
        )
    extra = sorted(k for k in files if GATE_MARK in k and k not in set(names))
    if extra:
        raise ValueError(f"{folder} holds gate tensors the described patch does not create (first: {extra[0]})")
    out: dict[str, torch.Tensor] = {}
    by_file: dict[str, list[str]] = {}
    for n in names:
        by_file.setdefault(files[n], []).append(n)
    for file, keys in by_file.items():
        try:
            with safe_open(file, framework="pt") as f:
                for k in keys:
                    out[k] = f.get_tensor(k)
        except Exception as exc:  # noqa: BLE001 - name the file (safetensors does not)
            raise ValueError(f"{file}: cannot read gate tensors (truncated or damaged?): {exc}") from None
    for k, t in out.items():
        if not t.dtype.is_floating_point:
            raise ValueError(f"{files[k]}: gate tensor {k} has dtype {t.dtype}, a floating-point dtype expected")
        if not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(f"{files[k]}: gate tensor {k} holds {bad} non-finite value(s) (NaN or inf)")
    return out


class _LoadReport(logging.Filter):
    """Hold back transformers' load report while the base model loads: its only
    entries for a GAPE folder are the gate tensors, which are loaded next."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in str(record.msg):
            self.held.append(record)
            return False
        return True


@contextlib.contextmanager
def _holding_load_report():
    logger = logging.getLogger("transformers.modeling_utils")
    report = _LoadReport()
    logger.addFilter(report)
    try:
        yield report
    finally:
        logger.removeFilter(report)


def attach_saved_gates(model: nn.Module, folder: str | os.PathLike, entry: dict | None = None) -> nn.Module:
    """Patch a base model loaded from a GAPE folder and load its gates from the folder's weights."""
    from gape import hf

    folder = os.fspath(folder)
    entry = entry if entry is not None else read_description(model.config)
    if entry is None:
        raise ValueError(f"{folder} is not a GAPE model folder (its config.json has no 'gape' entry)")
    config = GapeConfig.from_dict(entry["config"])
    if hf.is_patched(model):
        raise ValueError("the model is already patched; attach_saved_gates patches a freshly loaded base model")
    hf.patch(model, config)
    try:
        patched = hf._state(model)["layers"]
        if patched != entry["layers"]:
            raise ValueError(
                f"{folder}: the saved config patches layers {entry['layers']} but on this model it patches {patched}"
            )
        own = {n: t for n, t in list(model.named_parameters()) + list(model.named_buffers()) if GATE_MARK in n}
        saved = _gate_tensors(folder, sorted(own))
        with torch.no_grad():
            for name, t in saved.items():
                if tuple(t.shape) != tuple(own[name].shape):
                    raise ValueError(f"{_weight_files(folder)[name]}: gate {name} has shape {tuple(t.shape)} in the file, {tuple(own[name].shape)} in the model")
                own[name].copy_(t.to(own[name].dtype))
    except Exception:
        hf.unpatch(model)
        raise
    return model


_SHAPE_FIELDS = ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size",
                 "vocab_size", "num_hidden_layers")


def _shape_fields(raw: dict) -> str:
    return ", ".join(f"{k}={raw[k]!r}" for k in _SHAPE_FIELDS if k in raw)


def _first_mismatch(exc: Exception) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    shown = next((ln for ln in lines if "shape" in ln.lower() or "size" in ln.lower()), lines[0] if lines else "")
    return f"transformers: {shown[:400]}"


def from_pretrained(path: str | os.PathLike, *, cls=None, **kwargs) -> nn.Module:
    """Load a folder written by :func:`save_pretrained` (or a patched model's
    ``save_pretrained``): the patched model with its gates, in eval mode.

    Args:
        path: a local model folder (safetensors weights).
        cls: the transformers auto class (default ``AutoModelForCausalLM``).
        kwargs: passed to ``from_pretrained`` (``dtype``, ``device_map``...).
            ``attn_implementation`` is the one unpatched layers and ``gape.unpatch``
            use (default ``"sdpa"``).

    A folder without a ``"gape"`` entry loads as the plain model it is, with a
    warning; one whose ``attn_implementation`` is ``"gape"`` without a valid
    entry is refused. The saved gates are validated like a gate file (every
    gate tensor present, finite, of the patched shape); errors name the file
    and the field. Example: ``model = gape.from_pretrained("my-gape-model")``.
    """
    if cls is None:
        from transformers import AutoModelForCausalLM as cls
    folder = os.fspath(path)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder!r} is not a local model folder (gape.from_pretrained never downloads)")
    config_path = os.path.join(folder, "config.json")
    raw = read_json_object(config_path)  # UnreadableJsonError (a ValueError) names the file and the fault
    if raw is None:
        raise FileNotFoundError(f"{config_path} is missing: {folder!r} is not a transformers model folder")
    try:
        entry = read_description(raw)
    except ValueError as exc:
        raise ValueError(f"{config_path}: {exc}") from None
    if entry is None and raw.get("attn_implementation") == "gape":
        # the gate tensors would be dropped and the plain model returned
        raise ValueError(
            f'{config_path}: field "attn_implementation" is "gape" but the "gape" entry (the GAPE config and '
            "patched layers) is missing, so the saved gates cannot be attached. Restore the entry (save the "
            "model again with gape.save_pretrained), or set attn_implementation to \"sdpa\" to load the plain model"
        )
    kwargs.setdefault("attn_implementation", "sdpa")
    _weight_files(folder)  # a truncated or damaged weights file is named before transformers reads it
    with _holding_load_report() as report:
        try:
            model, info = cls.from_pretrained(folder, output_loading_info=True, **kwargs)
        except (RuntimeError, ValueError) as exc:
            if "mismatch" not in str(exc).lower() and "size" not in str(exc).lower():
                raise
            raise ValueError(
                f"{config_path} does not match the weights in {folder}: the shapes the config's fields "
                f"({_shape_fields(raw)}) give differ from the saved tensors. {_first_mismatch(exc)}"
            ) from exc
    only_gates = not info.get("missing_keys") and not info.get("mismatched_keys") and all(
        GATE_MARK in k for k in info.get("unexpected_keys", ())
    )
    if entry is None or not only_gates:
        for record in report.held:  # something else was reported: show it as transformers would
            logging.getLogger("transformers.modeling_utils").handle(record)
    if entry is None:
        logging.getLogger("gape").warning("gape: %s has no GAPE entry in config.json; loaded the plain model", folder)
        return model.eval()
    return attach_saved_gates(model, folder, entry).eval()
