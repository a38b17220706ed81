"""The installed distribution: one top-level package, kernels and patches under it, data files shipped."""

import importlib.metadata
from importlib import resources

import gape


def test_single_top_level_package():
    top = importlib.metadata.distribution("gape").read_text("top_level.txt")
    assert top is not None and top.split() == ["gape"], top


def test_kernels_and_patches_live_under_gape():
    import gape.kernels.attention_cpu
    import gape.patches.llama

    assert gape.kernels.attention_cpu.__name__ == "gape.kernels.attention_cpu"
    assert gape.patches.llama.__name__ == "gape.patches.llama"


def test_data_files_are_package_resources():
    assert resources.files("gape.kernels").joinpath("attention_cpu.cpp").is_file()
    assert resources.files("gape.tasks.niah.data").joinpath("essay.txt").read_text(encoding="utf-8").strip()
    tasks = {p.name for p in resources.files("gape.tasks.lmeval.tasks").iterdir()}
    assert {"gape_passkey.yaml", "gape_niah_single.yaml", "gape_tasks.py"} <= tasks, tasks
    assert gape.__version__
