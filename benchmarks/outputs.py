"""Reading merged output folders back, for the benchmarks that compare two tools' or two runs' outputs."""

from __future__ import annotations

from pathlib import Path

import torch


def folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for shard in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def max_relative_difference(a: Path, b: Path) -> float:
    """Largest ||x - y|| / ||y|| over the floating tensors both folders hold."""
    x, y = folder_tensors(a), folder_tensors(b)
    worst = 0.0
    for name in x.keys() & y.keys():
        if x[name].is_floating_point():
            ref = y[name].double()
            worst = max(worst, float((x[name].double() - ref).norm() / ref.norm().clamp_min(1e-30)))
    return worst
