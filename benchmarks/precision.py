"""How precisely the inputs define CART's update, and how close the randomized engine gets.

Float64 task sets (a random base plus a shared and a task-specific part with
power-law spectra, task vectors 1 % and 5 % of the weights' norm, T = 3 and 8,
k = 12 % of min(m, n)), measured by brute force with torch.linalg.svd:

1. the rounding floor: the relative change of the *exact* update
   Delta = sum_t LowRank_k(theta_t - theta_avg) when the inputs are rounded to
   bf16 / fp16 / fp32, next to ccsmerge.accuracy.rounding_floor's estimate;
2. the randomized update's relative error (float64 inputs and arithmetic) at
   several (oversample p, power_iters q), each with the engine's a-posteriori
   estimate of it;
3. the adaptive engine (lowrank.adaptive_randomized_svd_over_rows): bf16 inputs
   with tolerance="auto" and fp32 inputs with tolerance=0.01: power iterations it
   chose, its target, estimate and true error against the exact float64 update of
   the same inputs.

    python benchmarks/precision.py [--quick | --size M] [--out DIR]
    # 1024^2: ~1 h on 2 shared cores (the exact SVDs); --size 512: ~15 min; --quick: 256^2, ~20 s
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import torch

from harness import log, table, write_results
from machine import describe, git_state, load_average, load_ccsmerge, machine_info

ccsmerge = load_ccsmerge()
from ccsmerge import accuracy, kernels  # noqa: E402  (after load_ccsmerge picks the copy)
from ccsmerge.synthetic import decaying_matrix  # noqa: E402
from ccsmerge.lowrank import adaptive_randomized_svd_over_rows, centered_randomized_svd  # noqa: E402

ROUNDINGS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
STRENGTHS = (0.01, 0.05)
TASKS = (3, 8)


def settings(k: int) -> list[tuple[int, int]]:
    return [(10, 2), (10, 4), (k // 2, 3), (k // 2, 4), (k, 2), (k, 4)]


def task_set(m: int, n: int, T: int, strength: float, seed: int = 0) -> list[torch.Tensor]:
    """theta_t = base + tau_t, tau_t = 0.5 shared + own_t (spectra i^-1), ||tau_t|| = strength ||base||."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(m, n, generator=gen, dtype=torch.float64)
    spectrum = dict(decay=1.0, generator=gen, dtype=torch.float64)
    shared = decaying_matrix(m, n, **spectrum)
    out = []
    for _ in range(T):
        tau = 0.5 * shared + decaying_matrix(m, n, **spectrum)
        out.append(base + tau * (strength * base.norm() / tau.norm()))
    return out


def exact(xs: list[torch.Tensor], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact update in float64 and every centered matrix's singular values (T, r)."""
    xs = [x.to(torch.float64) for x in xs]
    center = sum(xs) / len(xs)
    total, spectra = 0, []
    for x in xs:
        u, s, vh = torch.linalg.svd(x - center, full_matrices=False)
        total = total + (u[:, :k] * s[:k]) @ vh[:k]
        spectra.append(s)
    return total, torch.stack(spectra)


def update(factors) -> torch.Tensor:
    u, s, vh = (f.to(torch.float64) for f in factors)
    return torch.einsum("tmk,tk,tkn->mn", u, s, vh)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def adaptive(xs, k, oversample, tolerance, cap, storage):
    m, n = xs[0].shape
    center = kernels.mean(xs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the cap is reached on purpose when q is fixed below
        return adaptive_randomized_svd_over_rows(
            lambda start, stop: (xs, center), (m, n), [(0, m)], k, oversample=oversample, tolerance=tolerance,
            max_power_iters=cap, seed=0, dtype=center.dtype, device=center.device, storage_dtype=storage, name="w",
        )


def measure(m: int, T: int, strength: float) -> dict:
    k = int(0.12 * m)
    xs = task_set(m, m, T, strength)
    reference, spectra = exact(xs, k)
    norm = float(reference.norm())
    gaps = spectra[:, k - 1] / spectra[:, k] - 1
    weights_rms = float(torch.stack([x.pow(2).mean() for x in xs]).mean().sqrt())
    row = {"m": m, "n": m, "T": T, "strength": strength, "k": k, "min_gap_at_cut": float(gaps.min()),
           "median_gap_at_cut": float(gaps.median()), "rounding": {}, "randomized": [], "adaptive": {}}
    rounded_refs = {}
    for label, dtype in ROUNDINGS.items():
        rounded = [x.to(dtype) for x in xs]
        moved, _ = exact(rounded, k)
        rounded_refs[label] = (rounded, moved)
        noise = accuracy.rounding_noise(dtype, weights_rms, T)
        row["rounding"][label] = {"measured": rel(moved, reference),
                                  "estimated": accuracy.rounding_floor(spectra, k, (m, m), noise, norm),
                                  "estimated_from_2k": accuracy.rounding_floor(spectra[:, : 2 * k], k, (m, m),
                                                                               noise, norm)}
    for p, q in settings(k):
        approx = update(centered_randomized_svd(xs, kernels.mean(xs), k, oversample=p, power_iters=q))
        factors, report = adaptive(xs, k, p, 1e-12, q, torch.float64)
        assert torch.equal(update(factors), approx), "the adaptive iterate differs from the fixed one"
        row["randomized"].append({"oversample": p, "power_iters": q, "error": rel(approx, reference),
                                  "estimated": report.estimated_error})
    for label, tolerance in (("bf16", "auto"), ("fp32", 0.01)):
        rounded, moved = rounded_refs[label]
        start = time.perf_counter()
        factors, report = adaptive(rounded, k, max(10, k), tolerance, 8, ROUNDINGS[label])
        row["adaptive"][label] = {"tolerance": tolerance, "power_iters": report.power_iters, "width": report.width,
                                  "target": report.target, "estimated_floor": report.rounding_floor,
                                  "estimated": report.estimated_error, "error": rel(update(factors), moved),
                                  "measured_floor": row["rounding"][label]["measured"],
                                  "seconds": time.perf_counter() - start}
    return row


def pct(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.2%}" if x >= 1e-4 else f"{x:.1e}"


def markdown(rows: list[dict], header: str) -> str:
    r_headers = ["m × n", "T", "τ/θ", "k", "gap at σ_k (min, median)",
                 *(f"{d}: measured / estimated" for d in ROUNDINGS)]
    r_rows = [[f"{r['m']}²", r["T"], f"{r['strength']:.0%}", r["k"],
               f"{r['min_gap_at_cut']:.2%}, {r['median_gap_at_cut']:.2%}",
               *(f"{pct(r['rounding'][d]['measured'])} / {pct(r['rounding'][d]['estimated'])} "
                 f"({r['rounding'][d]['estimated'] / r['rounding'][d]['measured']:.2f}×)" for d in ROUNDINGS)]
              for r in rows]
    labels = [f"p={'k' if p == r0k else ('k/2' if p == r0k // 2 else p)} q={q}" for r0k in [rows[0]["k"]]
              for p, q in settings(r0k)]
    s_rows = [[f"{r['m']}²", r["T"], f"{r['strength']:.0%}",
               *(f"{pct(c['error'])} ({pct(c['estimated'])})" for c in r["randomized"])] for r in rows]
    a_headers = ["m × n", "T", "τ/θ", "inputs", "tolerance", "q chosen", "target", "floor: est. / measured",
                 "estimated error", "true error"]
    a_rows = [[f"{r['m']}²", r["T"], f"{r['strength']:.0%}", d, a["tolerance"], a["power_iters"], pct(a["target"]),
               f"{pct(a['estimated_floor'])} / {pct(a['measured_floor'])}", pct(a["estimated"]), pct(a["error"])]
              for r in rows for d, a in r["adaptive"].items()]
    return "\n\n".join([
        "# The precision of CART's update: rounding floor and randomized error", header,
        "## 1. Relative change of the exact update when the inputs are rounded "
        "(estimated: `accuracy.rounding_floor` from the full spectra; ratio estimated/measured)",
        table(r_headers, r_rows),
        "## 2. Randomized update's relative error, float64 (in parentheses: the engine's a-posteriori estimate)",
        table(["m × n", "T", "τ/θ", *labels], s_rows),
        "## 3. Adaptive power iterations (oversample max(10, k), cap 8): bf16 inputs with tolerance='auto', "
        "fp32 inputs with tolerance=0.01; true error against the exact float64 update of the same inputs",
        table(a_headers, a_rows),
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="256 x 256 instead of 1024 x 1024")
    parser.add_argument("--size", type=int, help="m = n (default 1024, 256 with --quick)")
    parser.add_argument("--tasks", type=int, nargs="+", default=list(TASKS), help="values of T (default 3 8)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    m = args.size or (256 if args.quick else 1024)
    info = machine_info(ccsmerge)
    load_start = load_average()
    header = f"{describe(info)}; checkout {git_state()}; load average at the start {load_start}"
    log(header)
    rows = []
    for T in args.tasks:
        for strength in STRENGTHS:
            start = time.perf_counter()
            rows.append(measure(m, T, strength))
            r = rows[-1]
            log(f"{m}² T={T} τ/θ={strength:.0%} k={r['k']}: "
                + ", ".join(f"{d} {pct(v['measured'])} (est. {pct(v['estimated'])})" for d, v in r["rounding"].items())
                + f"  [{time.perf_counter() - start:.0f} s]")
    load_end = load_average()
    text = markdown(rows, f"{header}, at the end {load_end}")
    log(text)
    if args.out:
        every = args.tasks == list(TASKS)
        stem = "precision" if m == 1024 and every else f"precision-{m}" + ("" if every else "-T" + "-".join(
            map(str, args.tasks)))
        write_results(args.out, stem,
                      {"machine": info, "checkout": git_state(), "load_average": {"start": load_start, "end": load_end},
                       "rows": rows}, text)


if __name__ == "__main__":
    main()
