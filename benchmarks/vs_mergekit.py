"""ccsmerge merge against mergekit on the same checkpoints: wall time and
peak RSS, with the time to read the inputs once (a warm `cat`) as the floor.

Run it in an environment with both installed (`pip install
--no-build-isolation -e '.[mergekit]'`). T fine-tunes of a Llama-shaped
model are generated with transformers; each merge runs in a fresh process
under /usr/bin/time, in interleaved rounds; the methods are configured to
compute the same merge in both tools (linear = average; task arithmetic
with weight lam per model; TIES with density and lam).

    python benchmarks/vs_mergekit.py --out benchmarks/results/cpu-2core [--hidden 1024 --layers 8 --models 4]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import log, table, time_command_rss, upper_median, write_results  # noqa: E402
from machine import describe, load_average, load_ccsmerge, machine_info  # noqa: E402
from outputs import max_relative_difference  # noqa: E402


def make_models(root: Path, hidden: int, layers: int, models: int) -> tuple[Path, list[Path]]:
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=8000,
        hidden_size=hidden,
        intermediate_size=int(hidden * 2.6875),
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 128),
        num_key_value_heads=max(1, hidden // 128),
        torch_dtype="bfloat16",
    )
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    base.save_pretrained(root / "base")
    paths = []
    for t in range(models):
        with torch.no_grad():
            state = {k: v + 0.01 * torch.randn_like(v) for k, v in base.state_dict().items()}
        tuned = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
        tuned.load_state_dict(state)
        tuned.save_pretrained(root / f"ft{t}")
        paths.append(root / f"ft{t}")
    return root / "base", paths


def mergekit_config(path: Path, method: str, base: Path, models: list[Path], lam: float, density: float) -> None:
    lines = []
    if method == "average":
        lines += ["merge_method: linear", "models:"]
        lines += [f"  - model: {p}\n    parameters: {{weight: 1.0}}" for p in models]
    elif method == "task_arithmetic":
        lines += ["merge_method: task_arithmetic", f"base_model: {base}", "models:"]
        lines += [f"  - model: {p}\n    parameters: {{weight: {lam}}}" for p in models]
        lines += ["parameters: {normalize: false}"]
    else:
        lines += ["merge_method: ties", f"base_model: {base}", "models:"]
        lines += [f"  - model: {p}\n    parameters: {{weight: {lam}, density: {density}}}" for p in models]
        lines += ["parameters: {normalize: false}"]
    lines += ["dtype: bfloat16"]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--models", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    ccsmerge = load_ccsmerge()
    info = machine_info(ccsmerge)
    import mergekit  # noqa: F401  (fail early without it)
    from importlib.metadata import version

    log(f"{describe(info)} mergekit {version('mergekit')}")
    work = Path(tempfile.mkdtemp(prefix="ccsmerge-vs-mergekit-"))
    rows = []
    try:
        base, paths = make_models(work, args.hidden, args.layers, args.models)
        inputs = [f for p in paths for f in sorted(p.glob("*.safetensors"))]
        input_gb = sum(f.stat().st_size for f in inputs) / 1e9
        cat = ["bash", "-c", "cat " + " ".join(map(str, inputs)) + " > /dev/null"]
        time_command_rss(cat)
        lam, density = 0.3, 0.2
        mergekit_yaml = str(Path(sys.executable).parent / "mergekit-yaml")  # the console script beside python
        results: dict[tuple[str, str], list[tuple[float, float]]] = {}
        differences: dict[str, float] = {}
        for _ in range(args.rounds):
            results.setdefault(("cat (the floor)", ""), []).append(time_command_rss(cat))
            for method in ("average", "task_arithmetic", "ties"):
                out, mk_out = work / "out", work / "mergekit-out"
                config = work / f"{method}.yml"
                mergekit_config(config, method, base, paths, lam, density)
                shutil.rmtree(mk_out, ignore_errors=True)
                mk_command = [mergekit_yaml, str(config), str(mk_out)]
                results.setdefault((method, "mergekit"), []).append(time_command_rss(mk_command))
                shutil.rmtree(out, ignore_errors=True)
                command = [sys.executable, "-m", "ccsmerge", "merge", "--method", method, "--quiet", "--device", "cpu"]
                if method != "average":
                    command += ["--base", str(base), "--lam", str(lam), "--density", str(density)]
                command += [a for p in paths for a in ("--model", str(p))] + ["--out", str(out)]
                results.setdefault((method, "ccsmerge"), []).append(time_command_rss(command))
                differences[method] = max_relative_difference(out, mk_out)
        for (method, tool), runs in results.items():
            seconds = upper_median([r[0] for r in runs])
            rows.append({"method": method, "tool": tool, "seconds": seconds, "peak_rss_gb": max(r[1] for r in runs)})
    finally:
        shutil.rmtree(work, ignore_errors=True)

    floor = next(r["seconds"] for r in rows if r["tool"] == "")
    by = {(r["method"], r["tool"]): r for r in rows}
    cells = []
    for method in ("average", "task_arithmetic", "ties"):
        mk, cc = by[(method, "mergekit")], by[(method, "ccsmerge")]
        cells.append([method, f"{mk['seconds']:.2f}", f"{cc['seconds']:.2f}", f"{cc['seconds'] / mk['seconds']:.2f}x",
                      f"{cc['seconds'] / floor:.1f}x", f"{mk['peak_rss_gb']:.2f}", f"{cc['peak_rss_gb']:.2f}",
                      f"{differences[method]:.1e}"])
    lines = [
        "# ccsmerge merge vs mergekit on the same checkpoints",
        "",
        f"Machine: {describe(info)}; mergekit {version('mergekit')}; load average {load_average()}.",
        "",
        f"{args.models} bf16 fine-tunes of a Llama-shaped model (hidden {args.hidden}, {args.layers} layers), "
        f"{input_gb:.2f} GB of input; each merge in a fresh process (interpreter start and imports included), "
        f"median of {args.rounds} interleaved rounds; peak RSS from /usr/bin/time. Both tools at their defaults "
        "(mergekit on the CPU; ccsmerge with its default budget).",
        "",
        table(["method", "mergekit s", "ccsmerge s", "ccsmerge / mergekit", "ccsmerge / cat", "mergekit RSS GB",
               "ccsmerge RSS GB", "outputs differ by"], cells),
        "",
        f"cat of the inputs (warm page cache): {floor:.2f} s. `outputs differ by`: the largest relative "
        "difference of a tensor between the two tools' outputs (bf16 rounding is ~4e-3).",
    ]
    write_results(args.out, "vs_mergekit", {"machine": info, "input_gb": input_gb, "rows": rows,
                                            "differences": differences}, "\n".join(lines), echo=True)


if __name__ == "__main__":
    main()
