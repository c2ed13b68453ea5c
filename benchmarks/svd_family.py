"""Every merge method on the same task matrices, side by side, and what a
hyper-parameter search costs.

Per matrix shape and T: the time of one 2-D weight's merge with each method
(CART and TSV-M on the randomized engine and exactly; Iso-C and Iso-CTS,
which need full SVDs; task arithmetic and TIES), in interleaved rounds, and
the randomized results' distance to the exact ones. Then a 5 x 5 CART grid
(lam x rank_ratio) through ccsmerge.search against 25 separate merges.

    python benchmarks/svd_family.py --out benchmarks/results/cpu-2core [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import log, table, upper_median, write_results  # noqa: E402
from machine import describe, load_average, load_ccsmerge, machine_info  # noqa: E402

METHODS = [
    ("task_arithmetic", {}),
    ("ties", {}),
    ("cart", {}),
    ("cart", {"svd": "exact"}),
    ("tsv_m", {}),
    ("tsv_m", {"svd": "exact"}),
    ("iso_c", {}),
    ("iso_cts", {}),
]


def task_matrices(m: int, n: int, T: int, seed: int = 0):
    from ccsmerge.synthetic import decaying_matrix

    g = torch.Generator().manual_seed(seed)
    base = torch.randn(m, n, generator=g) / n**0.5
    shared = decaying_matrix(m, n, scale=0.5, generator=g)
    return base, [base + shared + decaying_matrix(m, n, scale=1.0, generator=g) for _ in range(T)]


def label(method: str, options: dict) -> str:
    return method + (" (exact)" if options.get("svd") == "exact" else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    ccsmerge = load_ccsmerge()
    info = machine_info(ccsmerge)
    log(describe(info))
    cases = [(512, 512, 4), (1024, 1024, 8)] if args.quick else [(1024, 1024, 4), (1024, 1024, 8), (2048, 1024, 8)]

    rows = []
    for m, n, T in cases:
        base, xs = task_matrices(m, n, T)
        models = [{"w": x} for x in xs]
        base_sd = {"w": base}
        times: dict[str, list[float]] = {}
        outputs: dict[str, torch.Tensor] = {}
        for _ in range(args.rounds):  # interleaved: every method once per round
            for method, options in METHODS:
                start = time.perf_counter()
                base_arg = base_sd if method != "cart" else None
                merged = ccsmerge.merge(models, method, base=base_arg, device="cpu", **options)
                times.setdefault(label(method, options), []).append(time.perf_counter() - start)
                outputs[label(method, options)] = merged["w"]
        for name, ts in times.items():
            method = name.split()[0]
            exact = outputs.get(f"{method} (exact)") if "exact" not in name else None
            diff = None
            if exact is not None:
                reference = base if method != "cart" else torch.stack(xs).mean(0)
                diff = float((outputs[name] - exact).norm() / (exact - reference).norm())
            rows.append(
                {
                    "shape": f"{m}x{n}",
                    "T": T,
                    "method": name,
                    "median_s": upper_median(ts),
                    "min_s": min(ts),
                    "max_s": max(ts),
                    "update_vs_exact": diff,
                }
            )
            print(rows[-1])

    # Search: a 5 x 5 grid against 25 merges, on T = 8 models of a few matrices.
    g = torch.Generator().manual_seed(1)
    size = 512 if args.quick else 1024
    base = {f"layer{i}.weight": torch.randn(size, size, generator=g) for i in range(3)}
    models = []
    for _ in range(8):
        models.append({k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()})
    lams, ratios = [1.0, 1.5, 2.0, 2.5, 3.0], [0.02, 0.04, 0.08, 0.12, 0.16]
    target = models[0]

    def evaluate(state):
        return -sum(float((state[k] - target[k]).norm()) for k in target)

    start = time.perf_counter()
    result = ccsmerge.search(models, evaluate, "cart", lam=lams, rank_ratio=ratios, device="cpu")
    grid_s = time.perf_counter() - start
    start = time.perf_counter()
    one_s = 0.0  # one merge (and its evaluation) at the grid's largest rank, whose SVDs the search computes
    for ratio in ratios:
        for lam in lams:
            t0 = time.perf_counter()
            evaluate(ccsmerge.merge(models, "cart", lam=lam, rank_ratio=ratio, device="cpu"))
            if ratio == max(ratios):
                one_s = max(one_s, time.perf_counter() - t0)
    separate_s = time.perf_counter() - start
    search_row = {
        "models": 8,
        "matrices": f"3 x {size}x{size}",
        "grid": "5 lam x 5 rank_ratio",
        "search_s": grid_s,
        "separate_merges_s": separate_s,
        "one_merge_s": one_s,
        "best": result.best,
    }
    print(search_row)

    result_json = {"machine": info, "load_average": load_average(), "rows": rows, "search": search_row}
    stem = "svd_family-quick" if args.quick else "svd_family"
    lines = [
        "# Every method on the same task matrices; the cost of a search",
        "",
        f"Machine: {describe(info)}; load average {result_json['load_average']}.",
        "",
        "One fp32 weight, T task matrices (a shared and a task-specific part with decaying spectra); "
        f"median of {args.rounds} interleaved rounds. `update vs exact`: ||randomized - exact|| / "
        "||exact - reference|| (reference: θ_avg for CART, θ_base otherwise).",
        "",
        table(["shape", "T", "method", "median s", "min-max s", "update vs exact"],
              [[r["shape"], r["T"], r["method"], f"{r['median_s']:.3f}", f"{r['min_s']:.3f}-{r['max_s']:.3f}",
                "" if r["update_vs_exact"] is None else f"{r['update_vs_exact']:.2%}"] for r in rows]),
        "",
        f"Search, {search_row['grid']} on {search_row['models']} models of {search_row['matrices']} matrices: "
        f"`ccsmerge.search` {grid_s:.2f} s; 25 separate merges {separate_s:.2f} s "
        f"(one at the largest rank {one_s:.2f} s): the grid costs {grid_s / one_s:.1f} merges at the largest "
        f"rank, and is {separate_s / grid_s:.1f}x faster than merging every setting.",
    ]
    write_results(args.out, stem, result_json, "\n".join(lines), echo=True)


if __name__ == "__main__":
    main()
