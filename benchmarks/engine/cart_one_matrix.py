"""Part a: CART on one m x n weight (T tasks). Four implementations of the same merge,
timed side by side in interleaved rounds: ccsmerge's randomized update at its defaults
and at oversample=10/power_iters=2, svd="exact", and the official-style code; the
randomized updates' error against the exact one, and each one's peak memory."""

from __future__ import annotations

import synthetic
import torch
from harness import fmt_range, fmt_ratio, fmt_seconds, log, paired_ratio, table, time_interleaved
from official_cart import official_cart, rank_for

from engine.common import LAM, PeakMemory, ccsmerge, fmt_bytes, free_memory, keep_last_output, rel_diff
from engine.presets import Preset

TITLE = "a. CART on one matrix"


def cart_variants(models, rank_ratio: float, device: torch.device, exact: bool = True) -> dict:
    """The implementations of one CART merge, as zero-argument calls (ccs_exact
    only when `exact`)."""
    merge = ccsmerge.merge
    variants = {
        "ccs_rand_default": lambda: merge(models, rank_ratio=rank_ratio, lam=LAM, device=device),
        "ccs_rand_os10_p2": lambda: merge(models, rank_ratio=rank_ratio, lam=LAM, oversample=10, power_iters=2,
                                          device=device),
        "ccs_exact": lambda: merge(models, rank_ratio=rank_ratio, lam=LAM, svd="exact", device=device),
        "official": lambda: official_cart(models, rank_ratio, LAM, device=device),
    }
    if not exact:
        del variants["ccs_exact"]
    return variants


def run(cfg: Preset, device: torch.device) -> dict:
    m, n = cfg.a_size
    rr = cfg.a_rank_ratio
    k = rank_for((m, n), rr)
    small = [{"w": x} for x in synthetic.task_matrices(256, 256, 3, seed=99, device=device)]
    rows = []
    for T in cfg.a_tasks:
        log(f"[a] {m}x{n} fp32, T={T}, k={k}: generating")
        xs = synthetic.task_matrices(m, n, T, seed=T, device=device)
        models = [{"w": x} for x in xs]
        outputs: dict = {}
        exact = T <= cfg.a_exact_max_T
        memory = PeakMemory(device)
        fns = memory.wrap(keep_last_output(cart_variants(models, rr, device, exact), outputs))
        # The exact SVDs are warmed up on a small matrix (LAPACK/cuSOLVER set-up), not at full size.
        warm_small = cart_variants(small, rr, device)
        warmups = {"ccs_exact": warm_small["ccs_exact"], "official": warm_small["official"]}
        log(f"[a] T={T}: timing {', '.join(fns)} x {cfg.a_rounds} rounds, interleaved")
        timings = time_interleaved(fns, device, rounds=cfg.a_rounds, warmups=warmups, wall=True,
                                   max_seconds=cfg.a_max_seconds)
        reference = "ccs_exact" if exact else "official"
        speedup = {
            "official/ccs_rand_default": paired_ratio(timings["official"], timings["ccs_rand_default"]),
            "official/ccs_rand_os10_p2": paired_ratio(timings["official"], timings["ccs_rand_os10_p2"]),
        }
        if exact:
            speedup.update({
                "ccs_exact/ccs_rand_default": paired_ratio(timings["ccs_exact"], timings["ccs_rand_default"]),
                "ccs_exact/ccs_rand_os10_p2": paired_ratio(timings["ccs_exact"], timings["ccs_rand_os10_p2"]),
                "official/ccs_exact": paired_ratio(timings["official"], timings["ccs_exact"]),
            })
        row = {
            "shape": [m, n], "T": T, "k": k, "rank_ratio": rr, "reference": reference,
            "times": {name: t.as_dict() for name, t in timings.items()}, "speedup": speedup,
            "peak_memory_bytes": memory.as_dict(), "input_bytes": sum(x.numel() * x.element_size() for x in xs),
        }
        if T >= 3:  # T = 2 is degenerate for CART: the two centered matrices are negatives of each other
            avg = ccsmerge.ops.mean(xs)
            update = {name: out["w"].float() - avg for name, out in outputs.items()}
            row["rel_err_vs_exact"] = {name: rel_diff(update[name], update[reference])
                                       for name in update if name != reference}
        rows.append(row)
        log(f"[a] T={T}: " + ", ".join(f"{name} {t}" for name, t in timings.items()))
        del xs, models, outputs, fns
        free_memory(device)
    return {"rows": rows}


def row_cells(r: dict, names: list[str]) -> list:
    t, s, e = r["times"], r["speedup"], r.get("rel_err_vs_exact")
    ref = r.get("reference", "ccs_exact")

    def cell(name):
        return fmt_range(t[name]["median_s"], t[name]["min_s"], t[name]["max_s"]) if name in t else "-"

    def err(name):
        if name == ref:
            return "reference"
        if e and name in e:
            return f"{e[name]:.2e}"
        return "n/a (T=2)" if r["T"] == 2 else "-"

    def ratio(key):
        return fmt_ratio(s[key]) if key in s else "-"

    return [f"{r['shape'][0]}x{r['shape'][1]}", r["T"], r["k"], *(cell(name) for name in names),
            ratio("official/ccs_rand_default"), ratio("official/ccs_rand_os10_p2"), ratio("official/ccs_exact"),
            *(err(name) for name in names)]


def markdown(res: dict) -> str:
    names = ["ccs_rand_default", "ccs_rand_os10_p2", "ccs_exact", "official"]
    rows = [row_cells(r, names) for r in res["rows"]]
    memory_rows = [[f"{r['shape'][0]}x{r['shape'][1]}", r["T"], fmt_bytes(r["input_bytes"]),
                    *(fmt_bytes(r["peak_memory_bytes"][name]) if name in r["peak_memory_bytes"] else "-"
                      for name in names)]
                   for r in res["rows"] if "peak_memory_bytes" in r]
    text = table(
        ["shape", "T", "k", "ccs rand (default)", "ccs rand (os10,p2)", "ccs exact", "official",
         "official/rand", "official/rand(os10,p2)", "official/ccs exact", "err rand", "err rand(os10,p2)",
         "err ccs exact", "err official"],
        rows,
    ) + ("\n\nTimes: median [min-max] over interleaved rounds; ratios: median [min-max] of the per-round ratios. "
         "err: ||D - D_ref||_F / ||D_ref||_F with D = merged - theta_avg (T >= 3 only); the reference is ccsmerge's "
         "exact merge, or official_cart where the exact merge is not run (large T on a CPU).")
    if memory_rows:
        text += "\n\n" + table(["shape", "T", "inputs", *(f"peak {name}" for name in names)], memory_rows) + (
            "\n\nPeak memory of one merge over what was in use when it started (the inputs already in memory): "
            "the largest over rounds; process RSS sampled every 2 ms on a CPU, "
            "torch.cuda.max_memory_allocated on a GPU.")
    return text


def summary_rows(res: dict) -> list[list]:
    """The end-of-run summary's lines for this part."""
    lines = []
    for r in res["rows"]:
        t, s = r["times"], r["speedup"]
        e = r.get("rel_err_vs_exact")
        exact = f" / exact {fmt_seconds(t['ccs_exact']['median_s'])}" if "ccs_exact" in t else ""
        lines.append([
            f"a CART {r['shape'][0]}x{r['shape'][1]} T={r['T']} k={r['k']}",
            (f"rand {fmt_seconds(t['ccs_rand_default']['median_s'])} / os10p2 "
             f"{fmt_seconds(t['ccs_rand_os10_p2']['median_s'])}{exact}"
             f" / official {fmt_seconds(t['official']['median_s'])}"),
            f"official/rand {fmt_ratio(s['official/ccs_rand_default'])}, "
            f"official/os10p2 {fmt_ratio(s['official/ccs_rand_os10_p2'])}"
            + (f"; err {e['ccs_rand_default']:.1e} / {e['ccs_rand_os10_p2']:.1e}" if e else ""),
        ])
    return lines
