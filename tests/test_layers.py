"""The package's wings and the direction of its imports, read from the code (an
AST walk, lazy imports inside functions included): the core never imports the
transformers integration, context parallelism, tasks or experiments; hf never
imports tasks or experiments; no import cycle spans two wings. And the earlier
flat module paths (``gape.models``, ``gape.ops``, ...) still import, as the
same module objects as their new homes."""

from __future__ import annotations

import ast
import importlib
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# wing -> floor; an import may only go to the same floor or below
FLOORS = {"base": 0, "core": 1, "hf": 2, "distributed": 3, "tasks": 4, "experiments": 5, "top": 6}


def wing(module: str) -> str:
    parts = module.split(".")
    if parts[0] != "gape":
        raise ValueError(module)
    if len(parts) == 1 or parts[1] in ("cli", "__main__", "_moved"):
        return "top"  # the facade, the command line, and the table of earlier paths reach every wing
    return {"core": "core", "kernels": "core", "hf": "hf", "patches": "hf", "distributed": "distributed",
            "tasks": "tasks", "experiments": "experiments"}.get(parts[1], "base")


def modules() -> dict[str, str]:
    """Module name -> file, for gape/ and the folders installed under it."""
    found = {}
    for top, prefix in (("gape", "gape"), ("kernels", "gape.kernels"), ("patches", "gape.patches")):
        base = os.path.join(ROOT, top)
        for dirpath, _, files in os.walk(base):
            for name in files:
                if not name.endswith(".py"):
                    continue
                rel = os.path.relpath(os.path.join(dirpath, name), base)[:-3].replace(os.sep, ".")
                mod = prefix if rel == "__init__" else f"{prefix}.{rel.removesuffix('.__init__')}"
                found[mod] = os.path.join(dirpath, name)
    return found


def imports(module: str, path: str, known: set[str]) -> set[str]:
    """The project modules ``module`` imports (resolved to the deepest known name)."""
    is_package = path.endswith("__init__.py")
    package = module if is_package else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                base = f"{anchor}.{base}" if base else anchor
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != module and t.startswith("gape"):
                out.add(t)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {m: imports(m, p, known) - {"gape"} for m, p in mods.items()}


def test_every_module_has_a_wing():
    assert {wing(m) for m in modules()} == set(FLOORS)


def test_no_import_runs_up_a_floor():
    up = [f"{m} ({wing(m)}) imports {t} ({wing(t)})" for m, ts in graph().items() for t in ts
          if FLOORS[wing(t)] > FLOORS[wing(m)]]
    assert not up, "\n".join(sorted(up))


def _cycles(g: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in g:
        if v not in index:
            visit(v)
    return out


def test_no_cycle_spans_two_wings():
    wide = [sorted(c) for c in _cycles(graph()) if len({wing(m) for m in c}) > 1]
    assert not wide, wide


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


EARLIER_PATHS = ["gape.api", "gape.reference", "gape.torch_backend", "gape.torch_tiles", "gape.sdpa_backend",
                 "gape.ops", "gape.gates", "gape.config", "gape.compat", "gape.pretrained", "gape.attention_probe",
                 "gape.positional", "gape.models", "gape.niah", "gape.niah.runner", "gape.lmeval", "gape.prompts",
                 "gape.methods", "gape.synthetic", "gape.extrapolate", "gape.extrapolate.runner", "gape.calibrate",
                 "gape.training_free", "gape.inspect"]


@pytest.mark.parametrize("old", EARLIER_PATHS)
def test_earlier_module_paths_are_the_same_modules(old):
    from gape._moved import home

    new = home(old)
    assert new is not None and new != old
    assert importlib.import_module(old) is importlib.import_module(new)
    assert sys.modules[new].__spec__.name == new  # the alias did not rename the module


def test_documented_names_are_where_the_documentation_says():
    import gape
    from gape.attention_probe import capture_attention, entropy  # noqa: F401
    from gape.models import load_model, load_tokenizer  # noqa: F401
    from gape.ops import block_backward, block_forward, merge  # noqa: F401
    from gape.training_free import apply_training_free  # noqa: F401

    assert callable(gape.attention) and callable(gape.attention_varlen) and callable(gape.patch)
    assert gape.ops.merge is merge and gape.GapeConfig.__module__ == "gape.hf.config"
    assert gape.api.select is importlib.import_module("gape.core.api").select
