"""Streaming merges of checkpoints on disk (`ccsmerge merge`): peak memory under a
budget, and wall time against reading the inputs once.

    python benchmarks/streaming.py --out DIR [--sizes 2,8,16] [--quick] [--keep]

Inputs: T = 8 synthetic bf16 checkpoints per size, each a sharded Hugging Face
folder (model.safetensors.index.json + shards), shaped like a Llama layer stack
(q/k/v/o d x d, gate/up d_ff x d, down d x d_ff, 1-D norms) after one embedding
(vocab x d) whose T-stack does not fit the budget, so that it is merged in row
blocks. The sizes are the total input bytes (GB = 10^9 bytes) of the T models.

For each size, in interleaved rounds:
- `cat` of every input shard to /dev/null, once to warm the page cache, then timed
  (the time to read the inputs once);
- `ccsmerge merge --method average --max-memory 1GB --quiet`, and the same with
  `--no-overlap` (reads, merges and writes in turn: what the reader/writer threads
  gain), each in a fresh process after another warming `cat`.
Then `--method cart` (defaults) on one size (--cart-size): on the same inputs first
(when that size is among --sizes); when that is refused or runs past --cart-timeout,
on inputs of the same total size built from smaller matrices (d = 2048, d_ff = 5504,
a 32000-row embedding), and the table says so.

Each merge runs in a child process (merge_process.py) that imports ccsmerge, records
its RSS (the baseline), runs ccsmerge.cli.main, samples /proc/self/status every 10 ms
(RssAnon: allocated memory; RssFile: pages of memory-mapped files, inputs
included) and reports getrusage's ru_maxrss (the peak RSS). Reported: peak RSS,
baseline, peak minus baseline, the sampled anon/file peaks, wall time of the merge
(ccsmerge.cli.main) and of the whole process, CPU time. fincore records how much
of the inputs was in the page cache before each timed step.

The inputs (synthetic_checkpoints.py) are cached under --cache (default
/tmp/ccsmerge-bench-streaming); the sizes share their shard files (hard links: a
smaller size's models are the first shards of the largest size's). They are deleted
at the end unless --keep.

Writes DIR/streaming.json (machine, configuration, every sample), DIR/streaming.md
(tables) and, with matplotlib, DIR/streaming.png (peak RSS over baseline against the
input size).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from harness import GB, fmt_gb, log, median, table, write_results  # noqa: E402
from machine import describe, git_state, load_average, load_ccsmerge, machine_info, startup_warnings  # noqa: E402
from merge_process import (  # noqa: E402
    cat,
    child_command,
    remove_output,
    resident_fraction,
    run_child,
    timed_cat,
    timed_write,
)
from plots import pyplot  # noqa: E402
from synthetic_checkpoints import Layout, generate, remove_generated, size_label  # noqa: E402

GOAL_OVER_BASELINE = 1.2 * GB  # peak RSS over the baseline, at --max-memory 1GB
GOAL_RATIO = 1.3  # merge wall time / time to read the inputs once


# --------------------------------------------------------------------------- measurements


def run_merge(models: list[str], out: Path, method: str, overlap: bool, max_memory: str, timeout: float,
              files: list[str], env: dict[str, str]) -> dict:
    """One `ccsmerge merge` in a fresh child process, after warming the page cache; the output is deleted after."""
    remove_output(out)
    warm_s = cat(files)
    resident = resident_fraction(files)
    argv = ["merge", "--method", method, "--max-memory", max_memory, "--out", str(out), "--quiet",
            "--device", "cpu"]
    for m in models:
        argv += ["--model", m]
    if not overlap:
        argv.append("--no-overlap")
    result: dict = {"method": method, "overlap": overlap, "warm_s": warm_s, "resident_before": resident,
                    "argv": argv}
    result.update(run_child(child_command(argv), timeout, env))
    if "error" not in result and out.is_dir():
        result["output_bytes"] = sum(p.stat().st_size for p in out.iterdir() if p.suffix == ".safetensors")
    remove_output(out)
    return result


def plan_summary(models: list[str], method: str, max_memory: str) -> dict:
    """What the planner decides for these inputs (estimated peak, tensors in row blocks), or its refusal."""
    load_ccsmerge()
    from ccsmerge.errors import MergeError
    from ccsmerge.streaming import plan_checkpoints

    try:
        plan = plan_checkpoints(models, method, max_memory=max_memory, device="cpu")
    except MergeError as exc:
        return {"refused": str(exc)}
    blocked = [t for t in plan.tensors if t.block_rows is not None]
    return {"estimated_peak": plan.peak_memory, "budget": plan.budget, "tensors": len(plan.tensors),
            "blocked": [{"name": t.name, "shape": list(t.shape), "block_rows": t.block_rows, "passes": t.passes,
                         "memory": t.memory} for t in blocked],
            "low_rank": sum(t.policy == "low-rank" for t in plan.tensors),
            "read_bytes": plan.read_bytes, "write_bytes": plan.write_bytes}


def measure_size(label: str, entry: dict, args, work: Path) -> dict:
    files, models = entry["files"], entry["models"]
    total_ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    res = {"size": label, "input_bytes": entry["input_bytes"], "tensors": entry["tensors"],
           "matrices": entry["matrices"], "plan": plan_summary(models, "average", args.max_memory),
           "exceeds_half_ram": entry["input_bytes"] > total_ram / 2, "cat": [], "runs": []}
    out = work / "merged"
    res["write"] = []
    for r in range(args.rounds):
        c = timed_cat(files)
        res["cat"].append(c)
        w = timed_write(work / "write-test", res["plan"].get("write_bytes", entry["tensor_bytes"] // 8))
        res["write"].append(w)
        log(f"[{label}] round {r + 1}: cat {c['s']:.2f} s ({entry['input_bytes'] / GB / c['s']:.2f} GB/s, "
            f"{fmt_frac(c['resident_before'])} cached before); writing the output's size with fsync {w:.2f} s")
        for overlap in (True, False):
            run = run_merge(models, out, "average", overlap, args.max_memory, args.timeout, files, args.env)
            run["round"] = r
            res["runs"].append(run)
            log(f"[{label}] round {r + 1}: {describe_run(run)}")
    return res


def fmt_frac(x: float | None) -> str:
    return "?" if x is None else f"{100 * x:.0f}%"


def describe_run(run: dict) -> str:
    what = f"{run['method']}{'' if run['overlap'] else ' --no-overlap'}"
    if "error" in run:
        return f"{what}: FAILED: {run['error']}"
    return (f"{what}: {run['merge_s']:.2f} s (process {run['process_s']:.2f} s, cpu {run['cpu_s']:.1f} s), "
            f"peak RSS {fmt_gb(run['peak_rss'])} GB, baseline {fmt_gb(run['baseline_rss'])} GB, "
            f"over baseline {fmt_gb(run['peak_rss'] - run['baseline_rss'])} GB "
            f"(anon {fmt_gb(run['sampled_peak_anon'] - run['baseline_anon'])}, "
            f"file {fmt_gb(run['sampled_peak_file'] - run['baseline_file'])}); "
            f"{fmt_frac(run['resident_before'])} of the inputs cached before")


def measure_cart(args, manifest: dict, work: Path) -> dict:
    """CART at its defaults on one size: the main inputs first, then smaller matrices when refused or too slow."""
    label = size_label(args.cart_size)
    res: dict = {"size": label, "attempts": []}
    candidates = []
    if label in manifest["sizes"]:
        candidates.append(("main", manifest["layout"], manifest["sizes"][label]))
    small = replace(Layout(**manifest["layout"]), d_model=2048, d_ff=5504, vocab=32000)
    for kind, layout, entry in candidates + [("small", None, None)]:
        if kind == "small":
            small_manifest = generate(small, [args.cart_size], args.cache)
            layout, entry = small_manifest["layout"], small_manifest["sizes"][label]
        attempt = {"inputs": kind, "layout": layout, "input_bytes": entry["input_bytes"],
                   "tensors": entry["tensors"], "matrices": entry["matrices"],
                   "plan": plan_summary(entry["models"], "cart", args.max_memory)}
        if "refused" in attempt["plan"]:
            log(f"[cart {label} {kind}] the planner refuses: {attempt['plan']['refused']}")
        c = timed_cat(entry["files"])
        attempt["cat"] = c
        run = run_merge(entry["models"], work / "merged", "cart", True, args.max_memory, args.cart_timeout,
                        entry["files"], args.env)
        attempt["run"] = run
        log(f"[cart {label} {kind}] cat {c['s']:.2f} s; {describe_run(run)}")
        res["attempts"].append(attempt)
        if "error" not in run:
            break
    return res


# --------------------------------------------------------------------------- report


def summarize_runs(runs: list[dict]) -> dict | None:
    """Medians over rounds of one configuration (None when every run failed)."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return None
    over = [r["peak_rss"] - r["baseline_rss"] for r in ok]
    return {
        "n": len(ok),
        "merge_s": median([r["merge_s"] for r in ok]),
        "merge_s_all": [r["merge_s"] for r in ok],
        "process_s": median([r["process_s"] for r in ok]),
        "cpu_s": median([r["cpu_s"] for r in ok]),
        "peak_rss": max(r["peak_rss"] for r in ok),
        "baseline_rss": median([r["baseline_rss"] for r in ok]),
        "over_baseline": max(over),
        "over_baseline_all": over,
        "anon_over": max(r["sampled_peak_anon"] - r["baseline_anon"] for r in ok),
        "file_over": max(r["sampled_peak_file"] - r["baseline_file"] for r in ok),
        "resident_before": min((r["resident_before"] for r in ok if r["resident_before"] is not None), default=None),
    }


def summary_rows(results: dict) -> list[list]:
    rows = []
    for size in results["sizes"]:
        cat_s = median([c["s"] for c in size["cat"]])
        for overlap in (True, False):
            runs = [r for r in size["runs"] if r["overlap"] == overlap]
            s = summarize_runs(runs)
            what = "average" + ("" if overlap else " --no-overlap")
            if s is None:
                rows.append([fmt_gb(size["input_bytes"]), what, "failed (see the notes)"] + [""] * 9)
                continue
            rows.append(row_cells(size["input_bytes"], what, s, cat_s, size["cat"]))
    cart = results.get("cart")
    if cart:
        for a in cart["attempts"]:
            layout = a["layout"]
            what = "cart" + ("" if a["inputs"] == "main" else f" (d={layout['d_model']}, ff={layout['d_ff']})")
            s = summarize_runs([a["run"]])
            if s is None:
                why = "refused by the planner" if "refused" in a["plan"] else "failed"
                rows.append([fmt_gb(a["input_bytes"]), what, f"{why} (see the notes)"] + [""] * 9)
            else:
                rows.append(row_cells(a["input_bytes"], what, s, a["cat"]["s"], [a["cat"]]))
    return rows


def row_cells(input_bytes: int, what: str, s: dict, cat_s: float, cats: list[dict]) -> list:
    cached = min((c["resident_before"] for c in cats if c["resident_before"] is not None), default=None)
    over = s["over_baseline"]
    return [fmt_gb(input_bytes), what, f"{s['merge_s']:.2f}", f"{s['process_s']:.2f}", f"{s['cpu_s']:.1f}",
            f"{cat_s:.2f}", f"{s['merge_s'] / cat_s:.2f}x", f"{fmt_frac(cached)} / {fmt_frac(s['resident_before'])}",
            fmt_gb(s["peak_rss"]), fmt_gb(s["baseline_rss"]),
            f"{fmt_gb(over)}{'' if over <= GOAL_OVER_BASELINE else ' (>1.2)'}",
            f"{fmt_gb(s['anon_over'])} / {fmt_gb(s['file_over'])}"]


HEADERS = ["input GB", "merge", "merge s", "process s", "cpu s", "cat s", "merge/cat", "cached (cat/merge)",
           "peak RSS GB", "baseline GB", "peak-baseline GB", "anon/file over baseline GB"]


OVERLAP_HEADERS = ["input GB", "cat s", "write s", "overlap s", "overlap/cat", "overlap/(cat+write)",
                   "--no-overlap s", "--no-overlap/cat", "no-overlap/overlap"]


def overlap_rows(results: dict) -> list[list]:
    rows = []
    for size in results["sizes"]:
        on = summarize_runs([r for r in size["runs"] if r["overlap"]])
        off = summarize_runs([r for r in size["runs"] if not r["overlap"]])
        cat_s = median([c["s"] for c in size["cat"]])
        write_s = median(size.get("write", []))
        if on and off:
            rounds = {}
            for r in size["runs"]:
                if "error" not in r:
                    rounds.setdefault(r["round"], {})[r["overlap"]] = r["merge_s"]
            per_round = [v[False] / v[True] for v in rounds.values() if len(v) == 2]
            rows.append([fmt_gb(size["input_bytes"]), f"{cat_s:.2f}", f"{write_s:.2f}", f"{on['merge_s']:.2f}",
                         f"{on['merge_s'] / cat_s:.2f}x", f"{on['merge_s'] / (cat_s + write_s):.2f}x",
                         f"{off['merge_s']:.2f}", f"{off['merge_s'] / cat_s:.2f}x",
                         f"{off['merge_s'] / on['merge_s']:.2f}x" + (
                             f" [{min(per_round):.2f}-{max(per_round):.2f}]" if len(per_round) > 1 else "")])
    return rows


def notes(results: dict) -> list[str]:
    out = []
    total_ram = results["ram_bytes"]
    for size in results["sizes"]:
        for r in size["runs"]:
            if "error" in r:
                out.append(f"{fmt_gb(size['input_bytes'])} GB, {r['method']}"
                           f"{'' if r['overlap'] else ' --no-overlap'}, round {r['round'] + 1}: {r['error']}")
        if size["exceeds_half_ram"]:
            cats = [c["s"] for c in size["cat"]]
            cached = [x for c in size["cat"] + size["runs"] if (x := c.get("resident_before")) is not None]
            low, high = (fmt_frac(min(cached)), fmt_frac(max(cached))) if cached else ("", "")
            span = low if low == high else f"{low} to {high}"
            seen = f"fincore found {span} of them cached before the timed steps" if cached else "no fincore"
            out.append(f"{fmt_gb(size['input_bytes'])} GB of inputs is more than half the RAM "
                       f"({total_ram / GB:.1f} GB): the page cache cannot be assumed to hold them all warm, "
                       f"and where it does not, cat and the merge read from disk ({seen}; the timed cat read "
                       f"{size['input_bytes'] / GB / median(cats):.2f} GB/s).")
    cart = results.get("cart")
    if cart:
        for a in cart["attempts"]:
            if "refused" in a["plan"]:
                out.append(f"cart on the {a['inputs']} {cart['size']} inputs (d={a['layout']['d_model']}) is refused "
                           f"at --max-memory {results['config']['max_memory']}: {a['plan']['refused']}")
            elif "error" in a["run"]:
                out.append(f"cart on the {a['inputs']} {cart['size']} inputs failed: {a['run']['error']}")
        if len(cart["attempts"]) > 1:
            a = cart["attempts"][-1]
            out.append(f"cart therefore ran on other inputs of the same total size: T={a['layout']['models']}, "
                       f"d={a['layout']['d_model']}, d_ff={a['layout']['d_ff']}, vocab={a['layout']['vocab']} "
                       f"({a['matrices']} matrices per model).")
    return out


def blocked_text(plan: dict) -> str:
    return ", ".join(sorted({f"{b['name'].split('.')[-2]} {b['block_rows']} rows" for b in plan["blocked"]}))


def plan_rows(results: dict) -> list[list]:
    rows = []
    for size in results["sizes"]:
        p = size["plan"]
        if "refused" in p:
            rows.append([fmt_gb(size["input_bytes"]), "average", size["tensors"], "refused: " + p["refused"], "", ""])
            continue
        rows.append([fmt_gb(size["input_bytes"]), "average", size["tensors"], fmt_gb(p["estimated_peak"]),
                     len(p["blocked"]), blocked_text(p)])
    for a in (results.get("cart") or {}).get("attempts", []):
        p = a["plan"]
        label = f"cart ({a['inputs']}, d={a['layout']['d_model']})"
        if "refused" in p:
            rows.append([fmt_gb(a["input_bytes"]), label, a["tensors"], "refused", "", p["refused"]])
        else:
            rows.append([fmt_gb(a["input_bytes"]), label, a["tensors"], fmt_gb(p["estimated_peak"]), len(p["blocked"]),
                         blocked_text(p)])
    return rows



def save(results: dict, out: Path) -> str:
    """out/streaming.json (everything) and out/streaming.md (the tables); returns the main table."""
    cfg = results["config"]
    main = table(HEADERS, summary_rows(results))
    md = [
        "# ccsmerge streaming merge: peak memory and wall time", "",
        (f"Machine: {describe(results['machine'])}; {results['ram_bytes'] / GB:.1f} GB RAM. "
         f"Checkout: {results.get('git')}."), "",
        (f"Wall time of the benchmark: {results.get('wall_s', float('nan')):.0f} s (input generation "
         f"{results.get('generate_s', 0):.0f} s). Load average (1/5/15 min) at the start "
         f"{results['load_avg_start']}, after each size "
         f"{[s.get('load_avg_after') for s in results['sizes']]}, at the end {results.get('load_avg_end')}."), "",
        *(f"**{w}**\n" for w in results["warnings"]),
        f"Inputs: {cfg['layout']['models']} bf16 models per size (d={cfg['layout']['d_model']}, "
        f"d_ff={cfg['layout']['d_ff']}, vocab={cfg['layout']['vocab']}), sharded safetensors folders; "
        f"`ccsmerge merge --max-memory {cfg['max_memory']} --quiet`, each in a fresh process; "
        f"{cfg['rounds']} interleaved round(s) per size"
        + (f"; merge processes run with {cfg['child_env']}" if cfg.get("child_env") else "") + ". GB = 10^9 bytes.", "",
        "## Results", "",
        main, "",
        ("merge s: wall time of `ccsmerge.cli.main` in the child (median over rounds); process s: the whole child "
         "(interpreter start, imports); cpu s: user + system CPU time of the merge; cat s: `cat` of the input "
         "shards to /dev/null after a warming `cat`; merge/cat: merge s over cat s (goal <= "
         f"{GOAL_RATIO}x); cached: share of the inputs in the page cache (fincore) before the timed cat / before "
         "the merge; peak RSS: getrusage ru_maxrss (the largest over rounds); baseline: RSS after importing "
         f"ccsmerge and torch; peak-baseline: goal <= {GOAL_OVER_BASELINE / GB:.1f} GB; anon/file: sampled "
         "(10 ms) peaks of RssAnon (allocated memory) and RssFile (memory-mapped file pages, the inputs) "
         "over their baselines."), "",
        "## What the reader/writer threads gain", "",
        table(OVERLAP_HEADERS, overlap_rows(results)), "",
        ("write s: writing as many bytes as the merged output to a new file, with fsync (the merge syncs each "
         "output shard); no-overlap/overlap: ratio of the medians [range of the per-round ratios]."), "",
        "## Plans (`ccsmerge plan`)", "",
        table(["input GB", "method", "tensors", "estimated peak GB", "tensors in row blocks", "row blocks"],
              plan_rows(results)), "",
    ]
    ns = notes(results)
    if ns:
        md += ["## Notes", "", *(f"- {n}" for n in ns), ""]
    if results.get("plot"):
        md += [f"![peak RSS over baseline]({results['plot']})", ""]
    write_results(out, "streaming", results, "\n".join(md))
    return main



def plot(results: dict, out: Path) -> str | None:
    """streaming.png: peak RSS over the baseline against the input size (None without matplotlib)."""
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for overlap, style in ((True, "o-"), (False, "s--")):
        xs, ys = [], []
        for size in results["sizes"]:
            s = summarize_runs([r for r in size["runs"] if r["overlap"] == overlap])
            if s:
                xs.append(size["input_bytes"] / GB)
                ys.append(s["over_baseline"] / GB)
        ax.plot(xs, ys, style, label="average" + ("" if overlap else " --no-overlap"))
    for a in (results.get("cart") or {}).get("attempts", []):
        s = summarize_runs([a["run"]])
        if s:
            ax.plot([a["input_bytes"] / GB], [s["over_baseline"] / GB], "D",
                    label=f"cart (d={a['layout']['d_model']})")
    budget = results["config"]["max_memory_bytes"] / GB
    ax.axhline(budget, color="gray", linestyle=":", label=f"--max-memory {results['config']['max_memory']}")
    ax.axhline(GOAL_OVER_BASELINE / GB, color="red", linestyle=":", label=f"goal ({GOAL_OVER_BASELINE / GB:.1f} GB)")
    ax.set_xlabel("total input (GB)")
    ax.set_ylabel("peak RSS over baseline (GB)")
    ax.set_ylim(bottom=0)
    ax.set_title("ccsmerge merge, T=8 bf16 checkpoints")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "streaming.png", dpi=120)
    plt.close(fig)
    return "streaming.png"


# --------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for streaming.json, .md and .png")
    p.add_argument("--sizes", help="total input sizes in GB, comma-separated (default 2,8,16; --quick 1,2)")
    p.add_argument("--quick", action="store_true", help="sizes 1,2 GB: a fast check")
    p.add_argument("--rounds", type=int, help="interleaved rounds per size (default 3; --quick 1)")
    p.add_argument("--max-memory", default="1GB", help="the merges' --max-memory (default 1GB)")
    p.add_argument("--cart-size", type=float,
                   help="input size (GB) of the cart merge; 0 skips it (default 2; --quick 0)")
    p.add_argument("--cart-timeout", type=float, default=900.0, help="seconds before a cart merge is given up")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds before an average merge is given up")
    p.add_argument("--cache", type=Path, default=Path("/tmp/ccsmerge-bench-streaming"),
                   help="where generated inputs are kept (default /tmp/ccsmerge-bench-streaming)")
    p.add_argument("--keep", action="store_true", help="keep the generated inputs for the next run")
    p.add_argument("--child-env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for the merge processes, e.g. MALLOC_MMAP_THRESHOLD_=131072")
    args = p.parse_args(argv)
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.cart_size is None:
        args.cart_size = 0.0 if args.quick else 2.0
    args.env = dict(kv.split("=", 1) for kv in args.child_env)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    ccsmerge = load_ccsmerge()
    from ccsmerge.sizes import parse_size

    sizes = [float(s) for s in (args.sizes or ("1,2" if args.quick else "2,8,16")).split(",")]
    info = machine_info(ccsmerge)
    log(describe(info))
    warnings = startup_warnings(info, "cpu")
    for w in warnings:
        log(w)
    layout = Layout()
    # disk: the largest size's inputs and one output, and the cart inputs
    needed = max(sizes) * GB * 1.15 + (args.cart_size * GB if args.cart_size else 0)
    args.cache.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.cache).free
    if free < needed:
        log(f"WARNING: {free / GB:.1f} GB free under {args.cache}, about {needed / GB:.1f} GB needed")
    results = {
        "machine": info, "warnings": warnings, "ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "load_avg_start": load_average(), "git": git_state(),
        "config": {"sizes_gb": sizes, "rounds": args.rounds, "max_memory": args.max_memory,
                   "max_memory_bytes": parse_size(args.max_memory), "cart_size_gb": args.cart_size,
                   "cart_timeout_s": args.cart_timeout, "layout": asdict(layout), "child_env": args.env,
                   "goal_over_baseline_bytes": GOAL_OVER_BASELINE, "goal_ratio": GOAL_RATIO},
        "sizes": [],
    }
    start = time.perf_counter()
    try:
        manifest = generate(layout, sizes, args.cache)
        results["generate_s"] = manifest["generate_s"]
        work = Path(manifest["folder"])
        for s in sorted(sizes):
            label = size_label(s)
            entry = manifest["sizes"][label]
            log(f"[{label}] {entry['input_bytes'] / GB:.2f} GB in {len(entry['files'])} files, "
                f"{entry['tensors']} tensors per model")
            results["sizes"].append(measure_size(label, entry, args, work))
            results["sizes"][-1]["load_avg_after"] = load_average()
            results["wall_s"] = time.perf_counter() - start
            save(results, args.out)
        if args.cart_size:
            t0 = time.perf_counter()
            results["cart"] = measure_cart(args, manifest, work)
            results["cart"]["wall_s"] = time.perf_counter() - t0
    finally:
        if not args.keep:
            remove_generated()
    results["wall_s"] = time.perf_counter() - start
    results["load_avg_end"] = load_average()
    results["plot"] = plot(results, args.out)
    main_table = save(results, args.out)
    log("")
    log(f"# {describe(info)}")
    log(main_table)
    log("")
    log(table(OVERLAP_HEADERS, overlap_rows(results)))
    for n in notes(results):
        log(f"- {n}")
    log(f"\ntotal wall time {results['wall_s']:.0f} s; results: {args.out / 'streaming.json'}, "
        f"{args.out / 'streaming.md'}" + (f", {args.out / 'streaming.png'}" if results["plot"] else ""))
    failed = any("error" in r for s in results["sizes"] for r in s["runs"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
