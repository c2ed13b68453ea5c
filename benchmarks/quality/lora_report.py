"""REPORT.md and results.json of the LoRA quality benchmark (lora.py)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from .lora import CART_LAMS, FRACTIONS, ROWS
from .run import paired

CURRENT_DEFAULT = 0.12  # CART's rank_ratio default, applied to R for adapter modules


def _acc(correct) -> list[float]:
    return [100 * c.mean().item() for c in correct]


def _mean(xs):
    return sum(xs) / len(xs)


def _setting(s: dict) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in s.items()) if s else "-"


def _edge(ax: str, v, grids: dict, method: str) -> bool:
    g = grids.get(method, {}).get(ax, [])
    return len(g) > 1 and v in (min(g), max(g))


def _mean_val(runs) -> dict:
    val = {}
    for run in runs:
        for row in run["searches"]["cart"]:
            val.setdefault((row["fraction"], row["lam"]), []).append(row["score"])
    return {key: _mean(v) for key, v in val.items()}


def default_keys(runs) -> list[tuple[float, float]]:
    """(fraction, lam) of the best mean validation accuracy over the ranks, and of the current
    default's fraction at its best lam."""
    mean_val = _mean_val(runs)
    best = max(mean_val, key=mean_val.get)
    current_lam = max(CART_LAMS, key=lambda lam: mean_val[(CURRENT_DEFAULT, lam)])
    return [best, (CURRENT_DEFAULT, current_lam)]


def _defaults(runs) -> dict:
    """The (fraction of R, lam) setting with the best validation accuracy averaged over the adapter
    ranks (one default for every rank), its test numbers, and the current default's."""
    mean_val = _mean_val(runs)
    best, (_, current_lam) = default_keys(runs)
    out = {"setting": {"fraction": best[0], "lam": best[1]}, "mean_val": 100 * mean_val[best],
           "current": {"fraction": CURRENT_DEFAULT, "lam": current_lam,
                       "mean_val": 100 * mean_val[(CURRENT_DEFAULT, current_lam)]},
           "per_rank": []}
    for run in runs:
        grid = run["test_grid"]
        chosen = run["results"]["cart"]["setting"]
        at = grid[best]
        row = {"r": run["r"], "R": run["R"], "k": max(1, int(best[0] * run["R"])),
               "test": _mean(_acc(at)),
               "vs_chosen": paired(at, run["results"]["cart"]["test"]),
               "vs_current": paired(at, grid[(CURRENT_DEFAULT, current_lam)]),
               "current_test": _mean(_acc(grid[(CURRENT_DEFAULT, current_lam)])),
               "vs_average": paired(at, run["results"]["average"]["test"]),
               "chosen": chosen}
        out["per_rank"].append(row)
    return out


def write(out: Path, tasks, sizes, runs, meta, argv) -> None:
    import ccsmerge

    from ..machine import describe, machine_info

    out = Path(out)
    info = machine_info(ccsmerge)
    names = [t.name for t in tasks]
    grids = meta["grids"]
    L = []
    w = L.append
    w("# Merging LoRA adapters: all-MiniLM-L6-v2 on seven text classification tasks\n")
    w(f"Command: `python -m benchmarks.quality.lora {' '.join(argv)}`  \n"
      f"Wall time: **{meta['wall_s']:.0f} s** ({', '.join(f'{k}: {v:.0f} s' for k, v in meta['phases'].items())}); "
      f"process CPU time {meta['cpu_s']:.0f} s; load average {meta['loadavg_start'][0]:.1f} at the start, "
      f"{meta['loadavg_end'][0]:.1f} at the end  \nMachine: {describe(info)}\n")

    defaults = _defaults(runs)
    d = defaults["setting"]
    w("## Summary\n")
    for run in runs:
        res = run["results"]
        cart = _mean(_acc(res["cart"]["test"]))
        ind = _mean(_acc(res["individual"]["test"]))
        s = res["cart"]["setting"]
        w(f"- **r = {run['r']}** (R = {run['R']} per module): CART reaches **{cart:.2f}%** mean test accuracy "
          f"({100 * cart / ind:.1f}% of the individual adapters' {ind:.2f}%) at k = {s['k']} "
          f"({s['fraction']:g} R), λ {s['lam']:g}, chosen on validation. "
          + "; ".join(f"vs {dict(ROWS)[k].lower()} {_fmt_pair(paired(res['cart']['test'], res[k]['test']))}"
                      for k in ("average", "task_arithmetic", "tsv_m", "iso_c")) + " (CART − other, paired SE).")
    w(f"- **One default for every rank** (the best validation accuracy averaged over the ranks): "
      f"k = {d['fraction']:g} R, λ {d['lam']:g}. On test: "
      + "; ".join(f"r = {p['r']}: k = {p['k']}, {p['test']:.2f}% ({_fmt_pair(p['vs_chosen'])} vs the rank's own "
                  f"validation choice, {_fmt_pair(p['vs_current'])} vs {CURRENT_DEFAULT:g} R at λ "
                  f"{defaults['current']['lam']:g}, {_fmt_pair(p['vs_average'])} vs averaging)"
                  for p in defaults["per_rank"]) + ".")
    w(f"- The current default, {CURRENT_DEFAULT:g} R (its best λ {defaults['current']['lam']:g}): mean validation "
      f"{defaults['current']['mean_val']:.2f}% against {defaults['mean_val']:.2f}% at the setting above.\n")

    for run in runs:
        _rank_section(w, run, names, grids)

    w("## Setup\n")
    a = meta["args"]
    w(f"- Model: all-MiniLM-L6-v2 (6 layers, hidden 384), embeddings and layers 0-{meta['start_layer'] - 1} frozen "
      f"(outputs cached); layers {meta['start_layer']}-5 adapted and merged: {len(meta['modules'])} LoRA modules "
      f"(query, key, value, attention output, intermediate, output: 384×384 and 1536×384); the "
      f"{meta['n_merged_tensors'] - len(meta['modules'])} biases and LayerNorm tensors stay the base's.")
    w(f"- LoRA: W0 + (α/r) B A with α = {a['alpha_ratio']:g} r, B = 0 and A ~ U(±1/sqrt(n)) at the start (peft's "
      f"initialisation); AdamW on A and B, lr {a['lora_lr']:g}, {a['epochs']} epochs of batches of {a['batch']}, "
      f"warm-up 10% and linear decay, seed {a['seed']} + task index. Saved as PEFT adapter folders "
      "(adapter_config.json, adapter_model.safetensors with base_model.model.<module>.lora_A/B.weight); the base "
      "is the pretrained tuned layers' tensors in one safetensors file.")
    if "full" in runs[0]["results"]:
        w(f"- Full fine-tunes (reference row): every tensor of the tuned layers, AdamW lr {a['lr']:g}, as "
          "`python -m benchmarks.quality` trains them.")
    w("- Heads: the pretrained model's normalised class means on each task's training split, frozen; logits = "
      f"{a['scale']:g} × cosine; every model is evaluated on each task with that task's head.")
    w("- Every merge: `ccsmerge.merge_checkpoints(adapter folders, out, method, base=base folder, ...)` (the factored "
      "path: exact QR/SVD of the stacked factors), the output's safetensors read back into the model's top layers. "
      f"CART's k is given with `rank` = max(1, int(fraction × R)), R = Σ r_t = T r on every module (T = {len(names)} "
      "adapters). Grids (validation): "
      + "; ".join(f"{m}: " + ", ".join(f"{ax} ∈ {{{', '.join(f'{v:g}' for v in vals)}}}" for ax, vals in g.items())
                  for m, g in grids.items()) + ".")
    merge_s = [s for run in runs for s in run["merge_s"]]
    w(f"- {len(merge_s)} merges from the folders: median {statistics.median(merge_s):.2f} s each "
      f"(read, plan, merge, write {meta['n_merged_tensors']} tensors, {meta['n_merged_params'] / 1e6:.2f}M parameters).")
    w("- Statistics: accuracy per task, the mean over tasks; normalised = merged / individual adapter per task, "
      "averaged. Paired differences on the same test examples, SE = sqrt(Σ_t var_t(c_A − c_B) / n_t) / T.")
    w("")
    w("## Tasks\n")
    w("| task | classes | train / val / test |")
    w("|---|---:|---|")
    for t in tasks:
        n = sizes[t.name]
        w(f"| {t.name} | {len(t.classes)} | {n['train']} / {n['val']} / {n['test']} |")
    (out / "REPORT.md").write_text("\n".join(L) + "\n")

    dump = {"machine": info, "meta": meta, "tasks": names, "default": defaults, "ranks": []}
    for run in runs:
        res = run["results"]
        dump["ranks"].append({
            "r": run["r"], "alpha": run["alpha"], "R": run["R"], "n_evals": run["n_evals"],
            "adapter_bytes": run["adapter_bytes"], "merge_s": run["merge_s"],
            "table": {k: {"acc": _acc(res[k]["test"]), "mean": _mean(_acc(res[k]["test"])), "val": res[k]["val"],
                          "setting": res[k]["setting"]} for k, _ in ROWS if k in res},
            "paired_cart_minus": {k: paired(res["cart"]["test"], res[k]["test"]) for k, _ in ROWS
                                  if k in res and k != "cart"},
            "searches": run["searches"],
            "cart_test_grid": [{"fraction": f, "lam": lam, "test": _mean(_acc(c))}
                               for (f, lam), c in run["test_grid"].items()],
            "final_loss": {k: _mean(v[-10:]) for k, v in run["losses"].items()},
        })
    (out / "results.json").write_text(json.dumps(dump, indent=1, default=str))


def _fmt_pair(pair) -> str:
    d, se = pair
    return f"{d:+.2f} ± {se:.2f}{' *' if abs(d) > 2 * se else ''}"


def _rank_section(w, run, names, grids) -> None:
    res, r, R = run["results"], run["r"], run["R"]
    ind = _acc(res["individual"]["test"])
    w(f"## Adapters of rank {r} (α = {run['alpha']:g}; R = {R} per module)\n")
    w("Test accuracy (%); settings chosen by the mean validation accuracy; normalised = % of the individual "
      "adapter's accuracy; CART − method: paired difference ± SE (* beyond 2 SE).\n")
    w("| method | " + " | ".join(names) + " | **mean** | normalised | val mean | chosen | CART − method |")
    w("|---|" + "---:|" * (len(names) + 3) + "---|---:|")
    edges = 0
    for key, label in ROWS:
        if key not in res:
            continue
        acc = _acc(res[key]["test"])
        norm = _mean([100 * a / i for a, i in zip(acc, ind)])
        chosen = []
        for ax, v in res[key]["setting"].items():
            edge = _edge(ax, v, grids, key)
            edges += edge
            chosen.append(f"{ax} {v:g}{' †' if edge else ''}")
        diff = "-" if key == "cart" else _fmt_pair(paired(res["cart"]["test"], res[key]["test"]))
        label = f"**{label}**" if key == "cart" else label
        w(f"| {label} | " + " | ".join(f"{a:.1f}" for a in acc) +
          f" | **{_mean(acc):.2f}** | {norm:.1f} | {100 * res[key]['val']:.2f} | {', '.join(chosen) or '-'} | {diff} |")
    if edges:
        w("\n† at the edge of its search grid.")
    w("")
    val = {(row["fraction"], row["lam"]): row["score"] for row in run["searches"]["cart"]}
    test = {key: _mean(_acc(c)) for key, c in run["test_grid"].items()}
    avg = _mean(_acc(res["average"]["test"]))
    w(f"### CART over k (fraction of R = {R}) and λ: validation mean accuracy (%)\n")
    w(f"Weight averaging (CART's limit at k ≥ R): validation {100 * res['average']['val']:.2f}, test {avg:.2f}. "
      "The test column (at each fraction's best λ on validation) is shown only; nothing is chosen from it.\n")
    w("| fraction of R | k | " + " | ".join(f"λ {lam:g}" for lam in CART_LAMS) + " | best λ (val) | val | test |")
    w("|---:|---:|" + "---:|" * (len(CART_LAMS) + 3))
    for f in FRACTIONS:
        k = max(1, int(f * R))
        lam = max(CART_LAMS, key=lambda x: val[(f, x)])
        w(f"| {f:g} | {k} | " + " | ".join(f"{100 * val[(f, x)]:.2f}" for x in CART_LAMS)
          + f" | {lam:g} | {100 * val[(f, lam)]:.2f} | {test[(f, lam)]:.2f} |")
    w("")
    for key in ("task_arithmetic", "tsv_m", "iso_c"):
        rows = run["searches"][key]
        w(f"- {dict(ROWS)[key]} (validation): " + ", ".join(f"λ {row['lam']:g}: {100 * row['score']:.2f}" for row in rows))
    w("")
