"""The precision-aware engine's speed at its accuracy, against the official-style code.

One m x m weight (power-law task spectra, task vectors 1 % of the weights' norm, rank 8 %),
T = 3 and 8, in one run per T, each variant timed side by side in interleaved rounds:

- official: the official-style code (benchmarks/official_cart.py: theta_avg and a float32
  torch.linalg.svd per task), on the bf16 inputs and on the float32 inputs;
- ccsmerge's CART step (what merge runs per weight: the adaptive engine with cart_factors'
  arguments; the result kept in float32, not rounded to the output dtype) with tolerance="auto" on the bf16 inputs (goal a) and tolerance=0.01 on
  the float32 inputs (goal b), with the fast arithmetic (bf16 GEMMs on centered panels,
  CholeskyQR bases) where the engine's estimate admits it, and the same with it disabled
  (accuracy.FAST_SHARE = 0: every pass in float32 with Householder QR).

Errors are relative to the exact update of the same inputs, which is the official-style
float32 one (an exact SVD per task in float32, said so in the report); the bf16 rounding
floor, the exact update's own change when the float32 inputs are rounded to bf16, is
measured in the same run from the two official-style updates. Goal (a) asks for an update
error no larger than that floor.

    python benchmarks/precision_speed.py --out DIR [--size 4096] [--tasks 3 8] [--threads 1]
    # --quick: 1024^2, T = 3, one round (~1 min on 2 cores)
"""

from __future__ import annotations

import argparse
import os
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

from harness import fmt_ratio, fmt_seconds, log, paired_ratio, table, time_interleaved, write_results
from machine import describe, git_state, load_average, load_ccsmerge, machine_info

ccsmerge = load_ccsmerge()
import torch  # noqa: E402

from ccsmerge import accuracy, fast_arithmetic, kernels  # noqa: E402
from ccsmerge.lowrank import adaptive_randomized_svd_over_rows  # noqa: E402
from ccsmerge.methods.cart import MAX_ADAPTIVE_POWER_ITERS  # noqa: E402
from ccsmerge.numerics import tensor_seed  # noqa: E402
from ccsmerge.synthetic import decaying_matrix  # noqa: E402
from official_cart import cart_tensor  # noqa: E402

RANK_RATIO = 0.08
LAM = 2.0
STRENGTH = 0.01


def task_set(m: int, T: int, seed: int = 0) -> list[torch.Tensor]:
    """theta_t = base + tau_t, tau_t = 0.5 shared + own_t (spectra i^-1), ||tau_t|| = 1 % ||base||, float32."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(m, m, generator=gen)
    shared = decaying_matrix(m, m, generator=gen)
    out = []
    for _ in range(T):
        tau = 0.5 * shared + decaying_matrix(m, m, generator=gen)
        out.append(base + tau * (STRENGTH * base.norm() / tau.norm()))
    return out


@contextmanager
def float32_products():
    """The engine with the fast arithmetic disabled: it is admitted only within FAST_SHARE of the target."""
    saved, accuracy.FAST_SHARE = accuracy.FAST_SHARE, 0.0
    try:
        yield
    finally:
        accuracy.FAST_SHARE = saved


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def measure(m: int, T: int, rounds: int) -> dict:
    fp32 = task_set(m, T)
    bf16 = [x.to(torch.bfloat16) for x in fp32]
    inputs = {"bf16": bf16, "fp32": fp32}
    tolerance = {"bf16": "auto", "fp32": 0.01}
    outputs: dict = {}
    reports: dict = {}

    def official(label):
        def call():
            outputs[f"official {label}"] = cart_tensor(inputs[label], RANK_RATIO, LAM)
        return call

    def ours(label, fast):
        xs = inputs[label]
        k = max(1, int(RANK_RATIO * m))

        def call():  # the merge's CART step (cart_factors' arguments), the result kept in float32
            center = kernels.mean(xs)
            with warnings_off(), (nullcontext() if fast else float32_products()):
                (u, s, vh), report = adaptive_randomized_svd_over_rows(
                    lambda start, stop: (xs, center), (m, m), [(0, m)], k, oversample=max(10, k),
                    tolerance=tolerance[label], max_power_iters=MAX_ADAPTIVE_POWER_ITERS, seed=tensor_seed(0, "w"),
                    dtype=torch.float32, device=center.device, storage_dtype=xs[0].dtype, name="w")
            merged = center + LAM * torch.einsum("tmk,tkn->mn", u * s.unsqueeze(-2), vh)
            name = f"ccsmerge {label}{'' if fast else ' float32 products'}"
            outputs[name] = merged
            reports[name] = report
        return call

    fns = {}
    for label in inputs:
        fns[f"official {label}"] = official(label)
        fns[f"ccsmerge {label}"] = ours(label, True)
        fns[f"ccsmerge {label} float32 products"] = ours(label, False)
    # the official-style code is the slow part: warmed up on a small matrix, not on itself
    small = [x[:256, :256].contiguous() for x in fp32]
    warm = {name: (lambda: cart_tensor(small, RANK_RATIO, LAM)) for name in fns if name.startswith("official")}
    timings = time_interleaved(fns, "cpu", rounds=rounds, warmups=warm)
    exact = {label: outputs[f"official {label}"] for label in inputs}  # (merged, theta_avg)
    updates = {label: (exact[label][0] - exact[label][1]) / LAM for label in inputs}
    floor = rel(updates["bf16"], updates["fp32"])
    rows = []
    for label in inputs:
        for variant in ("", " float32 products"):
            name = f"ccsmerge {label}{variant}"
            update = (outputs[name] - exact[label][1]) / LAM
            rep = reports[name]
            rows.append({"power_iters": rep.power_iters, "estimated_error": rep.estimated_error, "target": rep.target,
                         "fast_products": rep.fast_products, "inputs": label, "tolerance": tolerance[label], "variant": variant.strip() or "fast arithmetic",
                         "time": timings[name].as_dict(), "official_time": timings[f"official {label}"].as_dict(),
                         "speedup": paired_ratio(timings[f"official {label}"], timings[name]),
                         "update_error": rel(update, updates[label])})
    return {"m": m, "T": T, "k": max(1, int(RANK_RATIO * m)), "bf16_rounding_floor": floor, "rows": rows}


@contextmanager
def warnings_off():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def markdown(results: list[dict], header: str) -> str:
    lines = ["# Precision-aware CART: speed at the accuracy target", header, "",
             f"One m × m weight, power-law task spectra (i^-1, a shared and an own part), task vectors "
             f"{STRENGTH:.0%} of the weights' norm, rank {RANK_RATIO:.0%}, λ = {LAM}. *update error*: ‖Δ − Δ_exact‖ / "
             "‖Δ_exact‖ against the official-style update of the same inputs (float32 SVDs: the exact reference in "
             "float32). *bf16 floor*: the official-style update's own change when the float32 inputs are rounded "
             "to bf16, measured in this run. Each speedup is the official-style time over ccsmerge's, paired per "
             "round. *used*: the products the engine chose after its first (float32) iterate; *q*: power "
             "iterations; *estimated*: the engine's a-posteriori estimate (with the arithmetic's floor); *target*: "
             "what tolerance resolved to."]
    headers = ["m × m", "T", "k", "inputs", "tolerance", "arithmetic", "used", "q", "official-style", "ccsmerge",
               "speedup", "update error", "estimated", "target", "bf16 floor", "goal"]
    cells = []
    for r in results:
        for row in r["rows"]:
            goal = "≥ 20× at error ≤ floor" if row["inputs"] == "bf16" else "≥ 10× at tolerance 0.01"
            met = (row["speedup"]["median"] >= 20 and row["update_error"] <= r["bf16_rounding_floor"]
                   if row["inputs"] == "bf16" else row["speedup"]["median"] >= 10 and row["update_error"] <= 0.01)
            cells.append([f"{r['m']}²", r["T"], r["k"], row["inputs"], row["tolerance"], row["variant"],
                          "bf16" if row["fast_products"] else "fp32", row["power_iters"],
                          fmt_seconds(row["official_time"]["median_s"]), fmt_seconds(row["time"]["median_s"]),
                          fmt_ratio(row["speedup"]), f"{row['update_error']:.2%}", f"{row['estimated_error']:.2%}",
                          f"{row['target']:.2%}",
                          f"{r['bf16_rounding_floor']:.1%}", f"{goal}: {'met' if met else 'not met'}"])
    lines += ["", table(headers, cells)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--size", type=int)
    parser.add_argument("--tasks", type=int, nargs="+")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--quick", action="store_true", help="1024^2, T = 3, one round")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    m = args.size or (1024 if args.quick else 4096)
    tasks = args.tasks or ([3] if args.quick else [3, 8])
    rounds = args.rounds or (1 if args.quick else 2)
    info = machine_info(ccsmerge)
    load_start = load_average()
    header = (f"Machine: {describe(info)}; checkout {git_state()}; threads {torch.get_num_threads()} "
              f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}); fast products on this device: "
              f"{fast_arithmetic.available(torch.device('cpu'), torch.float32)}; load average at the start "
              f"{load_start}")
    log(header)
    results = []
    for T in tasks:
        start = time.perf_counter()
        results.append(measure(m, T, rounds))
        log(f"{m}² T={T}: {time.perf_counter() - start:.0f} s")
    header += f", at the end {load_average()}."
    text = markdown(results, header)
    log(text)
    stem = "precision-speed" + ("-quick" if args.quick else f"-{m}")
    write_results(args.out, stem, {"machine": info, "checkout": git_state(), "results": results}, text)


if __name__ == "__main__":
    main()
