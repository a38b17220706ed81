"""The positional-encoding methods the benchmarks compare, applied to a loaded model.

``rope`` is the model as loaded (unpatched SDPA). ``linear``, ``dynamic`` and ``yarn`` are
transformers' RoPE scaling (see :func:`gape.with_rope_scaling`) with ``rope_factor``.
``gape`` patches the model with trained gates (``gates=PATH``, from ``gape calibrate``) or,
without gates, the constant-rate default :func:`default_gape_config` (not the per-head
training-free setting of :mod:`gape.experiments.training_free`): a constant forgetting
rate ``lambda`` on every head, no protection (``pi = 0``), log distance -- a mild,
content-independent recency bias. ``gape+yarn`` is GAPE on top of YaRN.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from gape._io import relative_path

METHODS = ("rope", "gape", "yarn", "dynamic", "linear", "gape+yarn")

# constant-rate GAPE: bias -lambda * log(1 + distance); at 4k tokens that is about -0.4
DEFAULT_GAPE_LAMBDA = 0.05


@dataclass(frozen=True)
class MethodOptions:
    rope_factor: float = 2.0
    gates: str | None = None
    gape_lambda: float = DEFAULT_GAPE_LAMBDA
    distance: str = "log"

    def describe(self, method: str) -> dict:
        """The settings that make ``method`` what it is (for result rows)."""
        out: dict = {}
        if method in ("yarn", "dynamic", "linear", "gape+yarn"):
            out["rope_factor"] = self.rope_factor
        if method.startswith("gape"):
            out["gates"] = relative_path(self.gates) if self.gates else None
            if self.gates is None:
                out["gape_lambda"] = self.gape_lambda
                out["distance"] = self.distance
        return out


def parse_methods(text: str | list[str]) -> list[str]:
    names = [m.strip() for m in (text.split(",") if isinstance(text, str) else text) if m.strip()]
    bad = [m for m in names if m not in METHODS]
    if bad or not names:
        raise ValueError(f"methods must be a comma-separated list from {METHODS}, got {text!r}")
    return list(dict.fromkeys(names))


def default_gape_config(gape_lambda: float = DEFAULT_GAPE_LAMBDA, distance: str = "log"):
    """The constant-rate GAPE used when no gate file is given."""
    from gape.hf.config import GapeConfig

    return GapeConfig(distance=distance, fixed_lambda=float(gape_lambda), learned_pi=False, trainable=False)


def apply_gape(model, options: MethodOptions) -> Callable[[], None]:
    """Patch ``model`` to GAPE (trained gates or the constant-rate default); returns the undo."""
    import gape

    if options.gates is not None:
        gape.load_gates(model, options.gates)  # patches with the config saved beside the gates
    else:
        gape.patch(model, default_gape_config(options.gape_lambda, options.distance))
    return lambda: gape.unpatch(model)


def apply_method(model, method: str, options: MethodOptions | None = None) -> Callable[[], None]:
    """Switch ``model`` to ``method`` in place; returns a function that switches it back."""
    from gape.hf.models import with_rope_scaling

    options = options or MethodOptions()
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    undo: list[Callable[[], None]] = []
    if method in ("yarn", "dynamic", "linear", "gape+yarn"):
        with_rope_scaling(model, "yarn" if method == "gape+yarn" else method, options.rope_factor)
        undo.append(lambda: with_rope_scaling(model, "default"))
    if method in ("gape", "gape+yarn"):
        try:
            undo.append(apply_gape(model, options))
        except BaseException:
            for fn in reversed(undo):
                fn()
            raise

    def restore() -> None:
        for fn in reversed(undo):
            fn()

    return restore
