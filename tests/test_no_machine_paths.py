"""Committed results and documentation name no folder of the machine that wrote them: no
absolute path under a home, work, temporary or root folder in any tracked text file under
benchmarks/results/, docs/ or README.md (result writers record paths relative to the run's
folder: gape._io.relative_path). A placeholder such as ``/home/USER/...`` is allowed."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MACHINE_PATH = re.compile(r"(?<![\w.~-])/(?:work|home|tmp|root)/[^\s\"'`)\]},]+")
# an example, not a machine's folder: /home/USER/..., /home/<you>/..., /tmp/... in angle brackets or capitals
PLACEHOLDER = re.compile(r"^/(?:home|work|tmp|root)/(?:<[^>]+>|[A-Z][A-Z_]*|\.\.\.|user|you|me|example)(?:/|$)")


def _tracked() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--", "benchmarks/results", "docs", "README.md"], cwd=ROOT,
                             capture_output=True, check=True, timeout=60).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        pytest.skip(f"not a git checkout ({err})")
    return [p for p in out.decode().split("\0") if p]


def machine_paths(text: str) -> list[str]:
    return [m for m in MACHINE_PATH.findall(text) if not PLACEHOLDER.match(m)]


def test_the_pattern_finds_machine_paths_and_spares_placeholders():
    assert machine_paths('"gates": "/work/main/benchmarks/g.safetensors"') == ["/work/main/benchmarks/g.safetensors"]
    assert machine_paths("# gape extrapolate: /tmp/run1\n`--out /root/x`") == ["/tmp/run1", "/root/x"]
    assert machine_paths("see /home/USER/models or /home/<you>/data, ~/work/x, a/tmp/b, benchmarks/results/x") == []
    assert machine_paths("no folder under `/tmp/` or /work/ is named") == []  # a prefix alone names no folder


def test_no_tracked_result_or_page_names_a_machine_folder():
    files = _tracked()
    assert "README.md" in files and any(f.startswith("benchmarks/results/") for f in files)
    found = {}
    for name in files:
        data = (ROOT / name).read_bytes() if (ROOT / name).is_file() else b""
        if b"\0" in data:  # images, tensors
            continue
        hits = machine_paths(data.decode("utf-8", errors="replace"))
        if hits:
            found[name] = sorted(set(hits))[:3]
    assert not found, f"absolute paths of this machine (write them relative to the repository root): {found}"
