"""Studies built on the rest: training from scratch (``synthetic``, ``extrapolate``),
gate calibration (``calibrate``, ``training_free``), attention inspection (``inspect``) and the
long-context fine-tuning study (``longctx``)."""
