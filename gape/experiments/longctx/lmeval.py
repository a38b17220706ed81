"""The study's lm-eval unit: lm-eval's own RULER ``niah_single_1`` inside the window, run by
lm-eval (its prompts, its generation, its scoring) on an arm's evaluation model.

It is the one lm-eval task that runs without the Hugging Face hub: RULER builds its samples
from a tokenizer (to size them to the length) and a repeated-sentence haystack, so nothing is
downloaded. The study's tokenizer is saved to a temporary folder for it; the model lm-eval
drives is the arm's own (``study._eval_model``: YaRN, LoRA and gates in place), handed to
lm-eval's HFLM as an instantiated model.
"""

from __future__ import annotations

import contextlib
import math
import random
import tempfile

from ..._args import UsageError

TASK = "niah_single_1"
# RULER sizes a sample so that its text and the 128 tokens it lets the model generate fit the
# length; lm-eval then appends the answer prefix ("The special magic number for ... is", about
# 20 SmolLM2 tokens, 75 byte tokens). HFLM cuts the left of any prompt longer than its
# max_length minus the generated tokens: max_length = length + PROMPT_ROOM keeps every prompt
# whole (checked per sample).
PROMPT_ROOM = 256
RULER_SAMPLES = 500  # RULER generates this many samples per length; --limit N runs the first N


def require() -> None:
    """Refuse before any work when lm-eval (with RULER's extras) is not installed."""
    try:
        import lm_eval  # noqa: F401
        import nltk  # noqa: F401
        import wonderwords  # noqa: F401
    except ImportError as err:
        raise UsageError(f"--lmeval-samples: lm-evaluation-harness with RULER's extras is not installed ({err}): "
                         "pip install 'gape[eval]', or pass --lmeval-samples 0") from None


def _import_ruler():
    """lm-eval's RULER sample builder, imported without its download: on import it fetches
    NLTK's sentence splitter when missing, which only the essay haystacks use (not the repeated
    sentences of niah_single_1), and nothing here may download."""
    import io

    import nltk

    download = nltk.download
    nltk.download = lambda *args, **kwargs: False
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # lm-eval prints "Downloaded punkt_tab" whatever happened
            from lm_eval.tasks.ruler import niah_utils
    finally:
        nltk.download = download
    return niah_utils


@contextlib.contextmanager
def _rng_kept():
    """lm-eval seeds Python's, NumPy's and torch's generators; the study's own draws must not
    depend on whether an lm-eval unit ran before them."""
    import numpy as np
    import torch

    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


def _saved_tokenizer(tokenizer, folder: str):
    """``tokenizer`` saved to ``folder`` and loaded back as RULER loads it (``AutoTokenizer``);
    refused if the copy encodes differently (RULER would size its samples with another tokenizer)."""
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(folder)
    copy = AutoTokenizer.from_pretrained(folder)
    probe = "One of the special magic numbers for quiet-lake is: 1234567.\nThe grass is green. The sky is blue."
    if copy(probe).input_ids != tokenizer(probe).input_ids:
        raise UsageError("--lmeval-samples: the tokenizer saved for lm-eval's RULER encodes differently from the study's "
                         "tokenizer; pass --lmeval-samples 0")
    return copy


def task_manager(tokenizer_folder: str, length: int):
    """An lm-eval TaskManager over lm-eval's RULER folder only (indexing every task of lm-eval
    costs about 20 s), with the RULER metadata: the tokenizer and the one length."""
    from pathlib import Path

    from lm_eval.tasks import TaskManager, manager

    ruler = Path(manager.__file__).parent / "ruler"
    return TaskManager(include_path=[str(ruler)], include_defaults=False,
                       metadata={"tokenizer": tokenizer_folder, "max_seq_lengths": [length]})


def check(tokenizer, length: int) -> None:
    """Refuse ``length`` when RULER cannot build a sample that short for ``tokenizer`` (it
    needs the template, one needle, one haystack sentence and 128 tokens to generate), before
    any hour of the study is spent."""
    require()
    niah_utils = _import_ruler()

    with tempfile.TemporaryDirectory(prefix="gape-tokenizer-") as folder, _rng_kept():
        _saved_tokenizer(tokenizer, folder)
        try:
            niah_utils.niah_single_1(tokenizer=folder, max_seq_lengths=[length])
        except ValueError as err:
            raise UsageError(f"--lmeval-length {length}: lm-eval's RULER {TASK} builds no sample of that length for this "
                             f"tokenizer ({err})") from None


def harness(model, tokenizer, max_length: int):
    """lm-eval's HFLM on the arm's model. A PEFT model is unwrapped: its LoRA layers sit inside
    the transformers model (as do the gates), so the unwrapped model's forward is the arm's."""
    from lm_eval.models.huggingface import HFLM

    from gape.hf.compat import unwrap

    return HFLM(pretrained=unwrap(model), tokenizer=tokenizer, batch_size=1, max_length=max_length)


def run(model, tokenizer, length: int, samples: int) -> dict:
    """lm-eval's ``niah_single_1`` at ``length`` on the first ``samples`` of RULER's samples
    (``limit``: with one length in ``max_seq_lengths`` the first N samples are all of that
    length); the row of the unit, with every sample's response and score."""
    import lm_eval
    from lm_eval import simple_evaluate

    _import_ruler()
    if not 1 <= samples <= RULER_SAMPLES:
        raise UsageError(f"--lmeval-samples {samples}: RULER has {RULER_SAMPLES} samples per length")
    with tempfile.TemporaryDirectory(prefix="gape-tokenizer-") as folder, _rng_kept():
        tok = _saved_tokenizer(tokenizer, folder)
        lm = harness(model, tok, length + PROMPT_ROOM)
        results = simple_evaluate(model=lm, tasks=[TASK], task_manager=task_manager(folder, length), limit=samples,
                                  log_samples=True, bootstrap_iters=0)
    logged = sorted(results["samples"][TASK], key=lambda r: r["doc_id"])
    if len(logged) != samples:
        raise RuntimeError(f"lm-eval ran {len(logged)} samples of {TASK} at {length}, not {samples}")
    per = []
    for r in logged:
        context, gen = r["arguments"][0]
        prompt = int(lm.tok_batch_encode([context])[0].shape[1])
        if prompt + int(gen["max_gen_toks"]) > lm.max_length:
            raise RuntimeError(f"{TASK} sample {r['doc_id']}: a {prompt}-token prompt would be cut by lm-eval "
                               f"(max_length {lm.max_length}); raise PROMPT_ROOM")
        doc = r["doc"]
        per.append({"index": doc["index"], "ruler_length": doc["length"], "prompt_tokens": prompt, "answers": doc["outputs"],
                    "response": r["filtered_resps"][0], "score": float(r[str(length)])})
    scores = [p["score"] for p in per]
    score = float(results["results"][TASK][f"{length},none"])
    if not math.isclose(score, sum(scores) / len(scores), rel_tol=1e-9, abs_tol=1e-12):
        raise RuntimeError(f"lm-eval's {TASK} score {score} is not the mean of its per-sample scores")
    return {"task": TASK, "length": length, "samples": samples, "score": score, "stderr": stderr(scores),
            "lm_eval": lm_eval.__version__, "per_sample": per}


def stderr(scores: list[float]) -> float | None:
    """Standard error of the mean score (sample standard deviation / sqrt(n), as lm-eval's
    ``mean_stderr``); None for one sample. lm-eval reports none for RULER's own aggregation."""
    n = len(scores)
    if n < 2:
        return None
    mean = sum(scores) / n
    return math.sqrt(sum((x - mean) ** 2 for x in scores) / (n - 1) / n)
