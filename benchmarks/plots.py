"""The report's plots, drawn from the JSON the benchmark scripts write.

    python benchmarks/plots.py DIR [--device cpu|cuda] [--preset quick|full]

Reads DIR/engine-<device>-<preset>.json, DIR/scaling[-quick].json and
DIR/streaming.json (whichever exist) and writes into DIR:

- lowrank_time_vs_shape.png: the low-rank step's time per method against the
  matrix shape, at rank 8 % (float32 and bfloat16 inputs side by side);
- lowrank_error_vs_power_iters.png: the error ratio of ccsmerge.ops.randomized_svd
  (oversample 10) against the number of power iterations, one panel per shape;
- lowrank_speedup_vs_rank.png: speedup over torch.linalg.svd against the rank
  ratio, per method, one panel per shape;
- cart_speedup_vs_T.png: whole CART on one matrix against the official-style code, against T;
- rss_vs_input.png: peak RSS of streaming merges under a fixed --max-memory
  against the input size.

`make_plots` returns (caption, file name) for each plot it wrote; it draws nothing
(and says why) when matplotlib is not installed."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

GB = 1e9
HEADLINE_RATIO = 0.08
EXACT = "torch.linalg.svd"


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save(fig, out: Path, name: str) -> str:
    """Write one plot into `out` and close it; returns its file name for the report."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def timed_rows(engine: dict, dtype: str = "float32", kind: str = "decaying") -> list[dict]:
    """Part d's measured rows (not skipped, not failed) of one dtype and kind."""
    rows = (engine.get("parts", {}).get("d") or {}).get("rows", [])
    return [r for r in rows if "time" in r and r.get("dtype", "float32") == dtype and r.get("kind", "decaying") == kind]


def shape_label(shape: list[int]) -> str:
    return f"{shape[0]}x{shape[1]}"


def shapes_of(rows: list[dict]) -> list[tuple[int, int]]:
    return sorted({tuple(r["shape"]) for r in rows}, key=lambda s: (s[0] * s[1], s))


def methods_of(rows: list[dict]) -> list[str]:
    seen: list[str] = []
    for r in rows:
        if r["method"] not in seen:
            seen.append(r["method"])
    return seen


def time_vs_shape(plt, engine: dict, out: Path) -> str | None:
    dtypes = [d for d in ("float32", "bfloat16") if any(r["rank_ratio"] == HEADLINE_RATIO
                                                       for r in timed_rows(engine, d))]
    if not dtypes:
        return None
    fig, axes = plt.subplots(1, len(dtypes), figsize=(7 * len(dtypes), 4.5), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes):
        rows = [r for r in timed_rows(engine, dtype) if r["rank_ratio"] == HEADLINE_RATIO]
        shapes = shapes_of(rows)
        for method in methods_of(rows):
            points = [(shapes.index(tuple(r["shape"])), r["time"]["median_s"]) for r in rows if r["method"] == method]
            points.sort()
            style = "k-o" if method.startswith(EXACT) else "-o"
            ax.plot([x for x, _ in points], [y for _, y in points], style, label=method, markersize=4)
        ax.set_xticks(range(len(shapes)), [shape_label(list(s)) for s in shapes])
        ax.set_yscale("log")
        ax.set(xlabel="matrix shape", ylabel="seconds (median)",
               title=f"low-rank step, rank {HEADLINE_RATIO:.0%}, {dtype} inputs")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    return save(fig, out, "lowrank_time_vs_shape.png")


def power_iters(method: str) -> int | None:
    """p of 'ccs rsvd os10 p<p>'."""
    prefix = "ccs rsvd os10 p"
    return int(method[len(prefix):]) if method.startswith(prefix) else None


def error_vs_power_iters(plt, engine: dict, out: Path) -> str | None:
    series = {("float32", "decaying"): "-o", ("bfloat16", "decaying"): ":s", ("float32", "gaussian"): "--^"}
    rows_by = {key: [r for r in timed_rows(engine, *key) if power_iters(r["method"]) is not None] for key in series}
    shapes = shapes_of(rows_by[("float32", "decaying")])
    if not shapes:
        return None
    fig, axes = plt.subplots(1, len(shapes), figsize=(4.2 * len(shapes), 4), squeeze=False, sharey=True)
    colors = {}
    for ax, shape in zip(axes[0], shapes):
        for (dtype, kind), style in series.items():
            rows = [r for r in rows_by[(dtype, kind)] if tuple(r["shape"]) == shape]
            for ratio in sorted({r["rank_ratio"] for r in rows}):
                points = sorted((power_iters(r["method"]), r["err_ratio"]) for r in rows if r["rank_ratio"] == ratio)
                color = colors.setdefault(ratio, f"C{len(colors)}")
                label = f"rank {ratio:.0%}" + ("" if (dtype, kind) == ("float32", "decaying") else f", {kind} {dtype}")
                ax.plot([p for p, _ in points], [e for _, e in points], style, color=color, label=label,
                        markersize=4)
        ax.axhline(1.02, color="k", linestyle="--", linewidth=0.8)
        ax.set_yscale("log")
        ax.set(xlabel="power iterations", title=shape_label(list(shape)))
        ax.set_xticks([0, 1, 2, 4])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("||A - A_k|| / ||A - A_k^opt||  (dashed: 1.02)")
    fig.suptitle("ccsmerge.ops.randomized_svd, oversample 10: error ratio against power iterations "
                 "(solid: decaying spectrum, fp32)")
    return save(fig, out, "lowrank_error_vs_power_iters.png")


def speedup_vs_rank(plt, engine: dict, out: Path) -> str | None:
    rows = [r for r in timed_rows(engine) if not r["method"].startswith(EXACT)]
    shapes = [s for s in shapes_of(rows) if len({r["rank_ratio"] for r in rows if tuple(r["shape"]) == s}) > 1]
    if not shapes:
        return None
    fig, axes = plt.subplots(1, len(shapes), figsize=(4.2 * len(shapes), 4), squeeze=False, sharey=True)
    target = 100 if engine.get("device") == "cuda" else 20
    for ax, shape in zip(axes[0], shapes):
        here = [r for r in rows if tuple(r["shape"]) == shape]
        for i, method in enumerate(methods_of(here)):
            points = sorted((r["rank_ratio"], r["speedup_vs_linalg_svd"]) for r in here if r["method"] == method)
            ax.plot([x for x, _ in points], [y for _, y in points], "-o", color=f"C{i}", label=method, markersize=4)
        ax.axhline(1, color="k", linewidth=0.8)
        ax.axhline(target, color="k", linestyle="--", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set(xlabel="rank ratio", title=shape_label(list(shape)))
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel(f"speedup over torch.linalg.svd (dashed: {target}x)")
    axes[0][-1].legend(fontsize=6)
    fig.suptitle("low-rank step, float32, decaying spectrum: speedup against the rank ratio")
    return save(fig, out, "lowrank_speedup_vs_rank.png")


def cart_speedup_vs_t(plt, engine: dict, out: Path) -> str | None:
    rows = (engine.get("parts", {}).get("a") or {}).get("rows", [])
    if len(rows) < 2:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("official/ccs_rand_default", "merge defaults"), ("official/ccs_rand_os10_p2",
                                                                          "oversample 10, power_iters 2"),
                       ("official/ccs_exact", "svd='exact'")):
        points = [(r["T"], r["speedup"][key]) for r in rows if key in r["speedup"]]
        if points:
            ax.errorbar([t for t, _ in points], [s["median"] for _, s in points],
                        yerr=[[s["median"] - s["min"] for _, s in points], [s["max"] - s["median"] for _, s in points]],
                        fmt="-o", capsize=3, label=label)
    ax.axhline(20, color="k", linestyle="--", linewidth=0.8)
    ax.set_yscale("log")
    shape = shape_label(rows[0]["shape"])
    ax.set(xlabel="T (models)", ylabel="official-style time / ccsmerge time",
           title=f"CART of one {shape} fp32 weight, rank {rows[0]['rank_ratio']:.0%}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return save(fig, out, "cart_speedup_vs_T.png")


def streaming_points(streaming: dict) -> list[tuple[float, float]]:
    """(input GB, largest peak RSS over the baseline in GB) of the streaming averages."""
    points = []
    for size in streaming.get("sizes", []):
        over = [r["peak_rss"] - r["baseline_rss"] for r in size.get("runs", []) if "error" not in r]
        if over:
            points.append((size["input_bytes"] / GB, max(over) / GB))
    return points


def rss_vs_input(plt, scaling: dict | None, streaming: dict | None, out: Path) -> str | None:
    series = []
    if streaming:
        budget = streaming.get("config", {}).get("max_memory_bytes")
        series.append((streaming_points(streaming), "streaming.py: average, peak RSS over the baseline", budget))
    if scaling:
        series.append(([(g, r) for g, _, r in scaling["by_input_size"]], "scaling.py: average, peak RSS (imports included)",
                       256e6))
    series = [s for s in series if s[0]]
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, (points, label, budget) in enumerate(series):
        ax.plot([g for g, _ in points], [r for _, r in points], "-o", color=f"C{i}", label=label)
        if budget:
            ax.axhline(budget / GB, color=f"C{i}", linestyle="--", linewidth=0.8,
                       label=f"--max-memory {budget / GB:.2f} GB")
    ax.set_xscale("log")
    ax.set(xlabel="input GB (all models)", ylabel="GB", title="peak RSS against the input size, fixed --max-memory")
    ax.set_ylim(bottom=0)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    return save(fig, out, "rss_vs_input.png")


CAPTIONS = {
    "lowrank_time_vs_shape.png": "Low-rank step: time against the matrix shape, per method (rank 8 %)",
    "lowrank_error_vs_power_iters.png": "Low-rank step: error ratio against power iterations",
    "lowrank_speedup_vs_rank.png": "Low-rank step: speedup over torch.linalg.svd against the rank ratio",
    "cart_speedup_vs_T.png": "Whole CART on one matrix: speedup over the official-style code against T",
    "rss_vs_input.png": "Streaming merges: peak RSS against the input size under a fixed --max-memory",
}


def make_plots(out: Path, device: str = "cpu", preset: str = "quick") -> list[tuple[str, str]]:
    plt = pyplot()
    if plt is None:
        print("matplotlib is not installed: no plots")
        return []
    engine = load(out / f"engine-{device}-{preset}.json")
    scaling = load(out / f"scaling{'' if preset == 'full' else '-quick'}.json")
    streaming = load(out / "streaming.json")
    names = []
    if engine:
        names += [time_vs_shape(plt, engine, out), error_vs_power_iters(plt, engine, out),
                  speedup_vs_rank(plt, engine, out), cart_speedup_vs_t(plt, engine, out)]
    names.append(rss_vs_input(plt, scaling, streaming, out))
    return [(CAPTIONS[n], n) for n in names if n]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--preset", choices=("quick", "full"), default="quick")
    args = parser.parse_args()
    for caption, name in make_plots(args.out, args.device, args.preset):
        print(f"{args.out / name}: {caption}")


if __name__ == "__main__":
    main()
