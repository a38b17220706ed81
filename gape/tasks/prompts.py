"""Needle-in-a-haystack and pass-key prompts of an exact token length (gape niah, gape eval,
calibrate, training_free and inspect build their prompts here).

Tasks:
- ``passkey``: the Landmark-attention / LongLoRA pass-key retrieval prompt.
- ``single``, ``multikey``, ``multivalue``: RULER's needles ("One of the special magic
  numbers for {key} is: {value}.") with one needle, three distractor keys, or four values
  for one key.

Haystacks: ``noise`` (the repeated "The grass is green. The sky is blue. ..." lines) and
``essay`` (natural-language sentences from ``data/essay.txt``, an original text written for
this package and placed in the public domain (CC0)). Nothing is downloaded.

A prompt is assembled from separately tokenized pieces (chat header + instructions,
haystack sentences, needles, question + assistant header + answer prefix), so its length in
tokens of the model's tokenizer is exact by construction. Needles sit between whole
sentences, at the boundary nearest the requested depth (0 = start of the haystack, 1 = end).
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass
from functools import lru_cache
from importlib import resources

TASKS = ("passkey", "single", "multikey", "multivalue")
HAYSTACKS = ("noise", "essay")

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

# how many needles each task inserts (the first one is the target the question asks about)
_NUM_NEEDLES = {"passkey": 1, "single": 1, "multikey": 4, "multivalue": 4}

_PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there."
)
_RULER_INTRO = (
    "{some} special magic {kind} {is_are} hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {kind} afterwards."
)
_RULER_NEEDLE = "One of the special magic numbers for {key} is: {value}."

# key words for RULER needles ("adjective-noun", as RULER draws them from wonderwords)
_ADJECTIVES = (
    "ancient bitter brave calm careful cheerful clever cold curious damp eager early fancy fierce "
    "gentle giant golden grumpy hollow humble icy jolly lazy lively loud lucky massive merry narrow "
    "noisy odd pale polite proud quick quiet rapid rough rusty shiny silent silly sleepy slow smooth "
    "sour spicy steep sticky sunny swift tall tender tiny warm wild wise wooden young"
).split()
_NOUNS = (
    "anchor apple badger basket beacon bell blanket bottle bridge candle canyon castle cloud comet "
    "cottage crayon desert dragon feather forest garden glacier harbor helmet island jacket kettle "
    "ladder lantern lemon meadow mirror needle orchard otter parrot pebble pencil pillow planet "
    "rabbit ribbon river saddle shovel squirrel teapot thimble tiger tunnel violin wagon walnut whistle"
).split()


@dataclass
class Sample:
    """One prompt. ``input_ids`` is what the model reads (``len == length``)."""

    task: str
    haystack: str
    length: int
    depth: float
    index: int
    seed: int
    input_ids: list[int]
    needles: list[str]  # needle sentences, target first
    answers: list[str]  # what string_match_all looks for in the response
    query: str
    needle_position: int  # token offset of the target needle in input_ids
    actual_depth: float  # fraction of haystack tokens before the target needle
    chat_template: bool
    # the pieces of the user message, for harnesses that apply their own framing (lm-eval)
    intro: str = ""
    question: str = ""
    answer_prefix: str = ""
    context_span: tuple[int, int] = (0, 0)  # input_ids[a:b] is the haystack with the needles

    def to_dict(self) -> dict:
        return asdict(self)

    def user_text(self, tokenizer) -> str:
        """The user message as text: instructions, haystack with needles, question."""
        a, b = self.context_span
        return f"{self.intro}\n{tokenizer.decode(self.input_ids[a:b]).lstrip()}\n\n{self.question}"


@lru_cache(maxsize=1)
def essay_sentences() -> tuple[str, ...]:
    text = resources.files("gape.tasks.niah").joinpath("data/essay.txt").read_text(encoding="utf-8")
    paragraphs = [p for p in text.split("\n\n")[1:] if p.strip()]  # first paragraph is the title
    words = " ".join(" ".join(paragraphs).split())
    return tuple(s for s in re.split(r"(?<=[.!?])\s+", words) if s)


def haystack_sentences(haystack: str) -> tuple[str, ...]:
    if haystack == "noise":
        return tuple(s for s in re.split(r"(?<=[.!?])\s+", NOISE) if s)
    if haystack == "essay":
        return essay_sentences()
    raise ValueError(f"haystack must be one of {HAYSTACKS}, got {haystack!r}")


def _rng(seed: int, task: str, haystack: str, length: int, depth: float, index: int) -> random.Random:
    # a str seed is hashed with sha512 by random, so this is stable across processes
    return random.Random(f"gape-niah|{seed}|{task}|{haystack}|{length}|{depth:.6f}|{index}")


def _task_text(task: str, rng: random.Random) -> tuple[str, list[str], list[str], str, str, str]:
    """(intro, needles, answers, query, question, answer_prefix); the target needle is first."""
    n = _NUM_NEEDLES[task]
    if task == "passkey":
        value = str(rng.randint(10000, 99999))
        needle = f"The pass key is {value}. Remember it. {value} is the pass key."
        return _PASSKEY_INTRO, [needle], [value], "pass key", "What is the pass key?", "The pass key is"
    keys = [f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}" for _ in range(n if task == "multikey" else 1)]
    while len(set(keys)) < len(keys):
        keys[-1] = f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"
    values = [str(rng.randint(1_000_000, 9_999_999)) for _ in range(n)]
    while len(set(values)) < len(values):
        values[-1] = str(rng.randint(1_000_000, 9_999_999))
    if task == "multivalue":
        needles = [_RULER_NEEDLE.format(key=keys[0], value=v) for v in values]
        answers = values
        intro = _RULER_INTRO.format(some="Some", kind="numbers", is_are="are")
        question = f"What are all the special magic numbers for {keys[0]} mentioned in the provided text?"
        prefix = f"The special magic numbers for {keys[0]} mentioned in the provided text are"
    else:
        needles = [_RULER_NEEDLE.format(key=k, value=v) for k, v in zip(keys, values)]
        answers = values[:1]
        intro = _RULER_INTRO.format(some="A", kind="number", is_are="is")
        question = f"What is the special magic number for {keys[0]} mentioned in the provided text?"
        prefix = f"The special magic number for {keys[0]} mentioned in the provided text is"
    return intro, needles, answers, keys[0], question, prefix


def _special_prefix(tokenizer) -> list[int]:
    """The tokens the tokenizer puts before any text (BOS), if any."""
    with_special = tokenizer("a").input_ids
    plain = tokenizer("a", add_special_tokens=False).input_ids
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start : start + len(plain)] == plain:
            return list(with_special[:start])
    return []


_MARK = "\u241eGAPE-NIAH-CONTEXT\u241e"


def _frame(tokenizer, intro: str, question: str, answer_prefix: str, use_chat: bool) -> tuple[list[int], list[int]]:
    """Token ids before and after the haystack."""
    encode = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    content = f"{intro}\n{_MARK}\n\n{question}"
    if use_chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
        if text.count(_MARK) != 1:
            raise ValueError("the chat template did not keep the user message verbatim; pass use_chat_template=False")
        before, after = text.split(_MARK)
        return encode(before), encode(after + answer_prefix)
    before, after = content.split(_MARK)
    return _special_prefix(tokenizer) + encode(before), encode(after + "\nAnswer: " + answer_prefix)


def build_sample(
    tokenizer,
    *,
    task: str = "passkey",
    length: int,
    depth: float,
    index: int = 0,
    seed: int = 0,
    haystack: str = "noise",
    use_chat_template: bool | None = None,
) -> Sample:
    """Build one prompt of exactly ``length`` tokens with the target needle at ``depth``.

    Args:
        tokenizer: the model's (fast) tokenizer.
        task: one of :data:`TASKS`.
        length: total prompt length in tokens, chat template and answer prefix included.
        depth: where the target needle goes, 0 (start of the haystack) .. 1 (end).
        index, seed: which sample; the same arguments give the same prompt.
        haystack: ``"noise"`` or ``"essay"``.
        use_chat_template: ``None`` uses it when the tokenizer has one.

    Example::

        s = build_sample(tok, task="single", length=4096, depth=0.5)
        out = model.generate(torch.tensor([s.input_ids]), max_new_tokens=32)
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if isinstance(length, bool) or not isinstance(length, int) or length <= 0:
        raise ValueError(f"length must be a positive int (tokens), got {length!r}")
    if isinstance(depth, bool) or not isinstance(depth, (int, float)) or not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be a number in [0, 1], got {depth!r}")
    sentences = haystack_sentences(haystack)
    use_chat = bool(getattr(tokenizer, "chat_template", None)) if use_chat_template is None else bool(use_chat_template)
    rng = _rng(seed, task, haystack, length, float(depth), index)
    intro, needles, answers, query, question, answer_prefix = _task_text(task, rng)

    encode = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    head, tail = _frame(tokenizer, intro, question, answer_prefix, use_chat)
    needle_ids = [encode(" " + n) for n in needles]
    budget = length - len(head) - len(tail) - sum(map(len, needle_ids))
    if budget < 0:
        raise ValueError(
            f"length={length} is too short for task {task!r}: the instructions, question and needles alone take "
            f"{length - budget} tokens"
        )

    # whole sentences, cycling through the haystack from a seeded start, while they fit
    start = rng.randrange(len(sentences)) if haystack == "essay" else 0
    cache: dict[int, list[int]] = {}

    def sentence_ids(i: int) -> list[int]:
        j = i % len(sentences)
        if j not in cache:
            cache[j] = encode(" " + sentences[j])
        return cache[j]

    pieces: list[list[int]] = []
    used, i = 0, start
    while used + len(sentence_ids(i)) <= budget:
        pieces.append(sentence_ids(i))
        used += len(pieces[-1])
        i += 1
        if not sentence_ids(i):  # pragma: no cover - a tokenizer that drops text entirely
            raise ValueError("the tokenizer encodes haystack sentences to nothing")
    # the tokens left over: the end of the sentence before the first, so the excerpt begins
    # mid-sentence and every later boundary is a sentence end
    rest = budget - used
    if rest:
        before, back = sentence_ids(start - 1), 1
        while len(before) < rest:  # the sentence before is shorter than the gap: take more
            back += 1
            before = sentence_ids(start - back) + before
        pieces.insert(0, before[len(before) - rest :])
    boundaries = [0]
    for piece in pieces:
        boundaries.append(boundaries[-1] + len(piece))

    target = min(range(len(boundaries)), key=lambda b: (abs(boundaries[b] - depth * budget), b))
    slots = [target] + [rng.randrange(len(boundaries)) for _ in needle_ids[1:]]

    ids: list[int] = list(head)
    needle_position = -1
    for b in range(len(boundaries)):
        for k, slot in enumerate(slots):
            if slot == b:
                if k == 0:
                    needle_position = len(ids)
                ids.extend(needle_ids[k])
        if b < len(pieces):
            ids.extend(pieces[b])
    context_span = (len(head), len(ids))
    ids.extend(tail)
    if len(ids) != length:  # pragma: no cover - guarded by construction
        raise AssertionError(f"built {len(ids)} tokens, wanted {length}")
    return Sample(
        task=task,
        haystack=haystack,
        length=length,
        depth=float(depth),
        index=index,
        seed=seed,
        input_ids=ids,
        needles=needles,
        answers=answers,
        query=query,
        needle_position=needle_position,
        actual_depth=boundaries[target] / budget if budget else 0.0,
        chat_template=use_chat,
        intro=intro,
        question=question,
        answer_prefix=answer_prefix,
        context_span=context_span,
    )
