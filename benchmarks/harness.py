"""The benchmarks' shared harness: timing, medians, markdown tables, logging and result files.

Every in-process measurement returns a Timing (all samples, in seconds, with
median/min/max). On a CUDA device the clock is a pair of CUDA events around the
call (the GPU time of everything the call queued, host waits included) or, with
wall=True, the host clock between two synchronizations; on the CPU it is
time.perf_counter. Commands (a merge in a fresh process) are timed by the wall
clock around them, with /usr/bin/time for their peak RSS."""

from __future__ import annotations

import json
import statistics
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

GB = 10**9


# --------------------------------------------------------------------------- timing in this process


@dataclass
class Timing:
    samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def max(self) -> float:
        return max(self.samples)

    def as_dict(self) -> dict:
        return {"median_s": self.median, "min_s": self.min, "max_s": self.max, "n": len(self.samples),
                "samples_s": self.samples}

    def __str__(self) -> str:
        return fmt_range(self.median, self.min, self.max)


def fmt_seconds(s: float) -> str:
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms"
    return f"{s * 1e6:.0f} us"


def fmt_range(median: float, lo: float, hi: float, fmt: Callable[[float], str] = fmt_seconds) -> str:
    if lo == hi:
        return fmt(median)
    return f"{fmt(median)} [{fmt(lo)}-{fmt(hi)}]"


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def measure_once(fn: Callable[[], object], device: torch.device | str, wall: bool = False) -> float:
    """Seconds one call of fn takes on device (see the module docstring)."""
    device = torch.device(device)
    if device.type == "cuda" and not wall:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        synchronize(device)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def time_fn(
    fn: Callable[[], object],
    device: torch.device | str,
    *,
    warmup: int = 1,
    repeats: int = 5,
    max_seconds: float | None = None,
    warmup_fn: Callable[[], object] | None = None,
    wall: bool = False,
) -> Timing:
    """Run warmup_fn (or fn) `warmup` times, then time fn `repeats` times; stop
    early, after at least one sample, once the samples add up to max_seconds."""
    for _ in range(warmup):
        (warmup_fn or fn)()
    synchronize(device)
    timing = Timing()
    for _ in range(max(1, repeats)):
        timing.samples.append(measure_once(fn, device, wall))
        if max_seconds is not None and sum(timing.samples) >= max_seconds:
            break
    return timing


def time_interleaved(
    fns: Mapping[str, Callable[[], object]],
    device: torch.device | str,
    *,
    rounds: int = 3,
    warmups: Mapping[str, Callable[[], object] | None] | None = None,
    wall: bool = False,
    max_seconds: float | None = None,
) -> dict[str, Timing]:
    """Time several variants side by side: each round runs every variant once, in
    turn, so slow drifts (clocks, other load) hit all of them alike. warmups maps a
    variant to a cheaper warm-up call (None: the variant itself, once). No new round
    starts once the rounds so far took max_seconds."""
    warmups = warmups or {}
    for name, fn in fns.items():
        (warmups.get(name) or fn)()
    synchronize(device)
    timings = {name: Timing() for name in fns}
    start = time.perf_counter()
    for _ in range(rounds):
        for name, fn in fns.items():
            timings[name].samples.append(measure_once(fn, device, wall))
        if max_seconds is not None and time.perf_counter() - start >= max_seconds:
            break
    return timings


def paired_ratio(slow: Timing, fast: Timing) -> dict:
    """slow/fast per round (the variants ran in the same rounds): median, min, max."""
    ratios = [s / f for s, f in zip(slow.samples, fast.samples)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


def fmt_ratio(r: dict) -> str:
    if r["min"] == r["max"]:
        return f"{r['median']:.2f}x"
    return f"{r['median']:.2f}x [{r['min']:.2f}-{r['max']:.2f}]"


# --------------------------------------------------------------------------- timing commands


def time_command(command: list[str], env: dict[str, str] | None = None) -> float:
    """Wall seconds of a command (its output goes to ours); raises when it fails."""
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env)
    return time.perf_counter() - start


def time_command_rss(command: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in GB) of a command run under /usr/bin/time; exits with
    the end of its stderr when it fails."""
    start = time.perf_counter()
    result = subprocess.run(["/usr/bin/time", "-f", "%M", *command], check=False, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{result.stderr[-3000:]}")
    return seconds, int(result.stderr.strip().splitlines()[-1]) * 1024 / GB


# --------------------------------------------------------------------------- statistics


def median(xs: list[float]) -> float | None:
    """The median (the mean of the two middle samples for an even count); None for no samples."""
    return statistics.median(xs) if xs else None


def upper_median(xs: list[float]) -> float:
    """The middle sample, the larger of the two middle ones for an even count (with two
    rounds: the slower one). What distributed.py, scaling.py, svd_family.py and
    vs_mergekit.py have always reported as their median."""
    return statistics.median_high(xs)


# --------------------------------------------------------------------------- output


def log(msg: str) -> None:
    print(msg, flush=True)


def table(headers: list[str], rows: list[list], align: str | None = None) -> str:
    """A markdown table, its columns padded to their widest cell; align: one letter per
    column, "l" or "r" (default: all left)."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    align = align or "l" * len(headers)

    def line(r):
        return "| " + " | ".join(c.rjust(w) if a == "r" else c.ljust(w) for c, w, a in zip(r, widths, align)) + " |"

    rule = "|" + "|".join("-" * (w + 1) + (":" if a == "r" else "-") for w, a in zip(widths, align)) + "|"
    return "\n".join([line(headers), rule, *map(line, cells)])


def fmt_gb(x: float | None) -> str:
    """Bytes as GB (10^9) with two decimals; "-" for None."""
    return "-" if x is None else f"{x / GB:.2f}"


def write_results(out: Path, stem: str, data: dict, markdown: str, echo: bool = False) -> None:
    """out/stem.json (everything measured) and out/stem.md (the tables); echo prints the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    (out / f"{stem}.md").write_text(markdown.rstrip("\n") + "\n")
    if echo:
        log(markdown)
