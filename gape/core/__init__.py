"""The attention core: the maths as an fp64 oracle (``reference``), the backends
that compute it (``torch_backend`` with its C++ kernel and PyTorch tiles,
``sdpa_backend``, the Triton kernels in ``gape.kernels``), the one place that
picks a backend (``api``), and attention blocks for context parallelism (``ops``).
Nothing here imports transformers or any other part of gape."""
