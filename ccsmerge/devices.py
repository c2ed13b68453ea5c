"""The device option (--device, device=...): auto, cpu, cuda or cuda:N.

One parser for every entry point, so that a wrong value gets the list of the
values ccsmerge runs on, not torch's list of every device type it knows."""

from __future__ import annotations

import re

import torch

from .errors import MergeError

VALID_DEVICES = "auto, cpu, cuda, cuda:N (N: a GPU's index, from 0)"
_DEVICE = re.compile(r"^(cpu|cuda)(?::(\d{1,9}))?$")


def parse_device(device: str | torch.device) -> torch.device:
    """The torch.device named by `device`; "auto" is CUDA when available, else the CPU.
    Whether a named GPU is present is for the caller to check (a plan for a GPU
    can be made without one)."""
    if isinstance(device, torch.device):
        if device.type in ("cpu", "cuda"):
            return device
        raise MergeError(f"device: ccsmerge runs on the CPU or CUDA GPUs, not {device.type}; valid: {VALID_DEVICES}")
    text = str(device)
    shown = text if len(text) <= 40 else text[:30] + "..."
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    match = _DEVICE.match(text)
    if match is None or (match.group(1) == "cpu" and match.group(2) is not None):
        raise MergeError(f"device: {shown!r} is not a device ccsmerge runs on; valid: {VALID_DEVICES}")
    if match.group(2) is None:
        return torch.device(text)
    index = int(match.group(2))
    try:
        resolved = torch.device("cuda", index)
    except (RuntimeError, ValueError, OverflowError):
        resolved = None
    if resolved is None or resolved.index != index:  # torch keeps a small index and would wrap a large one
        raise MergeError(f"device: {shown!r}: GPU index {index} is out of range; valid: {VALID_DEVICES}")
    return resolved
