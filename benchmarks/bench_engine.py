"""ccsmerge engine benchmarks.

    python benchmarks/bench_engine.py --device cpu|cuda --preset quick|full --out DIR [--parts abcd]

Each part is one module of benchmarks/engine/, its presets in engine/presets.py:

a  engine/cart_one_matrix.py: CART on one m x n weight (T tasks): ccsmerge's randomized
   update (defaults, and oversample=10/power_iters=2) vs svd="exact" vs the official-style
   implementation, timed side by side, and the randomized update's error against the exact one.
b  engine/mean_bandwidth.py: the fused T-way mean: achieved GB/s vs a device copy and vs
   torch.stack().float().mean(0).
c  engine/end_to_end.py: an end-to-end in-memory merge of a synthetic multi-layer model (CPU
   state dicts), and ccsmerge vs official_cart on (a subset of) it.
d  engine/lowrank_step.py: the low-rank step on one matrix: ccsmerge.ops.randomized_svd vs
   torch.linalg.svd (each CUDA driver) vs torch.svd_lowrank: time and
   ||A - A_k||_F / ||A - A_k^opt||_F.

Results go to DIR/engine-<device>-<preset>.json and .md (rewritten after each part, so
a run cut short keeps what it finished); a compact table is printed at the end.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from dataclasses import asdict, replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from harness import log, table, write_results  # noqa: E402
from machine import describe, load_average, machine_info, startup_warnings  # noqa: E402

from engine import cart_one_matrix, end_to_end, lowrank_step, mean_bandwidth  # noqa: E402
from engine.common import ccsmerge, free_memory  # noqa: E402
from engine.presets import PRESETS, Preset  # noqa: E402

PARTS = {"a": cart_one_matrix, "b": mean_bandwidth, "c": end_to_end, "d": lowrank_step}


def summary(results: dict) -> str:
    """The compact end-of-run table: one line per headline number."""
    lines = []
    for key, part in PARTS.items():
        if key in results["parts"]:
            lines += part.summary_rows(results["parts"][key])
    return table(["benchmark", "time (median)", "result"], lines)


def save(results: dict, out: Path, stem: str) -> None:
    """out/stem.json (everything) and out/stem.md (each part's section, the failures, the summary)."""
    md = [f"# ccsmerge engine benchmarks: {results['device']}, preset {results['preset']}", "",
          f"Machine: {describe(results['machine'])}", "",
          (f"Wall time: {results.get('wall_s', float('nan')):.0f} s. Load average (1/5/15 min) at the start "
           f"and after each part: {results['load_avg']}."), "", *(f"**{w}**\n" for w in results["warnings"])]
    for key, part in PARTS.items():
        if key in results["parts"]:
            md += [f"## {part.TITLE}", "", part.markdown(results["parts"][key]), ""]
    for key, err in results.get("errors", {}).items():
        md += [f"## {PARTS[key].TITLE}: FAILED", "", "```", err, "```", ""]
    if results["parts"]:
        md += ["## Summary", "", summary(results), ""]
    write_results(out, stem, results, "\n".join(md))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), required=True)
    p.add_argument("--preset", choices=("quick", "full"), default="quick")
    p.add_argument("--out", type=Path, required=True, help="folder for the JSON and markdown results")
    p.add_argument("--parts", default="abcd", help="which parts to run, e.g. 'ad' (default: abcd)")
    p.add_argument("--size", help="part a's matrix, e.g. 4096x4096 (overrides the preset)")
    p.add_argument("--rounds", type=int, help="part a's interleaved rounds (overrides the preset)")
    p.add_argument("--matrices", type=Path, metavar="FILE",
                   help="part d: also factorize every 2-D tensor of this safetensors file (e.g. real centered "
                        "task vectors), at the preset's rank ratios")
    p.add_argument("--official-budget", type=float, metavar="SECONDS",
                   help="part c: run official_cart only when estimated at most this long (overrides the preset)")
    return p.parse_args(argv)


def configure(args: argparse.Namespace) -> Preset:
    cfg = PRESETS[(args.device, args.preset)]
    if args.size:
        m, n = (int(v) for v in args.size.lower().split("x"))
        cfg = replace(cfg, a_size=(m, n))
    if args.rounds:
        cfg = replace(cfg, a_rounds=args.rounds)
    if args.matrices:
        cfg = replace(cfg, d_matrices=str(args.matrices))
    if args.official_budget is not None:
        cfg = replace(cfg, c_official_budget_s=args.official_budget)
    return cfg


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is available")
    device = torch.device(args.device)
    cfg = configure(args)
    info = machine_info(ccsmerge)
    log(describe(info))
    warnings = startup_warnings(info, args.device)
    for warning in warnings:
        log(warning)
    parts = [p for p in PARTS if p in args.parts]
    results = {"device": args.device, "preset": args.preset, "machine": info, "config": asdict(cfg),
               "warnings": warnings, "parts": {}, "errors": {}, "part_wall_s": {},
               "load_avg": {"start": load_average()}}
    stem = f"engine-{args.device}-{args.preset}" + ("" if parts == list(PARTS) else "-" + "".join(parts))
    start = time.perf_counter()
    for part in parts:
        t0 = time.perf_counter()
        try:
            results["parts"][part] = PARTS[part].run(cfg, device)
        except Exception as exc:  # noqa: BLE001  (the other parts still run; the failure is reported)
            results["errors"][part] = traceback.format_exc()
            log(f"[{part}] FAILED: {type(exc).__name__}: {exc}")
        results["part_wall_s"][part] = time.perf_counter() - t0
        results["load_avg"][part] = load_average()
        results["wall_s"] = time.perf_counter() - start
        save(results, args.out, stem)
        free_memory(device)
    log("")
    log(f"# {describe(info)}")
    if results["parts"]:
        log(summary(results))
    log("\nparts: " + ", ".join(f"{p} {s:.0f} s" for p, s in results["part_wall_s"].items())
        + f"; total wall time {results['wall_s']:.0f} s; load average {results['load_avg']}")
    for warning in warnings:
        log(warning)
    log(f"results: {args.out / (stem + '.json')}, {args.out / (stem + '.md')}")
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
