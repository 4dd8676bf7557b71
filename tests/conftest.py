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
    """Each test starts without set-attention launch plans (jedi_kernels.ops.set_attention, "Launch plans"): a test
    that spies on the launchers sees its first call of a shape take the full path even if an earlier test in the same
    process ran that shape. (Plans exist only for compiled kernels, i.e. on a GPU.)"""
    import sys

    sa = sys.modules.get("jedi_kernels.ops.set_attention")
    if sa is not None:
        sa.clear_launch_plans()
    yield
