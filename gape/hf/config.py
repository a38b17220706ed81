"""``GapeConfig``: how a model is patched to GAPE, serialisable to JSON.

The config travels with the gates: ``gape.save_gates`` writes it into the
safetensors metadata and ``gape.load_gates`` reads it back, so a gate file is
self-describing.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import warnings
from dataclasses import dataclass

from gape.core.api import BACKENDS
from gape.core.reference import DISTANCES

# The trainable parts of a gate module (see gape.hf.gates.GapeGate):
#   "alpha" -> alpha (per query head scale of lambda)
#   "query" -> w, b  (query gate weights and bias)
#   "key"   -> u, c  (key gate weights and bias)
# (for gate="paper" the same parts are gamma; w_g, b_g; w_l, b_l)
GATE_PARTS = ("alpha", "query", "key")
ROPE_LAYOUTS = ("half", "interleaved")
# "invariant": the project's form (pair norms of post-RoPE q/k, alpha = 0 at start: identity);
# "paper": the paper's form (pre-RoPE q/k, gamma/w_g/b_g/w_l/b_l; docs/maths.md, "The paper's form")
GATES = ("invariant", "paper")
# The paper's plain start (gamma = b = w = 0): lambda = log(2)^2 / T, pi = 1/2 -- gated from step 0.
PAPER_GAMMA_INIT = 0.0
# The distance each gate form uses when GapeConfig.distance is left unset.
DEFAULT_DISTANCE = {"invariant": "log", "paper": "linear"}


@dataclass
class GapeConfig:
    """Settings of a GAPE patch.

    Attributes:
        gate: the gate form. ``"invariant"`` (default): the project's gates, read from
            rotation-invariant pair norms of the post-RoPE query and key, with ``alpha_h = 0``
            at start so a patched pretrained model is unchanged. ``"paper"``: the paper's
            gates, exactly (docs/maths.md, "The paper's form"): ``lambda = softplus(gamma_h) *
            softplus(w_g . q + b_g) / T`` and ``pi = sigmoid(w_l . k + b_l)`` from the
            pre-RoPE query and key; linear distance; needs ``train_length``.
        train_length: ``T`` of the paper's form (the training context length), an int > 0;
            only with ``gate="paper"``.
        gamma_init: initial ``gamma_h`` of the paper's form (only with ``gate="paper"``).
            Unset means ``0.0``, the paper's plain start (``Gamma = log 2``; with ``b = w = 0``
            every ``lambda = log(2)^2 / T`` and ``pi = 1/2``: not RoPE at step 0, as in the
            paper). Use a very negative value (e.g. ``-20``) to start a pretrained model at RoPE.
        distance: distance transform ``phi``: ``"log"`` (``log(1 + delta)``) or ``"linear"``.
            Unset: ``"log"`` for the invariant form, ``"linear"`` for the paper's (which
            accepts only ``"linear"``: its mask is linear in position).
        backend: attention backend passed to :func:`gape.attention` (``"auto"``,
            ``"reference"``, ``"torch"``, ``"sdpa"``, ``"triton"``).
        layers: indices of the decoder layers to patch (negative indices count
            from the end); ``None`` patches every attention layer (in a hybrid
            stack, the layers its spec's ``layer_kinds`` marks as attention; naming
            another is an error). Unpatched layers run plain SDPA.
        alpha_init: initial ``alpha_h`` of every query head. ``0.0`` makes
            ``lambda == 0``, i.e. the patched model equals the unpatched one.
            Invariant form only (the paper's form starts from ``gamma_init``).
        query_bias_init: initial query-gate bias ``b_h`` (``lambda = alpha *
            softplus(b)`` while ``w = 0``); ``b_g`` in the paper's form.
        key_bias_init: initial key-gate bias ``c_g`` (``pi = sigmoid(c)`` while ``u = 0``);
            ``b_l`` in the paper's form.
        learned_pi: ``False`` fixes ``pi = 0`` (no protection; the "fixed decay"
            ablation when combined with ``fixed_lambda``) and creates no ``u, c``.
            (Called ``key_gate`` before, which also names the tensor ``pi``; the
            old name is still read, with a DeprecationWarning.)
        trainable: ``True`` (every gate parameter), ``False`` (none) or a list of
            parts from ``("alpha", "query", "key")`` (paper's form: ``gamma``;
            ``w_g, b_g``; ``w_l, b_l``).
        fixed_lambda: ``None`` (learned query gate), a float (the same constant
            forgetting rate for every query head), or one float per query head.
            When set the query gate has no parameters: ``lambda_m = fixed_lambda[h]``.
            Invariant form only.
        rope_layout: which channels RoPE rotates together: ``"half"`` (pair ``i``
            is ``(x_i, x_{i+D/2})``, the transformers layout) or ``"interleaved"``
            (``(x_2i, x_2i+1)``). Normally taken from the architecture's spec.
        identity_shortcut: when every ``lambda`` is exactly zero and no gate
            gradient is needed, run plain SDPA (exactly the unpatched model,
            no GAPE overhead). Tests that exercise the GAPE kernel at identity
            turn it off.
    """

    distance: str | None = None
    backend: str = "auto"
    layers: list[int] | None = None
    alpha_init: float = 0.0
    query_bias_init: float = 0.0
    key_bias_init: float = 0.0
    learned_pi: bool = True
    trainable: bool | list[str] = True
    fixed_lambda: float | list[float] | None = None
    rope_layout: str | None = None
    identity_shortcut: bool = True
    gate: str = "invariant"
    train_length: int | None = None
    gamma_init: float | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError/TypeError naming the first invalid field."""
        if self.gate not in GATES:
            raise ValueError(f"GapeConfig.gate must be one of {GATES}, got {self.gate!r}")
        if self.distance is None:
            self.distance = DEFAULT_DISTANCE[self.gate]
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
        for name in ("learned_pi", "identity_shortcut"):
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
        if self.gate == "paper":
            self._validate_paper()
        else:
            for name in ("train_length", "gamma_init"):
                if getattr(self, name) is not None:
                    raise ValueError(
                        f"GapeConfig.{name} belongs to the paper's gate form; set gate='paper' or leave {name} unset "
                        f"(got {name}={getattr(self, name)!r} with gate={self.gate!r})"
                    )

    def _validate_paper(self) -> None:
        t = self.train_length
        if isinstance(t, bool) or not isinstance(t, int) or t <= 0:
            raise ValueError(
                f"GapeConfig.train_length must be the training context length T, an int > 0, with gate='paper'; got {t!r}"
            )
        if self.distance != "linear":
            raise ValueError(
                f"GapeConfig.distance must be 'linear' with gate='paper' (the paper's mask is linear in position), "
                f"got {self.distance!r}"
            )
        if self.fixed_lambda is not None:
            raise ValueError("GapeConfig.fixed_lambda is the invariant form's fixed-decay ablation; it does not apply to gate='paper'")
        if self.alpha_init != 0.0:
            raise ValueError(
                f"GapeConfig.alpha_init belongs to the invariant gate form; with gate='paper' set gamma_init (got alpha_init={self.alpha_init})"
            )
        g = PAPER_GAMMA_INIT if self.gamma_init is None else self.gamma_init
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g):
            raise ValueError(f"GapeConfig.gamma_init must be a finite float, got {self.gamma_init!r}")
        self.gamma_init = float(g)

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
        data = _renamed(data)
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
        return dataclasses.replace(self, **_renamed(changes))

    @property
    def key_gate(self) -> bool:
        """Deprecated name of :attr:`learned_pi`."""
        warnings.warn(_RENAMED_MESSAGE, DeprecationWarning, stacklevel=2)
        return self.learned_pi


# old field name -> new one; read from saved files, dicts and keyword arguments
_RENAMED = {"key_gate": "learned_pi"}
_RENAMED_MESSAGE = "GapeConfig.key_gate is now GapeConfig.learned_pi (key_gate names the tensor pi)"


def _renamed(data: dict) -> dict:
    old = [k for k in data if k in _RENAMED]
    if not old:
        return data
    warnings.warn(_RENAMED_MESSAGE, DeprecationWarning, stacklevel=3)
    data = dict(data)
    for k in old:
        new = _RENAMED[k]
        if new in data and data[new] != data[k]:
            raise ValueError(f"GapeConfig got both {k}={data[k]!r} and {new}={data[new]!r}; pass {new} only")
        data[new] = data.pop(k)
    return data


_dataclass_init = GapeConfig.__init__


@functools.wraps(_dataclass_init)
def _init(self, *args, **kwargs):
    _dataclass_init(self, *args, **_renamed(kwargs))


GapeConfig.__init__ = _init


def _plain(value):
    if isinstance(value, tuple):
        return list(value)
    return value
