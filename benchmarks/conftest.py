"""Test setup: Triton kernels run on the CPU through the interpreter when no GPU is present.

TRITON_INTERPRET is read when ``@triton.jit`` runs, so it is set here, before any test module imports the kernels.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marked gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    """Fresh but reproducible random inputs per test."""
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared CPU an OpenMP barrier waiting on a descheduled
    thread makes each op ~100x slower (1.8 s instead of 10 ms per tiny forward, measured): run them on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
