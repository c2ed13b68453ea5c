"""The built-in example: merge 8 synthetic fine-tunes of a small transformer
with every method, and compare CART's randomized engine with the exact SVD.

    python -m ccsmerge.example [--device cpu|cuda|auto] [--models 8]
"""

from __future__ import annotations

import argparse
import time

import torch

import ccsmerge
from ccsmerge.synthetic import fine_tunes, toy_transformer


def relative_update_error(merged: dict, exact: dict, avg: dict) -> float:
    """max over 2-D tensors of ||merged - exact|| / ||exact - avg||."""
    worst = 0.0
    for name, w in exact.items():
        update = (w.double() - avg[name].double()).norm()
        if w.dim() == 2 and update > 0:
            worst = max(worst, float((merged[name].double() - w.double()).norm() / update))
    return worst


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--models", type=int, default=8)
    args = parser.parse_args(argv)

    base = toy_transformer()
    models = fine_tunes(base, args.models)
    params = sum(t.numel() for t in base.values())
    print(f"ccsmerge {ccsmerge.__version__}: {args.models} fine-tunes of a {params / 1e6:.1f}M-parameter model")
    print(f"build: {ccsmerge.build_info()}")

    runs = {
        "average": dict(method="average"),
        "task_arithmetic": dict(method="task_arithmetic", base=base),
        "ties": dict(method="ties", base=base),
        "cart (exact SVD)": dict(method="cart", svd="exact"),
        "cart (randomized)": dict(method="cart"),
    }
    results = {}
    print(f"{'method':<20} {'seconds':>8}")
    for label, kwargs in runs.items():
        start = time.perf_counter()
        results[label] = ccsmerge.merge(models, device=args.device, **kwargs)
        print(f"{label:<20} {time.perf_counter() - start:8.3f}")
    err = relative_update_error(results["cart (randomized)"], results["cart (exact SVD)"], results["average"])
    print(f"cart randomized vs exact: worst relative difference of the update over all matrices = {err:.2%}")


if __name__ == "__main__":
    main()
