"""Run the needle-in-a-haystack grid (methods x lengths x depths x samples), resumably.

Every finished sample is appended to ``results.jsonl`` at once; a rerun with the same output
folder skips the samples already there. The settings that change what a row means (model,
RoPE factor, gates, generation length, ...) are stored in ``run.json``; a rerun with
different ones is refused instead of mixing incomparable rows.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from itertools import groupby

import torch

from gape import _args as A
from gape._args import UsageError
from gape._io import UnreadableJsonError, lock_folder, read_json_object, relative_path, write_atomic
from . import results as res
from ..prompts import HAYSTACKS, TASKS, build_sample
from ..methods import MethodOptions, apply_method, parse_methods
from .scoring import string_match_all

RUN_FILE = "run.json"
MAX_TOKENS = 1 << 20  # gape._args.MAX_TOKENS


class RunMismatchError(UsageError):
    """The output folder holds rows produced with other settings."""


@dataclass
class BenchmarkConfig:
    methods: list[str] = field(default_factory=lambda: ["rope", "gape"])
    lengths: list[int] = field(default_factory=lambda: [1024, 4096, 8192])
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    samples: int = 3
    task: str = "passkey"
    haystack: str = "noise"
    out: str = "niah_results"
    seed: int = 0
    max_new_tokens: int = 32
    options: MethodOptions = field(default_factory=MethodOptions)
    model: str | None = None  # None: the embedded SmolLM2
    gguf_file: str | None = None
    chat_template: bool | None = None  # None: use it when the tokenizer has one
    dtype: str = A.DEFAULT_DTYPE  # the model's dtype: float32, bfloat16, float16, or auto (resolved by validate)

    def validate(self) -> None:
        self.methods = parse_methods(self.methods)
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.haystack not in HAYSTACKS:
            raise ValueError(f"haystack must be one of {HAYSTACKS}, got {self.haystack!r}")
        if not self.lengths or any(isinstance(n, bool) or not isinstance(n, int) or not 0 < n <= MAX_TOKENS for n in self.lengths):
            raise ValueError(f"lengths must be ints in [1, {MAX_TOKENS}], got {self.lengths!r}")
        if not self.depths or any(
            isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 <= float(d) <= 1.0 for d in self.depths
        ):
            raise ValueError(f"depths must be numbers in [0, 1], got {self.depths!r}")
        # a repeated length or depth is one cell, not extra samples
        self.lengths = list(dict.fromkeys(self.lengths))
        self.depths = list(dict.fromkeys(round(float(d), 6) for d in self.depths))
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 1:
            raise ValueError(f"samples must be an int >= 1, got {self.samples!r}")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if self.dtype not in A.DTYPE_CHOICES:
            raise ValueError(f"dtype must be one of {A.DTYPE_CHOICES}, got {self.dtype!r}")
        self.dtype = self.concrete_dtype()

    def concrete_dtype(self) -> str:
        """``dtype`` with ``auto`` resolved on this machine: a folder records the dtype its rows were computed in."""
        if self.dtype != "auto":
            return self.dtype
        from gape.hf.models import dtype_name

        return dtype_name("auto")

    def model_label(self) -> str:
        if self.model is None:
            from gape.hf.models import EMBEDDED_GGUF

            return f"embedded:{self.gguf_file or EMBEDDED_GGUF}"
        return relative_path(self.model) + (f"::{self.gguf_file}" if self.gguf_file else "")

    def fixed_settings(self) -> dict:
        """What must agree between runs that share an output folder."""
        o = self.options
        return {
            "model": self.model_label(),
            "max_new_tokens": self.max_new_tokens,
            "chat_template": self.chat_template,
            "rope_factor": o.rope_factor,
            "gates": relative_path(o.gates) if o.gates else None,
            "gape_lambda": o.gape_lambda,
            "distance": o.distance,
            # only when not float32, so folders written before the field existed still resume
            **({"dtype": self.concrete_dtype()} if self.concrete_dtype() != "float32" else {}),
        }


def _check_run_file(out: str, settings: dict, echo=print, write: bool = True) -> None:
    path = os.path.join(out, RUN_FILE)
    try:
        saved = read_json_object(path)
    except UnreadableJsonError as err:
        if res.read_rows(out):
            raise RunMismatchError(
                f"--out {out}: {err}, so the settings of the rows in {os.path.join(out, res.RESULTS)} are "
                f"unknown; delete {RUN_FILE} if they were made with these settings, or use another --out"
            ) from None
        if write:
            echo(f"warning: {path} was unreadable ({err.reason}) and no result rows exist; rewritten")
        saved = None
    if saved is not None:
        for k in ("model", "gates"):  # a folder written when they were absolute still resumes
            if isinstance(saved.get(k), str) and os.path.isabs(saved[k]):
                saved[k] = relative_path(saved[k])
        diff = {k: (saved.get(k), v) for k, v in settings.items() if saved.get(k) != v}
        if diff:
            details = ", ".join(f"{k}: {a!r} (saved) vs {b!r} (now)" for k, (a, b) in diff.items())
            raise RunMismatchError(f"--out {out} holds results of a run with other settings ({details}); use another --out")
        return
    if write:  # one writer (rank 0 under torchrun); every rank checks
        write_atomic(path, json.dumps(settings, indent=2) + "\n")


def _generate(model, tokenizer, ids: list[int], max_new_tokens: int) -> tuple[str, int]:
    from transformers import GenerationConfig

    eos = {tokenizer.eos_token_id}
    gen_eos = getattr(model.generation_config, "eos_token_id", None)
    eos |= set(gen_eos) if isinstance(gen_eos, (list, tuple)) else {gen_eos}
    eos = sorted(e for e in eos if e is not None)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos or None, pad_token_id=pad)
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    with torch.no_grad():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config)
    new = out[0, input_ids.shape[1] :]
    return tokenizer.decode(new, skip_special_tokens=True), int(new.numel())


def run_benchmark(cfg: BenchmarkConfig, model=None, tokenizer=None, *, progress: bool = True, echo=print) -> list[dict]:
    """Run every sample of ``cfg`` not yet in ``cfg.out``; write summary, plots and return the summary.

    ``model``/``tokenizer`` may be passed in (already loaded); otherwise ``cfg.model`` is loaded
    with :func:`gape.load_model` (only if some sample is left to run).

    Under ``torchrun --nproc-per-node N`` the samples are dealt round robin to the ranks
    (each loads its own model), every rank appends to its own ``results.rank<r>.jsonl``
    and skips the samples any file of the folder already holds, so resuming works per
    rank and with another N. After a barrier rank 0 writes the summary and plots from
    all files: the same summary a single process writes.
    """
    from gape.distributed.launch import data_parallel

    cfg.validate()
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise UsageError(f"--out {cfg.out} is a file, not a folder")
    with data_parallel() as procs:
        # one writer per file: rank r of a torchrun holds the lock of results.rank<r>.jsonl
        lock = None if procs.world_size == 1 else f".gape.rank{procs.rank}.lock"
        with lock_folder(cfg.out, "gape niah", name=lock):
            if cfg.options.gates and any(m.startswith("gape") for m in cfg.methods):
                from gape.hf import read_gates

                try:  # a bad gate file fails now, before the model is loaded
                    read_gates(cfg.options.gates)
                except (ValueError, OSError) as err:
                    raise UsageError(f"--gates: {err}") from None
            _check_run_file(cfg.out, cfg.fixed_settings(), echo, write=procs.rank == 0)
            _run_share(cfg, model, tokenizer, procs, progress=progress and procs.rank == 0, echo=echo)
            procs.barrier()
            summary = res.summarize(res.read_rows(cfg.out, warn=echo if procs.rank == 0 else None))
            if procs.rank == 0:
                _write_outputs(cfg, summary, echo)
    return summary


def max_tokens_in_memory(model, available: int | None = None) -> int:
    """The longest prompt whose KV cache and prefill activations fit in the memory
    available now (float32 estimate: 2 K/V per layer, hidden and MLP activations)."""
    from gape._machine import available_memory

    c = model.config
    layers, hidden = int(c.num_hidden_layers), int(c.hidden_size)
    heads = int(c.num_attention_heads)
    kv = int(getattr(c, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(c, "head_dim", None) or hidden // heads)
    inter = int(getattr(c, "intermediate_size", None) or 4 * hidden)
    elt = next(model.parameters()).element_size()
    per_token = 2 * layers * kv * head_dim * elt + 4 * (4 * hidden + 3 * inter)
    available = available_memory() if available is None else available
    return max(1, int(available // per_token))


def _check_lengths_fit(model, lengths: list[int]) -> None:
    limit = max_tokens_in_memory(model)
    too_long = [n for n in lengths if n > limit]
    if too_long:
        raise UsageError(
            f"--lengths {','.join(map(str, too_long))}: this machine's available memory holds prompts of at most "
            f"about {limit} tokens for this model (KV cache and activations); use shorter lengths"
        )


def _write_outputs(cfg: BenchmarkConfig, summary: list[dict], echo) -> None:
    from .plots import plot_all

    res.write_summary(cfg.out, summary)
    plot_all(cfg.out, summary, cfg.methods)
    echo(res.format_table(summary, cfg.methods))


def _run_share(cfg: BenchmarkConfig, model, tokenizer, procs, *, progress: bool, echo) -> None:
    """Run this rank's samples of the plan that no result file holds yet."""
    from tqdm.auto import tqdm

    tag = f"rank {procs.rank}/{procs.world_size}: " if procs.world_size > 1 else ""
    depths = [float(d) for d in cfg.depths]
    plan = [(m, n, d, i) for m in cfg.methods for n in cfg.lengths for d in depths for i in range(cfg.samples)]
    plan = [p for index, p in enumerate(plan) if procs.mine(index)]
    key = lambda m, n, d, i: res.row_key(  # noqa: E731
        {"method": m, "task": cfg.task, "haystack": cfg.haystack, "length": n, "depth": d, "sample": i, "seed": cfg.seed}
    )
    done = {res.row_key(r) for r in res.read_rows(cfg.out, warn=echo)}
    todo = [p for p in plan if key(*p) not in done]
    results_file = res.rank_results(procs.rank, procs.world_size)
    if todo and model is None:
        from gape.hf.models import load_model

        echo(f"{tag}loading {cfg.model_label()} in {cfg.concrete_dtype()} ...")  # what --dtype auto chose
        model, tokenizer = load_model(cfg.model, gguf_file=cfg.gguf_file, dtype=A.torch_dtype(cfg.dtype))
    if todo:
        _check_lengths_fit(model, sorted({n for _, n, _, _ in todo}))
    if len(todo) < len(plan):
        where = os.path.join(cfg.out, res.RESULTS if procs.world_size == 1 else "results*.jsonl")
        echo(f"{tag}resuming: {len(plan) - len(todo)} of {len(plan)} samples already in {where}")

    if todo:  # fail now, not after hours, if the shortest length cannot hold the prompt
        try:
            build_sample(tokenizer, task=cfg.task, length=min(n for _, n, _, _ in todo), depth=0.0, seed=cfg.seed,
                         haystack=cfg.haystack, use_chat_template=cfg.chat_template)
        except ValueError as err:
            raise UsageError(f"--lengths: {err}") from None
    bar = tqdm(total=len(plan), initial=len(plan) - len(todo), desc="niah", unit="sample", disable=not progress, dynamic_ncols=True)
    try:
        for method, group in groupby(todo, key=lambda p: p[0]):
            restore = apply_method(model, method, cfg.options)
            try:
                for _, length, depth, index in group:
                    sample = build_sample(
                        tokenizer,
                        task=cfg.task,
                        length=length,
                        depth=depth,
                        index=index,
                        seed=cfg.seed,
                        haystack=cfg.haystack,
                        use_chat_template=cfg.chat_template,
                    )
                    start = time.perf_counter()
                    response, new_tokens = _generate(model, tokenizer, sample.input_ids, cfg.max_new_tokens)
                    seconds = time.perf_counter() - start
                    score = string_match_all(response, sample.answers)
                    row = {
                        "method": method,
                        "task": cfg.task,
                        "haystack": cfg.haystack,
                        "length": length,
                        "depth": depth,
                        "sample": index,
                        "seed": cfg.seed,
                        "needle": sample.needles[0],
                        "answers": sample.answers,
                        "response": response,
                        "score": score,
                        "correct": score == 1.0,
                        "seconds": round(seconds, 4),
                        "prompt_tokens": len(sample.input_ids),
                        "new_tokens": new_tokens,
                        "needle_position": sample.needle_position,
                        "actual_depth": round(sample.actual_depth, 4),
                        "chat_template": sample.chat_template,
                        "model": cfg.model_label(),
                        **cfg.options.describe(method),
                    }
                    res.append_row(cfg.out, row, results_file)
                    bar.update(1)
                    bar.set_postfix(method=method, length=length, depth=depth, ok=int(row["correct"]))
            finally:
                restore()
    finally:
        bar.close()
