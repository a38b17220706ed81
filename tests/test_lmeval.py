"""gape.tasks.lmeval: the registered lm-eval model ``gape``, the offline gape tasks, lm-eval's RULER
niah_single_1 with a local tokenizer folder, and ``gape eval`` passing lm-eval's CLI through."""

from __future__ import annotations

import glob
import json
import os

import pytest

pytest.importorskip("lm_eval")

from gape._io import relative_path  # noqa: E402
from gape.tasks.lmeval import TASKS_DIR, register, task_manager  # noqa: E402
from tiny_models import save_tiny_hf  # noqa: E402

# small prompts for the byte-level tiny tokenizer (one token per character)
META = {"max_seq_lengths": [1024], "depths": [0.0, 1.0], "samples": 1}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_hf(str(tmp_path_factory.mktemp("tiny") / "hf"))


def test_model_is_registered_and_applies_the_method(tiny_folder):
    from lm_eval.api.registry import get_model

    import gape
    from gape.tasks.lmeval.model import GapeLM, resolve_method

    register()
    assert get_model("gape") is GapeLM
    lm = GapeLM(pretrained=tiny_folder, method="rope", rope_type="yarn", rope_factor=4, device="cuda:0", max_length=1024)
    assert lm.gape_method == "yarn" and lm.model.model.rotary_emb.rope_type == "yarn"
    assert lm.model.config.rope_parameters["factor"] == 4.0 and str(lm.device) == "cpu"
    lm = GapeLM(pretrained=tiny_folder, method="gape", gape_lambda=0.1)
    from gape.hf import gape_config, is_patched

    assert is_patched(lm.model) and gape_config(lm.model).fixed_lambda == 0.1
    assert resolve_method("gape", "yarn") == "gape+yarn"
    with pytest.raises(ValueError, match="rope_type"):
        resolve_method("gape", "ntk")
    assert callable(gape.load_model)


def test_simple_evaluate_gape_tasks_offline(tiny_folder):
    from lm_eval import simple_evaluate

    register()
    # include_defaults=False: only the gape tasks, no scan of lm-eval's thousands of YAMLs
    tm = task_manager(include_defaults=False, metadata={"pretrained": tiny_folder, **META})
    out = simple_evaluate(
        model="gape",
        model_args={"pretrained": tiny_folder, "method": "linear", "rope_factor": 2.0, "max_length": 2048},
        tasks=["gape_passkey", "gape_niah_single"],
        limit=2,
        task_manager=tm,
        bootstrap_iters=0,
    )
    for task in ("gape_passkey", "gape_niah_single"):
        metrics = out["results"][task]
        assert 0.0 <= metrics["acc,none"] <= 1.0 and metrics["1024,none"] == metrics["acc,none"]
        samples = out["samples"][task]
        assert len(samples) == 2
        doc = samples[0]["doc"]
        assert doc["max_length"] == 1024 and doc["outputs"][0] in doc["input"]
        prompt = samples[0]["arguments"][0][0]
        assert prompt.startswith(doc["input"]) and prompt.rstrip().endswith(doc["gen_prefix"])


@pytest.fixture()
def index_only_ruler_defaults(monkeypatch):
    """lm-eval indexes its ~15k task YAMLs on every TaskManager (20 s on a busy CI core); keep
    only its RULER folder. The gape tasks still have to come from gape eval's include path."""
    from pathlib import Path

    from lm_eval.tasks import manager

    ruler = Path(manager.__file__).parent / "ruler"
    original = manager.TaskManager.__init__

    def init(self, *args, include_path=None, include_defaults=True, **kwargs):
        extra = [] if include_path is None else [include_path] if isinstance(include_path, (str, Path)) else list(include_path)
        original(self, *args, include_path=[ruler, *extra], include_defaults=False, **kwargs)

    monkeypatch.setattr(manager.TaskManager, "__init__", init)


def test_drop_unrun_lengths():
    from gape.tasks.lmeval.cli import drop_unrun_lengths

    results = {"results": {"t": {"acc,none": 0.5, "1024,none": 0.5, "1024_stderr,none": 0.1,
                                 "2048,none": -1, "2048_stderr,none": "N/A", "alias": "t"}}}
    assert drop_unrun_lengths(results)["results"]["t"] == {"acc,none": 0.5, "1024,none": 0.5, "1024_stderr,none": 0.1, "alias": "t"}


def test_gape_eval_cli_runs_ruler_and_gape_tasks_offline(tiny_folder, tmp_path, index_only_ruler_defaults, capsys):
    """lm-eval's own arguments pass through; gape_passkey is found without --include_path; lm-eval's
    RULER niah_single_1 (repeat haystack) runs offline with a local tokenizer folder."""
    from gape.cli import main

    assert os.path.isfile(os.path.join(TASKS_DIR, "gape_passkey.yaml"))
    out_dir = tmp_path / "eval"
    metadata = {"tokenizer": tiny_folder, **META}
    rc = main(
        [
            "eval",
            "--model", "gape",
            "--model_args", f"pretrained={tiny_folder},method=dynamic,rope_factor=2,max_length=2048",
            "--tasks", "gape_passkey,niah_single_1",
            "--limit", "2",
            "--device", "cpu",
            "--metadata", json.dumps(metadata),
            "--output_path", str(out_dir),
            "--log_samples",
        ]
    )
    assert rc == 0
    files = glob.glob(str(out_dir / "**" / "results_*.json"), recursive=True)
    assert len(files) == 1
    with open(files[0]) as f:
        results = json.load(f)
    assert results["config"]["model"] == "gape"
    # results are committed: the model folder, the tokenizer and lm-eval's task configs appear
    # relative (gape._io.relative_path), not as this machine's absolute paths
    strings = []

    def collect(v):
        if isinstance(v, dict):
            [collect(x) for x in v.values()]
        elif isinstance(v, list):
            [collect(x) for x in v]
        elif isinstance(v, str):
            strings.append(v)

    collect(results)
    assert not [v for v in strings if os.path.isabs(v) and os.path.exists(v) and v != "/"]
    assert results["config"]["model_args"]["pretrained"] == results["model_name"] == relative_path(tiny_folder)
    assert any(v.startswith("lm_eval") and v.endswith("niah_single_1.yaml") for v in strings)
    assert 0.0 <= results["results"]["gape_passkey"]["acc,none"] <= 1.0
    assert 0.0 <= results["results"]["niah_single_1"]["1024,none"] <= 1.0
    # lengths that were not run are absent, not placeholders (-1), in the file and the printed table
    for task in ("gape_passkey", "niah_single_1"):
        assert not [k for k, v in results["results"][task].items() if v == -1], results["results"][task]
        assert "4096,none" not in results["results"][task]
    printed = capsys.readouterr().out
    assert "1024" in printed and "-1.0000" not in printed and "|4096" not in printed.replace(" ", "")
    samples = glob.glob(str(out_dir / "**" / "samples_niah_single_1_*.jsonl"), recursive=True)
    assert len(samples) == 1
    with open(samples[0]) as f:
        docs = [json.loads(line)["doc"] for line in f]
    assert len(docs) == 2 and all(d["max_length"] == 1024 and d["outputs"][0] in d["input"] for d in docs)
