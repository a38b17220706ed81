"""What users run on a model: needle-in-a-haystack (``niah``), lm-evaluation-harness
(``lmeval``), the prompts they share (``prompts``) and the compared positional
methods (``methods``)."""
