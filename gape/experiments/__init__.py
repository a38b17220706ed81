"""Studies built on the rest: training from scratch (``synthetic``, ``extrapolate``),
gate calibration (``calibrate``, ``training_free``) and attention inspection (``inspect``)."""
