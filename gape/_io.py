"""Atomic file writes shared by every long run (niah, synthetic, calibrate,
inspect, the kernel audit, the benchmarks, saved gates): write a temporary file
beside the target, fsync, then ``os.replace``, so an interrupted run leaves
either the old file or the new one, never half of one."""

from __future__ import annotations

import csv
import io
import json
import os


def replace_atomic(path, write) -> None:
    """Call ``write(tmp_path)`` (any writer that takes a path), fsync, then move the file into place."""
    tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
    write(tmp)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def write_atomic(path, data: str | bytes) -> None:
    def write(tmp):
        if isinstance(data, bytes):
            with open(tmp, "wb") as f:
                f.write(data)
        else:
            with open(tmp, "w", encoding="utf-8", newline="") as f:
                f.write(data)

    replace_atomic(path, write)


def write_csv_atomic(path, fieldnames, rows, **writer_kwargs) -> None:
    """``rows`` (dicts) as CSV with a header; keys outside ``fieldnames`` are an error.

    ``writer_kwargs`` go to ``csv.DictWriter`` (e.g. ``lineterminator``)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(fieldnames), **writer_kwargs)
    w.writeheader()
    w.writerows(rows)
    write_atomic(path, buf.getvalue())


def write_json_atomic(path: str, data, **dump_kwargs) -> None:
    write_atomic(path, json.dumps(data, **dump_kwargs))


def save_figure_atomic(fig, path: str, **savefig_kwargs) -> str:
    """Render a matplotlib figure to PNG bytes, then write them atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", **savefig_kwargs)
    write_atomic(path, buf.getvalue())
    return path
