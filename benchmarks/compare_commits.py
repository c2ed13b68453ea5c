"""Two checkouts' quick benchmarks side by side, in one run: time ratios new / old per row.

    python benchmarks/compare_commits.py --old CHECKOUT --new CHECKOUT --out DIR
        [--steps engine,streaming] [--rounds 3] [--threads 1] [--device cpu|cuda]
        [--step-args "engine=--parts ad"] [--python PY]

A checkout is a folder with ccsmerge built in place (`python setup.py build_ext --inplace`,
or the compiled extension copied into its ccsmerge/), e.g. one made for the commit before a
change with `git worktree add --detach ../before HEAD~1`. Each benchmark run is a fresh
process with PYTHONPATH set to its checkout, so that it imports that checkout's ccsmerge and
benchmarks (checked before anything runs: an installed ccsmerge that shadows the checkout's,
or one without its compiled kernels, is refused).

The steps are those of `python -m benchmarks --quick` (the mergekit comparison left out),
with its arguments: engine (bench_engine.py --preset quick), scaling, svd_family, streaming,
streaming_load. --steps picks them (default engine,streaming); --step-args STEP=ARGS adds
arguments to one step (repeatable), e.g. "engine=--parts b" for a run of seconds. The runs
are interleaved: in every round each step runs for both checkouts back to back, the old one
first in even rounds and the new one first in odd rounds, so that load drifting during the
comparison hits both alike. The streaming step's inputs are generated once, under DIR/cache,
and shared by both checkouts (they are deleted at the end).

Every timing in the steps' JSON (median_s, merge_s, seconds, ...) is a row; its per-round
ratio is new / old, and the table gives the median ratio [min-max over rounds], the two
checkouts' median times, and the geometric mean of the ratios: over ccsmerge's rows and,
separately, over the reference rows (torch, the official-style code, cat), whose code is the
same on both sides: their spread is the noise of the machine. Writes DIR/compare.md and
DIR/compare.json; each run's output folder and log stay under DIR/<old|new>/<step>/round-N.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from harness import fmt_seconds, log, median, table, write_results  # noqa: E402
from machine import git_state  # noqa: E402
from plots import load  # noqa: E402

SIDES = ("old", "new")
TIME_KEYS = {"median_s", "merge_s", "seconds", "search_s", "separate_merges_s", "one_merge_s", "s"}
ID_KEYS = ("size", "shape", "T", "dtype", "kind", "rank_ratio", "impl", "inputs", "method", "overlap", "tool",
           "run", "oversample", "power_iters", "round")
REFERENCE_WORDS = ("torch.", "official", "cat", "copy")  # rows whose code does not come from ccsmerge
SLOWER = 1.10  # a row whose median ratio is above this is marked


def steps(device: str, cache: Path) -> dict[str, list[str]]:
    """Step name -> [script, arguments...], as `python -m benchmarks --quick` runs them (--out is added)."""
    return {
        "engine": ["bench_engine.py", "--device", device, "--preset", "quick"],
        "scaling": ["scaling.py", "--quick"],
        "svd_family": ["svd_family.py", "--quick"],
        "streaming": ["streaming.py", "--quick", "--cache", str(cache), "--keep"],
        "streaming_load": ["streaming_load.py", "--tensors", "120"],
    }


# --------------------------------------------------------------------------- running


def check_checkout(python: str, checkout: Path, device: str) -> str:
    """The checkout's commit; exits when its ccsmerge would not be the one imported, or has no kernels."""
    code = ("import ccsmerge, json; print(json.dumps({'file': ccsmerge.__file__, "
            "'build': ccsmerge.build_info()}))")
    proc = subprocess.run([python, "-c", code], cwd=checkout, env=env_for(checkout, None), capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"{checkout}: importing ccsmerge failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    if not Path(found["file"]).resolve().is_relative_to(checkout.resolve()):
        sys.exit(f"{checkout}: `import ccsmerge` finds {found['file']}, not this checkout's")
    key = "cuda_ext" if device == "cuda" else "cpu_ext"
    if not found["build"][key]:
        sys.exit(f"{checkout}: ccsmerge has no compiled {device} kernels ({found['build']['extension_error']}): "
                 "build it in place first")
    if not (checkout / "benchmarks" / "bench_engine.py").is_file():
        sys.exit(f"{checkout}: no benchmarks/bench_engine.py")
    return git_state(checkout) or "not a git checkout"


def env_for(checkout: Path, threads: int | None) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(checkout))
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def run_step(python: str, checkout: Path, command: list[str], out: Path, threads: int | None) -> dict:
    """One benchmark run in a fresh process: its exit status, wall time and result files."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    start = time.perf_counter()
    with open(out.with_suffix(".log"), "w") as logfile:
        rc = subprocess.run([python, str(checkout / "benchmarks" / command[0]), *command[1:], "--out", str(out)],
                            cwd=checkout, env=env_for(checkout, threads), stdout=logfile, stderr=subprocess.STDOUT,
                            check=False).returncode
    return {"rc": rc, "wall_s": time.perf_counter() - start,
            "results": {p.name: load(p) for p in sorted(out.glob("*.json"))}}


# --------------------------------------------------------------------------- rows


def label_of(item: dict) -> str | None:
    """A list item's identity from its scalar identifying fields (shape, method, T, ...)."""
    parts = []
    for key in ID_KEYS:
        value = item.get(key)
        if isinstance(value, list) and all(isinstance(v, int) for v in value):
            value = "x".join(map(str, value))
        if isinstance(value, bool):
            value = key if value else f"no {key}"
        elif key == "rank_ratio" and isinstance(value, float):
            value = f"{value:.0%}"
        elif key in ("T", "oversample", "power_iters") and value is not None:
            value = f"{key}={value}"
        elif key == "round" and isinstance(value, int):
            value = f"round {value + 1}"
        if value is not None and not isinstance(value, (dict, list)):
            parts.append(str(value))
    return " ".join(parts) or None


def timings(data, path: tuple[str, ...] = (), out: dict[str, float] | None = None) -> dict[str, float]:
    """Every timing in a result file: readable row name -> seconds."""
    out = {} if out is None else out

    def add(name: str, seconds: float) -> None:
        unique, n = name, 1
        while unique in out:
            n += 1
            unique = f"{name} ({n})"
        out[unique] = float(seconds)

    if isinstance(data, dict):
        for key, value in data.items():
            if key in TIME_KEYS and isinstance(value, (int, float)) and not isinstance(value, bool):
                name = " · ".join(p for p in path if p not in ("parts", "rows", "time", "times")) or "total"
                add(name if key in ("median_s", "merge_s", "s") else f"{name} · {key}", value)
            elif key in ("machine", "config", "samples_s"):
                continue
            elif key.startswith("by_") and isinstance(value, list) and all(isinstance(v, list) for v in value):
                for v in value:  # scaling.py's (x, seconds, ...) points
                    add(" · ".join((*path, f"{key[3:]}={v[0]}")), v[1])
            else:
                timings(value, (*path, key), out)
    elif isinstance(data, list):
        for i, item in enumerate(data):
            label = label_of(item) if isinstance(item, dict) else None
            timings(item, (*path, label or f"#{i}"), out)
    return out


def collect(runs: dict) -> dict[str, dict[str, list[float | None]]]:
    """Row -> side -> its time in each round (None where that run did not produce it)."""
    rows: dict[str, dict[str, list[float | None]]] = {}
    for step, by_side in runs.items():
        rounds = len(by_side["old"])
        for side in SIDES:
            for r, run in enumerate(by_side[side]):
                found = {f"{step} · whole run (wall, process start included)": run["wall_s"]}
                for name, data in run["results"].items():
                    if data is not None and name != "steps.json":
                        found.update({f"{step} · {k}": v for k, v in timings(data).items()})
                for key, seconds in found.items():
                    rows.setdefault(key, {s: [None] * rounds for s in SIDES})[side][r] = seconds
    return rows


def config_warnings(runs: dict) -> list[str]:
    """Result files whose configuration differs between the checkouts: their ratios compare different work."""
    out = []
    for step, by_side in runs.items():
        old, new = by_side["old"][0]["results"], by_side["new"][0]["results"]
        for name in sorted(old.keys() | new.keys()):
            if name not in old or name not in new:
                out.append(f"{step}: {name} written by the {'new' if name in new else 'old'} checkout only")
            elif (old[name] or {}).get("config") != (new[name] or {}).get("config"):
                out.append(f"{step}: {name} has a different configuration in the two checkouts")
    return out


def geomean(xs: list[float]) -> float | None:
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def summarize(rows: dict) -> list[dict]:
    out = []
    for name, sides in rows.items():
        ratios = [n / o for o, n in zip(sides["old"], sides["new"]) if o and n]
        old = median([x for x in sides["old"] if x is not None])
        new = median([x for x in sides["new"] if x is not None])
        out.append({"row": name, "old_s": old, "new_s": new, "ratio": median(ratios),
                    "ratio_min": min(ratios, default=None), "ratio_max": max(ratios, default=None),
                    "rounds": len(ratios), "reference": any(w in name for w in REFERENCE_WORDS)})
    return out


def markdown(summary: list[dict], labels: dict[str, str], args, warnings: list[str]) -> str:
    def ratio_cell(r):
        if r["ratio"] is None:
            return "missing"
        spread = f" [{r['ratio_min']:.2f}-{r['ratio_max']:.2f}]" if r["rounds"] > 1 else ""
        return f"{r['ratio']:.2f}{spread}" + (" slower" if r["ratio"] > SLOWER and not r["reference"] else "")

    ours = geomean([r["ratio"] for r in summary if r["ratio"] and not r["reference"]])
    reference = geomean([r["ratio"] for r in summary if r["ratio"] and r["reference"]])
    lines = [
        f"# new / old: {labels['new']} against {labels['old']}", "",
        (f"`{' '.join(sys.argv)}`: {args.rounds} interleaved round(s) of {', '.join(args.steps)}; "
         f"OMP/MKL threads {args.threads or 'as in the environment'}. Ratio: the median over rounds of new / old "
         f"[min-max]; below 1 the new checkout is faster. Rows marked slower: ratio above {SLOWER}."), "",
        (f"Geometric mean of the ratios: ccsmerge's rows {ours:.3f}" if ours else "No ccsmerge rows")
        + (f"; reference rows (torch, official-style code, cat: the same code on both sides, so their spread is "
           f"the machine's noise) {reference:.3f}." if reference else "."), "",
        *(f"**{w}**\n" for w in warnings),
        table(["row", "old", "new", "new / old"],
              [[r["row"] + (" (reference)" if r["reference"] else ""),
                fmt_seconds(r["old_s"]) if r["old_s"] is not None else "-",
                fmt_seconds(r["new_s"]) if r["new_s"] is not None else "-", ratio_cell(r)] for r in summary]),
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old", type=Path, required=True, help="the checkout to compare against (e.g. the commit before)")
    p.add_argument("--new", type=Path, required=True, help="the checkout with the change")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", default="engine,streaming",
                   help="comma-separated: engine, scaling, svd_family, streaming, streaming_load (default "
                        "engine,streaming)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--threads", type=int, metavar="N", help="OMP_NUM_THREADS and MKL_NUM_THREADS for every run")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="the engine step's device")
    p.add_argument("--step-args", action="append", default=[], metavar="STEP=ARGS",
                   help="more arguments for one step, e.g. 'engine=--parts b' (repeatable)")
    p.add_argument("--python", default=sys.executable, help="the interpreter for both checkouts (default: this one)")
    args = p.parse_args(argv)
    args.steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    cache = args.out / "cache"
    plan = steps(args.device, cache)
    unknown = [s for s in args.steps if s not in plan]
    if unknown:
        sys.exit(f"--steps: unknown {', '.join(unknown)} (known: {', '.join(plan)})")
    for extra in args.step_args:
        step, _, more = extra.partition("=")
        if step not in plan:
            sys.exit(f"--step-args {extra!r}: unknown step {step!r}")
        plan[step] = plan[step] + shlex.split(more)
    checkouts = {"old": args.old.resolve(), "new": args.new.resolve()}
    labels = {side: f"{side} {check_checkout(args.python, co, args.device)} ({co})" for side, co in checkouts.items()}
    for side in SIDES:
        log(labels[side])
    runs = {step: {side: [] for side in SIDES} for step in args.steps}
    try:
        for r in range(args.rounds):
            order = SIDES if r % 2 == 0 else SIDES[::-1]
            for step in args.steps:
                for side in order:
                    run = run_step(args.python, checkouts[side], plan[step], args.out / side / step / f"round-{r + 1}",
                                   args.threads)
                    runs[step][side].append(run)
                    log(f"round {r + 1}, {step}, {side}: {run['wall_s']:.0f} s"
                        + (f", EXIT {run['rc']} (see its log)" if run["rc"] else ""))
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    summary = summarize(collect(runs))
    warnings = config_warnings(runs) + [f"{step}, {side}, round {r + 1}: exit {run['rc']}"
                                        for step, by in runs.items() for side in SIDES
                                        for r, run in enumerate(by[side]) if run["rc"]]
    text = markdown(summary, labels, args, warnings)
    write_results(args.out, "compare", {"checkouts": labels, "steps": {s: plan[s] for s in args.steps},
                                        "rounds": args.rounds, "rows": summary, "warnings": warnings}, text, echo=True)
    return 1 if any(run["rc"] for by in runs.values() for side in SIDES for run in by[side]) else 0


if __name__ == "__main__":
    sys.exit(main())
