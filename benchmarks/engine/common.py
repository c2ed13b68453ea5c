"""What the engine's parts share: the ccsmerge under test, CART's scale, and the
measurements of a merge's outputs and peak memory."""

from __future__ import annotations

import gc
import os
import threading

import torch
from machine import load_ccsmerge

ccsmerge = load_ccsmerge()

LAM = 2.0  # CART's default scale, used by both implementations


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b||_F / ||b||_F."""
    return float((a.double() - b.double()).norm() / b.double().norm())


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def keep_last_output(fns: dict, outputs: dict) -> dict:
    """The same calls, each keeping its last result in outputs[name] (to score it after timing)."""
    def wrap(name, fn):
        def call():
            outputs[name] = fn()
        return call
    return {name: wrap(name, fn) for name, fn in fns.items()}


def rss_bytes() -> int:
    """This process's resident set size."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory of each call of wrapped functions, over what was in use when the
    call started: on a GPU torch.cuda.max_memory_allocated; on the CPU the process
    RSS, sampled every 2 ms by a thread (glibc returns large buffers to the system
    when they are freed, so one call's peak does not carry into the next)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peaks: dict[str, list[int]] = {}

    def wrap(self, fns: dict) -> dict:
        return {name: (lambda name=name, fn=fn: self.measure(name, fn)) for name, fn in fns.items()}

    def measure(self, name: str, fn):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            start = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            result = fn()
            torch.cuda.synchronize(self.device)
            self.peaks.setdefault(name, []).append(torch.cuda.max_memory_allocated(self.device) - start)
            return result
        start = rss_bytes()
        peak = [start]
        done = threading.Event()

        def sample():
            while not done.wait(0.002):
                peak[0] = max(peak[0], rss_bytes())
        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            result = fn()
        finally:
            done.set()
            thread.join()
        self.peaks.setdefault(name, []).append(max(peak[0], rss_bytes()) - start)
        return result

    def as_dict(self) -> dict:
        return {name: max(v) for name, v in self.peaks.items()}


def fmt_bytes(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if abs(n) >= 1e8 else f"{n / 1e6:.0f} MB"
