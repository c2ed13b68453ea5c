"""The whole benchmark suite in one command, with one report.

    python -m benchmarks --quick --out bench-out/quick      # about 5 minutes on 2 idle cores
    python -m benchmarks --full --out bench-out/full        # ~40-55 minutes on 2 cores (estimated); add --device cuda on a GPU
    python -m benchmarks --quick --out DIR --mergekit-python /path/to/venv/bin/python
    python -m benchmarks --quick --threads 1 --out DIR      # on a machine shared with other work

Runs each benchmark script in a fresh process, in this order: the engine
(CART on one matrix against the official-style code, the fused mean, an
end-to-end merge, the low-rank step against torch.linalg.svd and
torch.svd_lowrank), scaling, every method side by side with the cost of a
search, streaming merges from disk, a long merge under a small budget,
LoRA adapters merged from their factors against merge_and_unload + a dense
merge and peft's add_weighted_adapter (tiny with --quick, 4 layers of a
Llama-7B shape with --full), ccsmerge against mergekit (when this interpreter can import mergekit, or
under --mergekit-python), a whole CART merge of 4 bf16 Llama-shaped fine-tunes from disk
against an official-style script (tiny with --quick, 2.7 GB with --full), and, with --full,
distributed merges. Each writes
its JSON, markdown and plots into --out; then plots.py draws the report's
plots there, and REPORT.md gathers everything behind a table of the goals,
each with its measured value and whether it is met."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import median  # noqa: E402
from plots import load, make_plots  # noqa: E402

HERE = Path(__file__).resolve().parent


def mergekit_python(args) -> str | None:
    """The interpreter to run vs_mergekit.py with: --mergekit-python, else this one when
    mergekit is importable here, else None (the comparison is left out)."""
    if args.mergekit_python:
        return str(args.mergekit_python)
    return sys.executable if importlib.util.find_spec("mergekit") is not None else None


def steps(args) -> list[tuple[str, list[str], str]]:
    """(title, [interpreter, script, arguments...], markdown file it writes)."""
    out = str(args.out)
    preset = "full" if args.full else "quick"
    quick = [] if args.full else ["--quick"]
    py = sys.executable
    plan = [
        ("Engine", [py, "bench_engine.py", "--device", args.device, "--preset", preset, "--out", out]
         + (["--matrices", str(args.matrices)] if args.matrices else []),
         f"engine-{args.device}-{preset}.md"),
        ("Scaling", [py, "scaling.py", "--out", out, *quick], f"scaling{'' if args.full else '-quick'}.md"),
        ("Every method, and the cost of a search", [py, "svd_family.py", "--out", out, *quick],
         f"svd_family{'' if args.full else '-quick'}.md"),
        ("Streaming merges from disk", [py, "streaming.py", "--out", out, *(["--rounds", "2"] if args.full else quick)],
         "streaming.md"),
        ("A long merge under a small budget",
         [py, "streaming_load.py", "--out", out] + ([] if args.full else ["--tensors", "120"]), "streaming_load.md"),
        ("Merging LoRA adapters", [py, "adapters.py", "--out", out, *quick]
         + (["--threads", str(args.threads)] if args.threads else []),
         "adapters-4layers.md" if args.full else "adapters-quick.md"),
    ]
    mk = mergekit_python(args)
    if mk:
        size = [] if args.full else ["--hidden", "512", "--layers", "4", "--models", "3", "--rounds", "1"]
        plan.append(("Against mergekit", [mk, "vs_mergekit.py", "--out", out, *size], "vs_mergekit.md"))
    plan.append(("Precision-aware CART: speed at the accuracy target",
                 [py, "precision_speed.py", "--out", out, *quick],
                 "precision-speed-quick.md" if not args.full else "precision-speed-4096.md"))
    plan.append(("A whole merge from disk against an official-style script",
                 [py, "whole_merge.py", "--out", out, *quick], "whole-merge.md" if args.full else "whole-merge-quick.md"))
    if args.full:
        plan.append(("CART speed against accuracy", [py, "cart_tradeoff.py", "--out", out], "cart_tradeoff.md"))
        plan.append(("Distributed merges", [py, "distributed.py", "--out", out], "distributed.md"))
    return plan


def lowrank_goal(engine: dict, device: str) -> tuple[str, str, str]:
    target = 100 if device == "cuda" else 20
    goal = f"low-rank step 4096² fp32, rank 8 %: ≥ {target}× faster than torch.linalg.svd, error ratio ≤ 1.02"
    rows = [r for r in engine["parts"]["d"]["rows"] if "time" in r and tuple(r["shape"]) == (4096, 4096)
            and r.get("dtype", "float32") == "float32" and r.get("kind", "decaying") == "decaying"
            and abs(r["rank_ratio"] - 0.08) < 1e-9]
    ours = [r for r in rows if r["method"].startswith("ccs")]
    if not ours:
        return goal, "not measured in this preset", "—"
    accurate = [r for r in ours if r["err_ratio"] <= 1.02]
    best = max(accurate or ours, key=lambda r: r["speedup_vs_linalg_svd"])
    met = bool(accurate) and best["speedup_vs_linalg_svd"] >= target
    lowrank = next((r for r in rows if r["method"].startswith("torch.svd_lowrank")), None)
    measured = (f"{best['speedup_vs_linalg_svd']:.1f}× at error ratio {best['err_ratio']:.4f} ({best['method']}; "
                f"the fastest setting within 1.02)" if accurate else
                f"no setting within 1.02; the fastest: {best['speedup_vs_linalg_svd']:.1f}×, {best['err_ratio']:.4f}")
    if lowrank:
        measured += (f"; torch.svd_lowrank(niter=2) {lowrank['speedup_vs_linalg_svd']:.1f}×, "
                     f"{lowrank['err_ratio']:.4f}")
    return goal, measured, "yes" if met else "no"


def cart_goals(engine: dict) -> list[tuple[str, str, str]]:
    rows = engine["parts"]["a"]["rows"]
    scored = [r for r in rows if r.get("rel_err_vs_exact")]
    if not scored:
        return []
    at8 = [r for r in scored if r["T"] == 8]
    r = at8[0] if at8 else max(scored, key=lambda r: r["T"])
    shape = f"{r['shape'][0]}×{r['shape'][1]}"
    where = f"one {shape} fp32 weight, rank {r['rank_ratio']:.0%}, T = {r['T']}"
    if r["T"] != 8:
        where += " (T = 8 runs in --full)"
    s, e = r["speedup"], r["rel_err_vs_exact"]
    fast, default = s["official/ccs_rand_os10_p2"], s["official/ccs_rand_default"]
    rand_ok = [(name, s[f"official/{name}"]) for name in ("ccs_rand_default", "ccs_rand_os10_p2")
               if e.get(name, 1.0) <= 0.05]
    met = any(x["median"] >= 20 for _, x in rand_ok)
    out = [(
        "whole CART merge, T = 8: ≥ 20× faster than the official-style code, merged update within 5 % (randomized)",
        (f"{where}: merge defaults {default['median']:.1f}× [{default['min']:.1f}-{default['max']:.1f}] at "
        f"{e['ccs_rand_default']:.2%} update error; oversample 10 / power_iters 2 {fast['median']:.1f}× at "
        f"{e['ccs_rand_os10_p2']:.1%}"), "yes" if met else "no")]
    if "official" in e and r.get("reference", "ccs_exact") == "ccs_exact":
        exact = s.get("official/ccs_exact")
        out.append(("whole CART merge, exact SVD: merged update within 1e-4 of the official-style code",
                    f"{e['official']:.1e} ({where})"
                    + (f"; svd='exact' {exact['median']:.2f}× the official-style speed" if exact else ""),
                    "yes" if e["official"] <= 1e-4 else "no"))
    for other in rows:
        if other["T"] > r["T"]:
            x = other["speedup"]["official/ccs_rand_default"]
            err = other.get("rel_err_vs_exact", {}).get("ccs_rand_default")
            out.append((f"(for reference) whole CART at T = {other['T']}",
                        f"merge defaults {x['median']:.1f}× the official-style speed"
                        + (f", update {err:.2%} from the official-style one" if err is not None else ""), "—"))
    return out


def precision_goals(precision: dict) -> list[tuple[str, str, str]]:
    """The precision-aware CART goals (precision_speed.py): bf16 inputs with tolerance auto at an
    update error within the bf16 rounding floor (>= 20x), fp32 inputs with tolerance 0.01 (>= 10x)."""
    out = []
    for r in precision["results"]:
        where = f"one {r['m']}² weight, rank 8 %, T = {r['T']}" + ("" if r["m"] == 4096 else " (4096² in --full)")
        for row in r["rows"]:
            if row["variant"] != "fast arithmetic":
                continue
            bf16 = row["inputs"] == "bf16"
            bound = r["bf16_rounding_floor"] if bf16 else 0.01
            target = 20 if bf16 else 10
            met = row["speedup"]["median"] >= target and row["update_error"] <= bound
            goal = (f"CART, bf16 inputs, tolerance auto: ≥ {target}× the official-style code at an update error "
                    "≤ the exact update's own change under bf16 rounding" if bf16 else
                    f"CART, fp32 inputs, tolerance 0.01: ≥ {target}× the official-style code")
            out.append((goal, (f"{where}: {row['speedup']['median']:.1f}× at {row['update_error']:.2%} "
                               f"(floor {r['bf16_rounding_floor']:.1%}; {'bf16' if row['fast_products'] else 'fp32'} "
                               f"products, {row['power_iters']} power iterations)"), "yes" if met else "no"))
    return out


def tradeoff_goal(tradeoff: dict) -> tuple[str, str, str]:
    """The whole-CART goal at the fastest (oversample, power_iters) whose update is within 5 %."""
    within = [r for r in tradeoff["rows"] if r["update_error"] <= 0.05]
    where = f"{tradeoff['shape'][0]}×{tradeoff['shape'][1]}, T = {tradeoff['T']}"
    goal = "whole CART merge, T = 8, the fastest setting whose update is within 5 % (cart_tradeoff.py)"
    if not within:
        return goal, f"{where}: no setting within 5 %", "no"
    best = max(within, key=lambda r: r["speedup"]["median"])
    x = best["speedup"]
    return goal, (f"{where}: oversample {best['oversample']}, power_iters {best['power_iters']}: "
                  f"{x['median']:.1f}× [{x['min']:.1f}-{x['max']:.1f}] at {best['update_error']:.2%}"), \
        "yes" if x["median"] >= 20 else "no"


def whole_merge_goal(result: dict) -> tuple[str, str, str]:
    """`ccsmerge merge --method cart` at its defaults against the official-style script (whole_merge.py)."""
    layout, acc = result["layout"], result["accuracy"]
    name = "ccsmerge (defaults: tolerance auto)"
    x = result["summary"][name]
    err = acc["update_vs_official"][name]
    goal = (f"whole merge from disk, {layout['models']} bf16 Llama-shaped fine-tunes "
            f"({result['manifest']['input_bytes'] / 1e9:.2f} GB), `ccsmerge merge --method cart`: ≥ 20× faster than "
            "an official-style script")
    text = (f"{x['speedup']['median']:.1f}× ({result['summary']['official-style']['wall_s']:.0f} s against "
            f"{x['wall_s']:.0f} s; peak RSS {result['summary']['official-style']['peak_rss_gb']:.1f} against "
            f"{x['peak_rss_gb']:.1f} GB); update vs the official-style one {err['median']:.1%} median, "
            f"{err['worst']:.1%} worst (both bf16 outputs)")
    if result["quick"]:  # 17 MB of inputs: the processes' start-up is most of each run
        return goal, f"quick: {text}; the 2.7 GB run is --full", "—"
    return goal, text, "yes" if x["speedup"]["median"] >= 20 else "no"


def adapters_goal(result: dict) -> tuple[str, str, str]:
    """The factor path against merge_and_unload + dense CART (adapters.py)."""
    goal = "LoRA adapters: CART from the factors ≥ 50× faster than merge_and_unload + dense CART, and exact"
    rows = result["rows"]
    if any("error" in rows[key] for key in ("a", "b_merge")):
        return goal, "a merge failed", "no"
    a = rows["a"]["merge_s"]
    dense = rows["b_merge"]["merge_s"] + rows["b_write"]["write_s"]
    error = max(entry["a"]["update"] for entry in result["agreement"].values())
    config = result["config"]
    text = (f"{dense / a:.1f}× ({dense:.0f} s against {a:.1f} s; {config['adapters']} rank-{config['rank']} adapters, "
            f"hidden {config['hidden']}, {config['layers']} layers); update error {error:.1e} against exact dense CART")
    return goal, text, "yes" if dense / a >= 50 and error <= 1e-4 else "no"


def streaming_goals(streaming: dict) -> list[tuple[str, str, str]]:
    ratios, over = [], []
    for size in streaming.get("sizes", []):
        runs = [r for r in size.get("runs", []) if "error" not in r and r.get("overlap", True)]
        cats = [c["s"] for c in size.get("cat", [])]
        if not runs or not cats:
            continue
        gb = size["input_bytes"] / 1e9
        merge_s, cat_s = median([r["merge_s"] for r in runs]), median(cats)
        writes = size.get("write") or []
        ratios.append((gb, merge_s / cat_s, merge_s / (cat_s + median(writes)) if writes else None))
        over.append((gb, max(r["peak_rss"] - r["baseline_rss"] for r in size["runs"] if "error" not in r) / 1e9))
    out = []
    if ratios:
        text = "; ".join(f"{gb:.1f} GB: {r:.1f}×" + (f" (merge / (cat + fsync'd write) {w:.2f}×)" if w else "")
                         for gb, r, w in ratios)
        out.append(("streaming average within 1.3× of reading the inputs once (merge time / warm `cat`)", text,
                    "yes" if all(r <= 1.3 for _, r, _ in ratios) else "no"))
    if len(over) >= 2:
        budget = streaming.get("config", {}).get("max_memory_bytes", 1e9) / 1e9
        growth = over[-1][1] - over[0][1]
        text = (f"peak RSS over the baseline {', '.join(f'{o:.2f}' for _, o in over)} GB at "
                f"{', '.join(f'{g:.1f}' for g, _ in over)} GB of input (--max-memory {budget:.1f} GB): "
                f"{growth * 1000:+.0f} MB from the smallest to the largest")
        out.append(("peak RSS flat in the input size under a fixed --max-memory (streaming.py)", text,
                    "yes" if abs(growth) <= 0.1 * budget else "no"))
    return out


def goals(out: Path, device: str, preset: str, mergekit_ran: bool) -> list[tuple[str, str, str]]:
    """(goal, measured, met?) for what this run measured."""
    rows = []
    engine = load(out / f"engine-{device}-{preset}.json")
    if engine and "d" in engine["parts"]:
        rows.append(lowrank_goal(engine, device))
    if engine and "a" in engine["parts"]:
        rows += cart_goals(engine)
    versus = load(out / "vs_mergekit.json")
    if versus and mergekit_ran:
        by = {(r["method"], r["tool"]): r["seconds"] for r in versus["rows"]}
        floor = by.get(("cat (the floor)", ""))
        for method in ("average", "task_arithmetic"):
            ratio = by[(method, "ccsmerge")] / by[(method, "mergekit")]
            text = f"{ratio:.2f}× mergekit's time ({by[(method, 'ccsmerge')]:.2f} s vs {by[(method, 'mergekit')]:.2f} s)"
            if floor:
                text += f"; {by[(method, 'ccsmerge')] / floor:.0f}× the warm `cat` (process start included)"
            rows.append((f"streaming {method}: no slower than mergekit", text, "yes" if ratio <= 1.0 else "no"))
    else:
        rows.append(("streaming average / task arithmetic: no slower than mergekit",
                     "not run: mergekit is not importable here (pass --mergekit-python)", "—"))
    precision = load(out / f"precision-speed-{'4096' if preset == 'full' else 'quick'}.json")
    if precision:
        rows += precision_goals(precision)
    tradeoff = load(out / "cart_tradeoff.json")
    if tradeoff:
        rows.append(tradeoff_goal(tradeoff))
    adapters = load(out / ("adapters-4layers.json" if preset == "full" else "adapters-quick.json"))
    if adapters:
        rows.append(adapters_goal(adapters))
    whole = load(out / ("whole-merge.json" if preset == "full" else "whole-merge-quick.json"))
    if whole:
        rows.append(whole_merge_goal(whole))
    streaming = load(out / "streaming.json")
    if streaming:
        rows += streaming_goals(streaming)
    scaling = load(out / f"scaling{'' if preset == 'full' else '-quick'}.json")
    if scaling:
        slope = scaling["slopes"]["rss_gb_per_input_gb"]
        sizes = [g for g, _, _ in scaling["by_input_size"]]
        verdict = "yes" if slope < 0.05 else "no"
        if max(sizes) < 1.0:  # the quick sizes never reach the 256 MB budget by much
            verdict = "— (the quick sizes barely exceed the budget; see streaming.py above and --full)"
        rows.append(("peak RSS flat in the input size under a fixed --max-memory (scaling.py, 256 MB)",
                     f"{slope * 1000:+.0f} MB per GB of input (fitted), {min(sizes):.2f} to {max(sizes):.2f} GB",
                     verdict))
    return rows


def machine_line(out: Path, device: str, preset: str) -> str:
    """The machine and its load, from the engine's results."""
    engine = load(out / f"engine-{device}-{preset}.json")
    if not engine:
        return ""
    from machine import describe

    load_avg = engine.get("load_avg", {})
    last = list(load_avg.values())[-1] if load_avg else None
    return (f"Machine: {describe(engine['machine'])}. Load average (1/5/15 min) at the engine's start "
            f"{load_avg.get('start')}, at its end {last}: other work was running on the same cores.")


def write_report(args, env: dict, plan: list, timings: dict, done: bool) -> Path:
    """REPORT.md from what is in --out: rewritten after every step, so that a run cut
    short (or still going) has one; `timings` maps a step's title to (seconds, exit)."""
    preset = "full" if args.full else "quick"
    mergekit_ran = timings.get("Against mergekit", (0, 1))[1] == 0
    sections = []
    for title, _, markdown in plan:
        if title not in timings:
            continue
        rc = timings[title][1]
        path = args.out / markdown
        body = path.read_text() if path.is_file() and rc == 0 else f"(failed: exit {rc})"
        sections.append(f"## {title}\n\n" + re.sub(r"^(#+) ", r"#\1 ", body, flags=re.MULTILINE))
    plots = make_plots(args.out, args.device, preset)
    report = [
        f"# ccsmerge benchmark report ({preset}, {args.device})",
        "",
        f"`python -m benchmarks --{preset} --device {args.device}{f' --threads {args.threads}' if args.threads else ''}"
        f" --out {args.out}`"
        + (f" (mergekit comparison under `{mergekit_python(args)}`)" if mergekit_ran else "")
        + "; every section names its machine."
        + ("" if done else " **This run is not finished: the steps below without a time have not run yet.**"),
        "",
        machine_line(args.out, args.device, preset),
        "",
        NOISE_NOTE,
        "",
        f"Threads: OMP_NUM_THREADS={env.get('OMP_NUM_THREADS', 'unset')}, "
        f"MKL_NUM_THREADS={env.get('MKL_NUM_THREADS', 'unset')}, OMP_WAIT_POLICY={env.get('OMP_WAIT_POLICY', 'unset')}"
        f" in every step{' (--threads)' if args.threads else ''}. " + THREADS_NOTE,
        "",
        "## Goals",
        "",
        "| goal | measured | met |",
        "|---|---|---|",
    ]
    report += [f"| {g} | {m} | {ok} |" for g, m, ok in goals(args.out, args.device, preset, mergekit_ran)]
    report += ["", "| step | seconds | exit |", "|---|---|---|"]
    report += [f"| {t} | {timings[t][0]:.0f} | {timings[t][1]} |" if t in timings else f"| {t} | not run | |"
               for t, _, _ in plan]
    report.append(f"| total | {sum(t for t, _ in timings.values()):.0f} | |")
    if plots:
        report += ["", "## Plots", ""]
        report += [f"**{caption}**\n\n![{caption}]({name})\n" for caption, name in plots]
    report += [""] + sections
    path = args.out / "REPORT.md"
    path.write_text("\n".join(report) + "\n")
    (args.out / "steps.json").write_text(json.dumps(timings, indent=1) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the default: a few minutes on 2 cores")
    size.add_argument("--full", action="store_true")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--mergekit-python", type=Path, metavar="PYTHON",
                        help="interpreter with mergekit and ccsmerge installed, for the mergekit comparison "
                             "(default: this one, when it can import mergekit)")
    parser.add_argument("--matrices", type=Path, metavar="FILE",
                        help="a safetensors file of 2-D matrices (e.g. real centered task vectors) to add to the "
                             "low-rank step's sweep")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="OMP_NUM_THREADS and MKL_NUM_THREADS for every step (default: as the environment "
                             "has them); 1 on a machine shared with other work (the report says why)")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: rebuild REPORT.md and the plots from what is in --out")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    plan = steps(args)
    if args.report_only:
        saved = args.out / "steps.json"
        timings = {k: tuple(v) for k, v in json.loads(saved.read_text()).items()} if saved.is_file() else {}
        done = all(title in timings for title, _, _ in plan)
        print(f"report: {write_report(args, env, plan, timings, done)}")
        return
    timings: dict[str, tuple[float, int]] = {}
    for title, command, _ in plan:
        print(f"== {title}: {' '.join(command)}", flush=True)
        start = time.perf_counter()
        result = subprocess.run([command[0], str(HERE / command[1]), *command[2:]], check=False, env=env)
        timings[title] = (time.perf_counter() - start, result.returncode)
        write_report(args, env, plan, timings, done=len(timings) == len(plan))
    print(f"report: {args.out / 'REPORT.md'}")
    if any(rc for _, rc in timings.values()):
        sys.exit(1)


THREADS_NOTE = (
    "On a machine shared with other work, run with `--threads 1`: with two or more threads per process, OpenMP's "
    "synchronisation breaks down when other processes compete for the cores. Measured on a 2-core machine at a load "
    "average of 5-9: one 2048 x 2048 torch.linalg.svd took 43.6 s with 2 threads (spinning waits, the default) "
    "against 4.5 s with OMP_WAIT_POLICY=PASSIVE and 5.2 s on one thread, while passive waits made "
    "ccsmerge.ops.randomized_svd of 4096 x 4096 at k = 327 take 13-26 s with 2 threads against 1.3-1.5 s on one "
    "thread (1.6-7.4 s with spinning waits): either policy would make a ratio of the two meaningless. On one thread "
    "each process only loses its share of the CPU."
)

NOISE_NOTE = (
    "Ratios are the headline: each compares implementations timed side by side in one process, in "
    "interleaved rounds (or alternating runs for the command-line comparisons), with medians and min-max "
    "over rounds; absolute times hold only for the machine named in each section, and on a shared machine "
    "(other processes competing for the cores: see each section's load average) they are noisy."
)


if __name__ == "__main__":
    main()
