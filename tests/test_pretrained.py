"""A GAPE model ships like any transformers model: save_pretrained writes the GAPE
config with the weights and gates, gape.from_pretrained / gape.load_model give the
patched model back (same logits), plain transformers refuses the folder loudly, and
importing gape registers the "gape" attention implementation."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_hf import make_model, randomize_gates, tokens
from tiny_models import tiny_tokenizer

import gape
from gape import hf; from gape.hf import pretrained

CFG = gape.GapeConfig(backend="reference", distance="linear", layers=[1])
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _patched(arch="qwen3", config=CFG):
    model = make_model(arch)
    gape.patch(model, config)
    randomize_gates(model, seed=5)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A patched qwen3 saved with gape.save_pretrained, and its logits."""
    model = _patched()
    ids = tokens(2, 12)
    with torch.no_grad():
        want = model(ids).logits
    folder = tmp_path_factory.mktemp("gape_model") / "m"
    gape.save_pretrained(model, folder, tokenizer=tiny_tokenizer())
    return str(folder), ids, want, hf.gape_config(model)


def test_folder_is_self_describing(saved):
    folder, *_ = saved
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    assert config["attn_implementation"] == "gape"
    entry = pretrained.read_description(config)
    assert entry["layers"] == [1] and gape.GapeConfig.from_dict(entry["config"]) == CFG.replace(rope_layout="half")
    weights = load_file(os.path.join(folder, "model.safetensors"))
    gates = sorted(k for k in weights if ".gape_gate." in k)
    assert gates == [f"model.layers.1.self_attn.gape_gate.{n}" for n in ("alpha", "b", "c", "u", "w")]


@pytest.mark.parametrize("loader", ["from_pretrained", "load_model"])
def test_round_trip_gives_the_same_model(saved, loader, caplog):
    folder, ids, want, config = saved
    with caplog.at_level("WARNING", logger="transformers.modeling_utils"):
        model = gape.from_pretrained(folder) if loader == "from_pretrained" else gape.load_model(folder)[0]
    assert "LOAD REPORT" not in caplog.text  # the gate keys are expected, not reported
    assert hf.is_patched(model) and hf.gape_config(model) == config and not model.training
    assert [i for i, _ in hf.iter_gates(model)] == [1]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)
    # A reloaded model saves to the same folder content again (still self-describing).
    assert model.config.gape["layers"] == [1]


def test_model_save_pretrained_is_self_describing_too(tmp_path):
    model = _patched("llama", gape.GapeConfig(backend="reference"))
    ids = tokens(1, 10)
    with torch.no_grad():
        want = model(ids).logits
    model.save_pretrained(tmp_path)  # the model's own method, not gape.save_pretrained
    fresh = gape.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, want)


def test_auto_model_with_gape_registered_refuses_to_run_without_gates(saved):
    from transformers import AutoModelForCausalLM

    folder, ids, want, _ = saved
    model = AutoModelForCausalLM.from_pretrained(folder)  # "gape" is registered in this process
    assert model.config._attn_implementation == "gape"
    with pytest.raises(ValueError, match=r"layer 1 .*no gate.*gape.from_pretrained"):
        model(ids)
    # The plain base model stays one explicit argument away.
    base = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa")
    with torch.no_grad():
        assert (base(ids).logits - want).abs().max() > 1e-3


def test_plain_transformers_refuses_a_gape_folder(saved):
    """A fresh process without gape: loading fails and the message names gape."""
    folder, *_ = saved
    code = f"from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained({folder!r})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode != 0
    assert 'attn_implementation="gape"' in proc.stderr, proc.stderr[-2000:]


def test_import_registers_the_implementation_only_if_transformers_is_loaded():
    code = (
        "import sys, gape\n"
        "assert 'transformers' not in sys.modules, 'import gape must not import transformers'\n"
        "assert {'patch', 'GapeConfig', 'load_model', 'hf', 'distributed'} <= set(dir(gape)), dir(gape)\n"
        "assert set(gape.__all__) <= set(dir(gape)) and 'transformers' not in sys.modules\n"
        "import gape.hf\n"
        "from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS\n"
        "assert 'gape' in ALL_ATTENTION_FUNCTIONS\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=ENV, timeout=300)
    code = (
        "import transformers.modeling_utils, gape\n"
        "from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS\n"
        "assert 'gape' in ALL_ATTENTION_FUNCTIONS\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=ENV, timeout=300)


def test_unpatch_removes_the_description(tmp_path):
    model = _patched("llama", gape.GapeConfig())
    assert model.config.to_dict()["gape"]["layers"] == [0, 1]
    gape.unpatch(model)
    saved = model.config.to_dict()
    assert "gape" not in saved and "attn_implementation" not in saved
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="needs a model patched"):
        gape.save_pretrained(model, tmp_path / "x")


def test_missing_or_foreign_gate_tensors_are_errors(saved, tmp_path):
    folder, *_ = saved
    weights = load_file(os.path.join(folder, "model.safetensors"))
    for name, edit in (("missing", lambda w: w.pop("model.layers.1.self_attn.gape_gate.u")),
                       ("extra", lambda w: w.__setitem__("model.layers.0.self_attn.gape_gate.u", torch.zeros(2, 8)))):
        out = tmp_path / name
        out.mkdir()
        w = dict(weights)
        edit(w)
        save_file(w, str(out / "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(folder, "config.json")) as f:
            (out / "config.json").write_text(f.read())
        with pytest.raises(ValueError, match="gate tensors"):
            gape.from_pretrained(out)
    bad = tmp_path / "bad"
    bad.mkdir()
    config = json.loads(open(os.path.join(folder, "config.json")).read())
    config["gape"]["format_version"] = 99
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="format_version 99"):
        gape.from_pretrained(bad)


def test_plain_folder_loads_plain_with_a_warning(tmp_path, caplog):
    make_model("llama").save_pretrained(tmp_path)
    with caplog.at_level("WARNING", logger="gape"):
        model = gape.from_pretrained(tmp_path)
    assert not hf.is_patched(model) and "no GAPE entry" in caplog.text


def test_from_pretrained_with_accelerate_device_map_and_dtype(saved):
    folder, ids, want, _ = saved
    model = gape.from_pretrained(folder, device_map="cpu")  # accelerate's dispatch path
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)
    half = gape.from_pretrained(folder, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in hf.gate_parameters(half))
    with torch.no_grad():
        assert (half(ids).logits.float() - want).abs().max() < 0.5


@pytest.mark.model
def test_embedded_gguf_model_round_trips_with_its_gates(tmp_path):
    """The embedded SmolLM2 comes from a GGUF, which transformers marks as quantized and
    refuses to save; gape.load_model hands back a dense model, so the whole GAPE model
    saves and reloads with the same logits (non-trivial gates) and casts with .float()."""
    from gape.hf.models import quantization_method

    model, tok = gape.load_model()
    assert quantization_method(model) is None
    gape.patch(model, gape.GapeConfig())
    randomize_gates(model, seed=3, scale=0.1)
    ids = tok("The grass is green. The sky is blue.", return_tensors="pt")
    with torch.no_grad():
        want = model(**ids).logits
    gape.save_pretrained(model, tmp_path / "m", tokenizer=tok)
    again, _ = gape.load_model(tmp_path / "m")
    with torch.no_grad():
        got = again(**ids).logits
    assert hf.is_patched(again)
    assert torch.equal(got, want)
    assert again.float() is again


def test_a_quantized_model_is_refused_with_what_to_call_instead(tmp_path):
    """A model still marked quantized (GGUF loaded by transformers directly) is refused
    before anything is written, and the error names the calls that work."""
    try:
        from transformers.quantizers.quantizer_gguf import GgufHfQuantizer
        from transformers.utils.quantization_config import GgufConfig
    except ImportError:  # older transformers load a GGUF without a quantizer: nothing to refuse
        pytest.skip("this transformers has no GGUF quantizer")
    from gape.hf.models import dense, quantization_method

    model = _patched()
    model.hf_quantizer = GgufHfQuantizer(GgufConfig(dequantize=False))
    assert quantization_method(model) == "gguf"
    with pytest.raises(ValueError, match=r"gguf-quantized.*gape\.load_model.*gape\.models\.dense.*gape\.save_gates"):
        gape.save_pretrained(model, tmp_path / "m")
    assert not (tmp_path / "m").exists()
    ids = tokens(1, 8)
    with torch.no_grad():
        want = model(ids).logits
    model = dense(model)
    assert quantization_method(model) is None
    gape.save_pretrained(model, tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(gape.from_pretrained(tmp_path / "m")(ids).logits, want)
def _copy_folder(folder, out, edit_weights=None, edit_config=None, raw_weights=None):
    """A copy of the saved folder with its weights and/or config edited."""
    out.mkdir()
    config = json.loads(open(os.path.join(folder, "config.json")).read())
    if edit_config is not None:
        edit_config(config)
    (out / "config.json").write_text(json.dumps(config))
    if raw_weights is not None:
        (out / "model.safetensors").write_bytes(raw_weights)
    else:
        w = dict(load_file(os.path.join(folder, "model.safetensors")))
        if edit_weights is not None:
            edit_weights(w)
        save_file(w, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("field,value", [("b", float("nan")), ("w", float("inf")), ("alpha", float("nan")),
                                         ("u", float("-inf"))])
def test_a_non_finite_gate_in_a_saved_folder_is_refused(saved, tmp_path, field, value):
    folder, *_ = saved
    name = f"model.layers.1.self_attn.gape_gate.{field}"

    def edit(w):
        w[name] = w[name].clone()
        w[name].view(-1)[0] = value

    out = _copy_folder(folder, tmp_path / "m", edit_weights=edit)
    with pytest.raises(ValueError, match="non-finite") as info:
        gape.from_pretrained(out)
    assert str(out / "model.safetensors") in str(info.value) and name in str(info.value)


def test_a_folder_that_says_gape_without_its_entry_is_refused(saved, tmp_path):
    folder, *_ = saved
    out = _copy_folder(folder, tmp_path / "m", edit_config=lambda c: c.pop("gape"))
    with pytest.raises(ValueError, match='"attn_implementation" is "gape" but the "gape" entry') as info:
        gape.from_pretrained(out)
    assert str(out / "config.json") in str(info.value)
    # an invalid entry names the file and the field
    bad = _copy_folder(folder, tmp_path / "bad", edit_config=lambda c: c["gape"].__setitem__("layers", "all"))
    with pytest.raises(ValueError, match='invalid "layers"') as info:
        gape.from_pretrained(bad)
    assert str(bad / "config.json") in str(info.value)


def test_a_truncated_weights_file_is_named(saved, tmp_path):
    folder, *_ = saved
    data = open(os.path.join(folder, "model.safetensors"), "rb").read()
    for n in (4, 100, len(data) // 2):
        out = _copy_folder(folder, tmp_path / f"t{n}", raw_weights=data[:n])
        with pytest.raises(ValueError, match="not a readable safetensors file") as info:
            gape.from_pretrained(out)
        assert str(out / "model.safetensors") in str(info.value)


def test_edited_head_counts_name_the_config_and_its_fields(saved, tmp_path):
    folder, *_ = saved

    def edit(c):
        c["num_key_value_heads"] = c["num_key_value_heads"] * 2

    out = _copy_folder(folder, tmp_path / "m", edit_config=edit)
    with pytest.raises(ValueError, match="does not match the weights") as info:
        gape.from_pretrained(out)
    assert str(out / "config.json") in str(info.value) and "num_key_value_heads=" in str(info.value)


@pytest.mark.parametrize("backend", ["reference", "torch", "sdpa"])
def test_nan_gates_give_nan_outputs_on_every_backend(backend):
    """alpha = 0 is the identity shortcut (plain SDPA); a NaN elsewhere in the gate makes
    lambda NaN, which must reach the logits, not be skipped as lambda == 0."""
    model = _patched(config=gape.GapeConfig(backend=backend, distance="linear", layers=[1]))
    gate = dict(hf.iter_gates(model))[1]
    ids = tokens(1, 10)
    with torch.no_grad():
        gate.alpha.zero_()
        assert torch.isfinite(model(ids).logits).all()  # the identity: exact, finite
        gate.b[0] = float("nan")
        assert torch.isnan(model(ids).logits).any()
        gate.b[0] = 0.0
        gate.alpha.fill_(0.5)
        gate.w.view(-1)[0] = float("nan")
        assert torch.isnan(model(ids).logits).any()
