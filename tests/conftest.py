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


@pytest.fixture(autouse=True)
def _fresh_launch_plans():
    """Each test starts without launch plans (jedi_kernels.ops.fast_launch, "Launch plans"): a test that patches what
    an op reads (a launcher spy, a poisoned allocator, the SM count) sees its first call of a shape take the full path
    even if an earlier test in the same process ran that shape. (Plans exist only for compiled kernels, i.e. on a
    GPU.)"""
    import sys

    fl = sys.modules.get("jedi_kernels.ops.fast_launch")
    if fl is not None:
        fl.clear_plans()
    yield
