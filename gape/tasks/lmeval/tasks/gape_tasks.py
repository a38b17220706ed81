"""Datasets and scoring for the gape lm-eval tasks, generated offline by ``gape.tasks.niah``.

Task metadata (``--metadata '{...}'``, merged with model_args by lm-eval):
    max_seq_lengths  prompt lengths in tokens (default [4096])
    depths           needle depths in [0, 1] (default [0, 0.25, 0.5, 0.75, 1])
    samples          samples per (length, depth) (default 2)
    haystack         noise | essay (default noise)
    seed             (default 0)
    tokenizer / pretrained (+ gguf_file)   tokenizer that sizes the prompts
                     (default: the embedded SmolLM2's)
Prompt lengths count the user message plus the answer prefix, without a chat template.
"""

from __future__ import annotations

from functools import lru_cache

LENGTH_METRICS = (1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)


@lru_cache(maxsize=4)
def _tokenizer(name: str | None, gguf_file: str | None):
    from gape.hf.models import load_tokenizer

    return load_tokenizer(name, gguf_file=gguf_file)


def _dataset(task: str, **metadata):
    import datasets

    from gape.tasks.prompts import build_sample

    name = metadata.get("tokenizer") or metadata.get("pretrained")
    name = name if isinstance(name, str) and name else None
    gguf = metadata.get("gguf_file") if isinstance(metadata.get("gguf_file"), str) else None
    tok = _tokenizer(name, gguf)
    lengths = [int(n) for n in metadata.get("max_seq_lengths", [4096])]
    depths = [float(d) for d in metadata.get("depths", [0.0, 0.25, 0.5, 0.75, 1.0])]
    samples = int(metadata.get("samples", 2))
    haystack = metadata.get("haystack", "noise")
    seed = int(metadata.get("seed", 0))
    docs = []
    for length in lengths:
        for depth in depths:
            for index in range(samples):
                s = build_sample(tok, task=task, length=length, depth=depth, index=index, seed=seed, haystack=haystack, use_chat_template=False)
                docs.append(
                    {
                        "input": s.user_text(tok),
                        "outputs": s.answers,
                        "gen_prefix": s.answer_prefix,
                        "max_length": length,
                        "depth": depth,
                        "index": index,
                    }
                )
    return {"test": datasets.Dataset.from_list(docs, split=datasets.Split.TEST)}


def passkey_dataset(**metadata):
    return _dataset("passkey", **metadata)


def niah_single_dataset(**metadata):
    return _dataset("single", **metadata)


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    from gape.tasks.niah.scoring import string_match_all

    score = string_match_all(results[0], list(doc["outputs"]))
    # lm-eval wants every metric on every doc: other lengths get -1 and are dropped by aggregate
    out = {str(n): -1.0 for n in LENGTH_METRICS}
    if str(doc["max_length"]) in out:  # other lengths show in "acc" only
        out[str(doc["max_length"])] = score
    out["acc"] = score
    return out


def aggregate(values: list[float]) -> float:
    kept = [v for v in values if v != -1]
    return sum(kept) / len(kept) if kept else -1
