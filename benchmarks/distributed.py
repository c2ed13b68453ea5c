"""Wall time of a distributed merge against the number of processes.

The same CART merge from disk, run as one process (torch's default threads)
and under torchrun with 1..N processes of `cores / N` threads each; every
output is checked byte-identical to the single-process one.

    python benchmarks/distributed.py --out benchmarks/results/cpu-2core [--procs 1,2] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import log, table, time_command, upper_median, write_results  # noqa: E402
from machine import describe, load_average, load_ccsmerge, machine_info  # noqa: E402
from outputs import max_relative_difference  # noqa: E402


def write_models(root: Path, models: int, matrices: int, width: int) -> list[Path]:
    g = torch.Generator().manual_seed(0)
    base = {f"layers.{i}.weight": torch.randn(width, width, generator=g) for i in range(matrices)}
    paths = []
    for t in range(models):
        folder = root / f"model-{t}"
        folder.mkdir()
        tuned = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        save_file(tuned, folder / "model.safetensors")
        paths.append(folder)
    return paths


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--procs", default="1,2")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--models", type=int, default=4)
    parser.add_argument("--matrices", type=int, default=32)
    parser.add_argument("--width", type=int, default=768)
    args = parser.parse_args()
    ccsmerge = load_ccsmerge()
    info = machine_info(ccsmerge)
    log(describe(info))
    cores = info["cpu_affinity"] or 1
    procs = [int(p) for p in args.procs.split(",")]

    work = Path(tempfile.mkdtemp(prefix="ccsmerge-dist-"))
    try:
        paths = write_models(work, args.models, args.matrices, args.width)
        model_args = [a for p in paths for a in ("--model", str(p))]
        common = ["--method", "cart", "--device", "cpu", "--quiet", "--out-shard-size", "10MB", *model_args]
        runs: dict[str, list[float]] = {}
        identical: dict[str, list[bool]] = {}
        reference = None
        for _ in range(args.rounds):
            out = work / "single"
            shutil.rmtree(out, ignore_errors=True)
            runs.setdefault("1 process (no torchrun)", []).append(
                time_command([sys.executable, "-m", "ccsmerge", "merge", "--out", str(out), *common], dict(os.environ))
            )
            reference = reference or files(out)
            for n in procs:
                out = work / f"procs-{n}"
                shutil.rmtree(out, ignore_errors=True)
                env = dict(os.environ, OMP_NUM_THREADS=str(max(1, cores // n)))
                command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}"]
                command += ["-m", "ccsmerge", "merge", "--distributed", "--out", str(out), *common]
                label = f"torchrun, {n} process(es) x {max(1, cores // n)} threads"
                runs.setdefault(label, []).append(time_command(command, env))
                same = files(out) == reference
                identical.setdefault(label, []).append(same)
                if not same and max_relative_difference(out, work / "single") > 1e-4:
                    raise SystemExit(f"{n} processes wrote a different merge")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    single = upper_median(runs["1 process (no torchrun)"])
    rows = []
    for label, times in runs.items():
        median = upper_median(times)
        same = identical.get(label)
        bytes_note = "reference" if same is None else ("yes" if all(same) else "no (float rounding)")
        rows.append((label, median, min(times), max(times), single / median, bytes_note))
    result = {
        "machine": info,
        "load_average": load_average(),
        "models": args.models,
        "matrices": args.matrices,
        "width": args.width,
        "rows": [
            dict(zip(("run", "median_s", "min_s", "max_s", "speedup_vs_single", "byte_identical"), r)) for r in rows
        ],
    }
    lines = [
        "# Distributed merges: wall time against processes",
        "",
        f"Machine: {describe(info)}; load average {result['load_average']}.",
        "",
        f"CART of {args.models} models x {args.matrices} fp32 {args.width} x {args.width} matrices, from disk; "
        f"{args.rounds} rounds. Wall time of the whole command (interpreter start, and torchrun's rendezvous, "
        "included). Outputs are byte-identical to the single-process one when each process has as many "
        "threads as it had (the BLAS's summation order depends on its threads); otherwise they agree to "
        "float rounding (checked: relative difference below 1e-4).",
        "",
        table(["run", "median s", "min-max s", "speedup vs 1 process", "byte-identical"],
              [[r[0], f"{r[1]:.2f}", f"{r[2]:.2f}-{r[3]:.2f}", f"{r[4]:.2f}x", r[5]] for r in rows]),
    ]
    write_results(args.out, "distributed", result, "\n".join(lines), echo=True)


if __name__ == "__main__":
    main()
