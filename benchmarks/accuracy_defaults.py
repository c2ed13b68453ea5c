"""How far the randomized CART update is from the exact one, per (oversample,
power_iters): the measurement behind merge's defaults.

CART's update sum_t LowRank_k(theta_t - theta_avg) is minus the sum of the rank-k
residuals (the centered matrices sum to zero), so it is far more sensitive to the
randomized subspace than one low-rank approximation is. Task sets: a random base,
a shared and a task-specific part, each with singular values i^-decay.

    python benchmarks/accuracy_defaults.py [--out DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from harness import log, table
from machine import describe, load_ccsmerge, machine_info

ccsmerge = load_ccsmerge()
from ccsmerge.synthetic import decaying_matrix  # noqa: E402  (after load_ccsmerge picks the copy)
ops = ccsmerge.ops
centered_exact_svd = ops.centered_exact_svd
centered_randomized_svd = ops.centered_randomized_svd

CASES = [  # (m, n, T, decay, rank ratio)
    (1024, 1024, 8, 1.0, 0.04),
    (1024, 1024, 8, 1.0, 0.12),
    (1024, 1024, 3, 1.0, 0.12),
    (1024, 1024, 8, 0.5, 0.12),
    (2048, 512, 8, 1.0, 0.12),
]


def task_set(m: int, n: int, T: int, decay: float, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(m, n, generator=gen, dtype=torch.float64)
    spectrum = dict(decay=decay, generator=gen, dtype=torch.float64)
    shared = decaying_matrix(m, n, **spectrum)
    return [base + 0.5 * shared + decaying_matrix(m, n, **spectrum) for _ in range(T)]


def update(factors) -> torch.Tensor:
    u, s, vh = factors
    return torch.einsum("tmk,tk,tkn->mn", u, s, vh)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    settings = lambda k: [(10, 2), (10, 4), (k // 2, 4), (k, 2), (k, 4)]  # noqa: E731
    headers = ["m x n", "T", "decay", "k", "p=10 q=2", "p=10 q=4", "p=k/2 q=4", "p=k q=2", "p=k q=4"]
    log("| " + " | ".join(headers) + " |")
    rows = []
    for m, n, T, decay, ratio in CASES:
        xs = task_set(m, n, T, decay)
        center = ops.mean(xs)
        k = max(1, int(ratio * min(m, n)))
        exact = update(centered_exact_svd(xs, center, k))
        errors = []
        for p, q in settings(k):
            approx = update(centered_randomized_svd(xs, center, k, oversample=p, power_iters=q))
            errors.append(float((approx - exact).norm() / exact.norm()))
        rows.append([f"{m}x{n}", T, decay, k, *(f"{e:.2%}" for e in errors)])
        log("| " + " | ".join(map(str, rows[-1])) + " |")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "accuracy_defaults.md").write_text(
            f"# Randomized vs exact CART update, float64\n\n{describe(machine_info(ccsmerge))}\n\n"
            + table(headers, rows) + "\n")


if __name__ == "__main__":
    main()
