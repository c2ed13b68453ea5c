"""The whole benchmark suite in one command, with one report.

    python -m benchmarks --quick --out bench-out/quick      # under ~5 minutes on 2 cores
    python -m benchmarks --full --out bench-out/full        # tens of minutes; add --device cuda on a GPU

Runs each benchmark script in a fresh process, in this order: the engine
(CART on one matrix, the fused mean, an end-to-end merge, the low-rank step
against torch.linalg.svd and torch.svd_lowrank), scaling, every method side
by side with the cost of a search, streaming merges from disk, a long merge
under a small budget, ccsmerge against mergekit (when mergekit is
installed), and, with --full, distributed merges. Each writes its JSON,
markdown and plots into --out; REPORT.md gathers them behind a table of the
goals, each with its measured value and whether it is met."""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def steps(args) -> list[tuple[str, list[str], str]]:
    """(title, script arguments, markdown file it writes)."""
    out = str(args.out)
    preset = "full" if args.full else "quick"
    quick = [] if args.full else ["--quick"]
    plan = [
        ("Engine", ["bench_engine.py", "--device", args.device, "--preset", preset, "--out", out],
         f"engine-{args.device}-{preset}.md"),
        ("Scaling", ["scaling.py", "--out", out, *quick], f"scaling{'' if args.full else '-quick'}.md"),
        ("Every method, and the cost of a search", ["svd_family.py", "--out", out, *quick],
         f"svd_family{'' if args.full else '-quick'}.md"),
        ("Streaming merges from disk", ["streaming.py", "--out", out, *quick], "streaming.md"),
        ("A long merge under a small budget",
         ["streaming_load.py", "--out", out] + ([] if args.full else ["--tensors", "120"]), "streaming_load.md"),
    ]
    if importlib.util.find_spec("mergekit") is not None:
        size = [] if args.full else ["--hidden", "512", "--layers", "4", "--models", "3", "--rounds", "1"]
        plan.append(("Against mergekit", ["vs_mergekit.py", "--out", out, *size], "vs_mergekit.md"))
    if args.full:
        plan.append(("Distributed merges", ["distributed.py", "--out", out], "distributed.md"))
    return plan


def load(out: Path, name: str) -> dict | None:
    path = out / name
    return json.loads(path.read_text()) if path.is_file() else None


def goals(out: Path, device: str, preset: str) -> list[tuple[str, str, str]]:
    """(goal, measured, met?) for what this run measured."""
    rows = []
    engine = load(out, f"engine-{device}-{preset}.json")
    if engine and "d" in engine["parts"]:
        target = 100 if device == "cuda" else 20
        found = [r for r in engine["parts"]["d"]["rows"] if "error" not in r and tuple(r["shape"]) == (4096, 4096)
                 and abs(r["rank_ratio"] - 0.08) < 1e-9 and r["method"].startswith("ccsmerge")]
        if found:
            best = max(found, key=lambda r: r["speedup_vs_linalg_svd"])
            met = best["speedup_vs_linalg_svd"] >= target and best["err_ratio"] <= 1.02
            goal = f"low-rank step 4096² fp32, rank 8 %: ≥ {target}× vs torch.linalg.svd, error ratio ≤ 1.02"
            measured = f"{best['speedup_vs_linalg_svd']:.1f}× ({best['method']}), error ratio {best['err_ratio']:.4f}"
            rows.append((goal, measured, "yes" if met else "no"))
        else:
            rows.append(("low-rank step 4096² fp32, rank 8 %", "not in this preset (run --full)", "—"))
    if engine and "a" in engine["parts"]:
        biggest = max(engine["parts"]["a"]["rows"], key=lambda r: r["T"])
        speedup = biggest["speedup"]["official/ccs_rand_default"]["median"]
        rows.append((f"whole CART vs the official-style code (T = {biggest['T']} here; goal at T = 8: ≥ 20× on a CPU)",
                     f"{speedup:.1f}× on one {biggest['shape'][0]}×{biggest['shape'][1]} weight",
                     "yes" if speedup >= 20 else "no"))
    versus = load(out, "vs_mergekit.json")
    if versus:
        by = {(r["method"], r["tool"]): r["seconds"] for r in versus["rows"]}
        for method in ("average", "task_arithmetic"):
            ratio = by[(method, "ccsmerge")] / by[(method, "mergekit")]
            rows.append((f"streaming {method}: no slower than mergekit", f"{ratio:.2f}× mergekit's time",
                         "yes" if ratio <= 1.0 else "no"))
    scaling = load(out, f"scaling{'' if preset == 'full' else '-quick'}.json")
    if scaling:
        slope = scaling["slopes"]["rss_gb_per_input_gb"]
        verdict = "yes" if slope < 0.1 else "no"
        if preset != "full":  # 0.1-0.4 GB of input never reaches the 256 MB budget
            verdict = "— (the quick sizes stay under the budget; run --full)"
        rows.append(("peak RSS flat in the input size under a fixed --max-memory",
                     f"{slope * 1000:.0f} MB more per GB of input", verdict))
    rows.append(("streaming average within 1.3× of reading the inputs once",
                 "see the streaming section (merge/cat column)", "see below"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the default: a few minutes on 2 cores")
    size.add_argument("--full", action="store_true")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    sections, timings = [], []
    for title, command, markdown in steps(args):
        print(f"== {title}: {' '.join(command)}", flush=True)
        start = time.perf_counter()
        result = subprocess.run([sys.executable, str(HERE / command[0]), *command[1:]])
        seconds = time.perf_counter() - start
        timings.append((title, seconds, result.returncode))
        path = args.out / markdown
        body = path.read_text() if path.is_file() and result.returncode == 0 else f"(failed: exit {result.returncode})"
        sections.append(f"## {title}\n\n" + re.sub(r"^(#+) ", r"#\1 ", body, flags=re.M))
    preset = "full" if args.full else "quick"
    report = [
        f"# ccsmerge benchmark report ({preset}, {args.device})",
        "",
        f"`python -m benchmarks --{preset} --device {args.device} --out {args.out}`; every section names its machine.",
        "",
        "## Goals",
        "",
        "| goal | measured | met |",
        "|---|---|---|",
    ]
    report += [f"| {g} | {m} | {ok} |" for g, m, ok in goals(args.out, args.device, preset)]
    report += ["", "| step | seconds | exit |", "|---|---|---|"]
    report += [f"| {t} | {s:.0f} | {rc} |" for t, s, rc in timings]
    report += [""] + sections
    (args.out / "REPORT.md").write_text("\n".join(report) + "\n")
    print(f"report: {args.out / 'REPORT.md'}")
    if any(rc for _, _, rc in timings):
        sys.exit(1)


if __name__ == "__main__":
    main()
