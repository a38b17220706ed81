"""Run a function on W local gloo processes (torch.multiprocessing, spawn) with a
hard timeout, so a test that would hang fails instead.

``run_ranks(fn, world, *args)`` calls ``fn(rank, world, *args)`` in each
process after ``init_process_group("gloo")`` on a free localhost port and
returns the per-rank results (plain Python values: numbers, strings, lists,
dicts), in rank order. A worker that raises returns ``{"error": ...}`` with
the exception's type and message.
"""

from __future__ import annotations

import os
import socket
import traceback
from datetime import timedelta

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, fn, args, queue, threads):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
        )
        result = fn(rank, world, *args)
    except BaseException as exc:  # reported to the parent, which fails the test
        result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    finally:
        queue.put((rank, result))
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world: int, *args, timeout: float = 180.0, threads: int = 1) -> list:
    """``[fn(0, world, *args), ..., fn(world - 1, world, *args)]``, each in its own process."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, queue, threads), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    results: dict = {}
    import queue as _queue
    import time

    deadline = time.monotonic() + timeout
    try:
        while len(results) < world:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{world - len(results)} of {world} ranks did not finish within {timeout:.0f} s (hang?)")
            try:
                rank, result = queue.get(timeout=min(left, 1.0))
            except _queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in results]
                if dead:
                    raise RuntimeError(f"ranks {dead} died without a result (exit codes {[p.exitcode for p in procs]})") from None
                continue
            results[rank] = result
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    return [results[r] for r in range(world)]
