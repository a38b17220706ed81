"""The rows of a ``gape extrapolate`` folder: their file names, what a valid row holds, and
reading and writing them. Shared by the runner that writes them and the report that
reads them (so neither imports the other at load time)."""

from __future__ import annotations

import json
import math
import os

from gape._args import UsageError
from gape._io import UnreadableJsonError, read_json_object, read_jsonl_rows, write_atomic

from .models import GAPE_FORMS, SCHEMES


ROWS = "rows.jsonl"
CONFIG = "config.json"
# config keys that may grow between invocations on one folder (the queue, not the numbers)
QUEUE_KEYS = ("seeds", "schemes", "forms", "tasks", "bases")


ROW_FIELDS = {"run": str, "task": str, "scheme": str, "gape": str, "start": str, "variant": str, "seed": int,
              "train_length": int, "length": int, "multiple": int, "entropy": list}
METRIC_FIELD = {"retrieval": "accuracy", "lm": "perplexity"}


def _valid_row(row, config: dict | None) -> bool:
    """A row of this command with every field it needs; of ``config``'s experiment when given."""
    if not isinstance(row, dict) or any(not isinstance(row.get(k), t) or isinstance(row.get(k), bool) for k, t in ROW_FIELDS.items()):
        return False
    if row["scheme"] not in SCHEMES or row["gape"] not in GAPE_FORMS or row["seed"] < 0:
        return False
    metric = row.get(METRIC_FIELD.get(row["task"], ""))
    if not isinstance(metric, (int, float)) or isinstance(metric, bool) or not math.isfinite(metric):
        return False
    if config is not None:
        t = config.get(row["task"])
        if not isinstance(t, dict) or row["train_length"] != t.get("train_length") or row["multiple"] not in t.get("multiples", ()):
            return False
    return row["length"] == row["multiple"] * row["train_length"]


def read_config(folder: str) -> dict:
    """``folder``'s experiment config, refused (naming the file) when the folder holds none."""
    path = os.path.join(folder, CONFIG)
    try:
        config = read_json_object(path)
    except UnreadableJsonError as err:
        raise UsageError(f"{err}; not a gape extrapolate folder") from None
    if config is None:
        raise UsageError(f"{folder} is not a gape extrapolate folder ({CONFIG} is missing); run `gape extrapolate --out` on it first")
    if not all(isinstance(config.get(k), dict) for k in ("retrieval", "lm")) or "tasks" not in config or "seeds" not in config:
        raise UsageError(f"{path} is not the config of a gape extrapolate folder")
    return config


# what the report reads of a run's record (``runner.run_job`` writes it)
RECORD_FIELDS = {"run": str, "job": dict, "variant": str, "gate_curve": list, "mask_strength": dict}
JOB_FIELDS = {"task": str, "scheme": str, "gape": str, "seed": int}


def read_record(out: str, run_id: str) -> dict:
    """The record ``out/runs/<run_id>.json`` of a finished run (its gate curve, loss curve, job),
    refused naming the file when missing or not a record: the run's row says it exists."""
    path = os.path.join(out, "runs", run_id + ".json")
    try:
        record = read_json_object(path)
    except UnreadableJsonError as err:
        raise UsageError(f"{err}; delete it and its rows in {os.path.join(out, ROWS)} to train that run again") from None
    if record is None:
        raise UsageError(f"{path} is missing although {os.path.join(out, ROWS)} has rows of run {run_id}; "
                         "delete those rows to train it again")
    if any(not isinstance(record.get(k), t) for k, t in RECORD_FIELDS.items()) or record["run"] != run_id \
            or any(not isinstance(record["job"].get(k), t) for k, t in JOB_FIELDS.items()):
        raise UsageError(f"{path} is not the record of a gape extrapolate run; delete it and its rows in "
                         f"{os.path.join(out, ROWS)} to train that run again")
    return record


def _run_length(row: dict) -> tuple:
    return (row["run"], row["length"])


def read_rows(out: str, warn=None, config: dict | None = None) -> list[dict]:
    """The valid rows of ``out/rows.jsonl``, each (run, length) once, complete runs only.

    A line that is not JSON (torn by a crash or an editor), a row without the fields of
    this command or of another experiment (``config``: its training lengths and
    evaluation multiples), and every row of a run missing some of its lengths are
    skipped; ``warn`` (a callable, e.g. ``print``) gets one message naming the file and
    counting them. The skipped runs are simply trained again."""
    path = os.path.join(out, ROWS)
    if not os.path.exists(path):
        return []
    found, bad, duplicates = read_jsonl_rows(path, lambda row: _valid_row(row, config), _run_length)
    rows = {_run_length(r): r for r in found}
    lengths: dict[str, set] = {}
    for run_id, length in rows:
        lengths.setdefault(run_id, set()).add(length)
    partial = set()
    for run_id, have in lengths.items():
        first = rows[(run_id, next(iter(have)))]
        expected = (config or {}).get(first["task"], {}).get("multiples")
        if expected is not None and have != {m * first["train_length"] for m in expected}:
            partial.add(run_id)
    incomplete = sum(1 for (run_id, _) in rows if run_id in partial)
    if warn is not None and (bad or duplicates or incomplete):
        parts = [f"skipped {bad} torn or foreign row(s)"] if bad else []
        parts += [f"skipped {incomplete} row(s) of {len(partial)} incomplete run(s)"] if incomplete else []
        parts += [f"counted {duplicates} duplicated row(s) once"] if duplicates else []
        warn(f"warning: {path}: " + " and ".join(parts) + (" (those runs are trained again)" if bad or incomplete else ""))
    return [r for (run_id, _), r in rows.items() if run_id not in partial]


def write_rows(out: str, rows: list[dict]) -> None:
    write_atomic(os.path.join(out, ROWS), "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def _same_experiment(a: dict, b: dict) -> list[str]:
    return sorted(k for k in set(a) | set(b) if k not in QUEUE_KEYS and a.get(k) != b.get(k))


def _merge_queue(old: dict, new: dict) -> dict:
    merged = dict(new)
    for k in QUEUE_KEYS:
        seen = list(old.get(k, []))
        merged[k] = seen + [v for v in new[k] if v not in seen]
    return merged
