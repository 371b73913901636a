"""Tensors derived from a module's parameters (a float32 copy, a concatenation), computed once and
kept until a parameter they come from changes.

In-place loads (``load_state_dict``, ``copy_``) bump a tensor's ``_version``; moving or casting a
module changes its parameters' storage or dtype. The cache key holds all three, so a derived tensor
cannot go stale, and a decode step does not redo the conversion on every call.
"""

from __future__ import annotations

from typing import Callable

import torch


class DerivedTensor:
    """``fn(*params)``, recomputed only when one of ``params`` changed since the last call."""

    def __init__(self, fn: Callable[..., torch.Tensor]):
        self._fn = fn
        self._value: torch.Tensor | None = None
        self._key: tuple | None = None

    def __call__(self, *params: torch.Tensor) -> torch.Tensor:
        key = tuple((p.data_ptr(), p._version, p.device, p.dtype) for p in params)
        if self._value is None or key != self._key:
            with torch.no_grad():
                self._value = self._fn(*(p.detach() for p in params))
            self._key = key
        return self._value
