"""gape longctx's lm-eval unit: lm-eval's own RULER niah_single_1 run once per arm on the arm's
evaluation model, on the tiny Llama and the made-up corpus of test_longctx (the machinery, not
the study's numbers). RULER needs 500 byte tokens for its shortest sample (the template, one
needle, one haystack sentence and 128 tokens to generate): the tiny unit runs at 512.

Importing lm-eval's RULER code costs about 15 s once per process (it builds a list of six million
adjective-noun keys), paid in the setup of the module's ``ruler`` fixture."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch

from gape.cli import main
from gape.experiments.longctx import lmeval, report, study
from test_longctx import FLAGS, one_thread, tiny  # noqa: F401  (fixtures)

pytest.importorskip("peft")
pytest.importorskip("lm_eval")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LENGTH = 512


@pytest.fixture(scope="module")
def ruler():
    """lm-eval's RULER code, imported once (about 15 s on an idle core: lm-eval builds a list of
    six million adjective-noun keys at import), so each test's own time shows in its call."""
    return lmeval._import_ruler()


def _argv(tiny, out, *extra):  # noqa: F811
    flags = [f for f in FLAGS if f not in ("--lmeval-samples", "0")]
    return ["longctx", "--model", tiny["model"], "--corpus", tiny["corpus"], "--out", str(out), *flags, *extra]


def _settings(**kw):
    return study.Settings(train_length=96, target_length=1024, steps=4, lengths=[448, 512], samples=2, max_new_tokens=3, **kw)


def _perturb(model, scale=0.5, lora=True, gates=True):
    """Nonzero LoRA (B starts at zero; the same draw in every arm, by name) and gates away from
    identity, switched on."""
    from gape import hf

    params = dict(model.named_parameters())
    picked = sorted(n for n in params if ("lora_" in n and lora) or ("gape_gate" in n and gates))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n in picked:
            params[n].add_(scale * torch.randn(params[n].shape, generator=gen))
    for _, gate in hf.iter_gates(model) if gates and hf.is_patched(model) else ():
        gate.config.identity_shortcut = False


def test_lmeval_unit_rows_report_and_resume(tiny, tmp_path, one_thread, ruler):  # noqa: F811
    """One lm-eval row per arm, placed after the held-out passes and before retrieval, with
    lm-eval's score, the standard error and every sample; the report's line and CSV; a rerun
    runs nothing."""
    out = tmp_path / "study"
    argv = _argv(tiny, out, "--arms", "yarn,yarn-ft", "--lengths", "448", "--samples", "1",
                 "--lmeval-length", str(LENGTH), "--lmeval-samples", "2")
    assert main(argv) == 0
    with open(out / study.RESULTS) as f:
        order = [(r["kind"], r["arm"]) for r in map(json.loads, f)]
    evals = [k for k in order if k[0] != "train"]
    assert [k for k, _ in evals] == ["ppl"] * (len(evals) - 4) + ["lmeval", "lmeval", "niah", "niah"]
    assert [a for k, a in evals if k == "lmeval"] == ["yarn", "yarn-ft"]
    rows = [r for r in study.read_rows(str(out)) if r["kind"] == "lmeval"]
    import lm_eval

    for r in rows:
        assert (r["task"], r["length"], r["samples"], r["lm_eval"]) == ("niah_single_1", LENGTH, 2, lm_eval.__version__)
        per = r["per_sample"]
        assert [p["index"] for p in per] == [0, 1]  # RULER's first samples
        assert all(p["ruler_length"] <= LENGTH and p["prompt_tokens"] + 128 <= LENGTH + lmeval.PROMPT_ROOM for p in per)
        assert all(len(p["answers"]) == 1 and p["answers"][0].isdigit() and p["score"] in (0.0, 1.0) for p in per)
        assert r["score"] == sum(p["score"] for p in per) / 2 and r["seconds"] > 0
        assert r["stderr"] == lmeval.stderr([p["score"] for p in per])
    # both arms read the same samples (lm-eval's seeds, not the arm, draw them)
    assert [p["answers"] for p in rows[0]["per_sample"]] == [p["answers"] for p in rows[1]["per_sample"]]
    with open(out / "summary_lmeval.csv") as f:
        lines = f.read().splitlines()
    assert lines[0] == "arm,task,length,samples,score,stderr,lm_eval"
    assert [line.split(",")[:4] for line in lines[1:]] == [["yarn", "niah_single_1", str(LENGTH), "2"], ["yarn-ft", "niah_single_1", str(LENGTH), "2"]]
    with open(out / "summary.txt") as f:
        summary = f.read()
    assert summary.count(f"niah_single_1    {LENGTH}:") == 2 and "(2 samples)" in summary
    assert not [f for f in os.listdir(out) if "tokenizer" in f or ".tmp" in f]  # the tokenizer went to a temporary folder
    before = study.read_rows(str(out))
    assert main(argv) == 0 and study.read_rows(str(out)) == before


def _logits_through_lmeval(model, tok, ids):
    from gape.hf.compat import unwrap

    lm = lmeval.harness(model, tok, LENGTH + lmeval.PROMPT_ROOM)
    assert lm.model is unwrap(model)
    with torch.no_grad():
        out = lm._model_call(ids)
        torch.testing.assert_close(out, model(input_ids=ids).logits, rtol=0, atol=0)  # the arm's own forward
    return out


def test_lmeval_runs_the_arms_own_lora(tiny, one_thread, ruler):  # noqa: F811
    """lm-eval's logits are the arm model's own logits, LoRA included: a perturbed LoRA gives
    lm-eval other logits and other answers than the arm at its start (LoRA B = 0: the yarn
    model); and the study's random generators come out of an lm-eval unit as they went in."""
    import gape

    base, tok = gape.load_model(tiny["model"])
    s = _settings()
    start = study.build_arm(base, "yarn-ft", s)[0]
    trained = study.build_arm(base, "yarn-ft", s)[0]
    _perturb(trained)
    ids = torch.randint(0, 250, (1, 300), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = study.build_arm(base, "yarn", s)[0](input_ids=ids).logits
    torch.testing.assert_close(_logits_through_lmeval(start, tok, ids), ref, rtol=1e-5, atol=1e-5)
    assert (_logits_through_lmeval(trained, tok, ids) - ref).abs().max() > 1e-2
    states = random.getstate(), torch.get_rng_state()
    a = lmeval.run(start, tok, LENGTH, 2)
    b = lmeval.run(trained, tok, LENGTH, 2)
    assert random.getstate() == states[0] and torch.equal(torch.get_rng_state(), states[1])
    assert [p["answers"] for p in a["per_sample"]] == [p["answers"] for p in b["per_sample"]]
    assert [p["response"] for p in a["per_sample"]] != [p["response"] for p in b["per_sample"]]


def test_lmeval_runs_the_arms_own_gates(tiny, one_thread):  # noqa: F811
    """The gates (switched on and moved) are in the forward lm-eval runs, on top of the LoRA."""
    import gape

    base, tok = gape.load_model(tiny["model"])
    s = _settings()
    lora_only = study.build_arm(base, "yarn-ft", s)[0]
    gated = study.build_arm(base, "yarn-gape-ft", s)[0]
    _perturb(lora_only)
    _perturb(gated, gates=False)  # the same LoRA, gates at their start (identity)
    ids = torch.randint(0, 250, (1, 300), generator=torch.Generator().manual_seed(0))
    plain = _logits_through_lmeval(lora_only, tok, ids)
    torch.testing.assert_close(_logits_through_lmeval(gated, tok, ids), plain, rtol=1e-5, atol=1e-5)
    _perturb(gated, lora=False)
    assert (_logits_through_lmeval(gated, tok, ids) - plain).abs().max() > 1e-3


def test_an_existing_folder_without_the_lmeval_settings_resumes(tmp_path):
    """A run.json written before the lm-eval settings existed compares as their defaults: the
    live study's folder resumes with the default flags, a non-default lm-eval setting is refused
    naming it, and a missing setting that was always there is still refused."""
    from gape._args import UsageError

    fixed = {**_settings().fixed(), "model": "tiny", "plays": "0123456789abcdef"}
    old = {k: v for k, v in fixed.items() if k not in study.LATER_FIELDS}
    assert set(study.LATER_FIELDS) <= set(fixed) and len(old) == len(fixed) - 2
    (tmp_path / study.RUN_FILE).write_text(json.dumps(old))
    study._check_run_file(str(tmp_path), fixed)
    assert json.loads((tmp_path / study.RUN_FILE).read_text()) == old  # read, not rewritten
    with pytest.raises(UsageError, match=r"lmeval_samples: 20 \(saved\) vs 0 \(now\)"):
        study._check_run_file(str(tmp_path), {**fixed, "lmeval_samples": 0})
    with pytest.raises(UsageError, match="lmeval_length"):
        study._check_run_file(str(tmp_path), {**fixed, "lmeval_length": 8192})
    (tmp_path / study.RUN_FILE).write_text(json.dumps({k: v for k, v in old.items() if k != "lr"}))
    with pytest.raises(UsageError, match="lr: None"):
        study._check_run_file(str(tmp_path), fixed)
    (tmp_path / study.RUN_FILE).write_text(json.dumps([fixed]))  # JSON, but not the settings object
    with pytest.raises(UsageError, match="is unreadable \\(expected a JSON object, got list\\)"):
        study._check_run_file(str(tmp_path), fixed)
    # the study's own folder as committed (read only): its settings are this code's defaults
    committed = os.path.join(ROOT, "benchmarks", "results", "longctx", study.RUN_FILE)
    if os.path.exists(committed):
        with open(committed) as f:
            saved = json.load(f)
        (tmp_path / study.RUN_FILE).write_text(json.dumps(saved))
        now = {**study.Settings().fixed(), "model": study.model_label(None), "plays": saved["plays"]}
        study._check_run_file(str(tmp_path), now)


def test_the_attention_view_reads_a_folder_without_the_lmeval_settings(tmp_path):
    """The attention view compares settings as the study does: a run.json older than the lm-eval
    settings is read with their defaults (the live study's folder included), and a setting the
    command changes is still refused, naming it."""
    import dataclasses

    from gape._args import UsageError
    from gape.experiments.longctx import attention

    s = _settings(model="tiny")
    fixed = {**s.fixed(), "model": study.model_label(s.model)}
    (tmp_path / study.RUN_FILE).write_text(json.dumps({**{k: v for k, v in fixed.items() if k not in study.LATER_FIELDS},
                                                        "plays": "0123456789abcdef"}))
    assert attention.check_settings(str(tmp_path), s) == fixed
    with pytest.raises(UsageError, match=r"lmeval_samples: 20 \(saved\) vs 0 \(now\)"):
        attention.check_settings(str(tmp_path), dataclasses.replace(s, lmeval_samples=0))
    with pytest.raises(UsageError, match=r"steps: 4 \(saved\) vs 5 \(now\)"):
        attention.check_settings(str(tmp_path), dataclasses.replace(s, steps=5))
    committed = os.path.join(ROOT, "benchmarks", "results", "longctx", study.RUN_FILE)
    if os.path.exists(committed):
        with open(committed) as f:
            (tmp_path / study.RUN_FILE).write_text(f.read())
        attention.check_settings(str(tmp_path), study.Settings())


@pytest.mark.parametrize("content, message", [("{not json", "is unreadable"), ("[1, 2]", "expected a JSON object, got list"),
                                              (None, "holds no study")])
def test_the_study_and_the_attention_view_refuse_a_bad_run_file_alike(tmp_path, content, message):
    """One reader of run.json: a file that is not JSON or not a settings object is refused with
    the same words by the study and by the attention view, and a missing one is the study's to
    write but the view's to refuse."""
    from gape._args import UsageError
    from gape.experiments.longctx import attention

    s = _settings(model="tiny")
    fixed = {**s.fixed(), "model": study.model_label(s.model), "plays": "0123456789abcdef"}
    if content is not None:
        (tmp_path / study.RUN_FILE).write_text(content)
    with pytest.raises(UsageError, match=message) as seen:
        attention.check_settings(str(tmp_path), s)
    if content is None:
        study._check_run_file(str(tmp_path), fixed)
        assert json.loads((tmp_path / study.RUN_FILE).read_text()) == fixed
        return
    with pytest.raises(UsageError) as again:
        study._check_run_file(str(tmp_path), fixed)
    assert str(again.value) == str(seen.value)
    assert (tmp_path / study.RUN_FILE).read_text() == content  # refused, never overwritten


def test_plan_places_the_lmeval_unit():
    s = _settings(lmeval_length=LENGTH, lmeval_samples=3)
    units = study.plan(["yarn", "yarn-ft"], s, [("a", [448, 512])])
    kinds = [u.kind for u in units]
    assert kinds == ["train"] * 4 + ["ppl"] * 2 + ["lmeval"] * 2 + ["niah"] * (2 * 2 * 2)
    assert [(u.arm, u.length, u.tokens) for u in units if u.kind == "lmeval"] == [("yarn", LENGTH, 3 * LENGTH), ("yarn-ft", LENGTH, 3 * LENGTH)]
    assert "lmeval" not in [u.kind for u in study.plan(["yarn"], _settings(lmeval_samples=0), [("a", [448])])]
    assert study.row_key({"arm": "yarn", "kind": "lmeval", "task": "niah_single_1", "length": LENGTH}) == ("yarn", "lmeval", "niah_single_1", LENGTH)
    good = {"arm": "yarn", "kind": "lmeval", "task": "niah_single_1", "length": LENGTH, "samples": 3, "score": 0.5, "stderr": 0.1}
    assert study._valid(good) and not study._valid({**good, "samples": True}) and not study._valid({**good, "score": "0.5"})
    assert lmeval.stderr([1.0]) is None and abs(lmeval.stderr([1.0, 0.0, 1.0, 1.0]) - 0.25) < 1e-12
    text = report.format_tables([good, {**good, "arm": "yarn-ft", "score": 1.0, "stderr": None}])
    assert "yarn           niah_single_1    512: 0.50 +- 0.10 (3 samples)" in text and "1.00 +- n/a" in text


@pytest.mark.parametrize("flags, flag", [
    (["--lmeval-samples", "-1"], "--lmeval-samples"),
    (["--lmeval-samples", "501"], "--lmeval-samples"),
    (["--lmeval-length", "8"], "--lmeval-length"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_lmeval_flags_refused_at_parse_time(flags, flag, capsys, tmp_path):
    assert main(["longctx", "--out", str(tmp_path / "x"), *flags]) == 2
    assert f"argument {flag}" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x")


def test_a_length_ruler_cannot_build_is_refused_before_training(tiny, tmp_path, capsys, one_thread, ruler):  # noqa: F811
    out = tmp_path / "short"
    assert main(_argv(tiny, out, "--arms", "yarn-ft", "--lmeval-length", "448", "--lmeval-samples", "1")) == 2
    assert "--lmeval-length 448" in capsys.readouterr().err
    assert study.read_rows(str(out)) == []
