"""Part b: the fused T-way mean's bandwidth. ccsmerge.ops.mean against
torch.stack(xs).float().mean(0), in GB/s and as a share of a large device copy
measured in the same run."""

from __future__ import annotations

import synthetic
import torch
from harness import fmt_range, fmt_seconds, log, table, time_fn

from engine.common import ccsmerge, free_memory
from engine.presets import Preset

TITLE = "b. Fused mean bandwidth"


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


def run(cfg: Preset, device: torch.device) -> dict:
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


def markdown(res: dict) -> str:
    rows = [[f"{r['shape'][0]}x{r['shape'][1]}", r["dtype"], r["T"], r["impl"],
             fmt_range(r["time"]["median_s"], r["time"]["min_s"], r["time"]["max_s"]),
             f"{r['gbps']:.0f}", f"{r['pct_of_copy']:.0f}%"] for r in res["rows"]]
    copy = res["copy"]
    return (f"Device copy: {copy['gbps']:.0f} GB/s (read + write of {copy['bytes'] / 2**30:.1f} GiB).\n\n"
            + table(["shape", "dtype", "T", "impl", "time", "GB/s", "% of copy"], rows)
            + "\n\nBytes = T * numel * itemsize read + numel * 4 written (the float32 mean).")


def summary_rows(res: dict) -> list[list]:
    """The end-of-run summary's lines for this part."""
    copy = res["copy"]["gbps"]
    return [[f"b mean {r['shape'][0]}x{r['shape'][1]} {r['dtype']} T={r['T']}",
             f"{r['impl']}: {fmt_seconds(r['time']['median_s'])}",
             f"{r['gbps']:.0f} GB/s = {r['pct_of_copy']:.0f}% of copy ({copy:.0f} GB/s)"] for r in res["rows"]]
