"""The documentation: every python block of README.md and docs/*.md runs as a test
(pytest-markdown-docs, switched on in the root conftest.py), the README stays a short
front page, and neither speaks of anything outside the repository."""

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_the_examples_plugin_is_installed_and_on():
    assert importlib.util.find_spec("pytest_markdown_docs") is not None, (
        "pytest-markdown-docs is missing, so the documentation examples do not run: pip install -e '.[test]'")


def test_the_examples_are_collected(pytestconfig):
    assert pytestconfig.option.markdowndocs and pytestconfig.option.markdowndocs_syntax == "superfences"


def test_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 350, len(lines)
    for heading in ("## Set-up and the two commands", "## Quick start", "## Supported architectures"):
        assert heading in lines


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_pages_speak_of_the_project_alone(page):
    text = page.read_text()
    assert not re.search(r"issue [0-9]|moonshot", text, re.I)
    assert not re.search(r"(?<![\w.])(/work/|\.\./shared|shared/GAPE)", text)


def test_every_page_is_in_the_site_navigation():
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in (ROOT / "docs").glob("*.md"):
        assert f": {page.name}" in nav, page.name
