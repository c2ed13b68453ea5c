"""The built-in example: merge 8 synthetic fine-tunes of a small transformer
with every method, compare CART's randomized engine with the exact SVD, then
save the fine-tunes as Hugging Face model folders and merge them from disk
with `ccsmerge merge` under a small memory budget.

    python -m ccsmerge.example [--device cpu|cuda|auto] [--models 8]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import ccsmerge
from ccsmerge.cli import main as ccsmerge_cli
from ccsmerge.synthetic import fine_tunes, toy_transformer


def relative_update_error(merged: dict, exact: dict, avg: dict) -> float:
    """max over 2-D tensors of ||merged - exact|| / ||exact - avg||."""
    worst = 0.0
    for name, w in exact.items():
        update = (w.double() - avg[name].double()).norm()
        if w.dim() == 2 and update > 0:
            worst = max(worst, float((merged[name].double() - w.double()).norm() / update))
    return worst


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--models", type=int, default=8)
    args = parser.parse_args(argv)

    base = toy_transformer()
    models = fine_tunes(base, args.models)
    params = sum(t.numel() for t in base.values())
    print(f"ccsmerge {ccsmerge.__version__}: {args.models} fine-tunes of a {params / 1e6:.1f}M-parameter model")
    print(f"build: {ccsmerge.build_info()}")

    runs = {
        "average": dict(method="average"),
        "task_arithmetic": dict(method="task_arithmetic", base=base),
        "ties": dict(method="ties", base=base),
        "cart (exact SVD)": dict(method="cart", svd="exact"),
        "cart (randomized)": dict(method="cart"),
    }
    results = {}
    print(f"{'method':<20} {'seconds':>8}")
    for label, kwargs in runs.items():
        start = time.perf_counter()
        results[label] = ccsmerge.merge(models, device=args.device, **kwargs)
        print(f"{label:<20} {time.perf_counter() - start:8.3f}")
    err = relative_update_error(results["cart (randomized)"], results["cart (exact SVD)"], results["average"])
    print(f"cart randomized vs exact: worst relative difference of the update over all matrices = {err:.2%}")
    merge_from_disk(models, results["cart (randomized)"], args.device)


def merge_from_disk(models: list[dict], in_memory: dict, device: str) -> None:
    """The same CART merge through the CLI, streaming from safetensors folders
    with a 20 MB budget (the larger matrices are merged in row blocks)."""
    from safetensors.torch import load_file, save_file

    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, sd in enumerate(models):
            folder = Path(tmp) / f"finetune-{i}"
            folder.mkdir()
            save_file({k: v.contiguous() for k, v in sd.items()}, folder / "model.safetensors")
            (folder / "config.json").write_text(json.dumps({"model_type": "toy-transformer"}))
            paths.append(str(folder))
        out = Path(tmp) / "merged"
        argv = ["merge", "--method", "cart", "--out", str(out), "--max-memory", "20MB", "--device", device]
        argv += ["--out-shard-size", "2MB", "--quiet"] + [a for p in paths for a in ("--model", p)]
        plan = ccsmerge.plan_checkpoints(paths, method="cart", max_memory="20MB")
        blocked = sum(t.block_rows is not None for t in plan.tensors)
        print(f"$ ccsmerge {' '.join(argv[:9])} ... ({len(paths)} x --model)")
        print(f"  {blocked} of {len(plan.tensors)} tensors do not fit the budget whole: merged in row blocks")
        start = time.perf_counter()
        if ccsmerge_cli(argv) != 0:
            raise SystemExit("the streaming merge failed")
        seconds = time.perf_counter() - start
        merged = {}
        for shard in sorted(out.glob("*.safetensors")):
            merged.update(load_file(shard))
        worst = max(
            float((merged[k].double() - v.double()).norm() / v.double().norm().clamp_min(1e-30))
            for k, v in in_memory.items()
        )
        files = sorted(p.name for p in out.iterdir())
        print(f"streamed merge: {seconds:.3f} s, {len(files)} files ({', '.join(files[:3])}, ...)")
        print(f"streamed vs in-memory merge: worst relative difference over all tensors = {worst:.1e}")


if __name__ == "__main__":
    main()
