"""``gape inspect``: attention mass against distance, RoPE vs GAPE, per layer.

For one prompt the model runs twice, as loaded (RoPE) and GAPE-patched (trained
gates from ``--gates``, else the training-free setting of
:mod:`gape.experiments.training_free`). For each chosen layer the plot shows the attention
mass per distance bucket (``0, 1, 2-3, 4-7, ...``; averaged over heads and query
rows) for both, and the gate values per token: ``lambda`` (mean over query
heads) and ``pi`` (mean over key/value heads), which shows the tokens the key gate
protects. A JSON next to the PNG holds the numbers (and the attention entropy).
"""

from __future__ import annotations

import os

import torch

from gape._io import save_figure_atomic, write_json_atomic
from gape._threads import set_threads


def distance_profile(probs: torch.Tensor, skip: int = 0) -> list[float]:
    """Attention mass per log2 distance bucket from ``probs [B, H, L, L]`` (causal,
    rows at positions 0..L-1): bucket 0 is distance 0, bucket k >= 1 is ``[2^(k-1), 2^k)``.
    Averaged over batch, heads and rows ``>= skip``; each row sums to 1 so the buckets do too."""
    L = probs.shape[-1]
    pos = torch.arange(L)
    delta = (pos[:, None] - pos[None, :]).clamp_min(0)
    bucket = torch.where(delta == 0, 0, torch.floor(torch.log2(delta.clamp_min(1).float())).long() + 1)
    nb = int(bucket.max()) + 1
    p = probs[..., skip:, :].float().mean(dim=(0, 1))  # [rows, L]
    b = bucket[skip:]
    out = torch.zeros(nb).index_add_(0, b.reshape(-1), p.reshape(-1)) / p.shape[0]
    return out.tolist()


def bucket_labels(n: int) -> list[str]:
    return ["0"] + [f"{2 ** (k - 1)}" + (f"-{2 ** k - 1}" if k > 1 else "") for k in range(1, n)]


@torch.no_grad()
def collect(model, input_ids: torch.Tensor, layers: list[int]) -> dict:
    from gape.hf.attention_probe import capture_attention, entropy

    with capture_attention(model) as rec:
        model(input_ids=input_ids, use_cache=False)
    out = {}
    for i in layers:
        e = rec[i]
        skip = min(16, input_ids.shape[1] - 1)
        item = {"profile": distance_profile(e["probs"], skip), "entropy": float(entropy(e["probs"][..., skip:, :]).mean())}
        if "lambda" in e:
            item["lambda"] = e["lambda"][0].mean(0).tolist()
            item["pi"] = e["pi"][0].mean(0).tolist()
        out[i] = item
    return out


def inspect_model(model, input_ids: torch.Tensor, *, layers: list[int] | None = None, gates: str | None = None,
                  tokenizer=None, lam: float | None = None) -> dict:
    """``{"rope": {layer: ...}, "gape": {layer: ...}, "layers": [...]}`` for one prompt.

    The model is unpatched on return.
    """
    from gape import hf

    if hf.is_patched(model):
        raise ValueError("inspect_model needs an unpatched model (it compares RoPE with GAPE)")
    spec = _spec(model)
    n = len(hf._find_layers(model, spec))
    attending = hf.attention_layers(model, spec)  # all layers, except in a hybrid stack
    if layers is None:
        layers = sorted({attending[0], attending[len(attending) // 2], attending[-1]})
    layers = [i % n for i in layers]
    if not set(layers) <= set(attending):
        raise ValueError(f"layers {sorted(set(layers) - set(attending))} have no attention; the attention layers are "
                         f"{attending}")
    result = {"layers": layers, "rope": collect(model, input_ids, layers)}
    try:
        if gates:
            hf.load_gates(model, gates)
        else:
            from .training_free import DEFAULT_LAMBDA, apply_training_free

            apply_training_free(model, tokenizer, input_ids=input_ids, lam=DEFAULT_LAMBDA if lam is None else lam)
        for _, g in hf.iter_gates(model):
            g.config.identity_shortcut = False
        result["gape"] = collect(model, input_ids, layers)
        result["gape_config"] = hf.gape_config(model).to_dict()
    finally:
        if hf.is_patched(model):
            hf.unpatch(model)
    return result


def _spec(model):
    from gape.patches.registry import get_spec

    return get_spec(model.config.model_type)


def plot(result: dict, path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = result["layers"]
    fig, axes = plt.subplots(2, len(layers), figsize=(4.2 * len(layers), 6.5), squeeze=False)
    for col, i in enumerate(layers):
        ax = axes[0][col]
        for name, style in (("rope", "-o"), ("gape", "-s")):
            prof = result[name][i]["profile"]
            ax.plot(range(len(prof)), prof, style, ms=3, label=f"{name} (H={result[name][i]['entropy']:.2f})")
        n = len(result["rope"][i]["profile"])
        ax.set_xticks(range(n))
        ax.set_xticklabels(bucket_labels(n), rotation=60, fontsize=7)
        ax.set_yscale("log")
        ax.set_title(f"layer {i}: attention mass vs distance")
        ax.set_xlabel("distance (tokens, log2 buckets)")
        ax.legend(fontsize=8)
        ax = axes[1][col]
        g = result["gape"][i]
        if "pi" in g:
            ax.plot(g["pi"], lw=0.8, label="pi (mean over kv heads)", color="tab:green")
            ax.set_ylim(-0.02, 1.02)
            ax2 = ax.twinx()
            ax2.plot(g["lambda"], lw=0.8, color="tab:red", label="lambda (mean over heads)")
            ax2.set_ylabel("lambda", color="tab:red")
            ax.set_ylabel("pi", color="tab:green")
        ax.set_xlabel("token position")
        ax.set_title(f"layer {i}: gates per token")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=100)
    plt.close(fig)


def add_arguments(parser) -> None:
    from gape import _args as A

    parser.add_argument("--model", type=A.model_path, default=None,
                        help="model folder or .gguf (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--prompt", type=A.text, default=None, help="prompt text (default: a pass-key prompt of --length tokens)")
    parser.add_argument("--prompt-file", type=A.in_file, default=None, help="read the prompt from this file (default: none, see --prompt)")
    parser.add_argument("--length", type=A.integer(64, 1 << 16), default=512, help="length in tokens of the default pass-key prompt, 64..65536 (default 512)")
    parser.add_argument("--gates", type=A.in_file, default=None,
                        help="trained gate file (from gape calibrate) (default: the training-free per-head setting, "
                             "gape.experiments.training_free.apply_training_free)")
    parser.add_argument("--lam", type=A.number(0.0), default=None, help="largest per-head lambda of the training-free setting (default 0.1)")
    parser.add_argument("--layers", type=A.int_list(), default=None,
                        help="comma-separated layer indices, negative from the end (default: first, middle, last)")
    parser.add_argument("--out", type=A.out_file, default="inspect.png",
                        help="PNG path; a .json with the numbers is written beside it (default inspect.png)")
    parser.add_argument("--threads", type=A.threads, default=1, help="torch CPU threads (default 1)")
    A.add_dtype(parser)


def check_arguments(parser, args) -> None:
    if args.prompt is not None and args.prompt_file is not None:
        parser.error("argument --prompt-file: not allowed with --prompt (give one prompt)")


def run(args) -> int:
    from gape import _args as A
    from gape.hf import models

    set_threads(args.threads)
    model, tok = models.load_model(args.model, dtype=getattr(args, "dtype", A.DEFAULT_DTYPE))
    if args.prompt_file:
        with open(args.prompt_file) as f:
            text = f.read()
        ids = tok(text).input_ids
    elif args.prompt:
        ids = tok(args.prompt).input_ids
    else:
        from gape.tasks.prompts import build_sample

        ids = build_sample(tok, task="passkey", length=args.length, depth=0.25, seed=0).input_ids
    layers = args.layers
    if isinstance(layers, str):
        layers = [int(x) for x in layers.split(",")]
    if layers:
        from gape import hf
        from gape._args import UsageError

        n = len(hf._find_layers(model, _spec(model)))
        bad = [i for i in layers if not -n <= i < n]
        if bad:
            raise UsageError(f"--layers {bad}: the model has {n} layers (valid indices {-n}..{n - 1})")
    result = inspect_model(model, torch.tensor([ids]), layers=layers, gates=args.gates, tokenizer=tok, lam=args.lam)
    result["tokens"] = len(ids)
    plot(result, args.out, title=f"{args.model or 'SmolLM2-135M'}: {len(ids)} tokens, gates: {args.gates or 'training-free'}")
    base = os.path.splitext(args.out)[0] + ".json"
    write_json_atomic(base, result, indent=1)
    for i in result["layers"]:
        print(f"layer {i:3d}: entropy rope {result['rope'][i]['entropy']:.3f}  gape {result['gape'][i]['entropy']:.3f}")
    print(f"wrote {args.out} and {base}")
    return 0
