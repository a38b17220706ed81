"""Needle-in-a-haystack benchmark (``gape niah``): prompt generation at exact token lengths
(``generator``), RULER scoring (``scoring``), the positional-encoding methods compared
(``methods``), the resumable runner (``runner``), result files (``results``) and figures
(``plots``)."""
