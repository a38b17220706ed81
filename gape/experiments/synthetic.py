"""``gape synthetic``: length extrapolation of tiny models trained from scratch.

Tiny Llama models (random init) learn passkey retrieval at training length ``T``
and are evaluated at ``T, 2T, 4T, 8T`` (``16T`` with ``--full``). Methods:

- ``rope``: plain RoPE (SDPA).
- ``gape``: RoPE + learned GAPE gates (query gate lambda, key gate pi; docs/maths.md).
- ``fixed``: RoPE + a constant forgetting rate lambda and no key gate (pi = 0):
  GAPE without its content-dependent parts.

Every method sees the same data, the same base initialisation and the same steps.

The task: ``BOS, filler..., KEY d1 d2 d3 d4, filler..., QUERY d1 d2 d3 d4``, where
the ``d`` are 4 distinct digits from a digit vocabulary, filler is drawn from 48
distractor tokens and the needle (``KEY d1..d4``) sits at a random depth. The loss
covers the 4 answer tokens only. Accuracy is greedy exact match of all 4 digits
(teacher-forced argmax at each answer position equals greedy decoding: each step's
input is correct exactly when the previous prediction was).

RoPE theta defaults to 1e6. In the model's 32-wide heads, 7 of the 16 rotary
frequencies then turn by less than a radian over 8T = 2048 tokens (2 of 16 at
theta 1e4): they carry content, not position, at every evaluated length, and
GAPE's distance bias supplies the locality (much as ALiBi does), so retrieval
holds far past ``T``. Plain RoPE at the same base still fails beyond ``2T``.
With theta 1e4 GAPE's lead fades by 8T (results of both bases are under
``benchmarks/results/``).

Attention sharpness: the entropy (nats) of the attention row of the ``QUERY``
position, per layer, averaged over heads and samples.
"""

from __future__ import annotations

import math
import os
import time

import torch

from gape import _args as A
from gape._io import UnreadableJsonError, lock_folder, read_json_object, save_figure_atomic, write_results_json
from gape.core.api import BACKENDS
from gape._threads import set_threads

# vocabulary
PAD, BOS, KEY, QUERY = 0, 1, 2, 3
NUM_DIGITS, NUM_FILLER = 10, 48
DIGIT0 = 4
FILLER0 = DIGIT0 + NUM_DIGITS
VOCAB = FILLER0 + NUM_FILLER  # 62
ANSWER_LEN = 4
# BOS + needle (KEY + 4 digits) + QUERY + answer
MIN_LENGTH = 1 + (1 + ANSWER_LEN) + 1 + ANSWER_LEN
METHODS = ("rope", "gape", "fixed")


# --------------------------------------------------------------------------- data


def make_batch(gen: torch.Generator, batch: int, length: int, depths: torch.Tensor | None = None):
    """A batch of passkey sequences of exactly ``length`` tokens.

    Returns ``(tokens [B, L] int64, digits [B, 4] int64 (token ids), needle_pos [B] int64)``,
    ``needle_pos`` being the index of the ``KEY`` token. ``depths`` (in [0, 1]) places the
    needle; random when None.
    """
    if length < MIN_LENGTH:
        raise ValueError(f"length must be >= {MIN_LENGTH}, got {length}")
    tokens = torch.randint(FILLER0, FILLER0 + NUM_FILLER, (batch, length), generator=gen)
    digits = torch.argsort(torch.rand(batch, NUM_DIGITS, generator=gen), dim=1)[:, :ANSWER_LEN] + DIGIT0
    if depths is None:
        depths = torch.rand(batch, generator=gen)
    # needle start slots: 1 .. length - 6 - 5 (inclusive), so the haystack holds it whole
    free = length - MIN_LENGTH
    needle_pos = 1 + torch.round(depths.clamp(0, 1) * free).long()
    tokens[:, 0] = BOS
    rows = torch.arange(batch)
    tokens[rows, needle_pos] = KEY
    for i in range(ANSWER_LEN):
        tokens[rows, needle_pos + 1 + i] = digits[:, i]
    tokens[:, length - ANSWER_LEN - 1] = QUERY
    tokens[:, length - ANSWER_LEN :] = digits
    return tokens, digits, needle_pos


# --------------------------------------------------------------------------- models

THETA = 1e6  # RoPE base; why 1e6 and not 1e4: module docstring


def model_config(seq_len: int, layers: int = 2, hidden: int = 128, heads: int = 4, theta: float = THETA):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=64,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max(seq_len, 256),
        rope_parameters={"rope_type": "default", "rope_theta": float(theta)},
        tie_word_embeddings=False,
        attention_dropout=0.0,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=None,
    )


def gape_config_for(method: str, alpha: float = 1.0, fixed_lambda: float | None = None, backend: str = "torch",
                    key_bias: float = -3.0):
    """The GapeConfig of a method (None for ``rope``)."""
    from gape.hf.config import GapeConfig

    if method == "rope":
        return None
    if method == "gape":
        return GapeConfig(alpha_init=alpha, key_bias_init=key_bias, backend=backend, learned_pi=True, identity_shortcut=False)
    if method == "fixed":
        lam = alpha * math.log(2.0) if fixed_lambda is None else fixed_lambda  # gape's lambda at init
        return GapeConfig(fixed_lambda=lam, learned_pi=False, backend=backend, trainable=False, identity_shortcut=False)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def build_model(method: str, seed: int, max_len: int, alpha: float = 1.0, fixed_lambda=None, backend="torch", theta=THETA,
                key_bias: float = -3.0):
    """A randomly initialised tiny Llama (same base weights for every method at one seed)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(model_config(max_len, theta=theta))
    model.config._attn_implementation = "sdpa"
    model.set_attn_implementation("sdpa")
    cfg = gape_config_for(method, alpha, fixed_lambda, backend, key_bias)
    if cfg is not None:
        from gape import hf

        hf.patch(model, cfg)
    return model


def answer_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """Logits ``[B, 4, V]`` at the positions that predict the 4 answer digits."""
    out = model(input_ids=tokens, logits_to_keep=ANSWER_LEN + 1, use_cache=False)
    return out.logits[:, :ANSWER_LEN]


def answer_loss(model, tokens: torch.Tensor) -> torch.Tensor:
    logits = answer_logits(model, tokens)
    target = tokens[:, -ANSWER_LEN:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1))


def exact_match(logits: torch.Tensor, digits: torch.Tensor) -> torch.Tensor:
    """Per sample: 1.0 when the greedy answer equals ``digits`` at every position."""
    return (logits.argmax(-1) == digits).all(dim=-1).float()


# --------------------------------------------------------------------------- training


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def optimizer_step(model, opt, loss) -> float:
    """One AdamW step with global-norm clipping at 1.0 (every from-scratch trainer here); returns the loss."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.item()


class LossLog:
    """Mean training loss over each ``every`` steps, kept as ``curve = [[step, mean]]`` and logged."""

    def __init__(self, steps: int, every: int, log, indent: str = "  "):
        self.steps, self.every, self.log, self.indent = steps, every, log, indent
        self.curve: list[list[float]] = []
        self._window: list[float] = []

    def add(self, step: int, loss: float) -> None:
        self._window.append(loss)
        if (step + 1) % self.every == 0 or step + 1 == self.steps:
            self.curve.append([step + 1, sum(self._window) / len(self._window)])
            self.log(f"{self.indent}step {step + 1:5d}/{self.steps}  loss {self.curve[-1][1]:.4f}")
            self._window = []


def train(model, *, steps: int, train_len: int, seed: int, batch: int = 32, lr: float = 1e-3, gate_lr: float | None = None,
          warmup: int = 50, min_len: int = 32, log_every: int = 100, log=print, on_step=None) -> list[list[float]]:
    """Train on passkey batches, one length per batch drawn uniformly from ``min_len..train_len``.

    The data stream depends only on ``seed`` (the same for every method). ``on_step()``,
    if given, is called after every step (a progress bar's update).
    Returns ``[[step, mean loss over the last log_every steps], ...]``.
    """
    gate_ids = {id(p) for _, g in _gates(model) for p in g.parameters()}
    base = [p for p in model.parameters() if p.requires_grad and id(p) not in gate_ids]
    gates = [p for p in model.parameters() if p.requires_grad and id(p) in gate_ids]
    groups = [{"params": base, "lr_scale": 1.0}]
    if gates:
        groups.append({"params": gates, "lr_scale": (gate_lr / lr) if gate_lr else 1.0, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed * 1000003 + 17)
    model.train()
    losses = LossLog(steps, log_every, log)
    lo = min(max(MIN_LENGTH + 4, min_len), train_len)
    for step in range(steps):
        length = int(torch.randint(lo, train_len + 1, (1,), generator=gen))
        tokens, _, _ = make_batch(gen, batch, length)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup) * g["lr_scale"]
        losses.add(step, optimizer_step(model, opt, answer_loss(model, tokens)))
        if on_step is not None:
            on_step()
    model.eval()
    return losses.curve


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model, length: int, samples: int, seed: int, *, batch_tokens: int = 65536, entropy_samples: int = 32):
    """``(accuracy, per-layer entropy list)`` at ``length`` with the needle at random depths.

    Eval data depends only on ``(seed, length)``; depths are evenly spread over [0, 1]
    in a shuffled order so every depth band is covered.
    """
    from gape.hf.attention_probe import capture_attention, entropy

    gen = torch.Generator().manual_seed(seed * 7919 + length)
    depths = (torch.arange(samples, dtype=torch.float64) + torch.rand(samples, generator=gen, dtype=torch.float64)) / samples
    depths = depths[torch.randperm(samples, generator=gen)].float()
    bs = max(1, min(samples, batch_tokens // length))
    correct, ent_sum, ent_n = 0.0, None, 0
    qrow = length - ANSWER_LEN - 1
    for start in range(0, samples, bs):
        d = depths[start : start + bs]
        tokens, digits, _ = make_batch(gen, len(d), length, d)
        if ent_n < entropy_samples:
            with capture_attention(model, rows=[qrow]) as rec:
                logits = answer_logits(model, tokens)
            ent = torch.stack([entropy(rec[i]["probs"][:, :, 0]).mean(1).sum(0) for i in sorted(rec)])
            ent_sum = ent if ent_sum is None else ent_sum + ent
            ent_n += len(d)
        else:
            logits = answer_logits(model, tokens)
        correct += float(exact_match(logits, digits).sum())
    return correct / samples, ([] if ent_sum is None else (ent_sum / ent_n).tolist())


# --------------------------------------------------------------------------- results


def aggregate(results: dict) -> None:
    """Fill ``methods`` (mean accuracy over finished seeds), ``entropy`` and ``seeds_done`` from ``runs``."""
    methods, ent, done = {}, {}, {}
    for m in results["config"]["methods"]:
        runs = [r for k, r in results["runs"].items() if k.split("/")[0] == m]
        if not runs:
            continue
        lengths = runs[0]["accuracy"].keys()
        methods[m] = {L: sum(r["accuracy"][L] for r in runs) / len(runs) for L in lengths}
        ent[m] = {}
        for L in lengths:
            layers = len(runs[0]["entropy"][L])
            per_layer = [sum(r["entropy"][L][i] for r in runs) / len(runs) for i in range(layers)]
            ent[m][L] = {"per_layer": per_layer, "mean": sum(per_layer) / max(1, layers)}
        done[m] = len(runs)
    results["methods"], results["entropy"], results["seeds_done"] = methods, ent, done


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    T = results["train_len"]
    for m, accs in results["methods"].items():
        lens = sorted(int(L) for L in accs)
        ax.plot(lens, [accs[str(L)] for L in lens], marker="o", label=f"{m} ({results['seeds_done'][m]} seed(s))")
        ent = results["entropy"][m]
        ax2.plot(lens, [ent[str(L)]["mean"] for L in lens], marker="o", label=m)
    for a in (ax, ax2):
        a.set_xscale("log", base=2)
        a.axvline(T, color="grey", ls=":", lw=1)
        a.set_xlabel("sequence length (tokens)")
        a.legend()
    ax.set_ylabel("passkey exact match")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"tiny Llama trained at T={T}")
    ax2.set_ylabel("entropy of query-row attention (nats)")
    ax2.set_title("attention entropy (mean over layers)")
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=110)
    plt.close(fig)


def table(results: dict) -> str:
    methods = results["methods"]
    if not methods:
        return "(no finished runs)"
    lens = sorted({int(L) for a in methods.values() for L in a})
    head = f"{'method':8s} " + " ".join(f"{L:>7d}" for L in lens) + "   | entropy " + " ".join(f"{L:>6d}" for L in lens)
    lines = [head, "-" * len(head)]
    for m, accs in methods.items():
        ent = results["entropy"][m]
        lines.append(
            f"{m:8s} " + " ".join(f"{accs[str(L)]:7.2f}" for L in lens) + "   |         "
            + " ".join(f"{ent[str(L)]['mean']:6.2f}" for L in lens)
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI

QUICK = dict(train_len=128, steps=600, samples=100)
DEFAULT = dict(train_len=256, steps=1500, samples=200)


def add_arguments(parser) -> None:
    parser.add_argument("--quick", action="store_true", help="small run (T=128, 600 steps, 100 samples): a few minutes (default: off)")
    parser.add_argument("--full", action="store_true", help="also evaluate at 16T (default: off)")
    parser.add_argument("--train-len", type=A.integer(32, A.MAX_TOKENS), default=None, help="training length T (default 256; 128 with --quick)")
    parser.add_argument("--eval-lens", type=A.int_list(MIN_LENGTH, A.MAX_TOKENS), default=None, help="comma-separated evaluation lengths (default T,2T,4T,8T[,16T])")
    parser.add_argument("--steps", type=A.integer(1), default=None, help="training steps (default 1500; 600 with --quick)")
    parser.add_argument("--samples", type=A.integer(1), default=None, help="eval samples per length (default 200; 100 with --quick)")
    parser.add_argument("--seed", type=A.seed, default=0, help="first seed, of the data, initialisation and evaluation (default 0)")
    parser.add_argument("--seeds", type=A.integer(1, 1000), default=1, help="number of seeds: seed, seed+1, ... (default 1)")
    parser.add_argument("--methods", type=A.choice_list(METHODS), default=list(METHODS), help=f"comma-separated from {','.join(METHODS)} (default all)")
    parser.add_argument("--alpha", type=A.number(0.0), default=1.0, help="GAPE per-head lambda scale alpha at init (default 1)")
    parser.add_argument("--fixed-lambda", type=A.number(0.0), default=None, help="lambda of 'fixed' (default: gape's initial lambda, alpha*ln 2)")
    parser.add_argument("--key-bias", type=A.number(), default=-3.0,
                        help="GAPE key-gate bias at init, pi = sigmoid(key_bias) (default -3)")
    parser.add_argument("--gate-lr", type=A.number(0.0, above=True), default=None, help="learning rate of the gate parameters (default: --lr)")
    parser.add_argument("--lr", type=A.number(0.0, above=True), default=1e-3, help="AdamW learning rate (default 0.001)")
    parser.add_argument("--batch", type=A.integer(1, 65536), default=32, help="training batch size (default 32)")
    parser.add_argument("--theta", type=A.number(0.0, above=True), default=THETA,
                        help="RoPE theta (default 1e6, as in Qwen2/Llama-3-class models; GAPE extrapolated to 8T at 1e6, "
                        "not at 1e4; 100 broke both methods)")
    parser.add_argument("--backend", choices=BACKENDS, default="torch", help="GAPE attention backend for training and evaluation (default torch)")
    parser.add_argument("--threads", type=A.threads, default=1, help="torch CPU threads; 1 is fastest on a busy machine (default 1)")
    parser.add_argument("--out", type=A.out_folder, default="benchmarks/results/synthetic", help="output folder for results.json and accuracy.png (default benchmarks/results/synthetic)")
    parser.add_argument("--force", action="store_true", help="discard results in --out made with a different config (default: refuse them)")
    parser.add_argument("--merge", nargs="+", metavar="DIR", default=None, type=A.in_folder_with("results.json"),
                        help="instead of training: merge the runs in DIR/results.json (same experiment, e.g. other "
                        "seeds run as separate processes) into --out, then re-aggregate (default: train)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (default: a bar with an ETA)")


def resolve(args) -> dict:
    preset = QUICK if args.quick else DEFAULT
    T = args.train_len or preset["train_len"]
    if T < 32:
        raise ValueError(f"--train-len must be >= 32, got {T}")
    if args.eval_lens:
        lens = A.int_list(MIN_LENGTH, A.MAX_TOKENS)(args.eval_lens) if isinstance(args.eval_lens, str) else list(args.eval_lens)
    else:
        lens = [T, 2 * T, 4 * T, 8 * T] + ([16 * T] if args.full else [])
    if any(L < MIN_LENGTH for L in lens):
        raise ValueError(f"--eval-lens must all be >= {MIN_LENGTH}, got {lens}")
    methods = args.methods if isinstance(args.methods, list) else [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ValueError(f"--methods must be a comma-separated list from {METHODS}, got {args.methods!r}")
    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    return {
        "train_len": T, "eval_lens": lens, "steps": args.steps or preset["steps"],
        "samples": args.samples or preset["samples"], "seeds": [args.seed + i for i in range(args.seeds)],
        "methods": methods, "alpha": args.alpha, "key_bias": args.key_bias, "fixed_lambda": args.fixed_lambda, "gate_lr": args.gate_lr,
        "lr": args.lr, "batch": args.batch, "theta": args.theta, "backend": args.backend,
        "model": {"layers": 2, "hidden": 128, "heads": 4, "vocab": VOCAB, "digits": NUM_DIGITS, "filler": NUM_FILLER},
        "warmup": 50, "min_train_len": 32,
    }


# config keys added after results were first written, with the value older files imply
_CONFIG_DEFAULTS = {"key_bias": 0.0}


def _same_experiment(a: dict, b: dict) -> bool:
    # methods and seeds may grow between runs; everything else must match
    keys = set(a) | set(b)
    return all(a.get(k, _CONFIG_DEFAULTS.get(k)) == b.get(k, _CONFIG_DEFAULTS.get(k)) for k in keys - {"methods", "seeds"})


def _methods_and_seeds(old: dict, new: dict) -> dict:
    """The methods and seeds of two configs of one experiment together (they grow between runs)."""
    return {"methods": list(dict.fromkeys(old.get("methods", []) + new["methods"])),
            "seeds": sorted(set(old.get("seeds", [])) | set(new["seeds"]))}


def merge(out: str, sources: list[str]) -> dict:
    """Add the runs of ``sources`` (folders of results.json of the same experiment) to ``out``'s.

    Without a ``results.json`` in ``out`` the first source's is the start.
    """
    path = os.path.join(out, "results.json")
    if not os.path.exists(path):
        if not sources:
            raise A.UsageError(f"nothing to merge: {path} does not exist and no source folder was given")
        results = _read_results(os.path.join(sources[0], "results.json"))
        sources = sources[1:]
        os.makedirs(out, exist_ok=True)
    else:
        results = _read_results(path)
    for src in sources:
        other = _read_results(os.path.join(src, "results.json"))
        if other is None:
            raise A.UsageError(f"--merge {src}: {src}/results.json does not exist")
        if not _same_experiment(results["config"], other["config"]):
            raise A.UsageError(f"{src}/results.json is a different experiment from {path}: its config differs beyond methods and seeds")
        clash = sorted(set(results["runs"]) & set(other["runs"]))
        if clash:
            raise A.UsageError(f"{src}/results.json repeats runs already in {path}: {clash}")
        results["runs"].update(other["runs"])
        results["timings"].update(other.get("timings", {}))
        results["config"].update(_methods_and_seeds(results["config"], other["config"]))
    aggregate(results)
    write_results_json(path, results)
    plot(results, os.path.join(out, "accuracy.png"))
    return results


def _read_results(path: str, force: bool = False) -> dict | None:
    """``results.json`` (None when absent); an unreadable one is an error naming
    it, or, with ``force``, discarded."""
    try:
        results = read_json_object(path)
        if results is not None and not isinstance(results.get("runs", {}), dict):
            raise UnreadableJsonError(path, 'not a results object: "runs" is not an object')
        return results
    except UnreadableJsonError as err:
        if force:
            print(f"warning: {err}; discarded (--force)")
            return None
        raise A.UsageError(f"{err}; fix or delete it, or pass --force to start afresh") from None


def run(args) -> int:
    with lock_folder(args.out, "gape synthetic"):
        return _run_locked(args)


def _run_locked(args) -> int:
    from tqdm.auto import tqdm

    if args.merge:
        print(table(merge(args.out, args.merge)))
        return 0
    set_threads(args.threads)
    config = resolve(args)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results.json")
    results = _read_results(path, args.force)
    if results is not None:
        if not _same_experiment(results.get("config", {}), config):
            if not args.force:
                raise A.UsageError(f"{path} holds results of a different configuration; use another --out or --force")
            results = None
    if results is None:
        results = {"train_len": config["train_len"], "runs": {}, "timings": {}}
    results["config"] = {**config, **_methods_and_seeds(results.get("config", {}), config)}
    results["threads"] = torch.get_num_threads()
    max_len = max(config["eval_lens"] + [config["train_len"]])
    pending = sum(f"{m}/seed{s}" not in results["runs"] for s in config["seeds"] for m in config["methods"])
    bar = tqdm(total=pending * config["steps"], desc="synthetic", unit="step", dynamic_ncols=True,
               disable=getattr(args, "no_progress", False))
    say = bar.write  # lines go above the bar
    for seed in config["seeds"]:
        for method in config["methods"]:
            key = f"{method}/seed{seed}"
            if key in results["runs"]:
                say(f"{key}: done (in {path})")
                continue
            say(f"{key}: training {config['steps']} steps at T={config['train_len']}")
            model = build_model(method, seed, max_len, config["alpha"], config["fixed_lambda"], config["backend"], config["theta"], config.get("key_bias", 0.0))
            t0 = time.perf_counter()
            curve = train(model, steps=config["steps"], train_len=config["train_len"], seed=seed, batch=config["batch"],
                          lr=config["lr"], gate_lr=config["gate_lr"], warmup=config["warmup"], min_len=config["min_train_len"],
                          log=say, on_step=lambda: bar.update(1))
            t1 = time.perf_counter()
            acc, ent = {}, {}
            for L in config["eval_lens"]:
                acc[str(L)], ent[str(L)] = evaluate(model, L, config["samples"], seed + 10_000)
                say(f"  eval L={L:6d}: accuracy {acc[str(L)]:.3f}  entropy/layer {[round(e, 3) for e in ent[str(L)]]}")
            t2 = time.perf_counter()
            run_record = {"accuracy": acc, "entropy": ent, "loss_curve": curve, "train_s": t1 - t0, "eval_s": t2 - t1}
            gates = _gate_summary(model)
            if gates:
                run_record["gates"] = gates
            results["runs"][key] = run_record
            results["timings"][key] = {"train_s": round(t1 - t0, 1), "eval_s": round(t2 - t1, 1)}
            aggregate(results)
            write_results_json(path, results)
            plot(results, os.path.join(args.out, "accuracy.png"))
    bar.close()
    aggregate(results)
    write_results_json(path, results)
    if results["methods"]:
        plot(results, os.path.join(args.out, "accuracy.png"))
    print(table(results))
    print(f"wrote {path}")
    return 0


def _gate_summary(model) -> dict:
    """Per layer: alpha, b and c of the learned gates (small; for the record)."""
    out = {}
    for i, m in _gates(model):
        rec = {}
        for p in ("alpha", "b", "c"):
            if hasattr(m, p):
                rec[p] = [round(float(v), 4) for v in getattr(m, p).detach().flatten()]
        if hasattr(m, "fixed_lambda"):
            rec["fixed_lambda"] = [round(float(v), 4) for v in m.fixed_lambda.flatten()]
        out[str(i)] = rec
    return out


def _gates(model) -> list:
    """``hf.iter_gates`` of a patched model; none for the unpatched (RoPE) baseline."""
    from gape import hf

    return hf.iter_gates(model) if hf.is_patched(model) else []
