"""A whole CART merge from disk: `ccsmerge merge --method cart` against an official-style script.

Inputs (generated once, kept in --cache): T = 4 bf16 Llama-shaped fine-tunes (hidden 2048,
intermediate 5504, 4 layers, vocab 32000, embeddings and an lm_head: 2.7 GB in all), each a
Hugging Face folder (model.safetensors.index.json, 2 shards, config.json with model_type
llama). Every 2-D weight is base + tau_t, base ~ N(0, 0.02^2), tau_t = 0.5 shared + own_t with
shared and own_t each A diag(i^-1) B^T (A, B Gaussian factors of rank r = min(512, m, n),
columns of norm ~1) plus a flat noise floor at the level of the last kept singular value
(entries of std 1/(r sqrt(max(m, n))): the spectrum decays as a power law, then flattens);
||tau_t|| = 2 % of ||base||. Norm weights are 1 + 0.01 N(0, 1) per model.

Compared, each in a fresh process (wall time and peak RSS from /usr/bin/time, the page cache
warmed by reading the inputs once before each run), in interleaved rounds:

- official-style: all T state dicts loaded into memory with safetensors, then
  benchmarks/official_cart.py's official_cart (a float32 torch.linalg.svd per task per matrix),
  with ccsmerge's low-rank selection rule (ccsmerge.methods.params.lowrank_rule at its defaults:
  embeddings and lm_head averaged), the merge saved as one bf16 safetensors file;
- `ccsmerge merge --method cart --rank-ratio 0.12 --lam 2.0` at its defaults (tolerance auto),
  with --tolerance off (fixed power iterations), with --dtype float32 (the update not rounded to
  bf16), and with --exact, --svd exact.

Accuracy, for every low-rank tensor, in float64: the update as written (merged - theta_avg,
theta_avg the mean of the inputs) of each ccsmerge run against the official-style one, worst
and median; both outputs are bf16, so this includes both outputs' rounding, which
ccsmerge-accuracy.json states per tensor (output_rounding) with its estimated update error and
the inputs' rounding floor. On the matrices of --reference-layers layers the exact float32 update
(official_cart's cart_tensor, not rounded) is computed here, untimed, and the float32-output
run's update is compared with it: the engine's own error, next to its estimate.

    python benchmarks/whole_merge.py --out DIR [--rounds 1] [--threads 2] [--exact]
    python benchmarks/whole_merge.py --quick --out DIR    # hidden 256, 2 layers, vocab 1000 (seconds)
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import shutil
import statistics
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness import GB, log, table, time_command_rss, write_results  # noqa: E402
from merge_process import cat, remove_output  # noqa: E402
from synthetic_checkpoints import Layout, numel  # noqa: E402

RANK_RATIO = 0.12
LAM = 2.0
STRENGTH = 0.02
GOAL = 20.0


@dataclass(frozen=True)
class WholeLayout:
    """T Llama-shaped fine-tunes: embeddings, `layers` decoder layers, a final norm, an lm_head."""

    models: int = 4
    hidden: int = 2048
    intermediate: int = 5504
    layers: int = 4
    vocab: int = 32000
    shards: int = 2
    max_rank: int = 512  # r of the task vectors' power-law part
    seed: int = 0

    @property
    def name(self) -> str:
        return f"T{self.models}-d{self.hidden}-ff{self.intermediate}-L{self.layers}-v{self.vocab}"

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        stack = Layout(models=self.models, d_model=self.hidden, d_ff=self.intermediate, vocab=self.vocab).tensors()
        out = list(itertools.islice(stack, 1 + 9 * self.layers))  # the embedding, then 9 tensors a layer
        return out + [("model.norm.weight", (self.hidden,)), ("lm_head.weight", (self.vocab, self.hidden))]

    def bytes_per_model(self) -> int:
        return sum(numel(s) * 2 for _, s in self.tensors())


FULL = WholeLayout()
QUICK = WholeLayout(hidden=256, intermediate=688, layers=2, vocab=1000, max_rank=128)


def lowrank_filter():
    """ccsmerge's own rule of which tensors CART gives the low-rank step (its defaults)."""
    from types import SimpleNamespace

    from machine import load_ccsmerge

    load_ccsmerge()
    from ccsmerge.methods.params import DEFAULT_LOWRANK_STACKED, lowrank_rule

    cfg = SimpleNamespace(lowrank_include=(), lowrank_exclude=(), lowrank_stacked=DEFAULT_LOWRANK_STACKED,
                          default_excludes=True)
    return lambda name, tensor: lowrank_rule(name, tuple(tensor.shape), tensor.dtype, cfg)[0]


# --------------------------------------------------------------------------- the inputs


def _power_law(torch, m: int, n: int, r: int, gen, noise: bool) -> object:
    """A diag(i^-1) B^T with Gaussian A (m x r), B (n x r) of unit-norm-ish columns, plus (noise)
    a flat floor of entries N(0, (1 / (r sqrt(max(m, n))))^2): singular values ~ i^-1, then ~ 1/r."""
    a = torch.randn(m, r, generator=gen) / math.sqrt(m)
    b = torch.randn(n, r, generator=gen) / math.sqrt(n)
    out = (a * torch.arange(1, r + 1, dtype=torch.float32).pow(-1.0)) @ b.T
    if noise:
        out += torch.randn(m, n, generator=gen) / (r * math.sqrt(max(m, n)))
    return out


def _model_tensors(torch, layout: WholeLayout, name: str, shape, lowrank: bool) -> list:
    """The T models' values of one tensor, float32."""
    gen = torch.Generator().manual_seed(layout.seed * 1_000_003 + zlib.crc32(name.encode()))
    if len(shape) == 1:
        return [1 + 0.01 * torch.randn(shape, generator=gen) for _ in range(layout.models)]
    m, n = shape
    base = 0.02 * torch.randn(m, n, generator=gen)
    # tables (embeddings, the head) are only averaged: a cheaper low-rank task vector without the floor
    r = min(layout.max_rank if lowrank else 64, m, n)
    shared = _power_law(torch, m, n, r, gen, lowrank)
    target = STRENGTH * float(base.norm())
    out = []
    for _ in range(layout.models):
        tau = _power_law(torch, m, n, r, gen, lowrank).add_(shared, alpha=0.5)
        out.append(base.add(tau, alpha=target / float(tau.norm())))
    return out


def generate(layout: WholeLayout, root: Path) -> dict:
    """Build (or reuse) the T model folders under root; returns the manifest."""
    key = hashlib.sha1(json.dumps([asdict(layout), STRENGTH]).encode()).hexdigest()[:10]
    folder = root / f"{layout.name}-{key}"
    manifest_path = folder / "manifest.json"
    if manifest_path.is_file():
        log(f"inputs: reusing {folder}")
        return json.loads(manifest_path.read_text())
    import torch
    from safetensors.torch import save_file

    shutil.rmtree(folder, ignore_errors=True)
    rule = lowrank_filter()
    tensors = layout.tensors()
    per_shard = layout.bytes_per_model() / layout.shards
    shards: list[list] = [[]]
    size = 0
    for name, shape in tensors:  # tensors are not split; a shard closes once it holds its share
        if size >= per_shard * len(shards) and len(shards) < layout.shards:
            shards.append([])
        shards[-1].append((name, shape))
        size += numel(shape) * 2
    count = len(shards)
    log(f"inputs: generating {layout.models * layout.bytes_per_model() / GB:.2f} GB ({layout.models} models x "
        f"{count} shards) in {folder}")
    t0 = time.perf_counter()
    models = [folder / f"model-{t}" for t in range(layout.models)]
    for model in models:
        model.mkdir(parents=True)
    weight_map = {}
    for j, shard in enumerate(shards):
        filename = f"model-{j + 1:05d}-of-{count:05d}.safetensors"
        parts: list[dict] = [{} for _ in models]
        for name, shape in shard:
            lowrank = rule(name, torch.empty(shape, dtype=torch.bfloat16, device="meta"))
            for t, value in enumerate(_model_tensors(torch, layout, name, shape, lowrank)):
                parts[t][name] = value.to(torch.bfloat16)
            weight_map[name] = filename
        for model, part in zip(models, parts):
            save_file(part, str(model / filename), metadata={"format": "pt"})
        del parts
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": layout.hidden,
              "intermediate_size": layout.intermediate, "num_hidden_layers": layout.layers,
              "vocab_size": layout.vocab, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    index = {"metadata": {"total_size": layout.bytes_per_model()}, "weight_map": dict(sorted(weight_map.items()))}
    for model in models:
        (model / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (model / "config.json").write_text(json.dumps(config, indent=2))
    files = sorted(str(p) for model in models for p in model.glob("*.safetensors"))
    manifest = {"layout": asdict(layout), "strength": STRENGTH, "folder": str(folder),
                "models": [str(m) for m in models], "files": files,
                "input_bytes": sum(os.path.getsize(f) for f in files), "tensors": len(tensors),
                "generate_s": time.perf_counter() - t0}
    manifest_path.write_text(json.dumps(manifest, indent=1))
    log(f"inputs: generated in {manifest['generate_s']:.0f} s")
    return manifest


# --------------------------------------------------------------------------- reading folders


def tensor_files(folder: Path) -> dict[str, Path]:
    """name -> file of a model or output folder (sharded with an index, or one safetensors file)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return {k: folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    from safetensors import safe_open

    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            out.update({k: path for k in f.keys()})
    return out


class Reader:
    """Tensors of a folder by name, each file opened once."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.files = tensor_files(folder)
        self.handles = {p: safe_open(str(p), "pt") for p in set(self.files.values())}

    def __call__(self, name: str):
        return self.handles[self.files[name]].get_tensor(name)


# --------------------------------------------------------------------------- the official-style script (a child)


def official_main(spec_path: str) -> None:
    """Load every model into memory, official_cart, save the merge as one safetensors file."""
    spec = json.loads(Path(spec_path).read_text())
    import torch
    from safetensors.torch import load_file, save_file

    from official_cart import official_cart

    torch.set_num_threads(spec["threads"])
    models = []
    for folder in spec["models"]:
        state: dict = {}
        for path in sorted(set(tensor_files(Path(folder)).values())):
            state.update(load_file(str(path)))
        models.append(state)
    merged = official_cart(models, spec["rank_ratio"], spec["lam"], lowrank_filter=lowrank_filter())
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    save_file(merged, str(out / "model.safetensors"), metadata={"format": "pt"})


# --------------------------------------------------------------------------- the runs


def variants(exact: bool) -> dict[str, list[str] | None]:
    """Name -> ccsmerge merge's extra flags (None: the official-style script)."""
    out: dict[str, list[str] | None] = {
        "official-style": None,
        "ccsmerge (defaults: tolerance auto)": [],
        "ccsmerge --tolerance off": ["--tolerance", "off"],
        "ccsmerge --dtype float32": ["--dtype", "float32"],
    }
    if exact:
        out["ccsmerge --svd exact"] = ["--svd", "exact"]
    return out


def command(name: str, flags: list[str] | None, manifest: dict, out: Path, work: Path, threads: int) -> list[str]:
    if flags is None:
        spec = work / "official-spec.json"
        spec.write_text(json.dumps({"models": manifest["models"], "out": str(out), "threads": threads,
                                    "rank_ratio": RANK_RATIO, "lam": LAM}))
        return [sys.executable, str(Path(__file__).resolve()), "--child-official", str(spec)]
    models = [arg for m in manifest["models"] for arg in ("--model", m)]
    return [sys.executable, "-m", "ccsmerge", "merge", "--method", "cart", "--rank-ratio", str(RANK_RATIO),
            "--lam", str(LAM), *models, "--out", str(out), "--quiet", *flags]


def run_all(manifest: dict, work: Path, rounds: int, threads: int, plan: dict[str, list[str] | None]) -> dict:
    """Every variant of plan (variants()) `rounds` times, interleaved (the order reversed every
    other round); the outputs of the last round are kept in work."""
    work.mkdir(parents=True, exist_ok=True)
    os.environ.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    from machine import REPO_ROOT

    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    outs = {name: work / f"out-{i}" for i, name in enumerate(plan)}
    runs: dict[str, list[dict]] = {name: [] for name in plan}
    for r in range(rounds):
        order = list(plan) if r % 2 == 0 else list(plan)[::-1]
        for name in order:
            remove_output(outs[name])
            cat(manifest["files"])  # the page cache warm for every run alike
            seconds, rss = time_command_rss(command(name, plan[name], manifest, outs[name], work, threads))
            runs[name].append({"round": r, "wall_s": seconds, "peak_rss_gb": rss})
            log(f"round {r}: {name}: {seconds:.1f} s, peak RSS {rss:.2f} GB")
    return {"outs": outs, "runs": runs}


# --------------------------------------------------------------------------- accuracy


def rel(a, b) -> float:
    denominator = float(b.norm())
    return float((a - b).norm()) / denominator if denominator else (0.0 if float(a.norm()) == 0 else math.inf)


def spread(xs: list[float]) -> dict | None:
    if not xs:
        return None
    return {"worst": max(xs), "median": statistics.median(xs)}


def accuracy(manifest: dict, outs: dict[str, Path], reference_layers: int, threads: int) -> dict:
    """Each ccsmerge output's low-rank updates against the official-style one's (float64), its
    accuracy record, and (on the first reference_layers layers) the float32-output run's update
    against the exact float32 update computed here."""
    import torch

    from official_cart import cart_tensor

    torch.set_num_threads(threads)
    rule = lowrank_filter()
    inputs = [Reader(Path(m)) for m in manifest["models"]]
    readers = {name: Reader(out) for name, out in outs.items()}
    official = readers.pop("official-style")
    names = list(inputs[0].files)
    errors: dict[str, list[float]] = {name: [] for name in readers}
    averaged: dict[str, float] = {name: 0.0 for name in readers}
    reference: list[dict] = []
    lowrank_names = []
    fp32_name = "ccsmerge --dtype float32"
    for tensor in names:
        xs = [read(tensor) for read in inputs]
        avg = sum(x.double() for x in xs) / len(xs)
        off = official(tensor).double()
        if not rule(tensor, xs[0]):  # averaged: the outputs should agree up to the output's rounding
            for name, read in readers.items():
                averaged[name] = max(averaged[name], rel(read(tensor).double(), off))
            continue
        lowrank_names.append(tensor)
        off_update = off - avg
        for name, read in readers.items():
            errors[name].append(rel(read(tensor).double() - avg, off_update))
        layer = tensor.split(".")[2] if tensor.startswith("model.layers.") else None
        if fp32_name in readers and layer is not None and int(layer) < reference_layers:
            merged, center = cart_tensor(xs, RANK_RATIO, LAM)  # exact, float32, not rounded
            exact_update = merged.double() - center.double()
            ours = readers[fp32_name](tensor).double() - avg
            reference.append({"tensor": tensor, "shape": list(xs[0].shape),
                              "float32_output_vs_exact": rel(ours, exact_update),
                              "official_bf16_output_vs_exact": rel(off_update, exact_update)})
    out = {"lowrank_tensors": len(lowrank_names), "averaged_tensors": len(names) - len(lowrank_names),
           "update_vs_official": {name: spread(e) for name, e in errors.items()},
           "averaged_vs_official_worst": averaged, "reference": reference, "records": {}}
    from ccsmerge.accuracy_record import ACCURACY_FILE

    for name, folder in outs.items():
        path = folder / ACCURACY_FILE
        if not path.is_file():
            continue
        tensors = json.loads(path.read_text())["tensors"]

        def field(key, tensors=tensors):
            return spread([t[key] for t in tensors if t.get(key) is not None])

        out["records"][name] = {"matrices": len(tensors), "estimated_error": field("estimated_error"),
                                "rounding_floor": field("rounding_floor"), "output_rounding": field("output_rounding"),
                                "target": field("target"), "power_iters": field("power_iters"),
                                "reached_cap": sum(bool(t.get("reached_cap")) for t in tensors)}
    return out


# --------------------------------------------------------------------------- report


def pct(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f} %"


def summarize(runs: dict) -> dict:
    base = runs["official-style"]
    out = {}
    for name, samples in runs.items():
        ratios = [o["wall_s"] / s["wall_s"] for o, s in zip(base, samples)]
        out[name] = {"wall_s": statistics.median(s["wall_s"] for s in samples),
                     "peak_rss_gb": max(s["peak_rss_gb"] for s in samples),
                     "speedup": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}}
    return out


def markdown(result: dict) -> str:
    m, layout, acc = result["manifest"], result["layout"], result["accuracy"]
    lines = [f"# A whole CART merge: ccsmerge against an official-style script{' (quick)' if result['quick'] else ''}",
             "", result["header"], "",
             f"{layout['models']} bf16 Llama-shaped fine-tunes (hidden {layout['hidden']}, intermediate "
             f"{layout['intermediate']}, {layout['layers']} layers, vocab {layout['vocab']}, lm_head untied), "
             f"{layout['shards']} safetensors shards each, {m['input_bytes'] / GB:.2f} GB in all; "
             f"{acc['lowrank_tensors']} low-rank matrices, {acc['averaged_tensors']} averaged tensors (ccsmerge's "
             f"default excludes: embeddings, lm_head; and the norms). Task vectors: 0.5 shared + own, each a power-law "
             f"part (A diag(i^-1) B^T, Gaussian factors of rank {layout['max_rank']}) plus a flat floor, "
             f"{STRENGTH:.0%} of the weights' norm. CART rank ratio {RANK_RATIO}, λ = {LAM}; "
             f"{result['threads']} threads for every process; {result['rounds']} round(s), interleaved, the page "
             "cache warmed before each run. Wall time and peak RSS of the whole process (/usr/bin/time)."]
    s = result["summary"]
    headers = ["run", "wall", "speedup (official / it)", "peak RSS", "update vs official: worst", "median",
               "estimated error: worst", "median", "power iters", "bf16 output rounding: median", "goal ≥ 20×"]
    rows = []
    for name, x in s.items():
        err = acc["update_vs_official"].get(name)
        rec = acc["records"].get(name, {})
        est, rounding, iters = rec.get("estimated_error"), rec.get("output_rounding"), rec.get("power_iters")
        sp = x["speedup"]
        rows.append([name, f"{x['wall_s']:.1f} s",
                     "1" if name == "official-style" else
                     (f"{sp['median']:.1f}×" if sp["min"] == sp["max"] else
                      f"{sp['median']:.1f}× [{sp['min']:.1f}-{sp['max']:.1f}]"),
                     f"{x['peak_rss_gb']:.2f} GB", pct(err and err["worst"]), pct(err and err["median"]),
                     pct(est and est["worst"]), pct(est and est["median"]),
                     "-" if not iters else f"{iters['median']:g} (max {iters['worst']:g})",
                     pct(rounding and rounding["median"]),
                     "" if name == "official-style" else ("met" if sp["median"] >= GOAL else "not met")])
    lines += ["", table(headers, rows), ""]
    floors = [r["rounding_floor"] for r in acc["records"].values() if r.get("rounding_floor")]
    lines.append(
        "*update vs official*: ‖Δ_ccsmerge − Δ_official‖ / ‖Δ_official‖ per low-rank matrix, Δ = merged output − "
        "the inputs' mean, in float64; both outputs are rounded to bf16 (but the --dtype float32 run), so this "
        "includes the two outputs' rounding (*bf16 output rounding*, from ccsmerge-accuracy.json: "
        "‖round(merged) − merged‖ / ‖Δ‖). *estimated error*: ccsmerge's own a-posteriori estimate of its update's "
        "error (ccsmerge-accuracy.json; none with --tolerance off or --svd exact)"
        + (f"; the inputs' rounding floor it aims at (auto: a quarter of it, at least 1 %): median "
           f"{pct(floors[0]['median'])}, worst {pct(floors[0]['worst'])}." if floors else "."))
    worst_avg = max(acc["averaged_vs_official_worst"].values(), default=0.0)
    lines.append(f"Averaged tensors (embeddings, lm_head, norms): the outputs differ from the official-style ones "
                 f"by at most {pct(worst_avg, 3)} (relative, per tensor).")
    if acc["reference"]:
        ref = acc["reference"]
        ours = [r["float32_output_vs_exact"] for r in ref]
        off = [r["official_bf16_output_vs_exact"] for r in ref]
        lines += ["", f"Against the exact float32 update (cart_tensor, computed here, untimed) on the {len(ref)} "
                  "low-rank matrices of the first layer(s): ccsmerge's --dtype float32 output's update is off by "
                  f"{pct(max(ours))} worst, {pct(statistics.median(ours))} median (the engine's error alone); the "
                  f"official-style bf16 output's by {pct(max(off))} worst, {pct(statistics.median(off))} median "
                  "(its bf16 rounding alone)."]
    sp = s["ccsmerge (defaults: tolerance auto)"]["speedup"]["median"]
    lines += ["", f"Goal (issue 18, d): ccsmerge's defaults ≥ {GOAL:g}× faster than the official-style script on the "
              f"same files: {'met' if sp >= GOAL else 'not met'} ({sp:.1f}×)."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child-official", metavar="SPEC", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--quick", action="store_true", help="hidden 256, 2 layers, vocab 1000")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS") or 2),
                        help="torch / OpenMP threads of every process (default: OMP_NUM_THREADS, else 2)")
    parser.add_argument("--exact", action="store_true", help="add a --svd exact run (as slow as the official-style one)")
    parser.add_argument("--reference-layers", type=int,
                        help="layers whose exact float32 update is computed here (default: 1; all with --quick)")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/ccsmerge-bench-whole-merge"),
                        help="where the generated inputs are kept (default /tmp/ccsmerge-bench-whole-merge)")
    parser.add_argument("--keep-outputs", action="store_true", help="keep the merges' output folders")
    args = parser.parse_args()
    if args.child_official:
        official_main(args.child_official)
        return
    if args.out is None:
        parser.error("--out is required")
    import torch

    from machine import describe, git_state, load_average, load_ccsmerge, machine_info

    torch.set_num_threads(args.threads)
    layout = QUICK if args.quick else FULL
    info = machine_info(load_ccsmerge())
    load_start = load_average()
    manifest = generate(layout, args.cache)
    work = args.cache / "runs"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    started = time.perf_counter()
    runs = run_all(manifest, work, args.rounds, args.threads, variants(args.exact or args.quick))
    timed_s = time.perf_counter() - started
    reference_layers = args.reference_layers if args.reference_layers is not None else (layout.layers if args.quick else 1)
    acc = accuracy(manifest, runs["outs"], reference_layers, args.threads)
    load_end = load_average()
    header = (f"Machine: {describe(info)}; checkout {git_state()}; OMP_NUM_THREADS={args.threads}; load average "
              f"(1/5/15 min) at the start {load_start}, at the end {load_end}.")
    result = {"quick": args.quick, "layout": asdict(layout), "manifest": manifest, "threads": args.threads,
              "rounds": args.rounds, "header": header, "machine": info, "checkout": git_state(),
              "load_average": {"start": load_start, "end": load_end}, "timed_s": timed_s,
              "runs": runs["runs"], "summary": summarize(runs["runs"]), "accuracy": acc}
    text = markdown(result)
    write_results(args.out, "whole-merge-quick" if args.quick else "whole-merge", result, text, echo=True)
    if not args.keep_outputs:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
