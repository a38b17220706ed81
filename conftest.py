"""The documentation examples: pytest-markdown-docs runs every python block of
README.md and docs/*.md as a test (switched on here, in the superfences fence syntax
that mkdocs reads too, so that an environment without the plugin still runs the rest
of the suite; tests/test_docs.py fails there instead). Each example runs offline in an
empty folder of its own, so what it writes ("gates.safetensors", "my-gape-model")
lands there. A block whose first line is ``# slow: why`` is marked slow."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    if hasattr(config.option, "markdowndocs"):  # the plugin is installed (the test extra)
        config.option.markdowndocs = True
        config.option.markdowndocs_syntax = "superfences"


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
