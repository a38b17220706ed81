"""Test-wide settings: offline hub, Triton's interpreter on CPU-only machines,
few threads (CI has 2 cores), deterministic seeds."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton reads TRITON_INTERPRET when a kernel is decorated, so it must be set
# before gape.kernels is imported. Only on machines without a GPU.
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """Run the test on one torch thread (reproducible CPU timing of training
    loops) and give the process its thread count back afterwards."""
    from gape._threads import set_threads

    before = torch.get_num_threads()
    set_threads(1)
    yield
    set_threads(before)
