"""One `ccsmerge merge` in a fresh process, measured, and the floors it is compared with.

    python benchmarks/merge_process.py merge --model A --model B --out DIR ...   (the child)

The child imports ccsmerge (and torch), records its RSS as the baseline, runs
ccsmerge.cli.main while a thread samples /proc/self/status every 10 ms (RssAnon:
allocated memory; RssFile: pages of memory-mapped files, inputs included), and
prints one line, RESULT_MARKER + JSON: exit code, wall and CPU time of the merge,
the baseline, getrusage's ru_maxrss (the peak RSS) and the sampled peaks.
`run_child` runs such a child (this one, or gpu_streaming.py's, which adds the GPU's
numbers) and reads that line back.

The floors: `cat` of the input files to /dev/null (the time to read them once,
from a warm page cache), the share of them that is in the page cache (fincore),
and writing the output's size to a new file with fsync."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULT_MARKER = "@@merge-result@@ "


# --------------------------------------------------------------------------- the child: one merge, measured


def proc_status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile, RssShmem of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0]) * 1024
    return out


class RssSampler(threading.Thread):
    """Peaks of RssAnon, RssFile and VmRSS, sampled every `interval` seconds."""

    def __init__(self, interval: float = 0.01):
        super().__init__(name="rss-sampler", daemon=True)
        self.interval = interval
        self.peaks = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
        self.samples = 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            status = proc_status()
            for key in self.peaks:
                self.peaks[key] = max(self.peaks[key], status[key])
            self.samples += 1
            self._done.wait(self.interval)

    def stop(self) -> None:
        self._done.set()
        self.join()


def measure_cli(argv: list[str], finish=None) -> dict:
    """Run `ccsmerge <argv>` in this process: exit code, wall and CPU time, baseline and peak RSS.
    finish() (e.g. a CUDA synchronize) runs before the clock stops."""
    import ccsmerge.cli

    baseline = proc_status()
    sampler = RssSampler()
    sampler.start()
    cpu0 = os.times()
    t0 = time.perf_counter()
    rc = ccsmerge.cli.main(argv)
    if finish is not None:
        finish()
    wall = time.perf_counter() - t0
    cpu1 = os.times()
    sampler.stop()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "rc": rc,
        "merge_s": wall,
        "cpu_s": (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system),
        "baseline_rss": baseline["VmRSS"],
        "baseline_anon": baseline["RssAnon"],
        "baseline_file": baseline["RssFile"],
        "peak_rss": usage.ru_maxrss * 1024,  # KiB on Linux
        "sampled_peak_rss": sampler.peaks["VmRSS"],
        "sampled_peak_anon": sampler.peaks["RssAnon"],
        "sampled_peak_file": sampler.peaks["RssFile"],
        "samples": sampler.samples,
        "major_faults": usage.ru_majflt,
        "minor_faults": usage.ru_minflt,
    }


def report(result: dict) -> None:
    """The child's one line of results, read back by run_child."""
    print(RESULT_MARKER + json.dumps(result), flush=True)


def child_main(argv: list[str]) -> int:
    """Import ccsmerge, record the baseline RSS, run `ccsmerge <argv>`, print the measurements."""
    sys.path.insert(0, str(HERE))
    from machine import load_ccsmerge

    load_ccsmerge()
    import ccsmerge.cli
    import ccsmerge.streaming  # noqa: F401  (imported by cli.main: part of the baseline)

    result = measure_cli(argv)
    report(result)
    return result["rc"]


# --------------------------------------------------------------------------- the parent


def child_command(argv: list[str]) -> list[str]:
    """The command line of a child that runs and measures `ccsmerge <argv>`."""
    return [sys.executable, str(Path(__file__).resolve()), *argv]


def run_child(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> dict:
    """Run a measuring child (env: variables added to ours): {"process_s": seconds, then
    what it reported}, with "error" (its last line of stderr) when it failed, and
    "timed_out" when it ran past timeout and was killed."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout,
                              env=None if env is None else {**os.environ, **env})
    except subprocess.TimeoutExpired:
        return {"process_s": time.perf_counter() - t0, "error": f"timed out after {timeout:.0f} s", "timed_out": True}
    result: dict = {"process_s": time.perf_counter() - t0}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_MARKER)]
    if lines:
        result.update(json.loads(lines[-1][len(RESULT_MARKER):]))
    if proc.returncode != 0 or not lines:
        result["error"] = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
    return result


def remove_output(out: Path) -> None:
    """A merge's output folder and the partial folder an interrupted merge leaves beside it."""
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(out.parent / f".{out.name}.ccsmerge-partial", ignore_errors=True)


# --------------------------------------------------------------------------- the floors


def resident_fraction(files: list[str]) -> float | None:
    """Share of the files' bytes in the page cache (fincore), or None without fincore."""
    if not shutil.which("fincore"):
        return None
    try:
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", *files],
                             capture_output=True, text=True, check=True, timeout=120).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    resident = sum(int(x) for x in out.split())
    return resident / sum(os.path.getsize(f) for f in files)


def cat(files: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


def timed_cat(files: list[str]) -> dict:
    warm_s = cat(files)
    resident = resident_fraction(files)
    return {"warm_s": warm_s, "resident_before": resident, "s": cat(files)}


def timed_write(path: Path, nbytes: int) -> float:
    """Seconds to write nbytes (zeros, 64 MiB at a time) to a new file and fsync it, as the merge writes its output."""
    chunk = bytes(64 * 2**20)
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        left = nbytes
        while left > 0:
            f.write(chunk[: min(left, len(chunk))])
            left -= len(chunk)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - t0
    path.unlink()
    return seconds


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
