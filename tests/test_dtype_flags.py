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
    assert parser.parse_args([]).dtype == "float32"
    assert parser.parse_args(["--dtype", "bfloat16"]).dtype == "bfloat16"
    with pytest.raises(SystemExit):
        parser.parse_args(["--dtype", "int8"])
    assert "--dtype" in capsys.readouterr().err


def test_niah_folder_records_a_lower_dtype_only():
    from gape.tasks.niah.runner import BenchmarkConfig

    assert "dtype" not in BenchmarkConfig().fixed_settings()  # folders from before the flag still resume
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
