"""Data-parallel training of a patched model on 2 gloo processes: DDP and FSDP2
(fully_shard per decoder layer and at the root) give the loss and the gradients (the
gates' and the model's) of the same step on the whole batch in one process."""

from __future__ import annotations

import pytest

from dist_helpers import run_ranks

import dp_workers


@pytest.mark.slow  # two spawned processes importing transformers: about a minute of CPU
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_data_parallel_step_equals_one_process(mode):
    results = run_ranks(dp_workers.data_parallel_step, 2, mode, timeout=300)
    for r, res in enumerate(results):
        if "error" in res:
            pytest.fail(f"rank {r} raised: {res['error']}\n{res.get('traceback', '')}")
    for res in results:
        assert abs(res["loss"] - res["loss_single"]) < 1e-5
        gates = [n for n in res["errs"] if "gape_gate" in n]
        assert len(gates) >= 8  # alpha, w, b, u, c in each of the 2 layers
        assert min(res["scales"][n] for n in gates if n.endswith((".w", ".u"))) > 1e-6  # the gates get gradients
        for n, err in res["errs"].items():
            assert err <= 1e-5 * max(1.0, res["scales"][n]), f"{mode}: gradient of {n} differs by {err:.2e}"
