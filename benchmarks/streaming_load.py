"""A long merge under a memory budget: RSS, open files and threads sampled
from start to end.

A few hundred tensors are merged by `ccsmerge merge` in a child process
while this script samples the child every 20 ms. Reported: the child's RSS
over a baseline (a child that only imports ccsmerge and torch), per tenth of
the run, against the budget; and its open file descriptors and threads once
the pipeline runs versus at the end, which must not grow.

    python benchmarks/streaming_load.py --out benchmarks/results/cpu-2core [--tensors 400] [--budget 64MB]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import log, table, write_results  # noqa: E402
from machine import describe, load_average, load_ccsmerge, machine_info  # noqa: E402

MB = 1e6


def write_models(root: Path, models: int, tensors: int, width: int) -> list[Path]:
    """`models` folders of `tensors` tensors: 3 of 4 are width x width fp32 matrices, the rest biases."""
    g = torch.Generator().manual_seed(0)
    paths = []
    for t in range(models):
        sd = {}
        for i in range(tensors):
            shape = (width, width) if i % 4 else (width,)
            sd[f"layers.{i}.{'weight' if i % 4 else 'bias'}"] = torch.randn(shape, generator=g)
        folder = root / f"model-{t}"
        folder.mkdir()
        save_file(sd, folder / "model.safetensors")
        paths.append(folder)
    return paths


def baseline_rss() -> float:
    code = "import ccsmerge, psutil; print(psutil.Process().memory_info().rss)"
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def sample(cmd: list[str], period: float = 0.02) -> tuple[list[dict], float]:
    start = time.perf_counter()
    child = subprocess.Popen(cmd)
    probe = psutil.Process(child.pid)
    samples = []
    while child.poll() is None:
        try:
            with probe.oneshot():
                samples.append(
                    {
                        "t": time.perf_counter() - start,
                        "rss": probe.memory_info().rss,
                        "fds": probe.num_fds(),
                        "threads": probe.num_threads(),
                    }
                )
        except psutil.NoSuchProcess:
            break
        time.sleep(period)
    if child.wait() != 0:
        raise SystemExit(f"the merge failed: {' '.join(cmd)}")
    return samples, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--models", type=int, default=4)
    parser.add_argument("--tensors", type=int, default=400)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--budget", default="64MB")
    parser.add_argument("--method", default="cart")
    args = parser.parse_args()
    ccsmerge = load_ccsmerge()
    info = machine_info(ccsmerge)
    log(describe(info))

    work = Path(tempfile.mkdtemp(prefix="ccsmerge-load-"))
    try:
        paths = write_models(work, args.models, args.tensors, args.width)
        input_bytes = sum(p.stat().st_size for folder in paths for p in folder.iterdir())
        cmd = [sys.executable, "-m", "ccsmerge", "merge", "--method", args.method, "--device", "cpu", "--quiet"]
        cmd += ["--max-memory", args.budget, "--out", str(work / "merged"), "--out-shard-size", "50MB"]
        cmd += [a for p in paths for a in ("--model", str(p))]
        base = baseline_rss()
        samples, seconds = sample(cmd)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    budget = ccsmerge.sizes.parse_size(args.budget)
    running = [s for s in samples if s["threads"] == max(x["threads"] for x in samples)] or samples
    tenths = []
    for i in range(10):
        part = [s for s in samples if i / 10 <= s["t"] / seconds < (i + 1) / 10]
        if part:
            tenths.append(round((max(s["rss"] for s in part) - base) / MB, 1))
    peak = max(s["rss"] for s in samples)
    result = {
        "machine": info,
        "load_average": load_average(),
        "models": args.models,
        "tensors": args.tensors,
        "width": args.width,
        "method": args.method,
        "input_bytes": input_bytes,
        "budget_bytes": budget,
        "seconds": round(seconds, 2),
        "samples": len(samples),
        "baseline_rss_mb": round(base / MB, 1),
        "peak_rss_mb": round(peak / MB, 1),
        "peak_over_baseline_mb": round((peak - base) / MB, 1),
        "over_baseline_by_tenth_mb": tenths,
        "fds_first_running": running[0]["fds"],
        "fds_last_running": running[-1]["fds"],
        "fds_max": max(s["fds"] for s in samples),
        "threads_running": running[0]["threads"],
        "threads_max": max(s["threads"] for s in samples),
    }
    lines = [
        "# A long merge under a memory budget",
        "",
        f"Machine: {describe(info)}; load average {result['load_average']}.",
        "",
        f"`ccsmerge merge --method {args.method} --max-memory {args.budget}`: {args.models} models x "
        f"{args.tensors} tensors ({args.width} x {args.width} fp32 matrices and biases), "
        f"{input_bytes / MB:.0f} MB of input, {seconds:.1f} s, {len(samples)} samples.",
        "",
        table(["", "value"], [
            ["baseline RSS (import ccsmerge)", f"{result['baseline_rss_mb']} MB"],
            ["peak RSS over baseline", f"{result['peak_over_baseline_mb']} MB (budget {budget / MB:.0f} MB)"],
            ["peak over baseline, per tenth of the run", f"{', '.join(map(str, tenths))} MB"],
            ["open files while merging, first / last / max",
             f"{result['fds_first_running']} / {result['fds_last_running']} / {result['fds_max']}"],
            ["threads while merging / max", f"{result['threads_running']} / {result['threads_max']}"],
        ]),
    ]
    write_results(args.out, "streaming_load", result, "\n".join(lines), echo=True)


if __name__ == "__main__":
    main()
