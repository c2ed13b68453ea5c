"""The randomized engine on real centered task vectors: the fine-tunes of
`ccsmerge demo` (eight digit tasks, encoder matrices 256 x 256, 256 x 256 and
64 x 256), trained here in ~15 s.

For every 2-D weight, rank ratio and number of power iterations q:
- the per-task error ratio ||D_t - D̂_t||_F / ||D_t - D_t,k||_F of the
  randomized rank-k factors of D_t = θ_t - θ_avg against the exact truncated
  SVD (worst task reported);
- the relative error of CART's merged update Σ_t LowRank_k(D_t) against the
  exact one, which is what the merge uses and which is much more sensitive
  (the centered task vectors sum to zero, so the update is what is left after
  cancellation);
- how much of the spectrum the rank keeps (the energy share of the top k).
Real task vectors have flatter spectra than the synthetic power-law matrices,
so this is where the oversampling and power-iteration defaults earn their keep.

    python benchmarks/real_task_vectors.py --out benchmarks/results/cpu-2core [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import table, write_results  # noqa: E402
from machine import describe, load_ccsmerge, machine_info  # noqa: E402

RANK_RATIOS = (0.04, 0.08, 0.12, 0.32)
POWER_ITERS = (0, 1, 2, 4)


def demo_task_vectors(seed: int = 0) -> dict[str, list[torch.Tensor]]:
    """Each encoder matrix of the demo's eight fine-tunes, float64."""
    from ccsmerge.demo.tasks import Suite

    suite = Suite(seed)
    fine_tuned = suite.fine_tune_all(suite.pretrain())
    return {name: [m[name].double() for m in fine_tuned] for name in fine_tuned[0] if fine_tuned[0][name].dim() == 2}


def measure(name: str, xs: list[torch.Tensor], ratio: float, q: int, oversample: int | None) -> dict:
    from ccsmerge import lowrank

    m, n = xs[0].shape
    k = max(1, int(ratio * min(m, n)))
    p = max(10, k) if oversample is None else oversample
    center = torch.stack(xs).mean(0)
    exact_u, exact_s, exact_vh = lowrank.centered_exact_svd(xs, center, k)
    u, s, vh = lowrank.centered_randomized_svd([x.float() for x in xs], center.float(), k, oversample=p, power_iters=q)
    worst, kept = 0.0, 0.0
    for t, x in enumerate(xs):
        d = x - center
        spectrum = torch.linalg.svdvals(d)
        optimal = spectrum[k:].norm()
        approx = (u[t].double() * s[t].double()) @ vh[t].double()
        worst = max(worst, float((d - approx).norm() / optimal))
        kept += float(spectrum[:k].square().sum() / spectrum.square().sum()) / len(xs)
    exact_update = torch.einsum("tmk,tk,tkn->mn", exact_u, exact_s, exact_vh)
    update = torch.einsum("tmk,tk,tkn->mn", u.double(), s.double(), vh.double())
    return {
        "tensor": name,
        "shape": [m, n],
        "rank_ratio": ratio,
        "k": k,
        "oversample": p,
        "power_iters": q,
        "worst_task_error_ratio": worst,
        "update_relative_error": float((update - exact_update).norm() / exact_update.norm()),
        "energy_kept": kept,
    }


def markdown(rows: list[dict], machine: str, seconds: float) -> str:
    lines = [
        "# The randomized engine on real centered task vectors (ccsmerge demo's fine-tunes)",
        "",
        f"Machine: {machine}. {seconds:.0f} s.",
        "",
        "T = 8 tasks. *task error*: worst over tasks of ‖D_t − D̂_t‖_F / ‖D_t − D_t,k‖_F (1 = optimal).",
        "*update error*: ‖Σ_t D̂_t − Σ_t D_t,k‖_F / ‖Σ_t D_t,k‖_F, CART's merged update against exact.",
        "*energy kept*: mean share of ‖D_t‖² in its top k singular values. p: oversampling (the default",
        "is max(10, k)); q: power iterations (the default is 4).",
        "",
        table(["tensor", "shape", "rank ratio (k)", "energy kept", "p", "q", "task error", "update error"],
              [[r["tensor"], f"{r['shape'][0]}×{r['shape'][1]}", f"{r['rank_ratio']:g} ({r['k']})",
                f"{100 * r['energy_kept']:.0f} %", r["oversample"], r["power_iters"],
                f"{r['worst_task_error_ratio']:.4f}", f"{100 * r['update_relative_error']:.2f} %"] for r in rows],
              align="lllrrrrr"),
    ]
    defaults = [r for r in rows if r["power_iters"] == 4 and r["oversample"] == max(10, r["k"])]
    if defaults:
        lines[4:4] = [
            (
                f"At the defaults (p = max(10, k), q = 4), over every tensor and rank ratio: task error at most "
                f"{max(r['worst_task_error_ratio'] for r in defaults):.4f}, CART update error at most "
                f"{100 * max(r['update_relative_error'] for r in defaults):.2f} %."
            ),
            "",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="the default power iterations and q = 1 only")
    args = parser.parse_args(argv)
    ccsmerge = load_ccsmerge()
    machine = describe(machine_info(ccsmerge))
    started = time.perf_counter()
    vectors = demo_task_vectors()
    rows = []
    for name, xs in vectors.items():
        for ratio in RANK_RATIOS:
            for q in (1, 4) if args.quick else POWER_ITERS:
                for p in (None, 10):
                    if p == 10 and max(10, int(ratio * min(xs[0].shape))) == 10:
                        continue  # the default is already 10
                    rows.append(measure(name, xs, ratio, q, p))
    seconds = time.perf_counter() - started
    write_results(args.out, "real_task_vectors" + ("-quick" if args.quick else ""), {"machine": machine, "rows": rows},
                  markdown(rows, machine, seconds), echo=True)


if __name__ == "__main__":
    main()
