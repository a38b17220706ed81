"""Moved to :mod:`gape.tasks.prompts` (lmeval, calibrate, training_free and inspect use it too); kept for old imports."""

from gape.tasks.prompts import HAYSTACKS, NOISE, TASKS, Sample, build_sample, essay_sentences, haystack_sentences

__all__ = ["HAYSTACKS", "NOISE", "TASKS", "Sample", "build_sample", "essay_sentences", "haystack_sentences"]
