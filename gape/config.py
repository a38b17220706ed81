"""``GapeConfig``: how a model is patched to GAPE, serialisable to JSON.

The config travels with the gates: ``gape.save_gates`` writes it into the
safetensors metadata and ``gape.load_gates`` reads it back, so a gate file is
self-describing.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

from .api import BACKENDS
from .reference import DISTANCES

# The trainable parts of a gate module (see gape.gates.GapeGate):
#   "alpha" -> alpha (per query head scale of lambda)
#   "query" -> w, b  (query gate weights and bias)
#   "key"   -> u, c  (key gate weights and bias)
GATE_PARTS = ("alpha", "query", "key")
ROPE_LAYOUTS = ("half", "interleaved")


@dataclass
class GapeConfig:
    """Settings of a GAPE patch.

    Attributes:
        distance: distance transform ``phi``: ``"log"`` (``log(1 + delta)``) or ``"linear"``.
        backend: attention backend passed to :func:`gape.attention` (``"auto"``,
            ``"reference"``, ``"torch"``, ``"sdpa"``, ``"triton"``).
        layers: indices of the decoder layers to patch (negative indices count
            from the end); ``None`` patches every layer. Unpatched layers run
            plain SDPA.
        alpha_init: initial ``alpha_h`` of every query head. ``0.0`` makes
            ``lambda == 0``, i.e. the patched model equals the unpatched one.
        query_bias_init: initial query-gate bias ``b_h`` (``lambda = alpha *
            softplus(b)`` while ``w = 0``).
        key_bias_init: initial key-gate bias ``c_g`` (``pi = sigmoid(c)`` while ``u = 0``).
        key_gate: ``False`` fixes ``pi = 0`` (no protection; the "fixed decay"
            ablation when combined with ``fixed_lambda``) and creates no ``u, c``.
        trainable: ``True`` (every gate parameter), ``False`` (none) or a list of
            parts from ``("alpha", "query", "key")``.
        fixed_lambda: ``None`` (learned query gate), a float (the same constant
            forgetting rate for every query head), or one float per query head.
            When set the query gate has no parameters: ``lambda_m = fixed_lambda[h]``.
        rope_layout: which channels RoPE rotates together: ``"half"`` (pair ``i``
            is ``(x_i, x_{i+D/2})``, the transformers layout) or ``"interleaved"``
            (``(x_2i, x_2i+1)``). Normally taken from the architecture's spec.
        identity_shortcut: when every ``lambda`` is exactly zero and no gate
            gradient is needed, run plain SDPA (exactly the unpatched model,
            no GAPE overhead). Tests that exercise the GAPE kernel at identity
            turn it off.
    """

    distance: str = "log"
    backend: str = "auto"
    layers: list[int] | None = None
    alpha_init: float = 0.0
    query_bias_init: float = 0.0
    key_bias_init: float = 0.0
    key_gate: bool = True
    trainable: bool | list[str] = True
    fixed_lambda: float | list[float] | None = None
    rope_layout: str | None = None
    identity_shortcut: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError/TypeError naming the first invalid field."""
        if self.distance not in DISTANCES:
            raise ValueError(f"GapeConfig.distance must be one of {DISTANCES}, got {self.distance!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"GapeConfig.backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.layers is not None:
            if isinstance(self.layers, (str, bytes)) or not hasattr(self.layers, "__iter__"):
                raise TypeError(f"GapeConfig.layers must be None or a list of ints, got {self.layers!r}")
            layers = list(self.layers)
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
                raise TypeError(f"GapeConfig.layers must be None or a list of ints, got {self.layers!r}")
            if len(set(layers)) != len(layers):
                raise ValueError(f"GapeConfig.layers has duplicates: {layers}")
            self.layers = layers
        for name in ("alpha_init", "query_bias_init", "key_bias_init"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"GapeConfig.{name} must be a finite float, got {value!r}")
            setattr(self, name, float(value))
        if self.alpha_init < 0:
            raise ValueError(f"GapeConfig.alpha_init must be >= 0 (lambda >= 0), got {self.alpha_init}")
        for name in ("key_gate", "identity_shortcut"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"GapeConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if not isinstance(self.trainable, bool):
            parts = list(self.trainable) if isinstance(self.trainable, (list, tuple, set)) else None
            if parts is None or any(p not in GATE_PARTS for p in parts):
                raise ValueError(
                    f"GapeConfig.trainable must be True, False or a list of parts from {GATE_PARTS}, got {self.trainable!r}"
                )
            self.trainable = [p for p in GATE_PARTS if p in parts]
        if self.fixed_lambda is not None:
            values = self.fixed_lambda if isinstance(self.fixed_lambda, (list, tuple)) else [self.fixed_lambda]
            for v in values:
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                    raise ValueError(
                        f"GapeConfig.fixed_lambda must be None, a finite float >= 0 or a list of them, got {self.fixed_lambda!r}"
                    )
            if isinstance(self.fixed_lambda, (list, tuple)):
                if not self.fixed_lambda:
                    raise ValueError("GapeConfig.fixed_lambda must not be an empty list")
                self.fixed_lambda = [float(v) for v in self.fixed_lambda]
            else:
                self.fixed_lambda = float(self.fixed_lambda)
        if self.rope_layout is not None and self.rope_layout not in ROPE_LAYOUTS:
            raise ValueError(f"GapeConfig.rope_layout must be None or one of {ROPE_LAYOUTS}, got {self.rope_layout!r}")

    def trainable_parts(self) -> tuple[str, ...]:
        if self.trainable is True:
            return GATE_PARTS
        if self.trainable is False:
            return ()
        return tuple(self.trainable)

    def to_dict(self) -> dict:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict) -> GapeConfig:
        if not isinstance(data, dict):
            raise TypeError(f"GapeConfig.from_dict expects a dict, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown GapeConfig field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**data)

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, **kwargs)

    @classmethod
    def from_json(cls, text: str) -> GapeConfig:
        try:
            data = json.loads(text)
        except (TypeError, json.JSONDecodeError) as err:
            raise ValueError(f"GapeConfig.from_json: not a JSON object ({err})") from None
        return cls.from_dict(data)

    def replace(self, **changes) -> GapeConfig:
        return dataclasses.replace(self, **changes)


def _plain(value):
    if isinstance(value, tuple):
        return list(value)
    return value
