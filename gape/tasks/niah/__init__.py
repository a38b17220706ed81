"""Needle-in-a-haystack benchmark (``gape niah``): RULER scoring (``scoring``), the
resumable runner (``runner``), result files (``results``) and figures (``plots``). The
prompts are built by :mod:`gape.tasks.prompts` and the compared methods set up by
:mod:`gape.tasks.methods` (shared with lmeval, calibrate, training_free and inspect)."""
