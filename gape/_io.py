"""Atomic file writes shared by every long run (niah, synthetic, calibrate,
inspect, the kernel audit, the benchmarks, saved gates): write a temporary file
beside the target, fsync, then ``os.replace``, so an interrupted run leaves
either the old file or the new one, never half of one. And the readers of what
those runs resume from: a JSON state file (:func:`read_json_object`) and an
append-only JSONL row file (:func:`read_jsonl_rows`); and the form in which
results record a path (:func:`relative_path`)."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import sys
import time
from collections.abc import Callable, Hashable
from typing import NamedTuple


def replace_atomic(path, write) -> None:
    """Call ``write(tmp_path)`` (any writer that takes a path), fsync, then move the file into place."""
    tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # a failed write leaves no temporary file behind
            os.remove(tmp)
        raise


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


def write_results_json(path: str, data) -> None:
    """A results/card file as every command writes it: one-space indent, sorted keys, atomic."""
    write_json_atomic(path, data, indent=1, sort_keys=True)


def save_figure_atomic(fig, path: str, **savefig_kwargs) -> str:
    """Render a matplotlib figure to PNG bytes, then write them atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", **savefig_kwargs)
    write_atomic(path, buf.getvalue())
    return path


class UnreadableJsonError(ValueError):
    """A file that should hold a JSON object and does not: not UTF-8, not JSON, or another
    JSON value. ``path`` is the file, ``reason`` what is wrong with it; the message names both,
    and each caller adds what the user can do about it."""

    def __init__(self, path, reason: str):
        self.path, self.reason = os.fspath(path), reason
        super().__init__(f"{self.path} is unreadable ({reason})")


def read_json_object(path) -> dict | None:
    """The JSON object in ``path``; None when there is no such file.

    Every state, settings and card file gape reads back is a JSON object; anything else in its
    place (a torn or edited file, another program's file) raises :class:`UnreadableJsonError`,
    never a guess, so a caller either refuses naming the file or knowingly starts afresh."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
        raise UnreadableJsonError(path, str(err)) from None
    if not isinstance(data, dict):
        raise UnreadableJsonError(path, f"expected a JSON object, got {type(data).__name__}")
    return data


class JsonlRows(NamedTuple):
    """What :func:`read_jsonl_rows` found: the rows kept, and what it passed over."""

    rows: list[dict]
    bad: int  # lines that are not JSON or fail the validity check
    duplicates: int  # valid rows whose key an earlier row already had


def read_jsonl_rows(path, valid: Callable[[object], bool], key: Callable[[dict], Hashable]) -> JsonlRows:
    """The valid rows of an append-only JSONL file, each ``key`` once.

    A run killed mid-write leaves a torn last line, and an edited file may hold
    anything: a line that is not JSON or for which ``valid(row)`` is false is
    counted in ``bad`` and skipped, so the caller redoes its unit rather than
    trusting half a row. A key seen again (a unit redone after a resume) keeps its
    first place and its last row. Blank lines are ignored; the file must exist.
    """
    rows: dict = {}
    bad = duplicates = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if not valid(row):
                bad += 1
                continue
            k = key(row)
            duplicates += k in rows
            rows[k] = row
    return JsonlRows(list(rows.values()), bad, duplicates)


# the checkout gape runs from (where pyproject.toml is), when it runs from one
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def relative_path(path) -> str:
    """``path`` as a results file records it: relative, so results name no folder of the machine
    that wrote them.

    An installed package's file relative to the import root holding it (``lm_eval/tasks/...``,
    even where the environment lies below the current directory); else relative to the current
    directory when the path lies below it (a run started from the repository root:
    ``benchmarks/results/...``); else to the checkout gape runs from, or to the deepest import
    root holding it; else relative to the current directory (``../data``). The result is a label for the record,
    equal for equal files from one place; a relative input is normalised the same way.
    """
    path = os.path.abspath(os.fspath(path))
    cwd = os.getcwd()

    def below(root: str) -> bool:
        return os.path.commonpath([path, root]) == root if os.path.isabs(root) else False

    def holds_cwd(root: str) -> bool:
        return os.path.isabs(root) and os.path.commonpath([cwd, root]) == root

    try:
        # An installed package's file first (``lm_eval/tasks/...``), even where its environment
        # lies below the current directory (a ``.venv`` in the checkout).
        imports = [r for r in map(os.path.abspath, filter(None, sys.path))
                   if below(r) and not holds_cwd(r)
                   and (os.path.basename(r) in ("site-packages", "dist-packages")
                        or os.path.commonpath([r, cwd]) != cwd)]
        if imports:
            return os.path.relpath(path, max(imports, key=len))
        if below(cwd):
            return os.path.relpath(path, cwd)
        roots = [r for r in (_REPO_ROOT, *sys.path) if below(r) and r != os.path.dirname(r)]
        return os.path.relpath(path, max(roots, key=len) if roots else cwd)
    except ValueError:  # another drive (Windows): no relative form
        return path


def relative_paths(data):
    """``data`` (parsed JSON) with each string that is an absolute path of this machine (the file
    exists) replaced by :func:`relative_path`'s form; other values as they are."""
    if isinstance(data, dict):
        return {k: relative_paths(v) for k, v in data.items()}
    if isinstance(data, list):
        return [relative_paths(v) for v in data]
    if isinstance(data, str) and os.path.isabs(data) and os.path.dirname(data) != data and "\n" not in data \
            and os.path.exists(data):
        return relative_path(data)
    return data


LOCK_FILE = ".gape.lock"


class FolderLockedError(RuntimeError):
    """Another process is writing to the output folder.

    ``path`` is the lock file, ``holder`` the pid it names ("unknown" when unreadable)."""

    def __init__(self, message: str, path: str = "", holder: str = "unknown"):
        super().__init__(message)
        self.path, self.holder = path, holder


@contextlib.contextmanager
def lock_folder(folder: str, what: str = "gape", name: str | None = None, wait: float = 0.0):
    """One writer per output folder: an exclusive ``flock`` on ``folder/.gape.lock``.

    A second run on the same folder fails with FolderLockedError naming the
    holder's pid, at once or, with ``wait`` (seconds), once the holder has kept
    the lock that long. The lock is the kernel's: it goes with the process, so a
    run killed with ``kill -9`` leaves no stale lock (the file stays, unlocked).
    ``name`` replaces the lock file's name (one lock per writer when several
    processes of one run write their own files in the folder).
    """
    import fcntl

    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name or LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.1)
                    continue
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                raise FolderLockedError(
                    f"{folder} is in use by another {what} run (pid {holder}); wait for it to finish or pass another --out",
                    path,
                    holder,
                ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the flock
