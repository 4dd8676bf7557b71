"""Test helpers shared by the test-suites of every op (verbose comparisons, the flash-attention error rule)."""
from __future__ import annotations

import torch


def _where(diff: torch.Tensor) -> str:
    idx = int(torch.argmax(diff.reshape(-1)))
    coords = []
    for size in reversed(diff.shape):
        coords.append(idx % size)
        idx //= size
    return str(tuple(reversed(coords)))


def assert_close_verbose(actual: torch.Tensor, expected: torch.Tensor, *, atol: float, name: str = "tensor") -> None:
    """Assert ``max|actual - expected| <= atol``; on failure report the worst element, its index and both values."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a, e = actual.detach().double(), expected.detach().double()
    if not torch.isfinite(a).all():
        bad = (~torch.isfinite(a)).nonzero()[:5].tolist()
        raise AssertionError(f"{name}: non-finite values at {bad}")
    diff = (a - e).abs()
    worst = float(diff.max()) if diff.numel() else 0.0
    if worst > atol:
        pos = _where(diff)
        flat = int(torch.argmax(diff.reshape(-1)))
        raise AssertionError(
            f"{name}: max abs error {worst:.3e} > tol {atol:.3e} at index {pos} "
            f"(actual {float(a.reshape(-1)[flat]):.6g}, expected {float(e.reshape(-1)[flat]):.6g}); "
            f"{int((diff > atol).sum())}/{diff.numel()} elements out of tolerance"
        )


def assert_flash_rule(ours: torch.Tensor, same_dtype_torch: torch.Tensor, ref64: torch.Tensor, name: str) -> None:
    """flash-attention's rule: ``max|ours - ref64| <= 2 * max|torch_same_dtype - ref64| + 1e-5``."""
    base = float((same_dtype_torch.detach().double() - ref64.detach()).abs().max()) if ref64.numel() else 0.0
    assert_close_verbose(ours, ref64, atol=2 * base + 1e-5, name=f"{name} (2x rule, torch err {base:.2e})")


def assert_equal_verbose(actual: torch.Tensor, expected: torch.Tensor, name: str = "tensor") -> None:
    """Exact equality (bitwise, NaN-free) with a report of the first mismatch."""
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        raise AssertionError(
            f"{name}: {tuple(actual.shape)}/{actual.dtype} != expected {tuple(expected.shape)}/{expected.dtype}"
        )
    neq = actual != expected
    if neq.any():
        first = neq.nonzero()[0].tolist()
        raise AssertionError(
            f"{name}: {int(neq.sum())}/{neq.numel()} elements differ; first at {first}: "
            f"{actual[tuple(first)].item()} != {expected[tuple(first)].item()}"
        )
