"""Which tensors get CART's low-rank step."""

from __future__ import annotations

import re

import torch


def takes_lowrank(name: str, tensor: torch.Tensor, include: tuple[str, ...], exclude: tuple[str, ...]) -> bool:
    """A floating 2-D tensor takes the low-rank step unless its name matches an
    exclude pattern; matching an include pattern overrides the excludes
    (exclude=(".*",) with include patterns selects exactly those)."""
    if tensor.dim() != 2 or not tensor.is_floating_point() or min(tensor.shape) == 0:
        return False
    if any(re.search(p, name) for p in include):
        return True
    return not any(re.search(p, name) for p in exclude)


def lowrank_selected(name: str, shape: tuple[int, ...], dtype: torch.dtype, cfg) -> bool:
    """takes_lowrank from a tensor's header (shape and dtype) and a MergeConfig's patterns."""
    probe = torch.empty(shape, dtype=dtype, device="meta")
    return takes_lowrank(name, probe, cfg.lowrank_include, cfg.lowrank_exclude)
