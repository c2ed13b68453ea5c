"""`ccsmerge demo`: pretrain a small network on real digits, fine-tune one copy
per task on eight conflicting tasks, save them as model folders, choose each
method's hyper-parameters on a validation split, merge the folders on disk
(merge_checkpoints, what `ccsmerge merge` runs),
and report test accuracy per task for every method, with a rank sweep and a
λ sweep as PNG plots.

    ccsmerge demo [--out DIR] [--device auto|cpu|cuda] [--seed N] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

import ccsmerge
from ccsmerge import accuracy_record
from ccsmerge.checkpoint import Checkpoint
from ccsmerge.config import METHOD_PARAMS
from ccsmerge.merge import resolve_device
from ccsmerge.methods import REGISTRY

from .report import markdown_report, write_plots
from .tasks import Suite

# Validation grids; --quick keeps every method but fewer points.
GRIDS = {
    "task_arithmetic": {"lam": [0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0]},
    "ties": {"lam": [0.4, 0.6, 0.8, 1.0, 1.2], "density": [0.1, 0.2, 0.3, 0.5, 0.8]},
    "tsv_m": {"lam": [0.25, 0.5, 0.75, 1.0, 1.25, 1.5]},
    "iso_c": {"lam": [0.25, 0.5, 0.75, 1.0, 1.25, 1.5]},
    "iso_cts": {"lam": [0.25, 0.5, 0.75, 1.0, 1.25, 1.5], "common_space_fraction": [0.6, 0.8]},
    "cart": {"lam": [0.5, 1.0, 1.5, 2.0, 2.5, 3.0], "rank_ratio": [0.02, 0.04, 0.08, 0.12, 0.16, 0.24, 0.32, 0.5]},
}
QUICK_GRIDS = {
    "task_arithmetic": {"lam": [0.1, 0.3, 0.5]},
    "ties": {"lam": [0.6, 1.0], "density": [0.2, 0.5]},
    "tsv_m": {"lam": [0.5, 1.0]},
    "iso_c": {"lam": [0.5, 1.0]},
    "iso_cts": {"lam": [0.5, 1.0], "common_space_fraction": [0.8]},
    "cart": {"lam": [0.5, 1.0, 2.0], "rank_ratio": [0.04, 0.12, 0.32]},
}
# (row label, method, extra options); CART exact reuses the randomized CART's setting.
ROWS = (
    ("average", "average", {}),
    ("task arithmetic", "task_arithmetic", {}),
    ("TIES", "ties", {}),
    ("TSV-M", "tsv_m", {}),
    ("Iso-C", "iso_c", {}),
    ("Iso-CTS", "iso_cts", {}),
    ("CART (randomized)", "cart", {"svd": "randomized"}),
    ("CART (exact SVD)", "cart", {"svd": "exact"}),
)
FLAGS = {name: p.flag for name, p in METHOD_PARAMS.items()}


@dataclass
class Row:
    label: str
    method: str
    setting: dict = field(default_factory=dict)
    test: list[float] = field(default_factory=list)  # accuracy per task
    correct: torch.Tensor | None = None  # per test example over all tasks, for paired differences
    command: str = ""
    accuracy: dict | None = None  # the summary of the merge's accuracy record (CART)

    @property
    def mean(self) -> float:
        return sum(self.test) / len(self.test)


def build_models(suite: Suite, folder: Path, *, pretrain_steps: int, fine_tune_steps: int):
    """Pretrain, fine-tune one copy per task, and save every model as a folder with model.safetensors."""
    pretrained = suite.pretrain(pretrain_steps)
    fine_tuned = suite.fine_tune_all(pretrained, fine_tune_steps)
    paths = []
    for name, params in [("pretrained", pretrained)] + [(t.name, p) for t, p in zip(suite.tasks, fine_tuned)]:
        (folder / name).mkdir(parents=True, exist_ok=True)
        save_file(params, str(folder / name / "model.safetensors"), metadata={"format": "pt"})
        paths.append(folder / name)
    heads = {f"{t.name}.head": h.contiguous() for t, h in zip(suite.tasks, suite.heads)}
    save_file(heads, str(folder / "heads.safetensors"))
    return pretrained, fine_tuned, paths[0], paths[1:]


def select_settings(suite: Suite, models, base, grids, device: str) -> dict[str, tuple[dict, list[dict]]]:
    """Each method's best setting on the validation split, and its whole table (with test means for the plots)."""
    chosen = {}
    for method, grid in grids.items():
        test_means: list[float] = []

        def evaluate(state: dict, test_means=test_means) -> float:
            test_means.append(sum(suite.accuracies(state, "test")) / len(suite.tasks))
            return sum(suite.accuracies(state, "val")) / len(suite.tasks)

        seed = {"seed": suite.seed} if REGISTRY[method].param("seed") else {}
        result = ccsmerge.search(
            models, evaluate, method, base if method != "cart" else None, device=device, **seed, **grid
        )
        table = [{**row, "test": t} for row, t in zip(result.table, test_means)]
        chosen[method] = (result.best, table)
    return chosen


def merge_on_disk(
    method: str, setting: dict, options: dict, models, base, out: Path, device: str, seed: int
) -> tuple[Path, str]:
    """Merge the model folders with merge_checkpoints (what `ccsmerge merge`
    runs) and return the output folder and the equivalent command line."""
    spec = REGISTRY[method]
    chosen = {**setting, **({"svd": options["svd"]} if "svd" in options else {})}
    if spec.param("seed"):
        chosen["seed"] = seed
    args = ["merge", "--method", method, *[a for path in models for a in ("--model", str(path))]]
    if spec.needs_base:
        args += ["--base", str(base)]
    for key, value in chosen.items():
        args += [FLAGS[key], value if isinstance(value, str) else repr(value)]
    args += ["--device", device, "--out", str(out), "--overwrite", "--quiet"]
    ccsmerge.merge_checkpoints(
        models, out, method, base=base if spec.needs_base else None, device=device, overwrite=True, **chosen
    )
    return out, "ccsmerge " + " ".join(args)


def load_folder(path: Path) -> dict[str, torch.Tensor]:
    checkpoint = Checkpoint(path)
    return {name: checkpoint.read(name).clone() for name in checkpoint.tensors}


def evaluate_row(suite: Suite, label: str, method: str, encoder, setting=None) -> Row:
    per_task = [suite.correct(encoder, t, "test") for t in range(len(suite.tasks))]
    return Row(label, method, setting or {}, [float(c.float().mean()) for c in per_task], torch.cat(per_task))


def paired_difference(a: Row, b: Row) -> tuple[float, float]:
    """Mean of a - b over all test examples of all tasks (points), and its standard error."""
    d = a.correct.double() - b.correct.double()
    return 100 * float(d.mean()), 100 * float(d.std() / math.sqrt(len(d)))


def run_demo(
    out: str | Path = "ccsmerge-demo",
    *,
    device: str = "auto",
    seed: int = 0,
    quick: bool = False,
    plots: bool = True,
    threads: int = 1,
    log=print,
) -> dict:
    """Run the whole demo into `out`; returns the results (also written to out/results.json).

    The networks are small, so one CPU thread is as fast as several (and much faster on a
    busy machine), and it makes the numbers the same on machines with different core counts."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run_demo(Path(out), str(resolve_device(device)), seed, quick, plots, log)
    finally:
        torch.set_num_threads(previous)


def _run_demo(out: Path, device: str, seed: int, quick: bool, plots: bool, log) -> dict:
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    suite = Suite(seed)
    log(f"pretraining one encoder and fine-tuning it on {len(suite.tasks)} tasks (digits, {seed=})")
    pretrained, fine_tuned, base_path, model_paths = build_models(
        suite, out / "models", pretrain_steps=200, fine_tune_steps=100
    )
    rows = [evaluate_row(suite, "pretrained", "", pretrained)]
    per_task = [suite.correct(m, t, "test") for t, m in enumerate(fine_tuned)]
    rows.append(Row("individual fine-tuned", "", {}, [float(c.float().mean()) for c in per_task], torch.cat(per_task)))

    log("choosing each method's hyper-parameters on the validation split")
    grids = QUICK_GRIDS if quick else GRIDS
    chosen = select_settings(suite, fine_tuned, pretrained, grids, device)
    log("merging from disk with `ccsmerge merge` and evaluating on the test split")
    for label, method, options in ROWS:
        setting = chosen[method][0] if method in chosen else {}
        folder = out / "merged" / (method if "svd" not in options else f"{method}-{options['svd']}")
        folder, command = merge_on_disk(method, setting, options, model_paths, base_path, folder, device, seed)
        row = evaluate_row(suite, label, method, load_folder(folder), setting)
        row.command = command
        if method == "cart":
            row.accuracy = accuracy_record.summary(accuracy_record.read_accuracy(folder))
        rows.append(row)

    results = summarise(suite, rows, chosen, time.perf_counter() - started, device, seed, quick)
    if plots:
        results["plots"] = write_plots(results, out)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    report = markdown_report(results)
    (out / "REPORT.md").write_text(report)
    log(report)
    log(f"wrote {out / 'REPORT.md'} in {results['seconds']:.0f} s")
    return results


def summarise(suite: Suite, rows: list[Row], chosen, seconds: float, device: str, seed: int, quick: bool) -> dict:
    individual = rows[1].test
    cart = next(r for r in rows if r.label == "CART (randomized)")
    exact = next(r for r in rows if r.label == "CART (exact SVD)")
    return {
        "tasks": [t.name for t in suite.tasks],
        "rows": [
            {
                "label": r.label,
                "method": r.method,
                "setting": r.setting,
                "test": r.test,
                "mean": r.mean,
                "normalised": sum(a / b for a, b in zip(r.test, individual)) / len(individual),
                "cart_minus_this": None if r is cart else paired_difference(cart, r),
                "command": r.command,
            }
            for r in rows
        ],
        "randomized_minus_exact": paired_difference(cart, exact),
        # what the randomized merge's ccsmerge-accuracy.json says of its update (accuracy_record.summary)
        "randomized_accuracy": cart.accuracy,
        "sweeps": {method: table for method, (_, table) in chosen.items()},
        "seconds": seconds,
        "seed": seed,
        "quick": quick,
        "threads": torch.get_num_threads(),
        "device": device,
        "torch": torch.__version__,
        "ccsmerge": ccsmerge.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ccsmerge demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    run_from_arguments(parser.parse_args(argv))
    return 0


def run_from_arguments(args: argparse.Namespace) -> dict:
    return run_demo(
        args.out, device=args.device, seed=args.seed, quick=args.quick, plots=not args.no_plots, threads=args.threads
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="ccsmerge-demo", metavar="DIR", help="output folder (default ccsmerge-demo)")
    parser.add_argument("--device", default="auto", help="merge device: auto, cpu, cuda (default auto)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data split, training and merges")
    parser.add_argument("--quick", action="store_true", help="smaller validation grids")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: the networks are small)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
