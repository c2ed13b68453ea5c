"""Part d: the low-rank step on one matrix. ccsmerge.ops.randomized_svd against
torch.linalg.svd (each CUDA driver) and torch.svd_lowrank: time, speedup and
||A - A_k||_F / ||A - A_k^opt||_F, per matrix (shape, dtype, spectrum) and rank ratio."""

from __future__ import annotations

from pathlib import Path

import synthetic
import torch
from harness import Timing, fmt_range, fmt_seconds, log, table, time_fn, time_interleaved

from engine.common import ccsmerge, free_memory
from engine.presets import Preset

TITLE = "d. Low-rank step per matrix"

SUMMARY_METHODS = ("torch.linalg.svd", "ccs rsvd os10 p2", "ccs rsvd os=max(10,k) p4 (merge default)",
                     "torch.svd_lowrank q=k+10 niter2")



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


def run(cfg: Preset, device: torch.device) -> dict:
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


def row_cells(r: dict) -> list:
    head = [f"{r['shape'][0]}x{r['shape'][1]}", f"{r['rank_ratio']:.0%}", r["k"], r["method"]]
    if "skipped" in r:
        return head + ["skipped", "", r["skipped"]]
    if "error" in r:
        return head + ["unsupported", "", r["error"][:60]]
    t = r["time"]
    return head + [fmt_range(t["median_s"], t["min_s"], t["max_s"]), f"{r['speedup_vs_linalg_svd']:.1f}x",
                   f"{r['err_ratio']:.4f}"]


def markdown(res: dict) -> str:
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in res["rows"]:
        groups.setdefault((r.get("kind", "decaying"), r.get("dtype", "float32")), []).append(r)
    kinds = {"decaying": "power-law spectrum plus a noise tail", "gaussian": "Gaussian, flat spectrum"}
    out = []
    for (kind, dtype), rows in groups.items():
        what = f"{kind} matrices ({kinds[kind]})" if kind in kinds else kind
        out += [f"**{what}, {dtype} inputs**", "",
                table(["shape", "rank", "k", "method", "time", "vs linalg.svd", "err ratio"],
                      [row_cells(r) for r in rows]), ""]
    return ("\n".join(out)
            + "\nerr ratio = ||A - U_k S_k Vh_k||_F / ||A - A_k^opt||_F (1 = optimal; the optimum from float64 "
              "singular values where that is cheap, else from the float32 torch.linalg.svd, as `optimum_from` in "
              "the JSON records). torch.linalg.svd computes the full SVD (its time does not depend on k). "
              "bf16 inputs: ccsmerge.ops.randomized_svd takes the bf16 matrix as it is; torch.linalg.svd and "
              "torch.svd_lowrank have no bf16 kernels on the CPU and get a float32 copy, the cast counted in their "
              "time; the error is measured against the bf16 matrix's own values. On the CPU, torch.linalg.svd has "
              "one driver (LAPACK gesdd); the `driver` argument is CUDA-only.")


def summary_rows(res: dict) -> list[list]:
    """The end-of-run summary's lines for this part: the headline rank ratio's decaying matrices."""
    ratios = sorted({r["rank_ratio"] for r in res["rows"]})
    headline = 0.08 if 0.08 in ratios else ratios[len(ratios) // 2]
    lines = []
    for r in res["rows"]:
        if "time" not in r or r["rank_ratio"] != headline or r["method"] not in SUMMARY_METHODS:
            continue
        if r.get("kind", "decaying") != "decaying":
            continue
        lines.append([(f"d {r['shape'][0]}x{r['shape'][1]} {r.get('dtype', 'float32')} k={r['k']} "
                       f"({r['rank_ratio']:.0%})"),
                      f"{r['method']}: {fmt_seconds(r['time']['median_s'])}",
                      f"{r['speedup_vs_linalg_svd']:.1f}x vs linalg.svd, err ratio {r['err_ratio']:.4f}"])
    return lines
