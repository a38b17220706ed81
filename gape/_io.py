"""Atomic file writes shared by every long run (niah, synthetic, calibrate,
inspect, the kernel audit, the benchmarks, saved gates): write a temporary file
beside the target, fsync, then ``os.replace``, so an interrupted run leaves
either the old file or the new one, never half of one."""

from __future__ import annotations

import csv
import io
import json
import os


def write_atomic(path, data: str | bytes) -> None:
    tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
    mode = "wb" if isinstance(data, bytes) else "w"
    with open(tmp, mode, **({} if isinstance(data, bytes) else {"encoding": "utf-8", "newline": ""})) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_csv_atomic(path, fieldnames, rows) -> None:
    """``rows`` (dicts) as CSV with a header; keys outside ``fieldnames`` are an error."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(fieldnames))
    w.writeheader()
    w.writerows(rows)
    write_atomic(path, buf.getvalue())


def replace_atomic(path, write) -> None:
    """Call ``write(tmp_path)`` (a writer that only takes a path), then move the file into place."""
    tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)


def write_json_atomic(path: str, data, **dump_kwargs) -> None:
    write_atomic(path, json.dumps(data, **dump_kwargs))


def save_figure_atomic(fig, path: str, **savefig_kwargs) -> str:
    """Render a matplotlib figure to PNG bytes, then write them atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", **savefig_kwargs)
    write_atomic(path, buf.getvalue())
    return path
