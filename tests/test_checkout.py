"""gape used from the clone root, as a user does: ``python -c``, ``python -m``, a
script or notebook started there. The root is then first on ``sys.path``, so
``kernels/`` and ``patches/`` must never be regular packages there (they would
hide Hugging Face's ``kernels``, which transformers imports), and the project's
own code must reach them only as ``gape.kernels`` and ``gape.patches``."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OWN_FOLDERS = ("kernels", "patches")
TINY_LLAMA = (
    "from transformers import LlamaConfig, LlamaForCausalLM\n"
    "cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,\n"
    "                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)\n"
    "torch.manual_seed(0); model = LlamaForCausalLM(cfg).eval()\n"
)


def _python(code: str, cwd: str = ROOT, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    full.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env or {})})
    res = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=full, capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0, f"exit {res.returncode}\n--- stdout\n{res.stdout[-2000:]}\n--- stderr\n{res.stderr[-4000:]}"
    return res


@pytest.mark.parametrize("folder", OWN_FOLDERS)
def test_own_folders_are_not_regular_packages(folder):
    assert os.path.isdir(os.path.join(ROOT, folder))
    assert not os.path.exists(os.path.join(ROOT, folder, "__init__.py")), (
        f"{folder}/__init__.py makes {folder}/ a top-level package of the clone root; "
        "it is gape." + folder + " (gape/_checkout.py)")


def _python_files():
    for top in ("gape", "kernels", "patches", "tests", "benchmarks"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
            for name in files:
                if name.endswith(".py"):
                    yield os.path.join(dirpath, name)


def test_project_code_imports_its_folders_only_through_gape():
    offenders = []
    for path in _python_files():
        tree = ast.parse(open(path, encoding="utf-8").read(), path)
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{os.path.relpath(path, ROOT)}:{node.lineno} {n}" for n in names
                          if n.split(".")[0] in OWN_FOLDERS]
    assert not offenders, offenders


def test_hugging_face_kernels_is_not_shadowed_from_the_clone_root():
    out = _python(
        "import kernels, transformers.modeling_utils\n"
        "print(kernels.__file__)\n"
        "from kernels import CUDAProperties\n").stdout.strip()
    own = os.path.realpath(os.path.join(ROOT, "kernels")) + os.sep
    assert "site-packages" in out and not os.path.realpath(out).startswith(own), out


def test_gape_kernels_and_patches_resolve_from_the_clone_root():
    out = _python(
        "import gape.kernels.attention_cpu as cpu, gape.patches.registry as reg\n"
        "print(cpu.__name__, len(reg.supported_model_types()))\n").stdout.split()
    assert out[0] == "gape.kernels.attention_cpu" and int(out[1]) >= 15


def test_python_m_gape_help_from_the_clone_root():
    out = _python("import runpy, sys; sys.argv = ['gape', '--help']\n"
                  "try:\n    runpy.run_module('gape', run_name='__main__')\n"
                  "except SystemExit as e:\n    assert e.code in (0, None), e.code\n").stdout
    for sub in ("niah", "eval", "audit-kernels"):
        assert sub in out, out


def test_patched_forward_from_the_clone_root():
    _python(
        "import torch, gape\n" + TINY_LLAMA +
        "ids = torch.randint(0, 64, (2, 17))\n"
        "with torch.no_grad():\n"
        "    want = model(ids).logits\n"
        "    gape.patch(model)\n"
        "    got = model(ids).logits\n"
        "torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)\n")


@pytest.mark.model
def test_load_model_from_the_clone_root():
    _python("import gape; model, tok = gape.load_model(); print(type(model).__name__)")


def test_pytest_collects_from_the_clone_root():
    res = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "tests/test_api.py"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "error" not in res.stdout.lower(), res.stdout[-3000:]


def test_wheel_installs_kernels_and_patches_under_gape(tmp_path):
    """The built wheel carries kernels/ and patches/ inside gape/ and imports them
    from there, not through the checkout's finder."""
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                          "-w", str(tmp_path / "dist"), ROOT], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("gape-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        z.extractall(site)
    assert {"gape/kernels/attention_cpu.cpp", "gape/kernels/attention.py", "gape/patches/registry.py",
            "gape/patches/llama.py", "gape/tasks/niah/data/essay.txt"} <= names
    assert not any(n.split("/")[0] in OWN_FOLDERS for n in names), sorted(names)[:20]
    # every module of the checkout ships (a subpackage missing from pyproject's list would not)
    missing = []
    for path in _python_files():
        rel = os.path.relpath(path, ROOT).replace(os.sep, "/")
        top = rel.split("/")[0]
        if top in ("gape", *OWN_FOLDERS):
            shipped = rel if top == "gape" else "gape/" + rel
            missing += [] if shipped in names else [shipped]
    assert not missing, f"not in the wheel (add the package to [tool.setuptools] packages in pyproject.toml): {missing}"
    out = _python(
        "import gape, gape._checkout as c, gape.kernels.attention_cpu as k, gape.patches.registry as r\n"
        "print(c.is_checkout(), k.__file__, r.__file__)\n",
        cwd=str(tmp_path), env={"PYTHONPATH": str(site)}).stdout.split()
    assert out[0] == "False"
    assert all(p.startswith(str(site)) for p in out[1:]), out
