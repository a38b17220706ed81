"""The documentation examples: pytest-markdown-docs runs every python block of
README.md and docs/*.md as a test. Each runs offline in an empty folder of its own, so
what an example writes ("gates.safetensors", "my-gape-model") lands there. A block
whose first line is ``# slow: why`` is marked slow (deselected by default)."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    for item in items:
        code = getattr(item, "code", None)
        if item.get_closest_marker("markdown-docs") and code and code.lstrip().startswith("# slow:"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _example_folder(request, monkeypatch):
    if request.node.get_closest_marker("markdown-docs") is not None:
        monkeypatch.chdir(request.getfixturevalue("tmp_path"))
