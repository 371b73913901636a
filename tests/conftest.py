"""Shared test helpers: a fixed seed per test and the relative error used for every numeric bound."""

from __future__ import annotations

import pytest
import torch


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected|| / ||expected||`` in float64 (0 when both are zero)."""
    a, b = actual.double(), expected.double()
    denom = b.norm().item()
    diff = (a - b).norm().item()
    return diff if denom == 0 else diff / denom


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
