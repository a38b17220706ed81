"""``--dtype`` of gape niah / calibrate / inspect / eval and ``gape.load_model(dtype=...)``:
parsed and refused at parse time, carried into the run (the NIAH folder's fixed settings,
lm-eval's model_args), and a bfloat16 patched model runs the fused kernel on bfloat16
activations with the float32 model's answers."""

from __future__ import annotations

import argparse

import pytest
import torch

from gape import _args as A


@pytest.mark.parametrize("module", ["gape.tasks.niah.cli", "gape.experiments.calibrate", "gape.experiments.inspect"])
def test_commands_take_dtype(module, capsys):
    import importlib

    parser = argparse.ArgumentParser()
    importlib.import_module(module).add_arguments(parser)
    # auto for inference; calibrate trains, and its bfloat16 autocast was not compared
    assert parser.parse_args([]).dtype == ("float32" if module.endswith("calibrate") else "auto")
    assert parser.parse_args(["--dtype", "bfloat16"]).dtype == "bfloat16"
    with pytest.raises(SystemExit):
        parser.parse_args(["--dtype", "int8"])
    assert "--dtype" in capsys.readouterr().err


def test_niah_folder_records_a_lower_dtype_only(cpu_bf16):
    from gape.tasks.niah.runner import BenchmarkConfig

    cpu_bf16(False)  # the default, auto, is float32 on a CPU without native bfloat16
    assert "dtype" not in BenchmarkConfig().fixed_settings()  # folders from before the flag still resume
    assert "dtype" not in BenchmarkConfig(dtype="float32").fixed_settings()
    cfg = BenchmarkConfig(dtype="bfloat16")
    cfg.validate()
    assert cfg.fixed_settings()["dtype"] == "bfloat16"
    with pytest.raises(ValueError, match="dtype"):
        BenchmarkConfig(dtype="half").validate()


def test_eval_moves_dtype_into_model_args():
    from gape.tasks.lmeval.cli import with_dtype

    assert with_dtype(["--model", "gape", "--dtype", "bfloat16"]) == ["--model", "gape", "--model_args", "dtype=bfloat16"]
    assert with_dtype(["--model_args", "method=gape", "--dtype=float16"]) == ["--model_args", "method=gape,dtype=float16"]
    assert with_dtype(["--tasks", "x"]) == ["--tasks", "x"]
    with pytest.raises(ValueError, match="--dtype"):
        with_dtype(["--dtype", "int8"])
    with pytest.raises(ValueError, match="one place"):
        with_dtype(["--model_args", "dtype=float32", "--dtype", "bfloat16"])


def test_torch_dtype():
    assert A.torch_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        A.torch_dtype("bf16")


@pytest.mark.slow  # loads the embedded model twice
def test_bfloat16_model_gives_the_float32_answers():
    import gape
    from gape.core import torch_backend
    from gape.experiments.training_free import apply_training_free

    ids = None
    logits = {}
    for dtype in (torch.float32, torch.bfloat16):
        model, tok = gape.load_model(dtype=dtype)
        assert next(model.parameters()).dtype == dtype
        apply_training_free(model, tok)
        if ids is None:
            ids = tok("The quick brown fox jumps over the lazy dog. " * 20, return_tensors="pt").input_ids
        seen = []
        real = torch_backend.choose_strategy

        def spy(strategy, query, *rest, **kw):
            seen.append(query.dtype)
            return real(strategy, query, *rest, **kw)

        torch_backend.choose_strategy = spy
        try:
            with torch.no_grad():
                logits[dtype] = model(ids).logits.float()
        finally:
            torch_backend.choose_strategy = real
        assert seen and set(seen) == {dtype}
    agree = (logits[torch.float32].argmax(-1) == logits[torch.bfloat16].argmax(-1)).float().mean()
    assert agree > 0.9, f"bfloat16 agrees with float32 on {agree:.0%} of next-token predictions"


# ---------------------------------------------------------------------------- dtype "auto"


@pytest.fixture
def cpu_bf16(monkeypatch):
    """Force the CPU probe of gape.kernels.attention_cpu.native_half: set(True/False) makes
    this CPU report (or not) AVX512-BF16 in /proc/cpuinfo and in torch's own check."""
    from gape.kernels import attention_cpu

    def force(native: bool):
        flags = frozenset({"avx2", "avx512f", "avx512_bf16"} if native else {"avx2", "avx512f"})
        monkeypatch.setattr(attention_cpu, "_cpu_flags", lambda: flags)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)

    return force


def test_auto_is_bfloat16_only_where_the_cpu_has_native_bfloat16(cpu_bf16):
    from gape.hf.models import auto_dtype, dtype_name, resolve_dtype

    cpu_bf16(True)
    assert auto_dtype() is torch.bfloat16
    assert resolve_dtype("auto") is torch.bfloat16 and dtype_name("auto") == "bfloat16"
    cpu_bf16(False)
    assert auto_dtype() is torch.float32
    assert resolve_dtype("auto") is torch.float32 and dtype_name("auto") == "float32"


def test_auto_on_amx_alone(monkeypatch):
    from gape.hf.models import auto_dtype
    from gape.kernels import attention_cpu

    monkeypatch.setattr(attention_cpu, "_cpu_flags", lambda: frozenset({"amx_bf16", "amx_tile"}))
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert auto_dtype("cpu") is torch.bfloat16


def test_auto_on_cuda_follows_the_device(monkeypatch):
    from gape.hf.models import auto_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for supported, want in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: supported)
        assert auto_dtype("cuda") is want
        assert auto_dtype(torch.device("cuda", 0)) is want
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert auto_dtype("cuda") is torch.float32


def test_resolve_dtype_takes_dtypes_names_and_auto_and_refuses_the_rest():
    from gape.hf.models import resolve_dtype

    assert resolve_dtype(torch.float16) is torch.float16
    for name in A.DTYPES:
        assert resolve_dtype(name) is getattr(torch, name)
    for bad in ("bf16", "int8", None, 16, "Auto"):
        with pytest.raises(TypeError, match="dtype"):
            resolve_dtype(bad)


def test_load_model_refuses_a_bad_dtype_before_loading():
    import gape

    with pytest.raises(TypeError, match="dtype must be"):
        gape.load_model(dtype="bf16")


@pytest.mark.parametrize("module", ["gape.tasks.niah.cli", "gape.experiments.calibrate", "gape.experiments.inspect"])
def test_commands_take_auto(module):
    import importlib

    parser = argparse.ArgumentParser()
    importlib.import_module(module).add_arguments(parser)
    assert parser.parse_args(["--dtype", "auto"]).dtype == "auto"


def test_niah_folder_records_what_auto_resolved_to(cpu_bf16):
    from gape.tasks.niah.runner import BenchmarkConfig

    cpu_bf16(True)
    assert BenchmarkConfig().fixed_settings()["dtype"] == "bfloat16"  # auto, unvalidated
    cfg = BenchmarkConfig(dtype="auto")
    cfg.validate()
    assert cfg.dtype == "bfloat16" and cfg.fixed_settings()["dtype"] == "bfloat16"
    cpu_bf16(False)
    cfg = BenchmarkConfig(dtype="auto")
    cfg.validate()
    assert cfg.dtype == "float32" and "dtype" not in cfg.fixed_settings()


def test_eval_takes_auto():
    from gape.tasks.lmeval.cli import with_dtype

    assert with_dtype(["--dtype", "auto"]) == ["--model_args", "dtype=auto"]
