"""gape inspect: attention mass against distance, RoPE vs GAPE, on a tiny random Llama."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from gape import hf
from gape.experiments import inspect as gi
from tiny_models import save_tiny_hf, tiny_llama_config


def test_distance_profile_buckets():
    L = 9
    eye = torch.eye(L)[None, None]  # all mass at distance 0
    assert gi.distance_profile(eye) == pytest.approx([1.0, 0, 0, 0, 0])
    first = torch.zeros(1, 1, L, L)
    first[..., 0] = 1.0  # every row attends to key 0: distance = row
    prof = gi.distance_profile(first)
    # rows 0 | 1 | 2,3 | 4..7 | 8  -> buckets 0, 1, 2, 3, 4
    assert prof == pytest.approx([1 / 9, 1 / 9, 2 / 9, 4 / 9, 1 / 9])
    assert gi.bucket_labels(4) == ["0", "1", "2-3", "4-7"]


def test_inspect_model_gape_contracts_attention():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(max_position_embeddings=512)).eval()
    ids = torch.randint(0, 256, (1, 160))
    res = gi.inspect_model(model, ids, lam=2.0)
    assert not hf.is_patched(model)
    assert res["layers"] == [0, 1]
    for i in res["layers"]:
        rope, gape_ = res["rope"][i], res["gape"][i]
        assert sum(rope["profile"]) == pytest.approx(1.0, abs=1e-5)
        assert sum(gape_["profile"]) == pytest.approx(1.0, abs=1e-5)
        # the distance-0 key keeps its weight while others decay: more mass there, lower entropy
        assert gape_["profile"][0] > rope["profile"][0]
        assert gape_["entropy"] < rope["entropy"]
        assert len(gape_["pi"]) == 160 and all(0 <= p <= 1 for p in gape_["pi"])
        assert "pi" not in rope


def test_cli_writes_png_and_json(tmp_path, capsys):
    folder = save_tiny_hf(str(tmp_path / "tiny"), max_position_embeddings=512)
    out = tmp_path / "insp.png"
    args = argparse.Namespace(model=folder, prompt="The grass is green. " * 8, prompt_file=None, length=512, gates=None,
                              lam=0.5, layers="-1", out=str(out), threads=1)
    assert gi.run(args) == 0
    assert out.stat().st_size > 1000
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["layers"] == [1] and data["tokens"] > 100
    assert "entropy rope" in capsys.readouterr().out
