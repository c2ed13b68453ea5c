"""Part c: an end-to-end in-memory merge of a synthetic multi-layer model (CPU
state dicts in and out), and ccsmerge against official_cart on (a subset of) it:
wall time, the largest difference of the merged update, both peak memories."""

from __future__ import annotations

import time

import synthetic
import torch
from harness import fmt_range, fmt_seconds, log, table, time_fn, time_interleaved
from official_cart import official_cart, rank_for, truncated_reconstruction

from engine.common import LAM, PeakMemory, ccsmerge, fmt_bytes, keep_last_output, rel_diff
from engine.presets import Preset

TITLE = "c. End-to-end merge"


def layer_subset(models: list[dict], layers: int) -> list[dict]:
    keep = lambda name: int(name.split(".")[2]) < layers
    return [{k: v for k, v in sd.items() if keep(k)} for sd in models]


def svd_cost(shape: tuple[int, ...]) -> float:
    """Flop-count proxy of a thin SVD: max(m, n) * min(m, n)^2."""
    return max(shape) * min(shape) ** 2


def estimate_official(models: list[dict], rank_ratio: float, device: torch.device) -> float:
    """Seconds official_cart would take: one timed SVD of the cheapest 2-D shape,
    scaled by svd_cost to every 2-D tensor, times T."""
    shapes = [tuple(x.shape) for x in models[0].values() if x.dim() == 2]
    if not shapes:
        return 0.0
    probe = min(shapes, key=svd_cost)
    a = synthetic.decaying_matrix(*probe, seed=1, device=device)
    k = rank_for(probe, rank_ratio)
    truncated_reconstruction(a[:64, :64], 8)  # solver set-up
    seconds = time_fn(lambda: truncated_reconstruction(a, k), device, warmup=0, repeats=1).median
    return seconds * len(models) * sum(svd_cost(s) for s in shapes) / svd_cost(probe)


def max_update_diff(a: dict, b: dict, models: list[dict], device: torch.device) -> tuple[float, str]:
    """Largest ||D_a - D_b|| / ||D_b|| over the 2-D tensors, D = merged - theta_avg."""
    worst, worst_name = 0.0, ""
    for name, x in models[0].items():
        if x.dim() != 2:
            continue
        avg = ccsmerge.ops.mean([sd[name].to(device) for sd in models])
        d = rel_diff(a[name].to(device).float() - avg, b[name].to(device).float() - avg)
        if d > worst:
            worst, worst_name = d, name
    return worst, worst_name


def run(cfg: Preset, device: torch.device) -> dict:
    rr, T = cfg.c_rank_ratio, cfg.c_tasks
    log(f"[c] generating {T} models: {cfg.c_layers} layers, d={cfg.c_d_model}, ff={cfg.c_d_ff}, bf16")
    t0 = time.perf_counter()
    models = synthetic.synthetic_model(T, cfg.c_layers, cfg.c_d_model, cfg.c_d_ff, gen_device=device)
    gen_s = time.perf_counter() - t0
    nbytes = synthetic.model_bytes(models)
    params = sum(x.numel() for x in models[0].values())
    log(f"[c] {params / 1e6:.0f}M params per model, {nbytes / 2**30:.2f} GiB in all ({gen_s:.0f} s to generate)")

    tiny = synthetic.synthetic_model(T, 1, 256, 512, gen_device=device)
    ccsmerge.merge(tiny, rank_ratio=rr, lam=LAM, device=device)  # warm-up
    official_cart(tiny, rr, LAM, device=device)
    log(f"[c] ccsmerge.merge(device={device.type}) of the whole model x {cfg.c_rounds}")
    t_full = time_fn(lambda: ccsmerge.merge(models, rank_ratio=rr, lam=LAM, device=device), device,
                     warmup=0, repeats=cfg.c_rounds, wall=True)
    log(f"[c] ccsmerge: {t_full}")
    res = {
        "tasks": T, "layers": cfg.c_layers, "d_model": cfg.c_d_model, "d_ff": cfg.c_d_ff, "dtype": "bfloat16",
        "rank_ratio": rr, "params_per_model": params, "input_bytes": nbytes, "generate_s": gen_s,
        "ccsmerge_full": t_full.as_dict(), "ccsmerge_full_gbps": nbytes / t_full.median / 1e9,
    }

    layers = min(cfg.c_compare_layers, cfg.c_layers)
    sub = layer_subset(models, layers)
    estimate = estimate_official(sub, rr, device)
    compare = {"layers": layers, "official_estimate_s": estimate, "official_budget_s": cfg.c_official_budget_s}
    res["compare"] = compare
    if estimate > cfg.c_official_budget_s:
        compare["skipped"] = f"official_cart estimated at {estimate:.0f} s > budget {cfg.c_official_budget_s:.0f} s"
        log(f"[c] {compare['skipped']}")
        return res
    log(f"[c] ccsmerge vs official_cart on {layers} layer(s) (official estimated {estimate:.0f} s)")
    outputs: dict = {}
    memory = PeakMemory(device)
    fns = memory.wrap(keep_last_output({
        "ccsmerge": lambda: ccsmerge.merge(sub, rank_ratio=rr, lam=LAM, device=device),
        "official": lambda: official_cart(sub, rr, LAM, device=device),
    }, outputs))
    timings = time_interleaved(fns, device, rounds=1, warmups={k: (lambda: None) for k in fns}, wall=True)
    worst, worst_name = max_update_diff(outputs["ccsmerge"], outputs["official"], sub, device)
    compare.update({
        "ccsmerge": timings["ccsmerge"].as_dict(), "official": timings["official"].as_dict(),
        "speedup": timings["official"].median / timings["ccsmerge"].median,
        "max_rel_update_diff": worst, "max_rel_update_diff_tensor": worst_name,
        "peak_memory_bytes": memory.as_dict(),
    })
    log(f"[c] ccsmerge {timings['ccsmerge']}, official {timings['official']}, max rel diff {worst:.2e}")
    return res


def markdown(res: dict) -> str:
    t = res["ccsmerge_full"]
    lines = [
        (f"{res['tasks']} models x {res['layers']} layers (d={res['d_model']}, ff={res['d_ff']}, bf16, "
        f"{res['params_per_model'] / 1e6:.0f}M params each, {res['input_bytes'] / 2**30:.2f} GiB of inputs), "
        f"rank_ratio {res['rank_ratio']}, CPU state dicts in and out."),
        "",
        table(["what", "wall time", "input GB/s"], [[
            "ccsmerge.merge, whole model", fmt_range(t["median_s"], t["min_s"], t["max_s"]),
            f"{res['ccsmerge_full_gbps']:.2f}"]]),
        "",
    ]
    c = res["compare"]
    if "skipped" in c:
        lines.append(f"Comparison on {c['layers']} layer(s): {c['skipped']}.")
    else:
        lines.append(table(
            [f"first {c['layers']} layer(s)", "ccsmerge", "official_cart", "speedup", "max rel update diff"],
            [["wall time", fmt_seconds(c["ccsmerge"]["median_s"]), fmt_seconds(c["official"]["median_s"]),
              f"{c['speedup']:.1f}x", f"{c['max_rel_update_diff']:.2e} ({c['max_rel_update_diff_tensor']})"]]
            + ([["peak memory over the inputs", fmt_bytes(c["peak_memory_bytes"]["ccsmerge"]),
                 fmt_bytes(c["peak_memory_bytes"]["official"]),
                 f"official/ccsmerge {c['peak_memory_bytes']['official'] / max(1, c['peak_memory_bytes']['ccsmerge']):.1f}x",
                 ""]]
               if "peak_memory_bytes" in c else []),
        ))
    return "\n".join(lines)


def summary_rows(res: dict) -> list[list]:
    """The end-of-run summary's lines for this part."""
    lines = [[f"c merge {res['tasks']}x{res['layers']} layers d={res['d_model']} bf16",
              f"ccsmerge {fmt_seconds(res['ccsmerge_full']['median_s'])}",
              f"{res['input_bytes'] / 2**30:.1f} GiB in, {res['ccsmerge_full_gbps']:.2f} GB/s"]]
    compare = res["compare"]
    if "skipped" in compare:
        lines.append([f"c vs official ({compare['layers']} layers)", "skipped", compare["skipped"]])
    else:
        lines.append([f"c vs official ({compare['layers']} layers)",
                      (f"ccsmerge {fmt_seconds(compare['ccsmerge']['median_s'])} / official "
                       f"{fmt_seconds(compare['official']['median_s'])}"),
                      f"{compare['speedup']:.1f}x, max rel update diff {compare['max_rel_update_diff']:.1e}"])
    return lines
