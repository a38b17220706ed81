"""gape.distributed: context-parallel GAPE on 1-3 local gloo processes vs single-process gape.attention.

Each spawn runs many cases in one group (processes are the expensive part on
a 2-core machine); the parametrized tests read the module-scoped results.
"""

from __future__ import annotations

import os
from datetime import timedelta

import pytest
import torch

import gape
from gape import distributed as gd
from dist_helpers import run_ranks

import dist_workers as w

GRAD_NAMES = w.NAMES
CASES = [
    dict(b=2, hq=4, hkv=2, d=16, local=26, causal=causal, distance=distance, layout=layout)
    for layout in gd.LAYOUTS
    for causal in (True, False)
    for distance in ("log", "linear")
]
CASE_IDS = [f"{c['layout']}-{'causal' if c['causal'] else 'full'}-{c['distance']}-B2-H4/2-D16" for c in CASES]


def _ok(results):
    for r, res in enumerate(results):
        if isinstance(res, dict) and "error" in res:
            pytest.fail(f"rank {r} raised: {res['error']}\n{res.get('traceback', '')}")
    return results


@pytest.fixture(scope="module", params=[2, 3], ids=lambda n: f"W{n}")
def attention_results(request):
    world = request.param
    return world, _ok(run_ranks(w.attention_cases, world, CASES, timeout=400))


@pytest.mark.parametrize("index", range(len(CASES)), ids=CASE_IDS)
def test_output_and_five_gradients_match_single_process(attention_results, index):
    world, results = attention_results
    for rank, per_case in enumerate(results):
        res = per_case[index]
        for name, cp, single, scale in zip(GRAD_NAMES, res["cp32"], res["single32"], res["scale"]):
            # fp32 context-parallel vs the fp64 single-process oracle: within 2x the error of
            # single-process fp32 (plus a floor at fp32 resolution of the values)
            bound = 2 * single + 2e-6 * max(1.0, scale)
            assert cp <= bound, f"W{world} rank {rank} {name}: error {cp:.2e} > {bound:.2e} (single fp32 {single:.2e})"
        for name, err, scale in zip(GRAD_NAMES, res["cp64"], res["scale"]):
            assert err <= 1e-12 * max(1.0, scale), f"W{world} rank {rank} {name}: fp64 ring error {err:.2e}"
        assert res["bitwise_repeat"], f"W{world} rank {rank}: two identical calls differ"


def test_bad_inputs_fail_on_every_rank_and_leave_the_group_usable():
    results = _ok(run_ranks(w.bad_inputs, 2, timeout=200))
    expect = {
        "uneven": "disagree on the local length",
        "odd_zigzag": "needs a local length divisible by 2",
        "layout_disagree": "disagree on the layout",
        "sdpa": "no query_offset block kernel",
        "negative_gate": "rank 1: ValueError: query_gate (lambda) must be finite and >= 0",
    }
    for rank, res in enumerate(results):
        for name, text in expect.items():
            assert res[name] is not None, f"rank {rank}: {name} was accepted"
            assert text in res[name], f"rank {rank}: {name}: {res[name]}"
        assert res["after_ok"] < 1e-5


@pytest.fixture(scope="module", params=[2, 3], ids=lambda n: f"W{n}")
def llama_results(request):
    world = request.param
    # (total length, layout, patched, distance)
    runs = [(48, "zigzag", True, "log"), (48, "contiguous", True, "linear")]
    if world == 2:
        runs.append((48, "zigzag", False, "log"))  # an unpatched model: plain attention through the same ring
    return world, runs, _ok(run_ranks(w.llama_runs, world, runs, timeout=400))


def test_tiny_llama_loss_and_gradients_match_single_process(llama_results):
    world, runs, results = llama_results
    for rank, res in enumerate(results):
        for run, step in zip(runs, res["steps"]):
            assert step["loss"] == pytest.approx(step["loss_single"], rel=1e-5, abs=1e-6), (world, rank, run)
            for name, err in step["errs"].items():
                assert err <= 1e-5 * max(1.0, step["scales"][name]) + 1e-7, f"W{world} rank {rank} {run} {name}: {err:.2e}"
            assert step["gate_params"] == (10 if run[2] else 0)
            assert step["impl_after"] == ("gape" if run[2] else "sdpa")


def test_position_ids_that_do_not_match_the_layout_are_refused_on_every_rank(llama_results):
    world, _, results = llama_results
    for rank, res in enumerate(results):
        bad = res["bad"]
        assert "position_ids is required" in bad["missing"]
        for name in ("contiguous_positions", "plain_arange"):
            assert bad[name] is not None and "not this rank's 'zigzag' shard" in bad[name], (rank, name, bad[name])
            assert f"of a {world}-rank group" in bad[name]


def test_a_subgroup_ring_uses_global_ranks():
    results = _ok(run_ranks(w.subgroup_case, 3, timeout=200))
    assert results[0] is None
    assert all(err < 1e-5 for err in results[1:]), results


@pytest.fixture(scope="module")
def cp_refusal_results():
    # one spawn for every scenario; a rank left waiting in the ring would fail the
    # whole run with "did not finish" (the hang these tests guard against)
    return _ok(run_ranks(w.cp_refusals, 2, timeout=600))


CP_EXPECT = {
    "padding_mask": "does not support padding",
    "kv_cache": "without a KV cache",
    "labels": "causal_lm_loss",
    "attention_dropout": "attention dropout",
    "contiguous_positions": "not this rank's 'zigzag' shard",
    "length_mismatch": "position_ids hold 8 positions but the input holds 6",
    "batch_size": "disagree on the batch size",
    "grad_mode": "disagree on the grad enabled",
}


@pytest.mark.parametrize("name", w.CP_REFUSALS)
def test_a_refusal_on_one_rank_is_the_same_error_on_every_rank(cp_refusal_results, name):
    """Rank 0 calls the model wrongly, rank 1 correctly: both raise, neither waits in the ring."""
    messages = [res[name] for res in cp_refusal_results]
    for rank, msg in enumerate(messages):
        assert msg is not None, f"rank {rank} accepted {name}"
        assert CP_EXPECT[name] in msg, f"rank {rank}: {name}: {msg}"
    assert messages[0] == messages[1]  # the same agreed error, naming the rank that refused
    if name not in ("batch_size", "grad_mode"):
        assert "refused on 1 of 2 ranks (rank 0:" in messages[0]


def test_the_group_works_after_the_refusals(cp_refusal_results):
    for res in cp_refusal_results:
        assert res["after_ok"] < 1e-4


def test_a_peer_that_never_joins_is_an_error_after_the_timeout_not_a_wait():
    results = _ok(run_ranks(w.dead_peer, 2, timeout=120))
    assert results[1] == "away"
    assert results[0]["message"] is not None and "did not join within 3 s" in results[0]["message"]
    assert results[0]["seconds"] < 15  # the group's own timeout is 60 s


@pytest.mark.parametrize("bad", [0, -1, float("nan"), "10"])
def test_timeout_is_checked(bad):
    from gape.distributed.attention import as_timeout

    with pytest.raises((TypeError, ValueError), match="timeout"):
        as_timeout(bad)


def test_a_hanging_rank_times_out_instead_of_blocking():
    with pytest.raises(TimeoutError, match="did not finish"):
        run_ranks(w.hang, 2, timeout=15)


# --------------------------------------------------------------------------- no processes needed


@pytest.mark.parametrize("layout", gd.LAYOUTS)
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shard_unshard_round_trip_and_positions(layout, world):
    x = torch.arange(2 * 24).reshape(2, 24) * 10
    shards = [gd.shard_along(x, 1, world, r, layout) for r in range(world)]
    assert torch.equal(gd.unshard_from(shards, 1, layout), x)
    # every position exactly once, and shard() of the positions is global_positions()
    pos = torch.cat([gd.global_positions(layout, world, r, 24 // world) for r in range(world)])
    assert sorted(pos.tolist()) == list(range(24))
    for r in range(world):
        assert torch.equal(gd.shard_along(torch.arange(24), 0, world, r, layout), gd.global_positions(layout, world, r, 24 // world))


def test_zigzag_blocks():
    assert gd.global_positions("zigzag", 2, 0, 4).tolist() == [0, 1, 6, 7]
    assert gd.global_positions("zigzag", 2, 1, 4).tolist() == [2, 3, 4, 5]
    assert gd.global_positions("contiguous", 2, 1, 4).tolist() == [4, 5, 6, 7]


def test_shard_errors():
    with pytest.raises(ValueError, match="not divisible by 6"):
        gd.shard_along(torch.zeros(1, 10), 1, 3, 0, "zigzag")
    with pytest.raises(ValueError, match="layout must be one of"):
        gd.shard_along(torch.zeros(1, 12), 1, 3, 0, "striped")
    with pytest.raises(ValueError, match="differ in length"):
        gd.unshard_from([torch.zeros(1, 4), torch.zeros(1, 2)], 1, "contiguous")


def test_without_a_process_group_the_error_says_what_to_do():
    q = torch.randn(1, 2, 8, 8)
    with pytest.raises(RuntimeError, match="init_process_group"):
        gd.context_parallel_attention(q, q, q, torch.zeros(1, 2, 8), torch.zeros(1, 2, 8))
    with pytest.raises(RuntimeError, match="init_process_group"):
        gd.shard(q, 2)


def test_one_rank_group_equals_gape_attention(tmp_path):
    """W = 1: no communication, the blocks are the whole sequence (in this process)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1,
                            timeout=timedelta(seconds=30))
    try:
        case = dict(b=1, hq=6, hkv=2, d=8, local=20, causal=True, distance="log")
        (q, k, v, lam, pi), grad = w.full_inputs(case, 1, dtype=torch.float32)
        xs = [t.clone().requires_grad_() for t in (q, k, v, lam, pi)]
        ys = [t.clone().requires_grad_() for t in (q, k, v, lam, pi)]
        out = gd.context_parallel_attention(*xs)
        ref = gape.attention(*ys)
        (out * grad).sum().backward()
        (ref * grad).sum().backward()
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        for a, b in zip(xs, ys):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_example_script_under_torchrun_matches_one_process():
    """benchmarks/train_context_parallel.py, launched as docs/api.md says."""
    import re
    import subprocess
    import sys

    from dist_helpers import free_port

    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "train_context_parallel.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", script, "--length", "512", "--steps", "2", "--check"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 0, run.stderr[-3000:]
    m = re.search(r"check: loss ([\d.]+) vs one process ([\d.]+); largest gradient difference ([\d.e+-]+)", run.stdout)
    assert m, run.stdout
    assert abs(float(m[1]) - float(m[2])) < 1e-5 and float(m[3]) < 1e-5
    assert "step 2: loss" in run.stdout


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_longer_sequences_with_bigger_heads(world):
    cases = [dict(b=1, hq=8, hkv=2, d=64, local=512, causal=True, distance="log", layout="zigzag", lam=0.05)]
    for rank, per_case in enumerate(_ok(run_ranks(w.attention_cases, world, cases, timeout=900))):
        res = per_case[0]
        for name, cp, single, scale in zip(GRAD_NAMES, res["cp32"], res["single32"], res["scale"]):
            assert cp <= 2 * single + 2e-6 * max(1.0, scale), (world, rank, name, cp, single)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the Triton block kernel on CPU tensors needs TRITON_INTERPRET=1")
def test_triton_block_kernel_in_the_ring():
    """The Triton kernel (query offsets, in Triton's interpreter) as the ring's block kernel."""
    cases = [
        dict(b=1, hq=2, hkv=1, d=16, local=8, causal=True, distance="log", layout="zigzag", backend="triton"),
        dict(b=1, hq=2, hkv=1, d=16, local=6, causal=False, distance="linear", layout="contiguous", backend="triton"),
    ]
    for rank, per_case in enumerate(_ok(run_ranks(w.attention_cases, 2, cases, timeout=400))):
        for case, res in zip(cases, per_case):
            for name, cp, single, scale in zip(GRAD_NAMES, res["cp32"], res["single32"], res["scale"]):
                assert cp <= 2 * single + 2e-6 * max(1.0, scale), (rank, case["layout"], name, cp, single)
            assert res["bitwise_repeat"]
