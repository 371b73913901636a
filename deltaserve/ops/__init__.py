"""Kernel-level ops: one signature, two implementations.

Each public op (``deltaserve.ops.attention``, ``.conv1d``, ``.delta_rule``, ``.kda``, ``.moe``, ``.norm``,
``.sampling``) is a dispatcher: on CUDA inputs it calls the same-named function of ``deltaserve.ops.gpu.<module>`` when
that module imports (fla-core Triton kernels or the project's own), else the torch reference
``<name>_ref`` (CPU or GPU, float32 accumulation). Tests compare the two.
"""

from __future__ import annotations

import functools
import importlib
from typing import Callable

import torch


@functools.lru_cache(maxsize=None)
def gpu_impl(module: str, name: str) -> Callable | None:
    """``deltaserve.ops.gpu.<module>.<name>``, or None when that module does not import here.

    NOTE: imported only when a CUDA tensor asks for it, so a CPU machine never imports Triton/fla.
    """
    try:
        mod = importlib.import_module(f"deltaserve.ops.gpu.{module}")
    except ImportError:
        return None
    return getattr(mod, name, None)


def dispatch(module: str, name: str, x: torch.Tensor, ref: Callable) -> Callable:
    """The implementation to run for input ``x``: the GPU op when ``x`` is on CUDA and it exists, else ``ref``."""
    if x.is_cuda:
        impl = gpu_impl(module, name)
        if impl is not None:
            return impl
    return ref
