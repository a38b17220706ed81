"""gape.tasks.niah: prompt generator, scoring, result files and resume, the CLI end to end."""

from __future__ import annotations

import csv
import json
import os

import pytest
import torch

from gape.tasks.niah import results as res
from gape.tasks.prompts import HAYSTACKS, TASKS, build_sample, haystack_sentences
from gape.tasks.methods import METHODS, MethodOptions, apply_method, parse_methods
from gape.tasks.niah.scoring import string_match_all, string_match_part
from tiny_models import save_tiny_hf, tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_hf(str(tmp_path_factory.mktemp("tiny") / "hf"))


CASES = [(t, h) for t in TASKS for h in HAYSTACKS]


@pytest.mark.parametrize("task, haystack", CASES, ids=[f"{t}-{h}" for t, h in CASES])
@pytest.mark.parametrize("length", [700, 1531], ids=lambda n: f"L{n}")
def test_exact_length_needles_present_and_deterministic(tok, task, haystack, length):
    a = build_sample(tok, task=task, length=length, depth=0.5, index=1, seed=3, haystack=haystack)
    b = build_sample(tok, task=task, length=length, depth=0.5, index=1, seed=3, haystack=haystack)
    assert len(a.input_ids) == length
    assert a.input_ids == b.input_ids and a.answers == b.answers
    text = tok.decode(a.input_ids)
    for needle in a.needles:
        assert needle in text
    for answer in a.answers:
        assert answer in text
    assert len(a.answers) == (4 if task == "multivalue" else 1)
    # another sample index or seed is another prompt
    assert build_sample(tok, task=task, length=length, depth=0.5, index=2, seed=3, haystack=haystack).answers != a.answers
    assert build_sample(tok, task=task, length=length, depth=0.5, index=1, seed=4, haystack=haystack).answers != a.answers


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
@pytest.mark.parametrize("haystack", HAYSTACKS)
def test_needle_at_requested_depth_on_a_sentence_boundary(tok, depth, haystack):
    s = build_sample(tok, task="passkey", length=2000, depth=depth, haystack=haystack)
    a, b = s.context_span
    needle = tok(" " + s.needles[0], add_special_tokens=False).input_ids
    assert s.input_ids[s.needle_position : s.needle_position + len(needle)] == needle
    haystack_tokens = (b - a) - len(needle)
    before = s.needle_position - a
    # within one sentence of the requested depth
    longest = max(len(tok(" " + x, add_special_tokens=False).input_ids) for x in haystack_sentences(haystack))
    assert abs(before - depth * haystack_tokens) <= longest / 2 + 1
    assert s.actual_depth == pytest.approx(before / haystack_tokens)
    # a sentence boundary: the haystack text right before the needle ends a sentence
    if before > 0:
        assert tok.decode(s.input_ids[a : s.needle_position]).rstrip().endswith((".", "!", "?"))


def test_chat_template_and_plain_framing(tok):
    chat = build_sample(tok, task="single", length=900, depth=0.3)
    plain = build_sample(tok, task="single", length=900, depth=0.3, use_chat_template=False)
    assert chat.chat_template and not plain.chat_template
    chat_text, plain_text = tok.decode(chat.input_ids), tok.decode(plain.input_ids)
    assert chat_text.startswith("<|im_start|>user\n") and "<|im_start|>assistant\n" in chat_text
    assert "<|im_start|>" not in plain_text
    assert chat_text.endswith(chat.answer_prefix) and plain_text.endswith(plain.answer_prefix)
    assert chat.question in chat_text and chat.intro in plain_text


def test_generator_errors(tok):
    with pytest.raises(ValueError, match="too short"):
        build_sample(tok, task="passkey", length=50, depth=0.5)
    with pytest.raises(ValueError, match="task"):
        build_sample(tok, task="kv", length=900, depth=0.5)
    with pytest.raises(ValueError, match="depth"):
        build_sample(tok, task="passkey", length=900, depth=1.5)
    with pytest.raises(ValueError, match="haystack"):
        build_sample(tok, task="passkey", length=900, depth=0.5, haystack="wiki")


def test_scoring():
    assert string_match_all(" The pass key is 12345.", ["12345"]) == 1.0
    assert string_match_all("ABC-def 1 and 2", ["abc-DEF", "3"]) == 0.5
    assert string_match_all("\x00 7 \x1f", ["7"]) == 1.0
    assert string_match_all("1234", ["12345"]) == 0.0
    assert string_match_part("nothing 2", ["1", "2"]) == 1.0 and string_match_part("x", ["1", "2"]) == 0.0
    with pytest.raises(ValueError):
        string_match_all("x", [])


def test_methods_parse_and_restore(tiny_folder):
    import gape
    import gape.hf

    assert parse_methods("rope, yarn,rope") == ["rope", "yarn"]
    with pytest.raises(ValueError, match="methods"):
        parse_methods("rope,alibi")
    assert set(METHODS) >= {"rope", "gape", "yarn", "dynamic", "linear", "gape+yarn"}
    model, _ = gape.load_model(tiny_folder)
    ids = torch.randint(0, 200, (1, 300))  # beyond the 256-token window: every scaling differs
    with torch.no_grad():
        plain = model(ids).logits
        for method in ("yarn", "dynamic", "linear", "gape", "gape+yarn"):
            restore = apply_method(model, method, MethodOptions(rope_factor=4.0, gape_lambda=0.2))
            assert gape.hf.is_patched(model) == method.startswith("gape")
            assert not torch.allclose(model(ids).logits, plain, atol=1e-4), method
            restore()
            assert not gape.hf.is_patched(model)
            torch.testing.assert_close(model(ids).logits, plain, rtol=0, atol=0)
        # gape+yarn is yarn plus the gape bias: differs from both
        restore = apply_method(model, "yarn", MethodOptions(rope_factor=4.0))
        yarn = model(ids).logits
        restore()
        restore = apply_method(model, "gape+yarn", MethodOptions(rope_factor=4.0, gape_lambda=0.2))
        assert model.model.rotary_emb.rope_type == "yarn"
        assert not torch.allclose(model(ids).logits, yarn, atol=1e-4)
        restore()


def test_result_files_survive_a_torn_line(tmp_path):
    row = {"method": "rope", "task": "passkey", "haystack": "noise", "length": 8, "depth": 0.5, "sample": 0, "seed": 0, "score": 1.0, "correct": True, "seconds": 0.1}
    res.append_row(str(tmp_path), row)
    with open(tmp_path / res.RESULTS, "a") as f:
        f.write('{"method": "rope", "tas')  # killed mid-write
    res.append_row(str(tmp_path), dict(row, sample=1, score=0.0, correct=False))
    rows = res.read_rows(str(tmp_path))
    assert [r["sample"] for r in rows] == [0, 1]
    summary = res.summarize(rows)
    assert summary[0]["accuracy"] == 0.5 and summary[0]["samples"] == 2
    assert "rope" in res.format_table(summary)


def _cli(argv):
    from gape.cli import main

    return main(["niah", *argv])


def test_cli_end_to_end_and_resume(tiny_folder, tmp_path, capsys):
    out = str(tmp_path / "out")
    args = ["--model", tiny_folder, "--methods", "rope,yarn", "--lengths", "600,700", "--depths", "0,0.5,1", "--samples", "2",
            "--task", "single", "--haystack", "essay", "--out", out, "--max-new-tokens", "4", "--threads", "1", "--no-progress"]
    assert _cli(args) == 0
    rows = res.read_rows(out)
    assert len(rows) == 2 * 2 * 3 * 2
    for r in rows:
        for field in ("method", "task", "length", "depth", "seed", "needle", "response", "correct", "seconds"):
            assert field in r
        assert r["prompt_tokens"] == r["length"] and r["new_tokens"] <= 4
    assert {r["rope_factor"] for r in rows if r["method"] == "yarn"} == {2.0}
    with open(os.path.join(out, res.SUMMARY)) as f:
        summary = list(csv.DictReader(f))
    assert len(summary) == 2 * 2 * 3 and {s["samples"] for s in summary} == {"2"}
    for name in ("heatmap_rope_single_essay.png", "heatmap_yarn_single_essay.png", "accuracy_vs_length_single_essay.png"):
        with open(os.path.join(out, name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "task=single haystack=essay" in printed and "yarn" in printed

    # drop the last 5 rows as if interrupted; a rerun redoes exactly those, adds a new length
    with open(os.path.join(out, res.RESULTS)) as f:
        lines = f.readlines()
    with open(os.path.join(out, res.RESULTS), "w") as f:
        f.writelines(lines[:-5])
    assert _cli([*args[:5], "600,700,650", *args[6:]]) == 0
    rows2 = res.read_rows(out)
    assert len(rows2) == 2 * 3 * 3 * 2
    assert [json.dumps(r, sort_keys=True) for r in rows2[: len(lines) - 5]] == [json.dumps(r, sort_keys=True) for r in rows[:-5]]
    assert len({res.row_key(r) for r in rows2}) == len(rows2)
    # same generated prompts on rerun: redone rows have the same needles as before
    before = {res.row_key(r): r["needle"] for r in rows}
    assert all(before[res.row_key(r)] == r["needle"] for r in rows2 if res.row_key(r) in before)

    # a third run finds nothing to do (does not even load the model)
    assert _cli([*args[:5], "600,700,650", *args[6:]]) == 0
    assert "resuming: 36 of 36" in capsys.readouterr().out


def test_cli_refuses_changed_settings(tiny_folder, tmp_path, capsys):
    out = str(tmp_path / "out")
    base = ["--model", tiny_folder, "--methods", "rope", "--lengths", "600", "--depths", "0", "--samples", "1", "--out", out,
            "--max-new-tokens", "2", "--no-progress"]
    assert _cli(base) == 0
    assert _cli([*base, "--rope-factor", "4"]) == 2
    assert "rope_factor: 2.0 (saved) vs 4.0 (now)" in capsys.readouterr().err
    assert len(res.read_rows(out)) == 1


def test_results_record_paths_relative_to_the_run(tiny_folder, tmp_path, monkeypatch, capsys):
    from gape.tasks.methods import MethodOptions
    from gape.tasks.niah.runner import RUN_FILE, BenchmarkConfig

    monkeypatch.chdir(os.path.dirname(tiny_folder))
    name = os.path.basename(tiny_folder)
    out = str(tmp_path / "out")
    base = ["--model", tiny_folder, "--methods", "rope", "--lengths", "600", "--depths", "0", "--samples", "1", "--out", out,
            "--max-new-tokens", "2", "--no-progress"]
    assert _cli(base) == 0
    with open(os.path.join(out, RUN_FILE)) as f:
        assert json.load(f)["model"] == name
    assert [r["model"] for r in res.read_rows(out)] == [name]
    # a folder whose run.json has the absolute path (as written before) still resumes
    with open(os.path.join(out, RUN_FILE)) as f:
        saved = json.load(f)
    with open(os.path.join(out, RUN_FILE), "w") as f:
        json.dump({**saved, "model": tiny_folder}, f)
    assert _cli(base) == 0
    assert "resuming: 1 of 1" in capsys.readouterr().out
    gates = os.path.join(os.getcwd(), "g", "gates.safetensors")
    cfg = BenchmarkConfig(model=tiny_folder, options=MethodOptions(gates=gates))
    assert cfg.fixed_settings()["gates"] == os.path.join("g", "gates.safetensors")
    assert cfg.options.describe("gape")["gates"] == os.path.join("g", "gates.safetensors")


def test_cli_rejects_bad_flags(capsys):
    assert _cli(["--methods", "rope,alibi", "--no-progress"]) == 2
    assert "argument --methods" in capsys.readouterr().err
    assert _cli(["--lengths", "1024,abc", "--no-progress"]) == 2


def _torchrun(nproc, argv, timeout=420):
    import subprocess
    import sys

    from dist_helpers import free_port

    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", "-m", "gape", "niah", *argv]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _without_seconds(rows):
    return sorted(json.dumps({k: v for k, v in r.items() if k != "seconds"}, sort_keys=True) for r in rows)


def _summary_without_seconds(out):
    with open(os.path.join(out, res.SUMMARY)) as f:
        return [{k: v for k, v in line.items() if k != "seconds"} for line in csv.DictReader(f)]


def test_niah_under_torchrun_splits_cells_and_merges_to_the_single_process_summary(tiny_folder, tmp_path):
    args = ["--model", tiny_folder, "--methods", "rope,gape", "--lengths", "600", "--depths", "0,0.5,1", "--samples", "1",
            "--task", "single", "--max-new-tokens", "3", "--threads", "1", "--no-progress"]
    single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
    assert _cli([*args, "--out", single]) == 0

    run = _torchrun(2, [*args, "--out", multi])
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    files = sorted(os.listdir(multi))
    assert "results.rank0.jsonl" in files and "results.rank1.jsonl" in files and res.RESULTS not in files
    per_rank = [res.read_rows_file(os.path.join(multi, f"results.rank{r}.jsonl")) for r in (0, 1)]
    assert [len(rows) for rows in per_rank] == [3, 3]  # 6 cells dealt round robin
    assert not {res.row_key(r) for r in per_rank[0]} & {res.row_key(r) for r in per_rank[1]}
    assert _without_seconds(res.read_rows(multi)) == _without_seconds(res.read_rows(single))
    assert _summary_without_seconds(multi) == _summary_without_seconds(single)
    assert run.stdout.count("task=single haystack=noise") == 1  # rank 0 prints the table once

    # rank 1 was interrupted after its first sample: a rerun redoes only its two missing ones
    path = os.path.join(multi, "results.rank1.jsonl")
    with open(path) as f:
        lines = f.readlines()
    with open(path, "w") as f:
        f.writelines(lines[:1])
    run = _torchrun(2, [*args, "--out", multi])
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "rank 0/2: resuming: 3 of 3" in run.stdout and "rank 1/2: resuming: 1 of 3" in run.stdout
    assert len(res.read_rows_file(path)) == 3
    assert _summary_without_seconds(multi) == _summary_without_seconds(single)
    # a single process on the same folder finds everything done
    assert _cli([*args, "--out", multi]) == 0
    assert _summary_without_seconds(multi) == _summary_without_seconds(single)


def test_default_task_is_ruler_single_needle_and_passkey_stays():
    """The default is a task the embedded model can do inside its window (RULER's
    single needle); pass key is one flag away."""
    import argparse

    from gape.tasks.niah.cli import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert config_from_args(parser.parse_args([])).task == "single"
    assert config_from_args(parser.parse_args(["--quick"])).task == "single"
    assert config_from_args(parser.parse_args(["--task", "passkey"])).task == "passkey"
