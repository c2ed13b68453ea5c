"""ccsmerge engine benchmarks.

    python benchmarks/bench_engine.py --device cpu|cuda --preset quick|full --out DIR [--parts abcd]

a  CART on one m x n weight (T tasks): ccsmerge's randomized update (defaults, and
   oversample=10/power_iters=2) vs svd="exact" vs the official-style implementation,
   timed side by side, and the randomized update's error against the exact one.
b  the fused T-way mean: achieved GB/s vs a device copy and vs torch.stack().float().mean(0).
c  an end-to-end in-memory merge of a synthetic multi-layer model (CPU state dicts),
   and ccsmerge vs official_cart on (a subset of) it.
d  the low-rank step on one matrix: ccsmerge.ops.randomized_svd vs torch.linalg.svd
   (each CUDA driver) vs torch.svd_lowrank: time and ||A - A_k||_F / ||A - A_k^opt||_F.

Results go to DIR/engine-<device>-<preset>.json and .md (rewritten after each part, so
a run cut short keeps what it finished); a compact table is printed at the end.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import synthetic
import torch
from machine import (
    check_extension,
    check_load,
    describe,
    load_average,
    load_ccsmerge,
    machine_info,
)
from official_cart import official_cart, rank_for, truncated_reconstruction
from timing import (
    Timing,
    fmt_range,
    fmt_ratio,
    fmt_seconds,
    paired_ratio,
    time_fn,
    time_interleaved,
)

ccsmerge = load_ccsmerge()

LAM = 2.0  # CART's default scale, used by both implementations


# --------------------------------------------------------------------------- presets


@dataclass(frozen=True)
class Preset:
    # a: one matrix
    a_size: tuple[int, int] = (4096, 4096)
    a_tasks: tuple[int, ...] = (2, 8)
    a_rank_ratio: float = 0.08
    a_rounds: int = 3
    a_max_seconds: float = 90.0  # per T: no new round starts past this
    a_exact_max_T: int = 1000  # ccs_exact runs up to this T (official_cart is the reference beyond)
    # b: mean bandwidth
    b_tasks: int = 8
    b_sizes: tuple[tuple[int, int], ...] = ((4096, 4096), (8192, 8192))
    b_dtypes: tuple[str, ...] = ("bfloat16", "float32")
    b_repeats: int = 20
    b_copy_mib: int = 2048
    # c: end-to-end model
    c_tasks: int = 8
    c_layers: int = 2
    c_d_model: int = 4096
    c_d_ff: int = 11008
    c_rank_ratio: float = 0.12
    c_rounds: int = 1
    c_compare_layers: int = 1  # layers merged by both ccsmerge and official_cart
    c_official_budget_s: float = 150.0  # official_cart is skipped when estimated slower
    # d: low-rank step
    d_shapes: tuple[tuple[int, int], ...] = ((768, 768), (3072, 768), (4096, 4096))
    d_rank_ratios: tuple[float, ...] = (0.01, 0.08, 0.32)
    d_power_iters: tuple[int, ...] = (0, 1, 2, 4)
    d_repeats: int = 5
    d_exact_repeats: int = 2
    d_max_seconds: float = 20.0  # per method and matrix: no new round past this times the number of methods
    d_drivers: tuple[str | None, ...] = (None,)
    d_dtypes: tuple[str, ...] = ("float32", "bfloat16")
    d_kinds: tuple[str, ...] = ("decaying",)
    # further (m, n, dtype, kind, rank ratios) cases
    d_extra: tuple[tuple[int, int, str, str, tuple[float, ...]], ...] = (
        (768, 768, "float32", "gaussian", (0.01, 0.08, 0.32)), (3072, 768, "float32", "gaussian", (0.01, 0.08, 0.32)),
        (4096, 4096, "float32", "gaussian", (0.01, 0.08, 0.32)))
    d_float64_reference_max: float = 1e12  # max(m,n) * min(m,n)^2 up to which the optimum comes from float64
    d_wide_sketch_max_numel: int = 1 << 40  # larger matrices skip sketches wider than min(m, n) / 2
    d_matrices: str | None = None  # a safetensors file of further 2-D matrices (e.g. real centered task vectors)


CUDA_DRIVERS = (None, "gesvd", "gesvdj", "gesvda")

FULL_SHAPES = ((768, 768), (3072, 768), (4096, 4096), (11008, 4096))
FULL_RATIOS = (0.01, 0.04, 0.08, 0.16, 0.32)
SMALL_GAUSSIAN = ((768, 768, "float32", "gaussian", (0.01, 0.08, 0.32)),
                  (3072, 768, "float32", "gaussian", (0.01, 0.08, 0.32)))

PRESETS = {
    ("cuda", "quick"): Preset(a_max_seconds=60.0, d_drivers=CUDA_DRIVERS),
    ("cuda", "full"): Preset(
        a_tasks=(2, 8, 20), a_rounds=5, a_max_seconds=600.0, b_sizes=((4096, 4096), (8192, 8192), (16384, 8192)),
        b_repeats=50, c_layers=8, c_rounds=2, c_compare_layers=8, c_official_budget_s=1200.0,
        d_shapes=FULL_SHAPES, d_rank_ratios=FULL_RATIOS, d_repeats=10, d_exact_repeats=3, d_drivers=CUDA_DRIVERS,
    ),
    ("cpu", "quick"): Preset(
        a_tasks=(2, 3), a_rounds=2, a_max_seconds=45.0, b_sizes=((4096, 4096),), b_repeats=5, b_copy_mib=512,
        c_tasks=4, c_layers=2, c_d_model=768, c_d_ff=3072, c_compare_layers=2, c_official_budget_s=60.0,
        d_shapes=((768, 768), (3072, 768)), d_repeats=3, d_exact_repeats=1, d_max_seconds=3.0,
        d_extra=SMALL_GAUSSIAN + ((4096, 4096, "float32", "decaying", (0.08,)),), d_float64_reference_max=2e9,
    ),
    ("cpu", "full"): Preset(
        a_size=(2048, 2048), a_tasks=(2, 8, 20), a_rounds=2, a_max_seconds=150.0, a_exact_max_T=8,
        b_sizes=((4096, 4096), (8192, 8192)), b_repeats=10, b_copy_mib=1024,
        c_tasks=8, c_layers=1, c_d_model=1024, c_d_ff=4096, c_compare_layers=1, c_official_budget_s=900.0,
        d_shapes=FULL_SHAPES[:3], d_rank_ratios=FULL_RATIOS, d_dtypes=("float32",),
        d_extra=((11008, 4096, "float32", "decaying", (0.01, 0.08, 0.32)),)
        + tuple((m, n, "bfloat16", "decaying", (0.01, 0.08, 0.32)) for m, n in FULL_SHAPES[:2])
        + tuple((m, n, "bfloat16", "decaying", (0.08,)) for m, n in FULL_SHAPES[2:])
        + tuple((m, n, "float32", "gaussian", (0.08,)) for m, n in FULL_SHAPES[:3]),
        d_repeats=3, d_exact_repeats=1, d_max_seconds=2.0, d_float64_reference_max=2e9,
        d_wide_sketch_max_numel=4096 * 4096,
    ),
}


# --------------------------------------------------------------------------- small helpers


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b||_F / ||b||_F."""
    return float((a.double() - b.double()).norm() / b.double().norm())


def table(headers: list[str], rows: list[list]) -> str:
    """A markdown table."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------- a: CART on one matrix


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


def keep_last_output(fns: dict, outputs: dict) -> dict:
    def wrap(name, fn):
        def call():
            outputs[name] = fn()
        return call
    return {name: wrap(name, fn) for name, fn in fns.items()}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory of each call of wrapped functions, over what was in use when the
    call started: on a GPU torch.cuda.max_memory_allocated; on the CPU the process
    RSS, sampled every 2 ms by a thread (glibc returns large buffers to the system
    when they are freed, so one call's peak does not carry into the next)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peaks: dict[str, list[int]] = {}

    def wrap(self, fns: dict) -> dict:
        return {name: (lambda name=name, fn=fn: self.measure(name, fn)) for name, fn in fns.items()}

    def measure(self, name: str, fn):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            start = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            result = fn()
            torch.cuda.synchronize(self.device)
            self.peaks.setdefault(name, []).append(torch.cuda.max_memory_allocated(self.device) - start)
            return result
        start = rss_bytes()
        peak = [start]
        done = threading.Event()

        def sample():
            while not done.wait(0.002):
                peak[0] = max(peak[0], rss_bytes())
        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            result = fn()
        finally:
            done.set()
            thread.join()
        self.peaks.setdefault(name, []).append(max(peak[0], rss_bytes()) - start)
        return result

    def as_dict(self) -> dict:
        return {name: max(v) for name, v in self.peaks.items()}


def part_a(cfg: Preset, device: torch.device) -> dict:
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


def fmt_bytes(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if abs(n) >= 1e8 else f"{n / 1e6:.0f} MB"


def a_row_cells(r: dict, names: list[str]) -> list:
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


def markdown_a(res: dict) -> str:
    names = ["ccs_rand_default", "ccs_rand_os10_p2", "ccs_exact", "official"]
    rows = [a_row_cells(r, names) for r in res["rows"]]
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


# --------------------------------------------------------------------------- b: mean bandwidth


def copy_bandwidth(device: torch.device, mib: int, repeats: int) -> dict:
    """A large device copy, counting the bytes read and written."""
    src = torch.empty(mib * 2**20 // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, warmup=3, repeats=repeats)
    nbytes = 2 * src.numel() * src.element_size()
    return {"bytes": nbytes, "time": t.as_dict(), "gbps": nbytes / t.median / 1e9}


def mean_rows(xs: list[torch.Tensor], copy_gbps: float, device: torch.device, repeats: int) -> list[dict]:
    """ccsmerge.ops.mean vs torch.stack().float().mean(0) on one set of inputs."""
    T, numel = len(xs), xs[0].numel()
    nbytes = T * numel * xs[0].element_size() + numel * 4
    variants = {
        "ccsmerge.ops.mean": lambda: ccsmerge.ops.mean(xs),
        "torch.stack().float().mean(0)": lambda: torch.stack(xs).float().mean(0),
    }
    err = float((variants["ccsmerge.ops.mean"]() - variants["torch.stack().float().mean(0)"]()).abs().max())
    rows = []
    for name, fn in variants.items():
        t = time_fn(fn, device, warmup=3, repeats=repeats)
        gbps = nbytes / t.median / 1e9
        rows.append({"shape": list(xs[0].shape), "dtype": str(xs[0].dtype).removeprefix("torch."), "T": T,
                     "impl": name, "bytes": nbytes, "time": t.as_dict(), "gbps": gbps,
                     "pct_of_copy": 100 * gbps / copy_gbps, "max_abs_diff_vs_torch": err})
        log(f"[b] {'x'.join(map(str, rows[-1]['shape']))} {rows[-1]['dtype']} T={T} {name}: {t} = {gbps:.0f} GB/s")
    return rows


def part_b(cfg: Preset, device: torch.device) -> dict:
    log(f"[b] copy bandwidth ({cfg.b_copy_mib} MiB)")
    copy = copy_bandwidth(device, cfg.b_copy_mib, cfg.b_repeats)
    rows = []
    for m, n in cfg.b_sizes:
        for dtype_name in cfg.b_dtypes:
            gen = synthetic.generator(0, device)
            xs = [torch.randn(m, n, generator=gen, device=device).to(getattr(torch, dtype_name))
                  for _ in range(cfg.b_tasks)]
            rows += mean_rows(xs, copy["gbps"], device, cfg.b_repeats)
            xs = None
            free_memory(device)
    return {"copy": copy, "rows": rows}


def markdown_b(res: dict) -> str:
    rows = [[f"{r['shape'][0]}x{r['shape'][1]}", r["dtype"], r["T"], r["impl"],
             fmt_range(r["time"]["median_s"], r["time"]["min_s"], r["time"]["max_s"]),
             f"{r['gbps']:.0f}", f"{r['pct_of_copy']:.0f}%"] for r in res["rows"]]
    copy = res["copy"]
    return (f"Device copy: {copy['gbps']:.0f} GB/s (read + write of {copy['bytes'] / 2**30:.1f} GiB).\n\n"
            + table(["shape", "dtype", "T", "impl", "time", "GB/s", "% of copy"], rows)
            + "\n\nBytes = T * numel * itemsize read + numel * 4 written (the float32 mean).")


# --------------------------------------------------------------------------- c: end-to-end model


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


def part_c(cfg: Preset, device: torch.device) -> dict:
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


def markdown_c(res: dict) -> str:
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


# --------------------------------------------------------------------------- d: low-rank step


def d_cases(cfg: Preset) -> list[tuple[int, int, str, str, tuple[float, ...]]]:
    """(m, n, dtype, kind, rank ratios) of every matrix part d factorizes."""
    cases = [(m, n, dtype, kind, cfg.d_rank_ratios)
             for kind in cfg.d_kinds for dtype in cfg.d_dtypes for m, n in cfg.d_shapes]
    return cases + [(m, n, dtype, kind, tuple(ratios)) for m, n, dtype, kind, ratios in cfg.d_extra]


def test_matrix(m: int, n: int, dtype: str, kind: str, device: torch.device) -> torch.Tensor:
    """decaying: a power-law spectrum plus a noise tail (synthetic.decaying_matrix);
    gaussian: i.i.d. N(0, 1/n), a flat spectrum. Generated in float32, then cast."""
    if kind == "gaussian":
        a = torch.randn(m, n, generator=synthetic.generator(m * 7 + n, device), device=device) / n**0.5
    else:
        a = synthetic.decaying_matrix(m, n, seed=m + n, device=device)
    return a.to(getattr(torch, dtype))


def residual_norm(a: torch.Tensor, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, k: int) -> float:
    return float((a.float() - (u[:, :k].float() * s[:k].float()) @ vh[:k].float()).double().norm())


def sketch_width(method: str, k: int) -> int | None:
    """Columns of the random sketch of a randomized method (None for the exact SVD)."""
    if "max(10,k)" in method:
        return k + max(10, k)
    if method.startswith(("ccs rsvd", "torch.svd_lowrank")):
        return k + 10
    return None


def lowrank_methods(a: torch.Tensor, k: int, cfg: Preset) -> dict:
    """Rank-k factorizations to time: name -> call returning (U, S, Vh). ccsmerge takes
    the matrix as it is (bf16 included); torch.svd_lowrank gets a float32 copy when
    the input is bf16 or fp16 (it has no kernels for them), the cast inside the call."""
    m, n = a.shape
    methods = {}
    for p in cfg.d_power_iters:
        methods[f"ccs rsvd os10 p{p}"] = (lambda p=p: ccsmerge.ops.randomized_svd(a, k, oversample=10,
                                                                                  power_iters=p))
    methods["ccs rsvd os=max(10,k) p4 (merge default)"] = (
        lambda: ccsmerge.ops.randomized_svd(a, k, oversample=max(10, k), power_iters=4))
    q = min(k + 10, m, n)

    def svd_lowrank():
        u, s, v = torch.svd_lowrank(upcast(a), q=q, niter=2)
        return u, s, v.mT
    methods["torch.svd_lowrank q=k+10 niter2"] = svd_lowrank
    return methods


def upcast(a: torch.Tensor) -> torch.Tensor:
    """The matrix in float32 for torch's SVDs, which lack bf16/fp16 kernels on the CPU."""
    return a if a.dtype in (torch.float32, torch.float64) else a.float()


def exact_svds(a: torch.Tensor, cfg: Preset, device: torch.device) -> dict:
    """torch.linalg.svd with each driver: timing and factors (computed once per matrix).
    A bf16 matrix is cast to float32 inside the timed call."""
    out = {}
    warm = synthetic.decaying_matrix(128, 128, seed=5, device=device)
    for driver in cfg.d_drivers:
        name = f"torch.linalg.svd{'' if driver is None else f' {driver}'}"
        result = {}
        try:
            torch.linalg.svd(warm, full_matrices=False, driver=driver)

            def call(driver=driver, result=result):
                result["usv"] = torch.linalg.svd(upcast(a), full_matrices=False, driver=driver)
            t = time_fn(call, device, warmup=0, repeats=cfg.d_exact_repeats, max_seconds=cfg.d_max_seconds)
            out[name] = {"time": t, "usv": result["usv"]}
        except (RuntimeError, NotImplementedError) as exc:
            out[name] = {"error": str(exc).splitlines()[0][:200]}
        log(f"[d] {tuple(a.shape)} {str(a.dtype)[6:]} {name}: {out[name].get('time', out[name].get('error'))}")
    return out


def optimal_spectrum(a: torch.Tensor, exact: dict, cfg: Preset) -> tuple[torch.Tensor, str]:
    """Singular values for the optimal rank-k error: from float64 while that is cheap
    (a float32 SVD's tail is off by ~1e-4 relative on a GPU, enough to put ratios below
    1), else from the float32 exact SVD already computed (LAPACK's is accurate to
    float32 rounding)."""
    m, n = a.shape
    if max(m, n) * min(m, n) ** 2 <= cfg.d_float64_reference_max or "usv" not in exact.get("torch.linalg.svd", {}):
        return torch.linalg.svdvals(a.double()), "float64"
    return exact["torch.linalg.svd"]["usv"][1].double(), "float32"


def lowrank_rows(a: torch.Tensor, kind: str, ratios: tuple[float, ...], cfg: Preset,
                 device: torch.device) -> list[dict]:
    """Every method at every rank ratio on one matrix; the exact SVDs run once."""
    m, n = a.shape
    dtype = str(a.dtype).removeprefix("torch.")
    exact = exact_svds(a, cfg, device)
    reference, reference_from = optimal_spectrum(a, exact, cfg)
    base = exact["torch.linalg.svd"]["time"].median
    rows = []
    for ratio in ratios:
        k = max(1, int(ratio * min(m, n)))
        optimal = float(reference[k:].square().sum().sqrt())

        def add(name, t: Timing | None, usv=None, error=None, skipped=None, ratio=ratio, k=k, optimal=optimal):
            row = {"shape": [m, n], "dtype": dtype, "kind": kind, "rank_ratio": ratio, "k": k, "method": name,
                   "optimum_from": reference_from}
            if skipped:
                row["skipped"] = skipped
            elif t is None:
                row["error"] = error
            else:
                row.update(time=t.as_dict(), speedup_vs_linalg_svd=base / t.median,
                           err_ratio=residual_norm(a, *usv, k) / optimal if optimal > 0 else float("nan"))
            rows.append(row)

        for name, e in exact.items():
            add(name, e.get("time"), e.get("usv"), e.get("error"))
        # The randomized methods run in interleaved rounds (each round calls every method once),
        # so that load drifting during the measurement hits them alike.
        results: dict = {}
        fns = {}
        for name, fn in lowrank_methods(a, k, cfg).items():
            width = sketch_width(name, k)
            if m * n > cfg.d_wide_sketch_max_numel and width is not None and width > min(m, n) // 2:
                add(name, None, skipped=f"sketch width {width} > min(m,n)/2: slower than the full SVD here")
                continue
            fns[name] = lambda name=name, fn=fn, results=results: results.__setitem__(name, fn())
        timings = time_interleaved(fns, device, rounds=cfg.d_repeats, warmups=dict.fromkeys(fns, lambda: None),
                                   max_seconds=cfg.d_max_seconds * len(fns))
        for name, t in timings.items():
            add(name, t, results[name])
        log(f"[d] {m}x{n} {dtype} {kind} k={k}: " + ", ".join(
            f"{r['method']} {fmt_seconds(r['time']['median_s'])} err {r['err_ratio']:.4f}"
            for r in rows if r["k"] == k and "time" in r and "ccs" in r["method"]))
    return rows


def warm_up_lowrank(cfg: Preset, device: torch.device) -> None:
    """Run every method once on a small matrix of each dtype (library set-up, not timed)."""
    for dtype in {c[2] for c in d_cases(cfg)}:
        small = test_matrix(256, 256, dtype, "decaying", device)
        for fn in lowrank_methods(small, 16, cfg).values():
            fn()
        torch.linalg.svd(upcast(small), full_matrices=False)


def part_d(cfg: Preset, device: torch.device) -> dict:
    warm_up_lowrank(cfg, device)
    rows = []
    for m, n, dtype, kind, ratios in d_cases(cfg):
        rows += lowrank_rows(test_matrix(m, n, dtype, kind, device), kind, ratios, cfg, device)
        free_memory(device)
    if cfg.d_matrices:
        from safetensors.torch import load_file

        for name, a in load_file(cfg.d_matrices).items():
            if a.dim() == 2 and a.is_floating_point() and min(a.shape) >= 16:
                rows += lowrank_rows(a.to(device), f"file {Path(cfg.d_matrices).name}:{name}", cfg.d_rank_ratios,
                                     cfg, device)
                free_memory(device)
    return {"rows": rows}


def d_row_cells(r: dict) -> list:
    head = [f"{r['shape'][0]}x{r['shape'][1]}", f"{r['rank_ratio']:.0%}", r["k"], r["method"]]
    if "skipped" in r:
        return head + ["skipped", "", r["skipped"]]
    if "error" in r:
        return head + ["unsupported", "", r["error"][:60]]
    t = r["time"]
    return head + [fmt_range(t["median_s"], t["min_s"], t["max_s"]), f"{r['speedup_vs_linalg_svd']:.1f}x",
                   f"{r['err_ratio']:.4f}"]


def markdown_d(res: dict) -> str:
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in res["rows"]:
        groups.setdefault((r.get("kind", "decaying"), r.get("dtype", "float32")), []).append(r)
    kinds = {"decaying": "power-law spectrum plus a noise tail", "gaussian": "Gaussian, flat spectrum"}
    out = []
    for (kind, dtype), rows in groups.items():
        what = f"{kind} matrices ({kinds[kind]})" if kind in kinds else kind
        out += [f"**{what}, {dtype} inputs**", "",
                table(["shape", "rank", "k", "method", "time", "vs linalg.svd", "err ratio"],
                      [d_row_cells(r) for r in rows]), ""]
    return ("\n".join(out)
            + "\nerr ratio = ||A - U_k S_k Vh_k||_F / ||A - A_k^opt||_F (1 = optimal; the optimum from float64 "
              "singular values where that is cheap, else from the float32 torch.linalg.svd, as `optimum_from` in "
              "the JSON records). torch.linalg.svd computes the full SVD (its time does not depend on k). "
              "bf16 inputs: ccsmerge.ops.randomized_svd takes the bf16 matrix as it is; torch.linalg.svd and "
              "torch.svd_lowrank have no bf16 kernels on the CPU and get a float32 copy, the cast counted in their "
              "time; the error is measured against the bf16 matrix's own values. On the CPU, torch.linalg.svd has "
              "one driver (LAPACK gesdd); the `driver` argument is CUDA-only.")


# --------------------------------------------------------------------------- summary and output


SUMMARY_D_METHODS = ("torch.linalg.svd", "ccs rsvd os10 p2", "ccs rsvd os=max(10,k) p4 (merge default)",
                     "torch.svd_lowrank q=k+10 niter2")


def summary(results: dict) -> str:
    """The compact end-of-run table: one line per headline number."""
    lines = []
    parts = results["parts"]
    if "a" in parts:
        for r in parts["a"]["rows"]:
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
    if "b" in parts:
        copy = parts["b"]["copy"]["gbps"]
        for r in parts["b"]["rows"]:
            lines.append([f"b mean {r['shape'][0]}x{r['shape'][1]} {r['dtype']} T={r['T']}",
                          f"{r['impl']}: {fmt_seconds(r['time']['median_s'])}",
                          f"{r['gbps']:.0f} GB/s = {r['pct_of_copy']:.0f}% of copy ({copy:.0f} GB/s)"])
    if "c" in parts:
        c = parts["c"]
        lines.append([f"c merge {c['tasks']}x{c['layers']} layers d={c['d_model']} bf16",
                      f"ccsmerge {fmt_seconds(c['ccsmerge_full']['median_s'])}",
                      f"{c['input_bytes'] / 2**30:.1f} GiB in, {c['ccsmerge_full_gbps']:.2f} GB/s"])
        cmp_ = c["compare"]
        if "skipped" in cmp_:
            lines.append([f"c vs official ({cmp_['layers']} layers)", "skipped", cmp_["skipped"]])
        else:
            lines.append([f"c vs official ({cmp_['layers']} layers)",
                          (f"ccsmerge {fmt_seconds(cmp_['ccsmerge']['median_s'])} / official "
                          f"{fmt_seconds(cmp_['official']['median_s'])}"),
                          f"{cmp_['speedup']:.1f}x, max rel update diff {cmp_['max_rel_update_diff']:.1e}"])
    if "d" in parts:
        ratios = sorted({r["rank_ratio"] for r in parts["d"]["rows"]})
        headline = 0.08 if 0.08 in ratios else ratios[len(ratios) // 2]
        for r in parts["d"]["rows"]:
            if "time" not in r or r["rank_ratio"] != headline or r["method"] not in SUMMARY_D_METHODS:
                continue
            if r.get("kind", "decaying") != "decaying":
                continue
            lines.append([(f"d {r['shape'][0]}x{r['shape'][1]} {r.get('dtype', 'float32')} k={r['k']} "
                          f"({r['rank_ratio']:.0%})"),
                          f"{r['method']}: {fmt_seconds(r['time']['median_s'])}",
                          f"{r['speedup_vs_linalg_svd']:.1f}x vs linalg.svd, err ratio {r['err_ratio']:.4f}"])
    return table(["benchmark", "time (median)", "result"], lines)


MARKDOWN = {"a": ("a. CART on one matrix", markdown_a), "b": ("b. Fused mean bandwidth", markdown_b),
            "c": ("c. End-to-end merge", markdown_c), "d": ("d. Low-rank step per matrix", markdown_d)}


def write_results(results: dict, out: Path, stem: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1, default=str))
    md = [f"# ccsmerge engine benchmarks: {results['device']}, preset {results['preset']}", "",
          f"Machine: {describe(results['machine'])}", "",
          (f"Wall time: {results.get('wall_s', float('nan')):.0f} s. Load average (1/5/15 min) at the start "
          f"and after each part: {results['load_avg']}."), "", *(f"**{w}**\n" for w in results["warnings"])]
    for key, (title, render) in MARKDOWN.items():
        if key in results["parts"]:
            md += [f"## {title}", "", render(results["parts"][key]), ""]
    for key, err in results.get("errors", {}).items():
        md += [f"## {MARKDOWN[key][0]}: FAILED", "", "```", err, "```", ""]
    if results["parts"]:
        md += ["## Summary", "", summary(results), ""]
    (out / f"{stem}.md").write_text("\n".join(md))


RUNNERS = {"a": part_a, "b": part_b, "c": part_c, "d": part_d}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), required=True)
    p.add_argument("--preset", choices=("quick", "full"), default="quick")
    p.add_argument("--out", type=Path, required=True, help="folder for the JSON and markdown results")
    p.add_argument("--parts", default="abcd", help="which parts to run, e.g. 'ad' (default: abcd)")
    p.add_argument("--size", help="part a's matrix, e.g. 4096x4096 (overrides the preset)")
    p.add_argument("--rounds", type=int, help="part a's interleaved rounds (overrides the preset)")
    p.add_argument("--matrices", type=Path, metavar="FILE",
                   help="part d: also factorize every 2-D tensor of this safetensors file (e.g. real centered "
                        "task vectors), at the preset's rank ratios")
    p.add_argument("--official-budget", type=float, metavar="SECONDS",
                   help="part c: run official_cart only when estimated at most this long (overrides the preset)")
    return p.parse_args(argv)


def configure(args: argparse.Namespace) -> Preset:
    cfg = PRESETS[(args.device, args.preset)]
    if args.size:
        m, n = (int(v) for v in args.size.lower().split("x"))
        cfg = replace(cfg, a_size=(m, n))
    if args.rounds:
        cfg = replace(cfg, a_rounds=args.rounds)
    if args.matrices:
        cfg = replace(cfg, d_matrices=str(args.matrices))
    if args.official_budget is not None:
        cfg = replace(cfg, c_official_budget_s=args.official_budget)
    return cfg


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is available")
    device = torch.device(args.device)
    cfg = configure(args)
    info = machine_info(ccsmerge)
    log(describe(info))
    warnings = [w for w in (check_extension(info, args.device), check_load(info["cpu_affinity"])) if w]
    for warning in warnings:
        log(warning)
    parts = [p for p in "abcd" if p in args.parts]
    results = {"device": args.device, "preset": args.preset, "machine": info, "config": asdict(cfg),
               "warnings": warnings, "parts": {}, "errors": {}, "part_wall_s": {},
               "load_avg": {"start": load_average()}}
    stem = f"engine-{args.device}-{args.preset}" + ("" if parts == list("abcd") else "-" + "".join(parts))
    start = time.perf_counter()
    for part in parts:
        t0 = time.perf_counter()
        try:
            results["parts"][part] = RUNNERS[part](cfg, device)
        except Exception as exc:  # noqa: BLE001  (the other parts still run; the failure is reported)
            import traceback
            results["errors"][part] = traceback.format_exc()
            log(f"[{part}] FAILED: {type(exc).__name__}: {exc}")
        results["part_wall_s"][part] = time.perf_counter() - t0
        results["load_avg"][part] = load_average()
        results["wall_s"] = time.perf_counter() - start
        write_results(results, args.out, stem)
        free_memory(device)
    log("")
    log(f"# {describe(info)}")
    if results["parts"]:
        log(summary(results))
    log("\nparts: " + ", ".join(f"{p} {s:.0f} s" for p, s in results["part_wall_s"].items())
        + f"; total wall time {results['wall_s']:.0f} s; load average {results['load_avg']}")
    for warning in warnings:
        log(warning)
    log(f"results: {args.out / (stem + '.json')}, {args.out / (stem + '.md')}")
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
