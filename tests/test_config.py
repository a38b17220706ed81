"""GapeConfig: defaults, JSON round trip, validation errors that name the field."""

import pytest

from gape.hf.config import GapeConfig


def test_defaults_are_identity_and_learned():
    cfg = GapeConfig()
    assert cfg.distance == "log" and cfg.backend == "auto" and cfg.layers is None
    assert cfg.alpha_init == 0.0 and cfg.learned_pi is True and cfg.fixed_lambda is None
    assert cfg.trainable_parts() == ("alpha", "query", "key")


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"distance": "linear", "backend": "reference", "layers": [0, -1], "alpha_init": 1.5},
        {"learned_pi": False, "fixed_lambda": 0.25, "trainable": False},
        {"fixed_lambda": [0.1, 0.2, 0.0], "trainable": ["key"], "rope_layout": "interleaved"},
        {"query_bias_init": -2.0, "key_bias_init": 3.0, "identity_shortcut": False},
    ],
    ids=["defaults", "linear-layers-alpha", "fixed-decay", "per-head-lambda", "biases"],
)
def test_json_round_trip(kwargs):
    cfg = GapeConfig(**kwargs)
    back = GapeConfig.from_json(cfg.to_json())
    assert back == cfg
    assert GapeConfig.from_dict(cfg.to_dict()) == cfg


def test_trainable_list_is_normalised_to_part_order():
    assert GapeConfig(trainable=("key", "alpha")).trainable == ["alpha", "key"]
    assert GapeConfig(trainable=False).trainable_parts() == ()


@pytest.mark.parametrize(
    "kwargs, field, exc",
    [
        ({"distance": "cosine"}, "distance", ValueError),
        ({"backend": "cuda"}, "backend", ValueError),
        ({"layers": "0,1"}, "layers", TypeError),
        ({"layers": [0, 0]}, "layers", ValueError),
        ({"layers": [0.5]}, "layers", TypeError),
        ({"alpha_init": -1.0}, "alpha_init", ValueError),
        ({"alpha_init": float("nan")}, "alpha_init", ValueError),
        ({"key_bias_init": "1"}, "key_bias_init", ValueError),
        ({"learned_pi": 1}, "learned_pi", TypeError),
        ({"trainable": ["beta"]}, "trainable", ValueError),
        ({"fixed_lambda": -0.1}, "fixed_lambda", ValueError),
        ({"fixed_lambda": []}, "fixed_lambda", ValueError),
        ({"rope_layout": "pairs"}, "rope_layout", ValueError),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_invalid_fields_are_named(kwargs, field, exc):
    with pytest.raises(exc, match=field):
        GapeConfig(**kwargs)


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match="unknown GapeConfig field"):
        GapeConfig.from_dict({"distance": "log", "lambda": 1.0})


def test_paper_form_defaults_and_round_trip():
    cfg = GapeConfig(gate="paper", train_length=256)
    assert cfg.distance == "linear" and cfg.gamma_init == 0.0 and cfg.alpha_init == 0.0
    assert GapeConfig.from_json(cfg.to_json()) == cfg
    assert GapeConfig().gate == "invariant" and GapeConfig().distance == "log"
    # files written before the gate field existed load as the invariant form
    old = {k: v for k, v in GapeConfig().to_dict().items() if k not in ("gate", "train_length", "gamma_init")}
    assert GapeConfig.from_dict(old) == GapeConfig()


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"gate": "pre-rope"}, "gate"),
        ({"gate": "paper"}, "train_length"),
        ({"gate": "paper", "train_length": 0}, "train_length"),
        ({"gate": "paper", "train_length": -4}, "train_length"),
        ({"gate": "paper", "train_length": 256.0}, "train_length"),
        ({"gate": "paper", "train_length": 256, "distance": "log"}, "distance"),
        ({"gate": "paper", "train_length": 256, "gamma_init": float("inf")}, "gamma_init"),
        ({"gate": "paper", "train_length": 256, "fixed_lambda": 0.1}, "fixed_lambda"),
        ({"gate": "paper", "train_length": 256, "alpha_init": 1.0}, "alpha_init"),
        ({"train_length": 256}, "train_length"),
        ({"gamma_init": -5.0}, "gamma_init"),
    ],
    ids=["gate", "T-missing", "T-zero", "T-negative", "T-float", "paper-log", "gamma-inf", "paper-fixed",
         "paper-alpha", "T-invariant", "gamma-invariant"],
)
def test_paper_form_invalid_fields_are_named(kwargs, field):
    with pytest.raises(ValueError, match=f"GapeConfig.{field}"):
        GapeConfig(**kwargs)


def test_old_key_gate_name_still_loads_with_a_deprecation_warning():
    """``key_gate`` (the config bool) is now ``learned_pi``; saved configs, dicts and
    keyword arguments with the old name still load, with a DeprecationWarning."""
    import warnings

    for make in (
        lambda: GapeConfig.from_json('{"key_gate": false}'),
        lambda: GapeConfig.from_dict({"key_gate": False}),
        lambda: GapeConfig(key_gate=False),
        lambda: GapeConfig().replace(key_gate=False),
    ):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cfg = make()
        assert cfg.learned_pi is False
        assert any(issubclass(w.category, DeprecationWarning) and "learned_pi" in str(w.message) for w in caught)
    assert "key_gate" not in GapeConfig().to_dict() and GapeConfig().to_dict()["learned_pi"] is True
    with pytest.raises(ValueError, match="both key_gate"):
        GapeConfig.from_dict({"key_gate": False, "learned_pi": True})
