"""``gape audit-kernels`` on a subset (the full run is saved in
benchmarks/results/kernel_audit.json): ahead-of-time compilation for sm_80 and
sm_90 without a GPU, then the requirements on what ptxas reports."""

from __future__ import annotations

import json

import pytest

from gape.cli import main

LIMITS = {"sm_80": 164 * 1024, "sm_90": 228 * 1024}


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("audit") / "audit.json"
    # Under TRITON_INTERPRET=1 (set by conftest) the audit re-runs itself in a
    # subprocess without it: this also covers that path.
    rc = main(["audit-kernels", "--out", str(out), "--arch", "80", "90", "--head-dim", "128", "--dtype", "bf16",
               "--causal", "1", "--distance", "log", "--positions", "dense", "varlen", "--first-config-only",
               "--quiet"])
    assert rc == 0
    return json.loads(out.read_text())


def test_every_kernel_and_arch_compiled(rows):
    seen = {(r["kernel"], r["arch"]) for r in rows}
    assert seen == {(k, a) for k in ("fwd", "bwd_preprocess", "bwd_kv", "bwd_q") for a in ("sm_80", "sm_90")}
    # the dense kernels and the packed-sequence variant with a window
    assert {r["positions"] for r in rows if r["kernel"] != "bwd_preprocess"} == {"dense", "varlen"}
    for r in rows:
        assert r["ok"], r.get("error")
        assert r["regs"] and 0 < r["regs"] <= 255, r


def test_no_spills_and_shared_memory_in_bounds(rows):
    for r in rows:
        assert r["spills"] == 0, f"{r['kernel']} {r['arch']} spills {r['spills']} bytes"
        assert 0 < r["shared_bytes"] <= LIMITS[r["arch"]], r


def test_matmuls_use_tensor_cores(rows):
    for r in rows:
        if r["kernel"] == "bwd_preprocess":
            continue
        resident = r["block_n"] if r["kernel"] == "bwd_kv" else r["block_m"]
        if r["arch"] == "sm_90" and resident >= 64:
            assert r["uses_wgmma"], r
        else:
            assert r["uses_mma"] or r["uses_wgmma"], r
        assert r["meets_requirements"], r
