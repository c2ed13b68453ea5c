"""pytest options for the micro-benchmarks: --out DIR writes the results, with
the machine they ran on, to DIR/ops-<devices>.json and .md."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import machine
from harness import table, write_results


def pytest_addoption(parser):
    parser.addoption("--out", type=Path, default=None, help="folder for the JSON and markdown results")


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config, machine_info):
    """Adds ours to the machine info of --benchmark-json / --benchmark-autosave files."""
    machine_info["ccsmerge_bench"] = _machine()


def _machine() -> dict:
    return machine.machine_info(machine.load_ccsmerge())


def _rows(benchmarks) -> list[dict]:
    rows = []
    for bench in benchmarks:
        if bench.has_error:
            continue
        data = bench.as_dict(include_data=False)
        s = data["stats"]
        rows.append({"group": data["group"], "name": data["name"], "median_s": s["median"], "min_s": s["min"],
                     "max_s": s["max"], "mean_s": s["mean"], "rounds": s["rounds"]})
    return sorted(rows, key=lambda r: (r["group"] or "", r["median_s"]))


def _markdown(info: dict, rows: list[dict]) -> str:
    fastest: dict[str, float] = {}
    for r in rows:
        fastest.setdefault(r["group"], r["median_s"])
    cells = [[r["group"], r["name"], f"{r['median_s'] * 1e3:.3f} ms", f"{r['min_s'] * 1e3:.3f} ms",
              f"{r['max_s'] * 1e3:.3f} ms", r["rounds"], f"{r['median_s'] / fastest[r['group']]:.2f}x"] for r in rows]
    return "\n".join(["# ccsmerge op micro-benchmarks", "", f"Machine: {machine.describe(info)}", "",
                      table(["group", "test", "median", "min", "max", "rounds", "vs fastest"], cells)])


def pytest_sessionfinish(session, exitstatus):
    out = session.config.getoption("--out")
    bench_session = getattr(session.config, "_benchmarksession", None)
    if out is None or bench_session is None or not bench_session.benchmarks:
        return
    info = _machine()
    rows = _rows(bench_session.benchmarks)
    stem = "ops-" + ("cpu-cuda" if torch.cuda.is_available() else "cpu")
    write_results(out, stem, {"machine": info, "benchmarks": rows}, _markdown(info, rows))
