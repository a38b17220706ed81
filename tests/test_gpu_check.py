"""benchmarks/gpu_check.py, the one prepared GPU check: its dry run on the CPU
(every stage at tiny sizes), its report of a failing and of a hanging stage,
the import hook it falls back to when pip cannot install the checkout, and
the benchmark's FLOP formula and target table."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.py")


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(args, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "GAPE_GPU_CHECK_INJECT"}
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_dry_run_runs_every_stage_and_reports_an_injected_failure(tmp_path):
    out = tmp_path / "out"
    # the import hook (pip's fallback) for every stage; the benchmark stage made to fail on purpose
    res = _run([str(out), "--dry-run", "--install-mode", "path", "--inject", "bench"])
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    stages = summary["stages"]
    assert list(stages) == ["env", "kernel", "model", "bench"]
    assert stages["env"]["status"] == "passed", stages["env"]
    assert stages["env"]["info"]["import_mode"] == "path"
    assert stages["env"]["info"]["torch"] and stages["env"]["info"]["triton"]
    for name in ("kernel", "model"):
        c = stages[name]["counts"]
        assert stages[name]["status"] == "passed", stages[name]["message"]
        assert c["total"] > 0 and c["passed"] == c["total"] and c["not_run"] == 0, c
    assert stages["bench"]["status"] == "failed" and "injected" in stages["bench"]["message"]
    assert summary["ok"] is False
    assert set(summary["files"]) <= {"summary.json", "checks.csv", "log.txt", "bench.csv", "bench.png"}
    with open(out / "checks.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == stages["kernel"]["counts"]["total"] + stages["model"]["counts"]["total"]
    assert all(r["status"] == "passed" for r in rows)
    assert "NOT ALL PASSED" in res.stdout and "bench" in res.stdout
    assert not (out / ".lock").exists()


def test_a_hanging_stage_is_stopped_and_the_next_still_runs(tmp_path):
    t0 = time.time()
    res = _run([str(tmp_path / "out"), "--dry-run", "--stages", "env", "bench", "--inject", "env:hang",
                "--timeout", "env=3"])
    assert time.time() - t0 < 120
    assert res.returncode == 1
    stages = json.loads((tmp_path / "out" / "summary.json").read_text())["stages"]
    assert stages["env"]["status"] == "timeout" and "stopped after 3 s" in stages["env"]["message"]
    assert stages["bench"]["status"] == "skipped"  # ran after the stopped stage (skipped: dry run)


def test_checkout_import_hook_follows_the_package_dir_mapping(tmp_path):
    """A copy of the checkout, not the installed package, must provide gape,
    gape.kernels (kernels/) and gape.patches (patches/) through the hook."""
    copy = tmp_path / "checkout"
    for d in ("gape", "kernels", "patches"):
        shutil.copytree(os.path.join(ROOT, d), copy / d, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(os.path.join(ROOT, "pyproject.toml"), copy / "pyproject.toml")
    (copy / "benchmarks").mkdir()
    shutil.copy(SCRIPT, copy / "benchmarks" / "gpu_check.py")
    probe = [sys.executable, str(copy / "benchmarks" / "gpu_check.py"), "--probe-import", "--install-mode"]
    res = subprocess.run(probe + ["path"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    found = json.loads(res.stdout)
    real = os.path.realpath(copy)
    assert found["gape"] == os.path.join(real, "gape", "__init__.py")
    assert found["gape.kernels"] == os.path.join(real, "kernels")
    assert found["gape.patches"] == os.path.join(real, "patches")
    # without the hook the copy is not what imports: the probe can fail
    res = subprocess.run(probe + ["none"], capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "not from this checkout" in res.stderr


def test_bench_flop_formula_and_no_cuda_exit():
    bench = _load("bench_kernel_gpu", os.path.join(ROOT, "benchmarks", "bench_kernel_gpu.py"))
    b, h, L, d = 2, 3, 64, 16
    full = 4 * b * h * L * L * d
    assert bench.flops(b, h, L, d, False, "fwd") == full
    assert bench.flops(b, h, L, d, True, "fwd") == full / 2
    assert bench.flops(b, h, L, d, True, "fwd+bwd") == full / 2 * 3.5  # backward = 2.5 x forward
    import torch

    if not torch.cuda.is_available():
        assert bench.main(["--causal", "causal", "--seqlens", "1024"]) == 2


def test_bench_table_ratios_against_targets(tmp_path):
    gc = _load("gpu_check", SCRIPT)
    path = tmp_path / "bench.csv"
    rows = []
    for mode, tf in (("fwd", {"gape": 90.0, "gape-nobias": 100.0, "sdpa-flash": 120.0, "flex": 60.0}),
                     ("fwd+bwd", {"gape": 80.0, "gape-nobias": 100.0, "sdpa-flash": 110.0, "flex": 75.0})):
        for prov, v in tf.items():
            rows.append(dict(provider=prov, mode=mode, causal="True", seqlen="4096", head_dim="128", dtype="bf16",
                             tflops=str(v), error=""))
    rows.append(dict(provider="flex", mode="fwd", causal="True", seqlen="16384", head_dim="128", dtype="bf16",
                     tflops="", error="OutOfMemoryError: ..."))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines, ratios = gc.bench_table(str(path))
    by = {(r["mode"], r["seqlen"]): r for r in ratios}
    fwd, both = by[("fwd", 4096)], by[("fwd+bwd", 4096)]
    assert fwd["gape_over_nobias"] == pytest.approx(0.9) and fwd["nobias_ok"]
    assert fwd["gape_over_flex"] == pytest.approx(1.5) and fwd["flex_ok"]
    assert both["gape_over_nobias"] == pytest.approx(0.8) and both["nobias_ok"] is False
    assert both["gape_over_flex"] == pytest.approx(80 / 75) and both["flex_ok"] is False
    assert by[("fwd", 16384)]["gape_over_flex"] is None
    assert any("OutOfMemoryError" in line for line in lines)
    assert sum(line.count("!") for line in lines if line.startswith("fwd+bwd")) == 2  # both targets missed


def test_gpu_case_list_covers_the_brief():
    """The full-size case list (not run here: it needs CUDA) has every kind the GPU must check."""
    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    gc = _load("gpu_check", SCRIPT)
    cases = gc.kernel_cases("full")
    grid = [c for kind, c in cases if kind == "grid"]
    names = [gc.case_name(kind, c) for kind, c in cases]
    assert len(set(names)) == len(names)
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        for d in (64, 128, 80, 256):
            assert {c.causal for c in grid if c.dtype == dt and c.d == d} == {True, False}, (dt, d)
    assert any(c.hq != c.hkv for c in grid) and {c.distance for c in grid} == {"log", "linear"}
    assert {c.dtype for c in grid if c.lq == 1 and c.lk < 2**20} == {torch.float16, torch.bfloat16, torch.float32}
    assert any(c.lq == 1 and c.lk == 2**20 for c in grid)
    kinds = {kind for kind, _ in cases}
    assert {"ranges:left-pad-causal", "ranges:right-pad-full", "ranges:empty-batch", "tmask"} <= kinds
    # learned sinks and the soft-cap: each term alone and both, dense, windowed, decode offsets, packed
    assert {"terms:sinks", "terms:softcap", "terms:sinks+softcap", "terms-window:sinks+softcap",
            "terms-decode:sinks+softcap", "terms-varlen:sinks", "terms-varlen:sinks+softcap"} <= kinds
    for kind, c in cases:
        if kind.startswith("ranges:"):
            start, end = gc.key_range_layout(kind.split(":")[1], c.b, c.lk)
            assert (start <= end).all() and (end <= c.lk).all()
