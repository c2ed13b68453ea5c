"""Streaming merges on a GPU (`ccsmerge merge --device cuda`): wall time with the
host-to-device copies of the next tensor overlapping the current merge (pinned
buffers, a second CUDA stream) against the sequential pipeline (`--no-overlap`:
each tensor is read, copied, merged and written in turn), the peak GPU memory
against `--max-gpu-memory`, and the host's peak RSS.

    python -m benchmarks.gpu_streaming --out DIR [--device cuda] [--size 4] [--models 8]
        [--methods average,cart] [--max-gpu-memory default,tight] [--max-memory 4GB] [--rounds 2] [--quick] [--keep]

Inputs: the synthetic checkpoints of streaming.py (synthetic_checkpoints.py: T bf16
models, sharded Hugging Face folders, a Llama-like layer stack after one embedding)
of --size GB in all (GB = 10^9 bytes), cached under --cache.

For every method, GPU budget and round, in turn: `ccsmerge merge --device D
--max-memory M [--max-gpu-memory G] --quiet` with and without `--no-overlap`, each
in a fresh child process after a `cat` of the inputs (warm page cache). The child
initialises CUDA and the GPU libraries (a small matmul, QR and eigh) before its
baseline, then records the merge's wall time, its peak RSS (getrusage) and sampled
RssAnon/RssFile peaks over the baseline and, on a GPU,
torch.cuda.max_memory_allocated / max_memory_reserved. Each output is hashed: the
overlapped and sequential merges of one configuration must be byte-identical.

GPU budgets: `default` leaves `--max-gpu-memory` out (80 % of the free memory);
`tight` is halfway between the least budget the planner accepts for the method
and the largest tensor's whole working set (planned, no GPU needed), so that the
largest tensors are merged in row blocks; or a size such as 8GB.

`--device cpu` runs the same measurements on the CPU (no GPU columns): a check of
the script on a machine without a GPU (`--quick` makes it take seconds).

Writes DIR/gpu_streaming.json (machine, configuration, every run) and
DIR/gpu_streaming.md (tables)."""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from harness import fmt_gb, log, median, table, write_results  # noqa: E402
from machine import git_state, startup_warnings  # noqa: E402
from merge_process import cat, measure_cli, remove_output, report, run_child  # noqa: E402
from synthetic_checkpoints import Layout, generate, remove_generated, size_label  # noqa: E402

CHILD = "_gpu_merge_child"


# --------------------------------------------------------------------------- the child: one merge, measured


def warm_device(torch, device: str) -> None:
    """Create the CUDA context and load cuBLAS and cuSOLVER, so that the
    baseline holds them and the merge's numbers do not."""
    a = torch.randn(64, 64, device=device)
    (a @ a).sum().item()
    torch.linalg.qr(a)
    torch.linalg.eigh((a @ a.mT).double())
    torch.cuda.synchronize(device)


def plan_summary(ccsmerge, argv: list[str]) -> dict:
    """What the planner decides for this `ccsmerge merge` command line."""
    from ccsmerge.cli import build_parser, merge_arguments

    try:
        plan = ccsmerge.plan_checkpoints(**merge_arguments(build_parser().parse_args(argv)))
    except ccsmerge.MergeError as exc:
        return {"refused": str(exc)}
    return {"tensors": len(plan.tensors), "blocked": sum(t.block_rows is not None for t in plan.tensors),
            "peak_memory": plan.peak_memory, "peak_gpu_memory": plan.peak_gpu_memory,
            "gpu_budget": plan.gpu_budget, "staging_bytes": plan.staging_bytes}


def child_main(argv: list[str]) -> int:
    """Run `ccsmerge <argv>` in this process and print the measurements."""
    from machine import load_ccsmerge

    load_ccsmerge()
    import torch

    import ccsmerge
    import ccsmerge.cli
    import ccsmerge.streaming  # imported by cli.main: part of the baseline

    device = argv[argv.index("--device") + 1] if "--device" in argv else "auto"
    on_gpu = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if on_gpu:
        warm_device(torch, "cuda" if device == "auto" else device)
    plan = plan_summary(ccsmerge, argv)  # the GPU budget it names is the default's when none is given
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
        gpu_before = torch.cuda.memory_allocated()
    result = {"plan": plan, **measure_cli(argv, torch.cuda.synchronize if on_gpu else None)}
    rc = result["rc"]
    if on_gpu:
        result.update(
            gpu_before=gpu_before,
            gpu_peak_allocated=torch.cuda.max_memory_allocated(),
            gpu_peak_reserved=torch.cuda.max_memory_reserved(),
        )
    report(result)
    return rc


# --------------------------------------------------------------------------- the parent


def output_digest(folder: Path) -> str | None:
    if not folder.is_dir():
        return None
    h = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")):
        h.update(path.name.encode())
        with open(path, "rb") as f:
            while block := f.read(1 << 24):
                h.update(block)
    return h.hexdigest()


def run_merge(entry: dict, out: Path, *, method: str, device: str, max_memory: str, max_gpu_memory: str | None,
              overlap: bool, timeout: float) -> dict:
    remove_output(out)
    warm_s = cat(entry["files"])
    argv = ["merge", "--method", method, "--device", device, "--max-memory", max_memory, "--out", str(out), "--quiet"]
    if max_gpu_memory is not None:
        argv += ["--max-gpu-memory", max_gpu_memory]
    if not overlap:
        argv.append("--no-overlap")
    for m in entry["models"]:
        argv += ["--model", m]
    cmd = [sys.executable, str(Path(__file__).resolve()), CHILD, *argv]
    run = {"method": method, "overlap": overlap, "max_gpu_memory": max_gpu_memory or "default", "warm_s": warm_s}
    run.update(run_child(cmd, timeout))
    if "error" not in run:
        run["digest"] = output_digest(out)
    remove_output(out)
    return run


def tight_budget(entry: dict, method: str, device: str, max_memory: str) -> int:
    """Halfway between the least GPU budget the planner accepts and the largest
    whole working set: the largest tensors go to row blocks, the others stay whole."""
    from ccsmerge import MergeError, plan_checkpoints
    from ccsmerge.planning import DEVICE_RESERVE

    def plan(budget: int):
        return plan_checkpoints(entry["models"], method, device=device, max_memory=max_memory,
                                max_gpu_memory=budget)

    biggest = max(t.device_memory or 0 for t in plan(10**15).tensors)
    low, high = DEVICE_RESERVE + 1, DEVICE_RESERVE + biggest + 1
    while high - low > 2**20:
        mid = (low + high) // 2
        try:
            plan(mid)
            high = mid
        except MergeError:
            low = mid
    return (high + DEVICE_RESERVE + biggest) // 2


def summarize(runs: list[dict]) -> dict | None:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return None
    gpu = [r for r in ok if "gpu_peak_allocated" in r]
    budgets = [(r["gpu_peak_allocated"], r["plan"].get("gpu_budget")) for r in gpu]
    return {
        "within_budget": None if not budgets or any(b is None for _, b in budgets) else all(p <= b for p, b in budgets),
        "n": len(ok),
        "merge_s": median([r["merge_s"] for r in ok]),
        "cpu_s": median([r["cpu_s"] for r in ok]),
        "rss_over_baseline": max(r["peak_rss"] - r["baseline_rss"] for r in ok),
        "anon_over_baseline": max(r["sampled_peak_anon"] - r["baseline_anon"] for r in ok),
        "gpu_peak_allocated": max((r["gpu_peak_allocated"] for r in gpu), default=None),
        "gpu_peak_reserved": max((r["gpu_peak_reserved"] for r in gpu), default=None),
    }


HEADERS = ["method", "GPU budget", "pipeline", "merge s", "overlap gain", "GPU peak alloc GB", "GPU peak reserved GB",
           "within budget", "RSS over baseline GB", "anon over baseline GB", "same bytes", "plan"]


def rows(results: dict) -> list[list]:
    out = []
    for config in results["configs"]:
        both = {o: summarize([r for r in config["runs"] if r["overlap"] == o]) for o in (True, False)}
        digests = {r.get("digest") for r in config["runs"] if "error" not in r}
        same = "yes" if len(digests) == 1 else ("no" if digests else "-")
        plan = next((r["plan"] for r in config["runs"] if "plan" in r), None)
        if plan is None:
            plan_text = "-"
        else:
            plan_text = plan.get("refused") or f"{plan['blocked']}/{plan['tensors']} in row blocks"
            if plan.get("gpu_budget"):
                plan_text += f", GPU budget {fmt_gb(plan['gpu_budget'])} GB"
        for overlap in (True, False):
            s = both[overlap]
            if s is None:
                errors = [r["error"] for r in config["runs"] if r["overlap"] == overlap and "error" in r]
                out.append([config["method"], config["max_gpu_memory"], "overlap" if overlap else "sequential",
                            f"FAILED: {errors[0] if errors else '?'}", "", "", "", "", "", "", "", plan_text])
                continue
            gain = "-"
            if overlap and both[False] is not None:
                gain = f"{both[False]['merge_s'] / s['merge_s']:.2f}x"
            peak = s["gpu_peak_allocated"]
            within = {None: "-", True: "yes", False: "NO"}[s["within_budget"]]
            out.append([config["method"], config["max_gpu_memory"], "overlap" if overlap else "sequential",
                        f"{s['merge_s']:.2f}", gain, fmt_gb(peak), fmt_gb(s["gpu_peak_reserved"]), within,
                        fmt_gb(s["rss_over_baseline"]), fmt_gb(s["anon_over_baseline"]), same, plan_text])
    return out


def save(results: dict, out: Path) -> str:
    """out/gpu_streaming.json (everything) and out/gpu_streaming.md (the table); returns the table."""
    main_table = table(HEADERS, rows(results))
    cfg = results["config"]
    md = [
        "# Streaming merges on a GPU", "",
        f"Machine: {results['describe']}", "",
        (
            f"Inputs: {cfg['layout']['models']} bf16 models, {fmt_gb(results['input_bytes'])} GB in all "
            f"(d={cfg['layout']['d_model']}, d_ff={cfg['layout']['d_ff']}, vocab={cfg['layout']['vocab']}); "
            f"`ccsmerge merge --device {cfg['device']} --max-memory {cfg['max_memory']}`, each merge in a fresh "
            f"process after a `cat` of the inputs; {cfg['rounds']} round(s)."
        ),
        "",
        main_table, "",
        ("merge s: wall time of `ccsmerge.cli.main` (median over rounds); overlap gain: sequential merge s over "
         "overlapped merge s; GPU peak alloc / reserved: torch.cuda.max_memory_allocated / max_memory_reserved "
         "during the merge (the CUDA context and the libraries' first workspaces were created before); within "
         "budget: peak allocated <= --max-gpu-memory (the default: 80 % of the free memory at the start); RSS "
         "over baseline: getrusage's peak RSS minus the RSS before the merge (pinned staging buffers and "
         "memory-mapped inputs included); anon: the sampled RssAnon peak over its baseline; same bytes: every "
         "output of the configuration hashed alike; plan: tensors the planner puts in row blocks."), "",
    ]
    write_results(out, "gpu_streaming", results, "\n".join(md))
    return main_table


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for gpu_streaming.json and .md")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (cpu: a check of the script)")
    p.add_argument("--size", type=float, help="total input size in GB (default 4; --quick 0.03)")
    p.add_argument("--models", type=int, help="T, the number of models (default 8; --quick 4)")
    p.add_argument("--methods", default="average,cart", help="comma-separated merge methods (default average,cart)")
    p.add_argument("--max-memory", default="4GB", help="the merges' --max-memory (default 4GB)")
    p.add_argument("--max-gpu-memory", default="default,tight",
                   help="comma-separated GPU budgets: sizes, 'default' (the option left out) or 'tight' "
                        "(row blocks for the largest tensors); default: default,tight")
    p.add_argument("--rounds", type=int, help="rounds per configuration (default 2; --quick 1)")
    p.add_argument("--quick", action="store_true", help="small matrices, 4 models, 0.03 GB of input: a fast check")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds before a merge is given up")
    p.add_argument("--cache", type=Path, default=Path("/tmp/ccsmerge-bench-gpu-streaming"),
                   help="where generated inputs are kept (default /tmp/ccsmerge-bench-gpu-streaming)")
    p.add_argument("--keep", action="store_true", help="keep the generated inputs for the next run")
    args = p.parse_args(argv)
    if args.size is None:
        args.size = 0.03 if args.quick else 4.0
    if args.models is None:
        args.models = 4 if args.quick else 8
    if args.rounds is None:
        args.rounds = 1 if args.quick else 2
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from machine import describe, load_ccsmerge, machine_info

    ccsmerge = load_ccsmerge()
    import torch

    from ccsmerge.sizes import parse_size

    on_gpu = args.device.startswith("cuda")
    if on_gpu and not torch.cuda.is_available():
        print("no CUDA device is available: run with --device cpu to check the script", file=sys.stderr)
        return 2
    info = machine_info(ccsmerge)
    log(describe(info))
    warnings = startup_warnings(info, args.device, load=False)
    for w in warnings:
        log(w)
    layout = replace(Layout(), models=args.models)
    if args.quick:
        layout = replace(layout, d_model=256, d_ff=688, vocab=4000, shard_bytes=4 * 10**6)
    budgets = [b.strip() for b in args.max_gpu_memory.split(",") if b.strip()] if on_gpu else ["default"]
    results = {
        "machine": info, "describe": describe(info), "warnings": warnings, "git": git_state(),
        "config": {"device": args.device, "size_gb": args.size, "methods": args.methods.split(","),
                   "max_memory": args.max_memory, "gpu_budgets": budgets, "rounds": args.rounds,
                   "layout": asdict(layout)},
        "configs": [],
    }
    start = time.perf_counter()
    try:
        manifest = generate(layout, [args.size], args.cache)
        entry = manifest["sizes"][size_label(args.size)]
        results["input_bytes"] = entry["input_bytes"]
        out = Path(manifest["folder"]) / "merged"
        for method in results["config"]["methods"]:
            for budget in budgets:
                max_gpu_memory = None if budget == "default" else budget
                if budget == "tight":
                    max_gpu_memory = str(tight_budget(entry, method, args.device, args.max_memory))
                    budget = f"tight ({fmt_gb(int(max_gpu_memory))} GB)"
                elif max_gpu_memory is not None:
                    parse_size(max_gpu_memory)  # a typo fails here, not in every child
                config = {"method": method, "max_gpu_memory": budget, "runs": []}
                for r in range(args.rounds):
                    for overlap in (True, False):
                        run = run_merge(entry, out, method=method, device=args.device, max_memory=args.max_memory,
                                        max_gpu_memory=max_gpu_memory, overlap=overlap, timeout=args.timeout)
                        run["round"] = r
                        config["runs"].append(run)
                        what = f"[{method} gpu-budget={budget} {'overlap' if overlap else 'sequential'} r{r + 1}]"
                        if "error" in run:
                            log(f"{what} FAILED: {run['error']}")
                        else:
                            log(
                                f"{what} {run['merge_s']:.2f} s, RSS +{fmt_gb(run['peak_rss'] - run['baseline_rss'])} GB"
                                + (f", GPU peak {fmt_gb(run['gpu_peak_allocated'])} GB" if on_gpu else "")
                            )
                results["configs"].append(config)
                save(results, args.out)
    finally:
        if not args.keep:
            remove_generated()
    results["wall_s"] = time.perf_counter() - start
    main_table = save(results, args.out)
    log("")
    log(main_table)
    log(f"\ntotal wall time {results['wall_s']:.0f} s; results: {args.out / 'gpu_streaming.md'}")
    failed = any("error" in r for c in results["configs"] for r in c["runs"])
    differ = any(len({r.get("digest") for r in c["runs"] if "error" not in r}) > 1 for c in results["configs"])
    over = any(row[7] == "NO" for row in rows(results))
    return 1 if failed or differ or over else 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == CHILD:
        sys.exit(child_main(sys.argv[2:]))
    sys.exit(main())
