"""How time and memory grow: with the number of models T, with CART's rank
ratio, and with the input size of a streaming merge; each fitted with a
power law (time ∝ x^slope) and reported with its slope.

    python benchmarks/scaling.py --out benchmarks/results/cpu-2core [--quick]
"""

from __future__ import annotations

import argparse
import math
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import log, table, time_command_rss, time_fn, upper_median, write_results  # noqa: E402
from machine import describe, load_average, load_ccsmerge, machine_info  # noqa: E402
from plots import pyplot  # noqa: E402


def fit_power_law(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y against log x."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def fit_line(xs: list[float], ys: list[float]) -> float:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sum((a - mx) ** 2 for a in xs)


def median_time(fn, rounds: int) -> float:
    """Wall seconds of fn, over rounds (the upper median: with 2 rounds, the slower)."""
    return upper_median(time_fn(fn, "cpu", warmup=0, repeats=rounds).samples)


def task_models(T: int, size: int, seed: int = 0) -> list[dict]:
    from ccsmerge.synthetic import decaying_matrix

    g = torch.Generator().manual_seed(seed)
    base = torch.randn(size, size, generator=g) / size**0.5
    return [{"w": base + decaying_matrix(size, size, generator=g)} for _ in range(T)]


def streaming_inputs(root: Path, gb: float, models: int = 4) -> list[Path]:
    """`models` bf16 folders of 2048 x 2048 matrices, `gb` GB in all."""
    per_model = gb * 1e9 / models
    count = max(1, round(per_model / (2048 * 2048 * 2)))
    g = torch.Generator().manual_seed(0)
    base = {f"layers.{i}.weight": torch.randn(2048, 2048, generator=g).bfloat16() for i in range(count)}
    paths = []
    for t in range(models):
        folder = root / f"{gb}GB" / f"model-{t}"
        folder.mkdir(parents=True)
        save_file({k: (v.float() + 0.01 * (t + 1)).bfloat16() for k, v in base.items()}, folder / "model.safetensors")
        paths.append(folder)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    ccsmerge = load_ccsmerge()
    info = machine_info(ccsmerge)
    log(describe(info))
    size = 512 if args.quick else 1024
    rounds = 1 if args.quick else 2
    counts = [3, 4, 8, 12, 16, 20] if not args.quick else [3, 6, 12]  # T = 2 is the plain average
    ratios = [0.01, 0.02, 0.04, 0.08, 0.16, 0.32] if not args.quick else [0.02, 0.08, 0.32]
    sizes_gb = [0.5, 1.0, 2.0, 4.0] if not args.quick else [0.1, 0.2, 0.4]

    by_t = []
    for T in counts:
        models = task_models(T, size)
        by_t.append((T, median_time(lambda models=models: ccsmerge.merge(models, "cart", device="cpu"), rounds)))
        print("T", by_t[-1])
    models = task_models(8, size)
    by_rank = []
    for ratio in ratios:
        seconds = median_time(lambda ratio=ratio: ccsmerge.merge(models, "cart", rank_ratio=ratio, device="cpu"),
                              rounds)
        by_rank.append((ratio, seconds))
        print("rank", by_rank[-1])
    by_size = []
    work = Path(tempfile.mkdtemp(prefix="ccsmerge-scaling-"))
    try:
        for gb in sizes_gb:
            paths = streaming_inputs(work, gb)
            real_gb = sum(f.stat().st_size for p in paths for f in p.glob("*.safetensors")) / 1e9
            out = work / "out"
            command = [sys.executable, "-m", "ccsmerge", "merge", "--method", "average", "--quiet", "--device", "cpu"]
            command += ["--max-memory", "256MB", "--out", str(out)] + [a for p in paths for a in ("--model", str(p))]
            files = " ".join(str(p / "model.safetensors") for p in paths)
            subprocess.run(["bash", "-c", f"cat {files} > /dev/null"], check=True)  # a warm page cache
            shutil.rmtree(out, ignore_errors=True)
            seconds, rss = time_command_rss(command)
            by_size.append((real_gb, seconds, rss))
            print("size", by_size[-1])
            shutil.rmtree(work / f"{gb}GB", ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    slopes = {
        "time_vs_T": fit_power_law([t for t, _ in by_t], [s for _, s in by_t]),
        "time_vs_rank_ratio": fit_power_law([r for r, _ in by_rank], [s for _, s in by_rank]),
        "time_vs_input_size": fit_power_law([g for g, _, _ in by_size], [s for _, s, _ in by_size]),
        "seconds_per_gb": fit_line([g for g, _, _ in by_size], [s for _, s, _ in by_size]),
        "rss_gb_per_input_gb": fit_line([g for g, _, _ in by_size], [r for _, _, r in by_size]),
    }
    result = {"machine": info, "load_average": load_average(), "size": size, "by_T": by_t, "by_rank_ratio": by_rank,
              "by_input_size": by_size, "slopes": slopes}
    stem = "scaling-quick" if args.quick else "scaling"
    lines = [
        "# Scaling: time and memory against T, the rank ratio and the input size",
        "",
        f"Machine: {describe(info)}; load average {result['load_average']}.",
        "",
        f"CART of one fp32 {size} x {size} weight, defaults (median of {rounds}); slope: time ∝ T^slope.",
        "",
        table(["T", *(str(t) for t, _ in by_t), "slope"],
              [["s", *(f"{s:.3f}" for _, s in by_t), f"{slopes['time_vs_T']:.2f}"]]),
        "",
        f"CART, T = 8, one {size} x {size} weight, against the rank ratio; time ∝ ratio^slope.",
        "",
        table(["rank ratio", *(str(r) for r, _ in by_rank), "slope"],
              [["s", *(f"{s:.3f}" for _, s in by_rank), f"{slopes['time_vs_rank_ratio']:.2f}"]]),
        "",
        ("`ccsmerge merge --method average --max-memory 256MB`, 4 bf16 models of 2048 x 2048 matrices, warm page "
         "cache, a fresh process each (startup included)."),
        "",
        table(["input GB", "seconds", "peak RSS GB"], [[f"{g:.2f}", f"{s:.2f}", f"{r:.2f}"] for g, s, r in by_size]),
        "",
        (f"Slopes: time ∝ size^{slopes['time_vs_input_size']:.2f} ({slopes['seconds_per_gb']:.2f} s per GB); "
         f"peak RSS grows {slopes['rss_gb_per_input_gb'] * 1000:.0f} MB per GB of input."),
    ]
    write_results(args.out, stem, result, "\n".join(lines), echo=True)
    plt = pyplot()
    if plt is None:
        log("matplotlib is not installed: no plot")
        return
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    axes[0].loglog([t for t, _ in by_t], [s for _, s in by_t], "o-")
    axes[0].set(xlabel="T (models)", ylabel="seconds", title=f"CART, {size}², slope {slopes['time_vs_T']:.2f}")
    axes[1].loglog([r for r, _ in by_rank], [s for _, s in by_rank], "o-")
    title = f"CART, T = 8, slope {slopes['time_vs_rank_ratio']:.2f}"
    axes[1].set(xlabel="rank ratio", ylabel="seconds", title=title)
    axes[2].plot([g for g, _, _ in by_size], [r for _, _, r in by_size], "o-", label="peak RSS GB")
    axes[2].plot([g for g, _, _ in by_size], [s for _, s, _ in by_size], "s-", label="seconds")
    axes[2].set(xlabel="input GB", title="streaming average, --max-memory 256MB")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(args.out / f"{stem}.png", dpi=110)


if __name__ == "__main__":
    main()
