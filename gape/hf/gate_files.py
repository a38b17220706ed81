"""Gate files: ``save_gates`` / ``read_gates`` / ``load_gates`` (safetensors, config and
model shape in the metadata), validated before anything changes, loaded all or nothing."""

from __future__ import annotations

import logging
import math
import os

import torch
from torch import nn

from . import compat
from .._io import replace_atomic
from .config import GapeConfig
from .patching import _state, gape_config, is_patched, iter_gates, model_shape, patch, unpatch

logger = logging.getLogger("gape")

_FORMAT = "gape-gates"


def _check_gate_path(path, *, for_writing: bool) -> str:
    """``path`` as a string, or an error that names it and says what is wrong."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike (a .safetensors file), got {type(path).__name__}")
    path = os.fspath(path)
    if os.path.isdir(path):
        inside = os.path.join(path, "gates.safetensors")
        hint = f"; pass the file inside it, {inside}" if os.path.isfile(inside) else ""
        raise IsADirectoryError(f"gate file path {path} is a folder, not a .safetensors file{hint}")
    if for_writing:
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"cannot save gates to {path}: folder {folder} does not exist (create it first)")
    elif not os.path.exists(path):
        raise FileNotFoundError(f"gate file {path} does not exist")
    return path


def save_gates(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the gates of a patched model to ``path`` (safetensors; config and
    model shape in the metadata). The write is atomic."""
    from safetensors.torch import save_file

    model = compat.unwrap(model)
    path = _check_gate_path(path, for_writing=True)
    state = _state(model)
    tensors = {}
    for i, gate in iter_gates(model):
        for name, t in list(gate.named_parameters()) + list(gate.named_buffers()):
            tensors[f"layers.{i}.{name}"] = t.detach().to("cpu").contiguous()
    shape = model_shape(model)
    metadata = {
        "format": _FORMAT,
        "format_version": "1",
        "config": state["config"].to_json(),
        "model_type": str(model.config.model_type),
        **{k: str(v) for k, v in shape.items()},
    }
    replace_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


# Metadata every gate file carries (save_gates writes them all).
_REQUIRED_METADATA = ("config", "model_type", "num_layers", "num_heads", "num_kv_heads", "head_dim")
# Value ranges the config implies for saved gate tensors (others: any finite value;
# alpha may be negative, it is clamped at 0 in the forward pass).
_GATE_RANGES = {"fixed_lambda": (0.0, math.inf)}


def _validate_gate_file(path: str, metadata: dict, tensors: dict) -> GapeConfig:
    """Everything a gate file must satisfy on its own; returns its config.

    Raises ValueError naming ``path`` and the first thing wrong: format, missing
    or malformed metadata, an invalid config, a tensor name that is not
    ``layers.<i>.<name>``, a non-float or non-finite tensor, a value outside
    the range the config implies."""
    if metadata.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a GAPE gate file (metadata format {metadata.get('format')!r}, want {_FORMAT!r})")
    missing = [k for k in _REQUIRED_METADATA if k not in metadata]
    if missing:
        raise ValueError(f"gate file {path} lacks metadata {missing} (written by gape.save_gates, which stores them all)")
    for k in _REQUIRED_METADATA[2:]:
        if not metadata[k].isdigit() or int(metadata[k]) < 1:
            raise ValueError(f"gate file {path}: metadata {k}={metadata[k]!r} is not a positive integer")
    try:
        config = GapeConfig.from_json(metadata["config"])
    except (ValueError, TypeError) as err:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"gate file {path} holds an invalid GapeConfig: {err}") from None
    for key, t in tensors.items():
        parts = key.split(".")
        if len(parts) != 3 or parts[0] != "layers" or not parts[1].isdigit():
            raise ValueError(f"gate file {path}: tensor {key!r} is not named layers.<index>.<name>")
        if not t.is_floating_point():
            raise ValueError(f"gate file {path}: tensor {key} has dtype {t.dtype}, want a float dtype")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"gate file {path}: tensor {key} has non-finite values (NaN or inf)")
        lo, hi = _GATE_RANGES.get(parts[2], (-math.inf, math.inf))
        if t.numel() and not (float(t.min()) >= lo and float(t.max()) <= hi):
            raise ValueError(
                f"gate file {path}: tensor {key} has values in [{float(t.min())}, {float(t.max())}], must lie in [{lo}, {hi}]"
            )
    return config


def read_gates(path: str | os.PathLike) -> tuple[GapeConfig, dict, dict[str, torch.Tensor]]:
    """``(config, metadata, tensors)`` of a gate file, validated (see :func:`load_gates`)."""
    from safetensors import SafetensorError, safe_open

    path = _check_gate_path(path, for_writing=False)
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"gate file {path} is not a readable safetensors file: {err}") from None
    config = _validate_gate_file(path, metadata, tensors)
    return config, metadata, tensors


def load_gates(model: nn.Module, path: str | os.PathLike, *, strict: bool = True) -> nn.Module:
    """Load gates saved by :func:`save_gates` into ``model``.

    An unpatched model is patched first with the saved config. A patched model
    keeps its own config (backend, distance) and must have the same patched
    layers and gate layout. The file is validated before anything changes
    (finite float tensors, ranges the config implies, its config, metadata);
    ValueError names the file and what is wrong when the layer count, head
    counts, head dim or architecture (``model_type``; a warning with
    ``strict=False``) differ from the saved model's. Loading is all-or-nothing:
    after an error the model is exactly as before (not patched, or patched with
    its old gate values).
    """
    model = compat.unwrap(model)
    config, metadata, tensors = read_gates(path)
    path = os.fspath(path)
    shape = model_shape(model)
    saved = {k: int(metadata[k]) for k in shape}
    diffs = [f"{k} {saved[k]} (file) vs {shape[k]} (model)" for k in shape if saved[k] != shape[k]]
    if diffs:
        raise ValueError(
            f"gates in {path} were saved for a {metadata.get('model_type')} model that does not match this "
            f"{model.config.model_type} model: " + "; ".join(diffs)
        )
    if metadata["model_type"] != str(model.config.model_type):
        msg = (
            f"gates in {path} were saved from a {metadata['model_type']} model, this one is "
            f"{model.config.model_type} (same shapes; pass strict=False to load them anyway)"
        )
        if strict:
            raise ValueError(msg)
        logger.warning("gape: %s", msg)
    patched_here = not is_patched(model)
    if patched_here:
        patch(model, config)
    try:
        _copy_gates(model, path, config, tensors)
    except BaseException:
        if patched_here:
            unpatch(model)
        raise
    return model


def _copy_gates(model: nn.Module, path: str, config: GapeConfig, tensors: dict) -> None:
    """Check every layer's tensors against the patched gates, then copy them all
    (restoring the old values if a copy fails): all or nothing."""
    current = gape_config(model)
    for name in ("gate", "train_length"):
        if getattr(current, name) != getattr(config, name):
            raise ValueError(
                f"gates in {os.fspath(path)} have {name}={getattr(config, name)!r} but the model is patched with "
                f"{name}={getattr(current, name)!r}; the two gate forms (and the paper's T) are not interchangeable: "
                "unpatch the model and load the file into it unpatched, or patch with the file's config"
            )
    if current.distance != config.distance:
        logger.warning(
            "gape: gates in %s were trained with distance=%r but the model is patched with distance=%r",
            path, config.distance, current.distance,
        )
    gates = iter_gates(model)
    extra = sorted({int(k.split(".")[1]) for k in tensors} - {i for i, _ in gates})
    if extra:
        raise ValueError(
            f"gate file {path} has gates for layers {extra} that the model does not patch (patched: {_state(model)['layers']})"
        )
    pairs = []
    for i, gate in gates:
        own = dict(list(gate.named_parameters()) + list(gate.named_buffers()))
        prefix = f"layers.{i}."
        theirs = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if set(theirs) != set(own):
            raise ValueError(
                f"gate file {path}, layer {i}: the file holds {sorted(theirs) or 'nothing'} but the patched model's gate "
                f"has {sorted(own)} (file config: layers={config.layers}, learned_pi={config.learned_pi}, "
                f"fixed_lambda={config.fixed_lambda}; model: layers={current.layers}, learned_pi={current.learned_pi}, "
                f"fixed_lambda={current.fixed_lambda})"
            )
        for name, t in theirs.items():
            if own[name].shape != t.shape:
                raise ValueError(
                    f"gate file {path}, layer {i}: gate {name} has shape {tuple(t.shape)} in the file, "
                    f"{tuple(own[name].shape)} in the model"
                )
            pairs.append((own[name], t))
    backup = [dst.detach().clone() for dst, _ in pairs]
    with torch.no_grad():
        try:
            for dst, src in pairs:
                dst.copy_(src.to(dst.dtype))
        except BaseException:
            for (dst, _), old in zip(pairs, backup):
                dst.copy_(old)
