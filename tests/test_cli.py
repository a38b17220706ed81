"""One command line: every ``gape`` subcommand (but ``extrapolate``, checked in its own
tests) refuses each bad flag value at parse time with one line on stderr naming the
flag, exit status 2 and no traceback, and documents every flag with its default."""

import argparse
import importlib

import pytest
from test_bad_inputs import CLI, CLI_CASES, a_file  # noqa: F401 (a fixture)

from gape.cli import SUBCOMMANDS, Parser, main

# extrapolate and longctx check their flag values in their own tests; eval's are lm-eval's
CHECKED = [name for name in SUBCOMMANDS if name not in ("extrapolate", "longctx", "eval")]
DOCUMENTED = CHECKED + ["longctx"]
# flags whose value is any text (nothing to refuse at parse time)
FREE_TEXT = {("niah", "--gguf-file")}


def _actions(command):
    parser = Parser(prog=f"gape {command}")
    importlib.import_module(SUBCOMMANDS[command][0]).add_arguments(parser)
    return [a for a in parser._actions if a.option_strings and a.dest != "help"]


@pytest.mark.parametrize("command", CHECKED)
def test_every_flag_that_takes_a_value_has_a_bad_value_case(command):
    takes_value = {a.option_strings[-1] for a in _actions(command) if a.nargs != 0}
    covered = {flag for flag, _ in CLI[command]}
    assert takes_value - covered - {f for c, f in FREE_TEXT if c == command} == set()


@pytest.mark.parametrize("command", DOCUMENTED)
def test_every_flag_has_a_help_line_with_its_default(command):
    for action in _actions(command):
        if action.help == argparse.SUPPRESS:  # a hidden test hook, not a user flag
            continue
        assert action.help, f"gape {command} {action.option_strings[-1]} has no help"
        assert action.required or "default" in action.help, f"gape {command} {action.option_strings[-1]}: {action.help}"


@pytest.mark.parametrize("command,flag,value", CLI_CASES, ids=[f"{c}{f}={v}" for c, f, v in CLI_CASES])
def test_a_bad_flag_is_one_usage_line_naming_it(command, flag, value, a_file, tmp_path, capsys):
    value = value.replace("FILE", a_file).replace("MISSING", str(tmp_path / "missing"))
    extra = ["--out", str(tmp_path / "o.json")] if command == "audit-kernels" and flag != "--out" else []
    assert main([command, flag, value, *extra]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"gape {command}: error: argument {flag}"), lines[0]
    assert "Traceback" not in captured.err and captured.out == ""


def test_flag_conflicts_are_one_line_too(tmp_path, capsys):
    assert main(["calibrate", "--min-len", "2000", "--max-len", "1000"]) == 2
    assert capsys.readouterr().err.strip() == (
        "gape calibrate: error: argument --min-len: 2000 is above --max-len 1000 (see gape calibrate --help)")
    prompt = tmp_path / "p.txt"
    prompt.write_text("hello")
    assert main(["inspect", "--prompt", "hi", "--prompt-file", str(prompt)]) == 2
    assert capsys.readouterr().err.strip().startswith("gape inspect: error: argument --prompt-file: not allowed with --prompt")


def test_eval_reports_lm_evals_bad_flags_in_one_line(capsys):
    pytest.importorskip("lm_eval")
    assert main(["eval", "--limit", "many"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gape eval: error: argument") and "--limit" in lines[0], lines
