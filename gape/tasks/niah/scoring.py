"""RULER's scoring: the needle value(s) found in the (greedy) response."""

from __future__ import annotations

import re

_CONTROL = re.compile(r"[\x00-\x1f]")


def postprocess(response: str) -> str:
    """Strip, and turn control characters into newlines (as RULER does)."""
    return _CONTROL.sub("\n", response.strip()).strip()


def string_match_all(response: str, answers: list[str]) -> float:
    """Fraction of ``answers`` that occur in ``response`` (case-insensitive): RULER's
    ``string_match_all`` for one sample. 1.0 means every value was retrieved."""
    if not answers:
        raise ValueError("answers must not be empty")
    text = postprocess(response).lower()
    return sum(a.lower() in text for a in answers) / len(answers)


def string_match_part(response: str, answers: list[str]) -> float:
    """1.0 if any of ``answers`` occurs in ``response`` (RULER's ``string_match_part``)."""
    if not answers:
        raise ValueError("answers must not be empty")
    text = postprocess(response).lower()
    return float(any(a.lower() in text for a in answers))
