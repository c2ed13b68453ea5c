"""Loads the compiled operator library and answers which ops run natively."""

from __future__ import annotations

import functools
import os
import warnings

import torch

DISABLE_ENV = "CCSMERGE_DISABLE_EXT"

load_error: str | None = None
if os.environ.get(DISABLE_ENV, "0").lower() in ("1", "true", "yes", "on"):
    load_error = f"disabled by {DISABLE_ENV}"
else:
    try:
        from . import _C  # noqa: F401  (registers torch.ops.ccsmerge.*)
    except ImportError as exc:
        load_error = str(exc)

loaded = load_error is None


@functools.cache
def has_kernel(op: str, device_type: str) -> bool:
    """Whether ccsmerge::<op> has a compiled kernel for this device type."""
    if not loaded:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"ccsmerge::{op}", key)


@functools.cache
def warn_fallback(op: str, device_type: str) -> None:
    reason = load_error or f"the extension was built without {device_type} kernels"
    warnings.warn(
        f"ccsmerge: no compiled {op} kernel for {device_type} ({reason}); using the PyTorch fallback",
        RuntimeWarning,
        stacklevel=3,
    )
