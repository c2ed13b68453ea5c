"""The demo's table (markdown) and plots (PNG)."""

from __future__ import annotations

import platform
from pathlib import Path

from ccsmerge.accuracy_record import summary_table

SECOND_AXIS = {"cart": "rank_ratio", "ties": "density", "iso_cts": "common_space_fraction"}
LABELS = {
    "cart": "CART (randomized)",
    "task_arithmetic": "task arithmetic",
    "ties": "TIES",
    "tsv_m": "TSV-M",
    "iso_c": "Iso-C",
    "iso_cts": "Iso-CTS",
}


def _setting(setting: dict) -> str:
    short = {"lam": "λ", "rank_ratio": "rank", "density": "density", "common_space_fraction": "common"}
    return ", ".join(f"{short[k]} {v:g}" for k, v in setting.items()) or "–"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def markdown_report(results: dict) -> str:
    tasks = results["tasks"]
    lines = [
        "## ccsmerge demo: eight digit tasks merged into one encoder",
        "",
        "Test accuracy (%) per task; hyper-parameters chosen on the validation split. *normalised* is the",
        "mean over tasks of merged / individual accuracy. *CART − this* is the paired difference in",
        "points over all test examples of all tasks, ± its standard error.",
        "",
        "| model | setting | " + " | ".join(tasks) + " | mean | normalised | CART − this |",
        "|---|---|" + "---:|" * (len(tasks) + 3),
    ]
    for row in results["rows"]:
        diff = row["cart_minus_this"]
        lines.append(
            f"| {row['label']} | {_setting(row['setting'])} | "
            + " | ".join(f"{100 * a:.1f}" for a in row["test"])
            + f" | **{100 * row['mean']:.1f}** | {100 * row['normalised']:.1f} | "
            + ("–" if diff is None else f"{diff[0]:+.1f} ± {diff[1]:.1f}")
            + " |"
        )
    gap, se = results["randomized_minus_exact"]
    lines += [
        "",
        f"CART randomized − exact SVD, same setting: {gap:+.2f} ± {se:.2f} points "
        f"({within_one_se(gap, se)}).",
        "",
    ]
    if results.get("randomized_accuracy") is not None:
        lines += [
            "The randomized CART merge at the library's defaults (tolerance auto), as its "
            "`ccsmerge-accuracy.json` records it (errors relative to the update):",
            "",
            *summary_table(results["randomized_accuracy"]),
            "",
        ]
    lines += [
        (
            f"{results['seconds']:.0f} s with {results['threads']} CPU thread(s) on {cpu_name()}, "
            f"torch {results['torch']}, ccsmerge {results['ccsmerge']}, seed {results['seed']}, merge device "
            f"{results['device']}{', --quick grids' if results['quick'] else ''}."
        ),
    ]
    cart_row = next(r for r in results["rows"] if r["label"] == "CART (randomized)")
    if cart_row["command"]:
        lines += ["", "The CART merge, as run:", "", "```", cart_row["command"], "```"]
    for name in results.get("plots", []):
        lines += ["", f"![{name}]({name})"]
    return "\n".join(lines) + "\n"


def within_one_se(diff: float, se: float) -> str:
    """Whether a paired difference is within one standard error of zero, in words."""
    if diff == 0 and se == 0:
        return "identical predictions on every test example"
    if abs(diff) <= se:
        return "within 1 SE"
    return f"NOT within 1 SE: {abs(diff) / se:.1f} SE" if se > 0 else "NOT within 1 SE (SE 0)"


def _mean_of(results: dict, label: str) -> float:
    return next(100 * r["mean"] for r in results["rows"] if r["label"] == label)


def write_plots(results: dict, out: Path) -> list[str]:
    """rank_sweep.png (CART accuracy vs rank ratio) and lambda_sweep.png (accuracy vs λ per method)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install 'ccsmerge[demo]')")
        return []
    chosen = {r["method"]: r["setting"] for r in results["rows"] if r["method"]}
    references = [("individual fine-tuned", ":"), ("average", "--"), ("pretrained", "-.")]

    fig, ax = plt.subplots(figsize=(6, 4))
    sweep = [r for r in results["sweeps"]["cart"] if r["lam"] == chosen["cart"]["lam"]]
    ranks = [r["rank_ratio"] for r in sweep]
    ax.plot(ranks, [100 * r["score"] for r in sweep], "o-", label="CART, validation")
    ax.plot(ranks, [100 * r["test"] for r in sweep], "s-", label="CART, test")
    for label, style in references:
        ax.axhline(_mean_of(results, label), linestyle=style, color="gray", linewidth=1)
        ax.annotate(label, (ranks[-1], _mean_of(results, label)), fontsize=7, ha="right", va="bottom")
    ax.set_xscale("log")
    ax.set_xticks(ranks, [f"{r:g}" for r in ranks], fontsize=8)
    ax.minorticks_off()
    ax.set_xlabel("rank ratio (k / min(m, n))")
    ax.set_ylabel("mean accuracy over tasks (%)")
    ax.set_title(f"CART rank sweep, λ = {chosen['cart']['lam']:g}")
    ax.legend(loc="lower center", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "rank_sweep.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, table in results["sweeps"].items():
        second = SECOND_AXIS.get(method)
        rows = [r for r in table if second is None or r[second] == chosen[method][second]]
        (line,) = ax.plot([r["lam"] for r in rows], [100 * r["test"] for r in rows], "o-", label=LABELS[method])
        ax.plot([r["lam"] for r in rows], [100 * r["score"] for r in rows], ":", color=line.get_color())
    ax.axhline(_mean_of(results, "average"), linestyle="--", color="gray", linewidth=1, label="average")
    ax.set_xlabel("λ")
    ax.set_ylabel("mean accuracy over tasks (%)")
    ax.set_title("λ sweep (solid: test, dotted: validation)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "lambda_sweep.png", dpi=120)
    plt.close(fig)
    return ["rank_sweep.png", "lambda_sweep.png"]
