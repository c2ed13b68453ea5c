"""CART's speed against its accuracy: every (oversample, power_iters) on one weight.

The same task set as bench_engine.py's part a (one m x n float32 weight, T
fine-tunes, rank 8 %): the official-style code (a full torch.linalg.svd per task)
and ccsmerge.merge at each setting, timed side by side in interleaved rounds.
Each setting's merged update is compared with the official one, so the table
shows what a faster setting costs in accuracy on these spectra.

    python benchmarks/cart_tradeoff.py --out DIR [--size 2048] [--tasks 8] [--rounds 2]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import synthetic
from harness import fmt_ratio, fmt_seconds, paired_ratio, table, time_interleaved, write_results
from machine import describe, load_average, load_ccsmerge, machine_info
from official_cart import official_cart, rank_for

ccsmerge = load_ccsmerge()
RANK_RATIO = 0.08
LAM = 2.0


def settings(k: int) -> list[tuple[int, int]]:
    return [(p, q) for p in (10, k // 2, k) for q in (1, 2, 3, 4)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    start = time.perf_counter()
    info = machine_info(ccsmerge)
    m = n = args.size
    T = args.tasks
    k = rank_for((m, n), RANK_RATIO)
    models = [{"w": x} for x in synthetic.task_matrices(m, n, T, seed=T)]
    outputs: dict = {}

    def run(name, fn):
        def call():
            outputs[name] = fn()["w"]
        return call

    fns = {"official": run("official", lambda: official_cart(models, RANK_RATIO, LAM, device="cpu"))}
    for p, q in settings(k):
        fns[f"p={p} q={q}"] = run(f"p={p} q={q}", lambda p=p, q=q: ccsmerge.merge(
            models, rank_ratio=RANK_RATIO, lam=LAM, oversample=p, power_iters=q, device="cpu"))
    load_before = load_average()
    timings = time_interleaved(fns, "cpu", rounds=args.rounds, wall=True)
    center = ccsmerge.ops.mean([sd["w"] for sd in models])
    reference = outputs["official"] - center
    rows = []
    for name, timing in timings.items():
        if name == "official":
            continue
        p, q = (int(part.split("=")[1]) for part in name.split())
        rows.append({
            "oversample": p, "power_iters": q, "time": timing.as_dict(),
            "speedup": paired_ratio(timings["official"], timing),
            "update_error": float((outputs[name] - center - reference).norm() / reference.norm()),
        })
    result = {"machine": info, "shape": [m, n], "T": T, "k": k, "rank_ratio": RANK_RATIO, "lam": LAM,
              "official": timings["official"].as_dict(), "rows": rows,
              "load_average": {"start": load_before, "end": load_average()},
              "seconds": time.perf_counter() - start}
    lines = [
        f"# CART speed against accuracy: {m}x{n} float32, T = {T}, rank 8 % (k = {k})\n",
        f"Machine: {describe(info)}. Load average at the start {load_before}, at the end {load_average()}; "
        f"{result['seconds']:.0f} s.\n",
        f"The official-style code (a float32 torch.linalg.svd per task) took "
        f"{fmt_seconds(timings['official'].median)}; each setting was timed beside it in "
        f"{args.rounds} interleaved rounds. *update error*: ‖U − U_official‖_F / ‖U_official‖_F with "
        f"U = merged − θ_avg. The merge defaults are oversample = k, power_iters = 4.\n",
        table(["oversample", "power_iters", "time", "speedup vs official", "update error"],
              [[row["oversample"], row["power_iters"], fmt_seconds(row["time"]["median_s"]), fmt_ratio(row["speedup"]),
                f"{row['update_error']:.2%}"] for row in rows], align="rrrrr"),
    ]
    write_results(args.out, "cart_tradeoff", result, "\n".join(lines), echo=True)


if __name__ == "__main__":
    main()
