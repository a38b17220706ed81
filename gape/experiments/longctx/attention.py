"""``gape longctx --attention``: where the attention of a retrieval prompt goes, per arm.

For the study's own single-needle prompts (same seed, the first samples of
:func:`.study.niah_order`, so the depths spread) at one length, one forward pass per prompt
records the attention probabilities of the prompt's last :data:`ROWS` query rows (the question
and the answer prefix: the rows that must find the needle). The full ``L x L`` map of a 32k
prompt does not fit in memory (4 GiB per head and layer in float32); these rows take
``ROWS x L`` per head, one layer at a time. Per layer, averaged over heads and rows: the mass
per log2 distance bucket (bucket 0 is distance 0, bucket ``k`` is ``[2^(k-1), 2^k)``, as in
``gape inspect``), the mass on the needle's tokens and on the first :data:`SINKS` tokens
(attention sinks); for GAPE layers also the mean ``lambda`` of the rows and ``pi`` at the
needle's tokens against its mean over the rest of the haystack.

``OUT/attention/<arm>-<L>.json`` per arm and length, rewritten atomically after every prompt
(a rerun continues from the prompts it holds and leaves a finished file alone), and
``OUT/attention_vs_distance.png``.
"""

from __future__ import annotations

import os
import time

import torch

from ..._args import UsageError
from ..._io import UnreadableJsonError, lock_folder, read_json_object, save_figure_atomic, write_json_atomic
from . import study

ROWS = 32  # the last query rows of a prompt: its question and answer prefix
SINKS = 4  # the first tokens, where attention parks when it has nowhere to go
ATTENTION_DIR = "attention"
PLOT = "attention_vs_distance.png"


# ---------------------------------------------------------------------------- measures


def bucket_of(delta: torch.Tensor) -> torch.Tensor:
    """The log2 distance bucket of non-negative integer distances: 0 for 0, ``k`` for
    ``[2^(k-1), 2^k)`` (the bit length, exact at any distance, unlike a float log2)."""
    delta = delta.long()
    out = torch.zeros_like(delta)
    k = 0
    while True:
        above = delta >= (1 << k)
        if not bool(above.any()):
            return out
        out += above.long()
        k += 1


def n_buckets(length: int) -> int:
    """Buckets of a prompt of ``length`` tokens (its longest distance is ``length - 1``)."""
    return int(bucket_of(torch.tensor(max(length - 1, 0)))) + 1


def bucket_labels(n: int) -> list[str]:
    return ["0"] + [f"{2 ** (k - 1)}" + (f"-{2 ** k - 1}" if k > 1 else "") for k in range(1, n)]


def row_profiles(probs: torch.Tensor, positions: torch.Tensor, buckets: int | None = None) -> torch.Tensor:
    """Attention mass per distance bucket of each query row, ``[R, buckets]`` (float64).

    ``probs [B, H, R, K]`` are the probabilities of the query rows at key positions
    ``positions [R]`` (causal: a row's keys at or before it), averaged over batch and heads;
    every row sums to its probabilities' total (1).
    """
    k = probs.shape[-1]
    nb = n_buckets(k) if buckets is None else buckets
    p = probs.double().mean(dim=(0, 1))  # [R, K]
    delta = (positions.reshape(-1, 1).long() - torch.arange(k)[None, :]).clamp_min(0)  # later keys carry no mass
    return torch.zeros(p.shape[0], nb, dtype=torch.float64).scatter_add_(1, bucket_of(delta), p)


def needle_span(tokenizer, sample) -> tuple[int, int]:
    """``input_ids[a:b]`` is the target needle of a prompt of :func:`gape.tasks.prompts.build_sample`."""
    ids = tokenizer(" " + sample.needles[0], add_special_tokens=False).input_ids
    a = sample.needle_position
    if a < 0 or sample.input_ids[a : a + len(ids)] != ids:  # pragma: no cover - guarded by build_sample
        raise AssertionError(f"the needle is not at token {a} of sample {sample.index}")
    return a, a + len(ids)


def _layer_summary(entry: dict, positions: torch.Tensor, span: tuple[int, int], haystack: tuple[int, int], buckets: int) -> dict:
    probs = entry["probs"]
    a, b = span
    p = probs.double().mean(dim=(0, 1))  # [R, K]
    out = {"profile": row_profiles(probs, positions, buckets).mean(0).tolist(),
           "needle": float(p[:, a:b].sum(-1).mean()), "sinks": float(p[:, :SINKS].sum(-1).mean())}
    if "lambda" in entry:
        pi = entry["pi"].double().mean(dim=(0, 1))  # [K], over key/value heads
        rest = torch.ones(pi.shape[0], dtype=torch.bool)
        rest[: haystack[0]] = False
        rest[haystack[1] :] = False
        rest[a:b] = False
        out.update({"lambda": float(entry["lambda"].double().mean()), "pi_needle": float(pi[a:b].mean()),
                    "pi_haystack": float(pi[rest].mean())})
    return out


@torch.no_grad()
def measure(model, tokenizer, sample, rows: int = ROWS) -> list[dict]:
    """One forward pass over ``sample``'s prompt; per attention layer (ascending), the summary of
    its last ``rows`` query rows: ``profile`` (mass per distance bucket), ``needle``, ``sinks``,
    and for a gated layer ``lambda``, ``pi_needle`` and ``pi_haystack``."""
    from gape.hf.attention_probe import capture_attention
    from gape.hf.compat import unwrap

    length = len(sample.input_ids)
    r = min(rows, length)
    positions = torch.arange(length - r, length)
    span, haystack, nb = needle_span(tokenizer, sample), tuple(sample.context_span), n_buckets(length)

    def reduce(layer, entry):
        if entry["probs"].shape[-2:] != (r, length):  # pragma: no cover - a cache or a split pass would break the positions
            raise AssertionError(f"layer {layer}: probe rows {tuple(entry['probs'].shape)}, expected {r} x {length}")
        return _layer_summary(entry, positions, span, haystack, nb)

    body, _ = study._parts(model)
    with capture_attention(unwrap(model), rows=lambda q: range(q - r, q), reduce=reduce) as rec:
        body(input_ids=torch.tensor([sample.input_ids]), use_cache=False)
    return [{"layer": i, **rec[i]} for i in sorted(rec)]


def mean_layers(samples: list[dict]) -> list[dict]:
    """Per layer, every measure averaged over the samples."""
    out = []
    for i, first in enumerate(samples[0]["layers"]):
        row = {"layer": first["layer"]}
        for key, value in first.items():
            if key == "layer":
                continue
            values = [s["layers"][i][key] for s in samples]
            row[key] = [sum(v) / len(v) for v in zip(*values)] if isinstance(value, list) else sum(values) / len(values)
        out.append(row)
    return out


# ---------------------------------------------------------------------------- the command


def result_path(out: str, arm: str, length: int) -> str:
    return os.path.join(out, ATTENTION_DIR, f"{arm}-{length}.json")


def _saved_settings(out: str) -> dict:
    saved = study.read_run_file(out)
    if saved is None:
        raise UsageError(f"--out {out} holds no study ({study.RUN_FILE} is missing): the attention view reads a study's "
                         "arms; run `gape longctx --out` on it first")
    return saved


def check_settings(out: str, s: study.Settings) -> dict:
    """The study's settings as ``run.json`` records them (the corpus digest aside), refused when
    the command's differ: the arms' training state means something only under its settings."""
    saved = _saved_settings(out)
    fixed = {**s.fixed(), "model": study.model_label(s.model)}
    details = study.settings_diff(saved, fixed)
    if details:
        raise UsageError(f"--out {out} holds a study with other settings ({details}); pass the study's flags")
    return fixed


def default_arms(out: str) -> list[str]:
    """The arms evaluated in ``out`` (rows of held-out passes or retrieval), with ``yarn-ft`` and
    ``yarn-gape-ft`` whenever the folder holds them at all (rows or a training state)."""
    rows = study.read_rows(out)
    evaluated = {r["arm"] for r in rows if r["kind"] in ("ppl", "niah")}
    present = {r["arm"] for r in rows} | {a for a in study.ARMS if os.path.exists(study._state_path(out, a))}
    chosen = evaluated | ({"yarn-ft", "yarn-gape-ft"} & present)
    return [a for a in study.ARMS if a in chosen]


def check_trained(out: str, arms: list[str], s: study.Settings) -> dict[str, int]:
    """``{arm: training step}``; an arm that trains and has not finished is refused, naming it."""
    steps = {}
    for arm in arms:
        if not study.ARMS[arm].finetune:
            steps[arm] = 0
            continue
        path = study._state_path(out, arm)
        step = study.saved_step(path)
        if step != s.steps:
            where = f"{path} is missing" if not os.path.exists(path) else f"{path} is at step {step}"
            raise UsageError(f"--arms {arm}: the arm's training is not done ({where}, not {s.steps}); run "
                             f"`gape longctx --out {out} --arms {arm}` with the study's flags to finish it first")
        steps[arm] = step
    return steps


def _load(path: str, key: dict) -> list[dict]:
    """The samples a result file holds when it was made with ``key`` (else none: redone)."""
    try:
        saved = read_json_object(path)
    except UnreadableJsonError:
        return []
    if saved is None or any(saved.get(k) != v for k, v in key.items()):
        return []
    samples = saved.get("samples")
    if not isinstance(samples, list) or not all(isinstance(x, dict) and isinstance(x.get("index"), int)
                                                and isinstance(x.get("layers"), list) for x in samples):
        return []
    return samples


def run_attention(s: study.Settings, out: str, arms: list[str] | None, length: int, samples: int, *, model=None,
                  tokenizer=None, echo=print) -> list[str]:
    """Write ``OUT/attention/<arm>-<length>.json`` for every arm (default :func:`default_arms`)
    and the plot; the paths written. Holds ``out``'s lock, so it never runs beside the study."""
    from ..._machine import machine_record
    from gape.tasks.prompts import build_sample

    if samples > s.samples:
        raise UsageError(f"--attention-samples {samples} exceeds --samples {s.samples} (the study's samples per length)")
    with lock_folder(out, "gape longctx"):
        fixed = check_settings(out, s)
        if arms is None:
            arms = default_arms(out)
            if not arms:
                raise UsageError(f"--arms: {out} holds no evaluated arm yet; name the arms with --arms")
        steps = check_trained(out, arms, s)
        if tokenizer is None:
            from gape.hf.models import load_tokenizer

            tokenizer = load_tokenizer(s.model)
        indices = study.niah_order(s.samples)[:samples]
        prompts = []
        for i in indices:
            depth = study.niah_depth(i, s.samples)
            try:
                prompts.append(build_sample(tokenizer, task="single", length=length, depth=depth, index=i, seed=s.seed,
                                            haystack=s.haystack))
            except ValueError as err:
                raise UsageError(f"--attention-length {length}: {err}") from None
        paths, todo = [], []
        for arm in arms:
            path = result_path(out, arm, length)
            key = {"arm": arm, "length": length, "rows": min(ROWS, length), "sinks": SINKS, "settings": fixed,
                   "state_step": steps[arm]}
            have = {x["index"]: x for x in _load(path, key) if x["index"] in indices}
            paths.append(path)
            if len(have) == len(indices):
                echo(f"attention {arm} L={length}: done ({path})")
            else:
                todo.append((arm, path, key, have))
        if todo and model is None:
            from gape.hf.models import load_model

            echo(f"loading {study.model_label(s.model)} ({s.dtype}) ...")
            model, _ = load_model(s.model, dtype=study.DTYPES[s.dtype])
        if todo:
            study.check_fits(model, [length])
        for arm, path, key, have in todo:
            built = study._eval_model(model, out, arm, s)
            for sample in prompts:
                if sample.index in have:
                    continue
                start = time.perf_counter()
                layers = measure(built, tokenizer, sample)
                a, b = needle_span(tokenizer, sample)
                have[sample.index] = {"index": sample.index, "depth": sample.depth, "actual_depth": round(sample.actual_depth, 4),
                                      "needle_position": sample.needle_position, "needle_tokens": [a, b],
                                      "seconds": round(time.perf_counter() - start, 3), "layers": layers}
                done = [have[i] for i in indices if i in have]
                result = {**key, "machine": machine_record(), "buckets": bucket_labels(n_buckets(length)),
                          "done": len(done) == len(indices), "seconds": round(sum(x["seconds"] for x in done), 3),
                          "samples": done, "mean": mean_layers(done)}
                os.makedirs(os.path.dirname(path), exist_ok=True)
                write_json_atomic(path, result, indent=1)
                echo(f"attention {arm} L={length} sample {sample.index} (depth {sample.depth}): {have[sample.index]['seconds']:.0f} s")
            del built
        plot(out, echo=echo)
        return paths


# ---------------------------------------------------------------------------- the plot


def read_results(out: str) -> list[dict]:
    """The finished result files of ``OUT/attention``, arms in the study's order, then by length."""
    folder = os.path.join(out, ATTENTION_DIR)
    found = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if not name.endswith(".json"):
            continue
        try:
            r = read_json_object(os.path.join(folder, name))
        except UnreadableJsonError:
            continue
        if r is not None and r.get("done") and r.get("arm") in study.ARMS and isinstance(r.get("mean"), list):
            found.append(r)
    return sorted(found, key=lambda r: (list(study.ARMS).index(r["arm"]), r["length"]))


def plot(out: str, echo=print) -> str | None:
    """``OUT/attention_vs_distance.png``: the mass per distance bucket (mean over layers and
    prompts) and the needle's mass per layer, one line per arm and length."""
    results = read_results(out)
    if not results:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    widest = max(len(r["buckets"]) for r in results)
    for r in results:
        label = f"{r['arm']} L={r['length']} ({len(r['samples'])} prompts)"
        layers = r["mean"]
        profile = [sum(x["profile"][k] for x in layers) / len(layers) for k in range(len(layers[0]["profile"]))]
        (line,) = left.plot(range(len(profile)), profile, "-o", ms=3, label=label)
        right.plot([x["layer"] for x in layers], [x["needle"] for x in layers], "-o", ms=3, color=line.get_color(), label=label)
        right.plot([x["layer"] for x in layers], [x["sinks"] for x in layers], ":", color=line.get_color())
    left.set_xticks(range(widest))
    left.set_xticklabels(bucket_labels(widest), rotation=60, fontsize=7)
    left.set_yscale("log")
    left.set_xlabel("distance from the query (tokens, log2 buckets)")
    left.set_ylabel("attention mass (mean over layers, heads, rows)")
    left.set_title(f"last {ROWS} rows of the retrieval prompts")
    right.set_yscale("log")
    right.set_xlabel("layer")
    right.set_ylabel("attention mass")
    right.set_title(f"on the needle (solid) and the first {SINKS} tokens (dotted)")
    left.legend(fontsize=7)
    fig.tight_layout()
    path = save_figure_atomic(fig, os.path.join(out, PLOT), dpi=120)
    plt.close(fig)
    echo(f"wrote {path}")
    return path
