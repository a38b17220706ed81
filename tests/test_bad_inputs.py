"""Bad inputs and faults against every public entry point: each one
raises the expected exception type with a message that names the argument,
never a wrong answer or an error a user cannot act on.

Entry points: ``gape.attention``, ``gape.patch`` / ``GapeConfig``,
``gape.save_gates`` / ``gape.load_gates``, and every CLI command (parsed
in-process, as ``gape.cli.main`` does). Faults: a busy or killed run's output
folder, corrupted result rows, a garbled run file, a length the memory cannot
hold."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import gape
from gape import hf

from helpers import rewrite_safetensors
from test_hf import IDENTITY, make_model, randomize_gates

# --------------------------------------------------------------------------- gape.attention


def _inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 6, 8, generator=g)
    k, v = torch.randn(2, 2, 9, 8, generator=g), torch.randn(2, 2, 9, 8, generator=g)
    lam, pi = torch.rand(2, 4, 6, generator=g) * 0.5, torch.rand(2, 2, 9, generator=g)
    return [t.to(dtype) for t in (q, k, v, lam, pi)]


_ARG = {"query": 0, "key": 1, "value": 2, "query_gate": 3, "key_gate": 4}


def _with(name, value):
    def make():
        args = _inputs()
        args[_ARG[name]] = value() if callable(value) else value
        return args, {}

    return make


def _kw(**kw):
    def make():
        return _inputs(), dict(kw)

    return make


def _zero_dim(dv=False):
    def make():
        q, k, v, lam, pi = _inputs()
        if dv:
            v = v[..., :0]
        else:
            q, k = q[..., :0], k[..., :0]
        return [q, k, v, lam, pi], {}

    return make


def _shape(q, k, v, lam, pi):
    return lambda: ([torch.zeros(q), torch.zeros(k), torch.zeros(v), torch.zeros(lam), torch.zeros(pi)], {})


ATTENTION = {
    "query-list": (_with("query", [[1.0]]), TypeError, "query must be a torch.Tensor"),
    "key-none": (_with("key", None), TypeError, "key must be a torch.Tensor"),
    "value-numpy": (_with("value", lambda: torch.zeros(2, 2, 9, 8).numpy()), TypeError, "value must be a torch.Tensor"),
    "query_gate-float": (_with("query_gate", 0.1), TypeError, "query_gate must be a torch.Tensor"),
    "key_gate-int-tensor": (_with("key_gate", lambda: torch.zeros(2, 2, 9, dtype=torch.int64)), TypeError, "key_gate must have a floating"),
    "query-sparse": (_with("query", lambda: torch.zeros(2, 4, 6, 8).to_sparse()), TypeError, "query must be a dense"),
    "key-float8": (_with("key", lambda: torch.zeros(2, 2, 9, 8, dtype=torch.float8_e4m3fn)), TypeError, "key must be float16"),
    "value-complex": (_with("value", lambda: torch.zeros(2, 2, 9, 8, dtype=torch.complex64)), TypeError, "value must have a floating"),
    "query-int": (_with("query", lambda: torch.zeros(2, 4, 6, 8, dtype=torch.int32)), TypeError, "query must have a floating"),
    "query-3d": (_with("query", lambda: torch.zeros(2, 4, 6)), ValueError, "query must be 4-D"),
    "key-5d": (_with("key", lambda: torch.zeros(2, 2, 9, 8, 1)), ValueError, "key must be 4-D"),
    "value-2d": (_with("value", lambda: torch.zeros(9, 8)), ValueError, "value must be 4-D"),
    "query_gate-4d": (_with("query_gate", lambda: torch.zeros(2, 4, 6, 1)), ValueError, "query_gate must be 3-D"),
    "key_gate-2d": (_with("key_gate", lambda: torch.zeros(2, 9)), ValueError, "key_gate must be 3-D"),
    "key-batch": (_with("key", lambda: torch.zeros(3, 2, 9, 8)), ValueError, "batch sizes differ"),
    "value-batch": (_with("value", lambda: torch.zeros(1, 2, 9, 8)), ValueError, "batch sizes differ"),
    "key-head-dim": (_with("key", lambda: torch.zeros(2, 2, 9, 16)), ValueError, "key head dim 16 must equal query head dim 8"),
    "head-dim-0": (_zero_dim(), ValueError, "head dims must be >= 1"),
    "value-head-dim-0": (_zero_dim(dv=True), ValueError, "head dims must be >= 1.*Dv=0"),
    "value-heads": (_with("value", lambda: torch.zeros(2, 1, 9, 8)), ValueError, "value must be"),
    "value-length": (_with("value", lambda: torch.zeros(2, 2, 5, 8)), ValueError, "value must be"),
    "kv-heads-0": (_shape((2, 4, 6, 8), (2, 0, 9, 8), (2, 0, 9, 8), (2, 4, 6), (2, 0, 9)), ValueError, "key/value heads"),
    "gqa-not-multiple": (_shape((2, 5, 6, 8), (2, 2, 9, 8), (2, 2, 9, 8), (2, 5, 6), (2, 2, 9)), ValueError, "multiple of key/value heads"),
    "key-length-0": (_shape((2, 4, 6, 8), (2, 2, 0, 8), (2, 2, 0, 8), (2, 4, 6), (2, 2, 0)), ValueError, "key must hold at least one"),
    "query_gate-shape": (_with("query_gate", lambda: torch.zeros(2, 4, 5)), ValueError, "query_gate must be \\[B, Hq, Lq\\]"),
    "key_gate-shape": (_with("key_gate", lambda: torch.zeros(2, 4, 9)), ValueError, "key_gate must be \\[B, Hkv, Lk\\]"),
    "key-dtype": (_with("key", lambda: torch.zeros(2, 2, 9, 8, dtype=torch.float64)), TypeError, "query, key and value must share"),
    "value-dtype": (_with("value", lambda: torch.zeros(2, 2, 9, 8, dtype=torch.float16)), TypeError, "value"),
    "query_gate-dtype": (_with("query_gate", lambda: torch.zeros(2, 4, 6, dtype=torch.float16)), TypeError, "query_gate must be"),
    "key_gate-dtype": (_with("key_gate", lambda: torch.zeros(2, 2, 9, dtype=torch.float64)), TypeError, "key_gate must be"),
    "key_gate-device": (_with("key_gate", lambda: torch.zeros(2, 2, 9, device="meta")), ValueError, "key_gate is on meta"),
    "value-device": (_with("value", lambda: torch.zeros(2, 2, 9, 8, device="meta")), ValueError, "value is on meta"),
    "query_gate-negative": (_with("query_gate", lambda: -torch.ones(2, 4, 6)), ValueError, "query_gate \\(lambda\\) must be finite and >= 0"),
    "query_gate-nan": (_with("query_gate", lambda: torch.full((2, 4, 6), float("nan"))), ValueError, "query_gate"),
    "query_gate-inf": (_with("query_gate", lambda: torch.full((2, 4, 6), float("inf"))), ValueError, "query_gate"),
    "key_gate-above-one": (_with("key_gate", lambda: torch.full((2, 2, 9), 1.5)), ValueError, "key_gate \\(pi\\) must lie in \\[0, 1\\]"),
    "key_gate-negative": (_with("key_gate", lambda: torch.full((2, 2, 9), -0.1)), ValueError, "key_gate"),
    "key_gate-nan": (_with("key_gate", lambda: torch.full((2, 2, 9), float("nan"))), ValueError, "key_gate"),
    "scale-bool": (_kw(scale=True), TypeError, "scale must be a float"),
    "scale-str": (_kw(scale="0.5"), TypeError, "scale must be a float"),
    "scale-tensor": (_kw(scale=torch.tensor(0.5)), TypeError, "scale must be a float"),
    "scale-nan": (_kw(scale=float("nan")), ValueError, "scale must be a finite"),
    "scale-inf": (_kw(scale=float("inf")), ValueError, "scale must be a finite"),
    "is_causal-int": (_kw(is_causal=1), TypeError, "is_causal must be a bool"),
    "is_causal-none": (_kw(is_causal=None), TypeError, "is_causal must be a bool"),
    "is_causal-numpy": (_kw(is_causal=np.bool_(True)), TypeError, "is_causal must be a bool, got numpy.bool"),
    "query-nested": (_with("query", lambda: torch.nested.nested_tensor([torch.zeros(4, 6, 8)] * 2)), TypeError,
                     "query must be a dense .*got a nested tensor"),
    "distance-name": (_kw(distance="cubic"), ValueError, "distance must be one of"),
    "distance-list": (_kw(distance=["log"]), ValueError, "distance must be one of"),
    "backend-name": (_kw(backend="cuda-magic"), ValueError, "backend must be one of"),
    "backend-none": (_kw(backend=None), ValueError, "backend must be one of"),
    "attn_mask-float": (_kw(attn_mask=torch.zeros(6, 9)), TypeError, "attn_mask must be a bool"),
    "attn_mask-int": (_kw(attn_mask=torch.ones(6, 9, dtype=torch.int64)), TypeError, "attn_mask must be a bool"),
    "attn_mask-list": (_kw(attn_mask=[[True]]), TypeError, "attn_mask must be a bool"),
    "attn_mask-shape": (_kw(attn_mask=torch.ones(6, 8, dtype=torch.bool)), ValueError, "attn_mask shape"),
    "attn_mask-5d": (_kw(attn_mask=torch.ones(1, 1, 1, 6, 9, dtype=torch.bool)), ValueError, "attn_mask must broadcast"),
    "attn_mask-sparse": (_kw(attn_mask=torch.ones(6, 9, dtype=torch.bool).to_sparse()), TypeError, "attn_mask must be a dense"),
    "attn_mask-device": (_kw(attn_mask=torch.ones(6, 9, dtype=torch.bool, device="meta")), ValueError, "attn_mask is on meta"),
    "sdpa-log": (_kw(backend="sdpa", distance="log"), ValueError, "backend='sdpa' cannot serve.*linear"),
    "sdpa-non-causal": (_kw(backend="sdpa", distance="linear", is_causal=False), ValueError, "sdpa.*is_causal=True"),
}


@pytest.mark.parametrize("name", list(ATTENTION))
def test_attention_bad_input(name):
    make, exc, match = ATTENTION[name]
    args, kw = make()
    kw.setdefault("backend", "torch")
    with pytest.raises(exc, match=match):
        gape.attention(*args, **kw)


def test_attention_triton_refuses_float64():
    with pytest.raises(ValueError, match="triton.*float64"):
        gape.attention(*_inputs(torch.float64), backend="triton")


def test_torch_double_backward_is_refused_with_what_to_do():
    q, k, v, lam, pi = (t.requires_grad_() for t in _inputs())
    out = gape.attention(q, k, v, lam, pi, backend="torch")
    with pytest.raises(RuntimeError, match='double backward.*backend="reference"'):
        torch.autograd.grad(out.square().sum(), q, create_graph=True)


# --------------------------------------------------------------------------- patch / GapeConfig

CONFIGS = {
    "distance": (dict(distance="cubic"), ValueError, "GapeConfig.distance"),
    "backend": (dict(backend="gpu"), ValueError, "GapeConfig.backend"),
    "layers-str": (dict(layers="0,1"), TypeError, "GapeConfig.layers"),
    "layers-float": (dict(layers=[0.5]), TypeError, "GapeConfig.layers"),
    "layers-dup": (dict(layers=[0, 0]), ValueError, "GapeConfig.layers"),
    "alpha_init-nan": (dict(alpha_init=float("nan")), ValueError, "GapeConfig.alpha_init"),
    "alpha_init-negative": (dict(alpha_init=-1.0), ValueError, "GapeConfig.alpha_init"),
    "query_bias_init-str": (dict(query_bias_init="0"), ValueError, "GapeConfig.query_bias_init"),
    "key_bias_init-inf": (dict(key_bias_init=float("inf")), ValueError, "GapeConfig.key_bias_init"),
    "learned_pi-int": (dict(learned_pi=1), TypeError, "GapeConfig.learned_pi"),
    "key_gate-int": (dict(key_gate=1), TypeError, "GapeConfig.learned_pi"),  # the old name, renamed
    "identity_shortcut-str": (dict(identity_shortcut="yes"), TypeError, "GapeConfig.identity_shortcut"),
    "trainable-part": (dict(trainable=["alpha", "bias"]), ValueError, "GapeConfig.trainable"),
    "fixed_lambda-negative": (dict(fixed_lambda=-0.1), ValueError, "GapeConfig.fixed_lambda"),
    "fixed_lambda-nan": (dict(fixed_lambda=[0.1, float("nan")]), ValueError, "GapeConfig.fixed_lambda"),
    "fixed_lambda-empty": (dict(fixed_lambda=[]), ValueError, "GapeConfig.fixed_lambda"),
    "rope_layout": (dict(rope_layout="diagonal"), ValueError, "GapeConfig.rope_layout"),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_config_bad_field(name):
    fields, exc, match = CONFIGS[name]
    with pytest.raises(exc, match=match):
        gape.GapeConfig(**fields)


@pytest.fixture(scope="module")
def llama():
    return make_model("llama")


PATCH = {
    "config-list": (lambda m: gape.patch(m, [1]), TypeError, "config must be a GapeConfig"),
    "config-unknown-field": (lambda m: gape.patch(m, {"lambda": 1.0}), ValueError, "unknown GapeConfig field"),
    "layers-out-of-range": (lambda m: gape.patch(m, gape.GapeConfig(layers=[5])), ValueError, "GapeConfig.layers has index 5"),
    "fixed_lambda-count": (lambda m: gape.patch(m, gape.GapeConfig(fixed_lambda=[0.1, 0.2])), ValueError, "fixed_lambda has 2 values"),
    "model-not-hf": (lambda m: gape.patch(torch.nn.Linear(2, 2)), TypeError, "model must be a transformers PreTrainedModel"),
    "unpatch-unpatched": (lambda m: gape.unpatch(m), ValueError, "not patched"),
    "save-unpatched": (lambda m: gape.save_gates(m, "/tmp/x.safetensors"), ValueError, "not patched"),
}


@pytest.mark.parametrize("name", list(PATCH))
def test_patch_bad_input_leaves_the_model_unpatched(name, llama):
    call, exc, match = PATCH[name]
    with pytest.raises(exc, match=match):
        call(llama)
    assert not hf.is_patched(llama) and llama.config._attn_implementation == "sdpa"
    assert not any("gape_gate" in n for n, _ in llama.named_modules())


def test_patch_twice_is_refused():
    model = make_model("llama")
    gape.patch(model, IDENTITY)
    with pytest.raises(ValueError, match="already patched"):
        gape.patch(model, IDENTITY)


# --------------------------------------------------------------------------- save_gates / load_gates


@pytest.fixture(scope="module")
def gate_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gates")
    model = make_model("llama")
    gape.patch(model, IDENTITY)
    randomize_gates(model, seed=3)
    path = folder / "gates.safetensors"
    gape.save_gates(model, path)
    return path


def _garbage(src, dst):
    dst.write_bytes(b"\xff" * 8 + b"not a header")
    return dst


def _config_json(**changes):
    return json.dumps({**IDENTITY.to_dict(), **changes})


GATE_FILES = {
    "corrupted-header": (_garbage, ValueError, "garbled.safetensors is not a readable safetensors file"),
    "not-a-gate-file": (lambda s, d: rewrite_safetensors(s, d, metadata={"format": "other"}), ValueError, "is not a GAPE gate file"),
    "missing-num_layers": (lambda s, d: rewrite_safetensors(s, d, metadata={"num_layers": None}), ValueError, "lacks metadata \\['num_layers'\\]"),
    "missing-config": (lambda s, d: rewrite_safetensors(s, d, metadata={"config": None}), ValueError, "lacks metadata \\['config'\\]"),
    "num_heads-not-int": (lambda s, d: rewrite_safetensors(s, d, metadata={"num_heads": "four"}), ValueError, "metadata num_heads='four'"),
    "config-not-json": (lambda s, d: rewrite_safetensors(s, d, metadata={"config": "{oops"}), ValueError, "invalid GapeConfig"),
    "config-bad-field": (lambda s, d: rewrite_safetensors(s, d, metadata={"config": _config_json(distance="cubic")}), ValueError, "invalid GapeConfig.*distance"),
    "config-unknown-field": (lambda s, d: rewrite_safetensors(s, d, metadata={"config": _config_json(gamma=1)}), ValueError, "invalid GapeConfig.*unknown"),
    "tensor-nan": (lambda s, d: rewrite_safetensors(s, d, tensors={"layers.0.w": torch.full((4, 8), float("nan"))}), ValueError, "layers.0.w has non-finite"),
    "tensor-inf": (lambda s, d: rewrite_safetensors(s, d, tensors={"layers.1.alpha": torch.full((4,), float("inf"))}), ValueError, "layers.1.alpha has non-finite"),
    "tensor-int": (lambda s, d: rewrite_safetensors(s, d, tensors={"layers.0.b": torch.zeros(4, dtype=torch.int32)}), ValueError, "layers.0.b has dtype torch.int32"),
    "tensor-name": (lambda s, d: rewrite_safetensors(s, d, tensors={"gate.weights": torch.zeros(2)}), ValueError, "'gate.weights' is not named layers"),
    "tensor-shape": (lambda s, d: rewrite_safetensors(s, d, tensors={"layers.1.u": torch.zeros(3, 8)}), ValueError, "layer 1: gate u has shape \\(3, 8\\)"),
    "tensor-missing": (lambda s, d: rewrite_safetensors(s, d, tensors={"layers.0.c": None}), ValueError, "layer 0: the file holds"),
    "extra-layer": (lambda s, d: rewrite_safetensors(s, d, tensors={"layers.7.c": torch.zeros(2)}), ValueError, "gates for layers \\[7\\]"),
    "other-shape": (lambda s, d: rewrite_safetensors(s, d, metadata={"num_heads": "8"}), ValueError, "num_heads 8 \\(file\\) vs 4 \\(model\\)"),
    "other-architecture": (lambda s, d: rewrite_safetensors(s, d, metadata={"model_type": "qwen3"}), ValueError, "saved from a qwen3 model"),
}


@pytest.mark.parametrize("name", list(GATE_FILES))
def test_load_gates_bad_file_names_the_file_and_changes_nothing(name, gate_file, tmp_path):
    make, exc, match = GATE_FILES[name]
    bad = make(gate_file, tmp_path / "garbled.safetensors")
    model = make_model("llama")
    with pytest.raises(exc, match=match) as info:
        gape.load_gates(model, bad)
    assert "garbled.safetensors" in str(info.value)
    assert not hf.is_patched(model) and not any("gape_gate" in n for n, _ in model.named_modules())


def test_load_gates_path_errors(tmp_path, gate_file):
    model = make_model("llama")
    with pytest.raises(FileNotFoundError, match="gate file .*nothing.safetensors does not exist"):
        gape.load_gates(model, tmp_path / "nothing.safetensors")
    with pytest.raises(IsADirectoryError, match="is a folder.*pass the file inside it"):
        gape.load_gates(model, gate_file.parent)
    with pytest.raises(TypeError, match="path must be a str"):
        gape.load_gates(model, 42)
    gape.patch(model, IDENTITY)
    with pytest.raises(FileNotFoundError, match="cannot save gates to .*folder .*missing does not exist"):
        gape.save_gates(model, tmp_path / "missing" / "g.safetensors")
    with pytest.raises(IsADirectoryError, match="is a folder"):
        gape.save_gates(model, tmp_path)


# --------------------------------------------------------------------------- CLI: every flag at parse time


def _parser(command):
    from gape.cli import SUBCOMMANDS

    module = importlib.import_module(SUBCOMMANDS[command][0])
    parser = argparse.ArgumentParser(prog=f"gape {command}")
    module.add_arguments(parser)
    return parser, module


@pytest.fixture(scope="module")
def a_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("f") / "plain.txt"
    path.write_text("x")
    return str(path)


CLI = {
    "niah": [
        ("--dtype", "float64"),
        ("--lengths", "abc"), ("--lengths", "0"), ("--lengths", "1000000000"), ("--lengths", ","),
        ("--depths", "1.5"), ("--depths", "x"), ("--depths", "nan"), ("--samples", "0"), ("--samples", "two"),
        ("--methods", "rope,alibi"), ("--gape-lambda", "-1"), ("--gape-lambda", "nan"), ("--rope-factor", "0.5"),
        ("--max-new-tokens", "0"), ("--threads", "0"), ("--seed", "-1"), ("--out", "FILE"), ("--gates", "MISSING"),
        ("--model", "MISSING"), ("--task", "bogus"), ("--haystack", "bogus"), ("--distance", "cubic"),
    ],
    "synthetic": [
        ("--train-len", "8"), ("--eval-lens", "3"), ("--eval-lens", "64,x"), ("--steps", "0"), ("--samples", "0"),
        ("--seeds", "0"), ("--methods", "nope"), ("--alpha", "-1"), ("--fixed-lambda", "-0.5"), ("--key-bias", "inf"),
        ("--lr", "0"), ("--gate-lr", "-1"), ("--batch", "0"), ("--theta", "-1"), ("--backend", "gpu"), ("--threads", "-2"),
        ("--out", "FILE"), ("--merge", "MISSING"), ("--seed", "-3"),
    ],
    "calibrate": [
        ("--dtype", "float64"),
        ("--minutes", "0"), ("--max-steps", "0"), ("--min-len", "10"), ("--max-len", "100000"), ("--lr", "-1"),
        ("--text-fraction", "2"), ("--tasks", "passkey,nope"), ("--alpha-init", "-1"), ("--backend", "gpu"),
        ("--save-every", "0"), ("--out", "FILE"), ("--model", "MISSING"), ("--init", "random"), ("--seed", "x"),
        ("--threads", "0"),
    ],
    "inspect": [
        ("--dtype", "float64"),
        ("--length", "0"), ("--lam", "-1"), ("--layers", "a,b"), ("--out", "MISSING/x.png"), ("--prompt-file", "MISSING"),
        ("--gates", "MISSING"), ("--threads", "0"), ("--model", "MISSING"), ("--prompt", " "),
    ],
    "audit-kernels": [("--head-dim", "8"), ("--out", "MISSING/rows.json"), ("--arch", "70"), ("--dtype", "fp8"),
                      ("--kernel", "attn"), ("--causal", "yes"), ("--distance", "cubic"), ("--positions", "paged"),
                      ("--terms", "alibi")],
}
CLI_CASES = [(cmd, flag, value) for cmd, cases in CLI.items() for flag, value in cases]


@pytest.mark.parametrize("command,flag,value", CLI_CASES, ids=[f"{c}{f}={v}" for c, f, v in CLI_CASES])
def test_cli_bad_flag_is_refused_under_its_own_name(command, flag, value, a_file, tmp_path, capsys):
    value = value.replace("FILE", a_file).replace("MISSING", str(tmp_path / "missing"))
    parser, _ = _parser(command)
    extra = ["--out", str(tmp_path / "o.json")] if command == "audit-kernels" and flag != "--out" else []
    with pytest.raises(SystemExit) as info:
        parser.parse_args([flag, value, *extra])
    assert info.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err


def test_cli_main_returns_2_for_a_bad_flag_and_a_flag_conflict(capsys):
    from gape.cli import main

    assert main(["niah", "--lengths", "1000000000"]) == 2
    assert "argument --lengths: must be in [1, 1048576]" in capsys.readouterr().err
    assert main(["calibrate", "--min-len", "2000", "--max-len", "1000"]) == 2
    assert "--min-len: 2000 is above --max-len 1000" in capsys.readouterr().err


def test_cli_eval_passes_a_bad_flag_to_lm_eval_and_returns_2(capsys):
    pytest.importorskip("lm_eval")
    from gape.cli import main

    assert main(["eval", "--no-such-flag"]) == 2
    assert "--no-such-flag" in capsys.readouterr().err


# --------------------------------------------------------------------------- faults of long runs


def test_a_second_writer_is_refused_and_a_killed_one_leaves_no_lock(tmp_path):
    from gape._io import FolderLockedError, lock_folder

    out = str(tmp_path / "out")
    with lock_folder(out):
        with pytest.raises(FolderLockedError, match=f"{out} is in use by another gape run \\(pid {os.getpid()}\\)"):
            with lock_folder(out):
                pass
    # a holder killed with SIGKILL: the kernel drops its flock
    code = f"from gape._io import lock_folder\nimport time\nwith lock_folder({out!r}):\n    print('locked', flush=True)\n    time.sleep(60)\n"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(FolderLockedError):
            with lock_folder(out):
                pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with lock_folder(out):
        pass


def test_niah_busy_out_folder_is_an_error_naming_it(tmp_path, capsys):
    from gape._io import lock_folder
    from gape.cli import main

    out = str(tmp_path / "busy")
    with lock_folder(out):
        assert main(["niah", "--out", out, "--no-progress", "--lengths", "600", "--samples", "1"]) == 2
    assert f"{out} is in use by another gape niah run" in capsys.readouterr().err


def _row(**kw):
    row = {"method": "rope", "task": "single", "haystack": "noise", "length": 600, "depth": 0.0, "sample": 0, "seed": 0,
           "score": 1.0, "correct": True, "seconds": 0.1}
    return {**row, **kw}


def test_corrupted_and_duplicated_rows_are_skipped_and_counted_once(tmp_path):
    from gape.tasks.niah import results as res

    lines = [json.dumps(_row()), json.dumps(_row()), "{not json", json.dumps({"method": "rope"}), "[1, 2]",
             json.dumps(_row(length="600")), json.dumps(_row(sample=1, score=0.0, correct=False)), '{"method": "rope", "ta']
    (tmp_path / res.RESULTS).write_text("\n".join(lines))
    warnings = []
    rows = res.read_rows(str(tmp_path), warn=warnings.append)
    assert len(rows) == 2
    assert len(warnings) == 1 and "skipped 5 corrupted" in warnings[0] and "1 duplicated" in warnings[0]
    summary = res.summarize(rows + rows)  # duplicated input rows count once
    assert [(s["samples"], s["accuracy"]) for s in summary] == [(2, 0.5)]


def test_repeated_lengths_and_depths_are_one_cell():
    from gape.tasks.niah.runner import BenchmarkConfig

    cfg = BenchmarkConfig(lengths=[600, 600, 700], depths=[0.5, 0.5, 0.50000001, 1])
    cfg.validate()
    assert cfg.lengths == [600, 700] and cfg.depths == [0.5, 1.0]
    with pytest.raises(ValueError, match="lengths must be ints in \\[1, 1048576\\]"):
        BenchmarkConfig(lengths=[10**9]).validate()


def _tiny_niah(tmp_path, **kw):
    from gape.tasks.niah.runner import BenchmarkConfig

    from tiny_models import tiny_tokenizer

    cfg = BenchmarkConfig(methods=["rope"], lengths=[600], depths=[0.0], samples=1, task="single",
                          out=str(tmp_path / "run"), max_new_tokens=2, **kw)
    return cfg, make_model("llama", vocab_size=262, max_position_embeddings=1024), tiny_tokenizer()


def test_garbled_run_json_is_reported_not_crashed(tmp_path):
    from gape.tasks.niah import results as res
    from gape.tasks.niah.runner import RUN_FILE, RunMismatchError, run_benchmark

    cfg, model, tok = _tiny_niah(tmp_path)
    os.makedirs(cfg.out)
    (tmp_path / "run" / RUN_FILE).write_text("{garbled")
    echoed = []
    run_benchmark(cfg, model, tok, progress=False, echo=echoed.append)  # no rows yet: rewritten, with a warning
    assert any("was unreadable" in e for e in echoed) and len(res.read_rows(cfg.out)) == 1
    (tmp_path / "run" / RUN_FILE).write_text("[]")
    with pytest.raises(RunMismatchError, match="run.json is unreadable"):
        run_benchmark(cfg, model, tok, progress=False, echo=echoed.append)


def test_only_the_writing_rank_rewrites_an_unreadable_run_json(tmp_path):
    from gape.tasks.niah.runner import RUN_FILE, _check_run_file

    path = tmp_path / RUN_FILE
    path.write_text("{garbled")
    echoed = []
    _check_run_file(str(tmp_path), {"seed": 1}, echoed.append, write=False)  # a non-zero torchrun rank
    assert path.read_text() == "{garbled" and echoed == []
    _check_run_file(str(tmp_path), {"seed": 1}, echoed.append, write=True)
    assert json.loads(path.read_text()) == {"seed": 1} and len(echoed) == 1


def test_a_length_beyond_memory_is_refused_with_the_limit(tmp_path, monkeypatch):
    from gape import _machine
    from gape._args import UsageError
    from gape.tasks.niah.runner import run_benchmark

    cfg, model, tok = _tiny_niah(tmp_path)
    monkeypatch.setattr(_machine, "available_memory", lambda: 1 << 20)  # 1 MiB
    with pytest.raises(UsageError, match="--lengths 600: .*at most about \\d+ tokens"):
        run_benchmark(cfg, model, tok, progress=False, echo=lambda s: None)
    assert not os.path.exists(os.path.join(cfg.out, "results.jsonl"))


def test_synthetic_and_calibrate_report_garbled_state_files(tmp_path):
    from gape.experiments import calibrate as cal
    from gape.experiments import synthetic as syn
    from gape._args import UsageError

    (tmp_path / "results.json").write_text("{torn")
    with pytest.raises(UsageError, match="results.json is unreadable.*--force"):
        syn._read_results(str(tmp_path / "results.json"))
    assert syn._read_results(str(tmp_path / "results.json"), force=True) is None
    (tmp_path / "card.json").write_text('{"steps": "many"}')
    (tmp_path / "gates.safetensors").write_bytes(b"")
    model = make_model("llama")
    with pytest.raises(UsageError, match="card.json is unreadable.*cannot resume"):
        cal.calibrate(model, None, out=str(tmp_path), max_steps=1)


def _state_readers():
    """Every reader of a JSON state, settings or card file: ``(file it reads, call)``."""
    from gape.experiments import synthetic as syn
    from gape.experiments.extrapolate import rows as ex_rows
    from gape.experiments.longctx import study
    from gape.hf import models, pretrained

    return {
        "longctx run.json": (study.RUN_FILE, lambda d: study.read_run_file(d)),
        "synthetic results": ("results.json", lambda d: syn._read_results(os.path.join(d, "results.json"))),
        "extrapolate config": (ex_rows.CONFIG, lambda d: ex_rows.read_config(d)),
        "extrapolate record": ("runs/r.json", lambda d: ex_rows.read_record(d, "r")),
        "model config": ("config.json", lambda d: pretrained.from_pretrained(d)),
        "model index": ("model.safetensors.index.json", lambda d: pretrained._weight_files(d)),
        "load_model config": ("config.json", lambda d: models._is_gape_folder(d)),
    }


@pytest.mark.parametrize("content", [b"\xff\xfe{}", b'{"torn', b"[1, 2]"], ids=["not-utf8", "torn", "list"])
@pytest.mark.parametrize("reader", ["longctx run.json", "synthetic results", "extrapolate config", "extrapolate record",
                                    "model config", "model index", "load_model config"])
def test_every_state_file_reader_refuses_a_bad_file_naming_it(tmp_path, reader, content):
    """A state file that is not UTF-8, torn, or not a JSON object is refused by a ValueError (a
    UsageError for the commands) naming the file; never a traceback from another error type,
    never read as if empty."""
    name, read = _state_readers()[reader]
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    with pytest.raises(ValueError) as err:
        read(str(tmp_path))
    assert str(path) in str(err.value)
    assert path.read_bytes() == content  # refused, not overwritten


def test_a_bad_extrapolate_folder_is_a_usage_error_not_a_traceback(tmp_path, capsys):
    from gape.cli import main

    folder = tmp_path / "ex"
    folder.mkdir()
    assert main(["extrapolate", "--report", "--out", str(folder)]) == 2
    assert "config.json is missing" in capsys.readouterr().err
    for content in (b"\xff", b"[1]", b'{"tasks": "lm"}'):
        (folder / "config.json").write_bytes(content)
        assert main(["extrapolate", "--report", "--out", str(folder)]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and str(folder / "config.json") in err and "gape extrapolate folder" in err


def test_more_entry_point_errors(tmp_path, capsys):
    from gape._io import write_atomic
    from gape.cli import main

    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="scale must be a finite"):
        gape.attention(*_inputs(), scale=10**400)
    with pytest.raises(ValueError, match="GapeConfig.from_json: not a JSON object"):
        gape.GapeConfig.from_json("{nope")
    with pytest.raises(TypeError, match="GapeConfig.from_dict expects a dict"):
        gape.GapeConfig.from_dict([("distance", "log")])
    cfg = gape.GapeConfig()
    cfg.distance = "cubic"  # set after construction: patch validates again
    model = make_model("llama")
    with pytest.raises(ValueError, match="GapeConfig.distance"):
        gape.patch(model, cfg)
    assert not hf.is_patched(model)

    def failing(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise OSError("disk full")

    from gape._io import replace_atomic

    with pytest.raises(OSError, match="disk full"):
        replace_atomic(str(tmp_path / "x.json"), failing)
    assert os.listdir(tmp_path) == []
    write_atomic(str(tmp_path / "y.json"), "{}")
    assert os.listdir(tmp_path) == ["y.json"]


def test_niah_refuses_a_too_short_length_and_a_bad_gate_file_before_running(tmp_path, gate_file):
    from gape._args import UsageError
    from gape.tasks.methods import MethodOptions
    from gape.tasks.niah.runner import run_benchmark

    cfg, model, tok = _tiny_niah(tmp_path)
    cfg.lengths = [20]
    with pytest.raises(UsageError, match="--lengths: length=20 is too short"):
        run_benchmark(cfg, model, tok, progress=False, echo=lambda s: None)
    cfg, model, tok = _tiny_niah(tmp_path)
    bad = _garbage(gate_file, tmp_path / "garbled.safetensors")
    cfg.methods, cfg.options = ["gape"], MethodOptions(gates=str(bad))
    with pytest.raises(UsageError, match="--gates: gate file .*garbled.safetensors is not a readable"):
        run_benchmark(cfg, model, tok, progress=False, echo=lambda s: None)
