"""CART-indexing: an index holds θ_avg and every task's rank-k centred
update; exporting task t gives θ_avg + LowRank_k(θ_t − θ_avg), checked
against a float64 truncated SVD written here."""

from __future__ import annotations

import math
import re

import pytest
import torch
from checkpoints import INT_BUFFER, load_output, toy_set, write_set
from reference import ref_truncated
from safetensors import safe_open

import ccsmerge
from ccsmerge.cli import main
from ccsmerge.config import DEFAULT_LOWRANK_EXCLUDE

LOWRANK = "layers.0.mlp.up_proj.weight"


def is_lowrank(name: str, tensor: torch.Tensor) -> bool:
    return tensor.dim() == 2 and not any(re.search(p, name) for p in DEFAULT_LOWRANK_EXCLUDE)


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    root = tmp_path_factory.mktemp("index")
    base, models = toy_set(4, width=32, vocab=48)
    _, paths = write_set(root / "in", base, models)
    index = ccsmerge.build_index(paths, root / "index", rank_ratio=0.25, svd="exact", device="cpu")
    return models, paths, index


@pytest.mark.parametrize("task", [0, 1, 3])
def test_export_task_is_average_plus_the_tasks_low_rank_update(indexed, tmp_path, task):
    models, _, index = indexed
    out = ccsmerge.export_task(index, task, tmp_path / "task", device="cpu")
    got = load_output(out)
    assert got.keys() == models[0].keys()
    for name, tensor in models[0].items():
        if not tensor.is_floating_point():
            assert torch.equal(got[name], tensor)
            continue
        avg = sum(sd[name].double() for sd in models) / len(models)
        if is_lowrank(name, tensor):
            k = max(1, int(0.25 * min(tensor.shape)))
            expected = avg + ref_truncated(models[task][name].double() - avg, k)
            update = (models[task][name].double() - avg).norm()
            assert float((got[name].double() - expected).norm() / update) < 1e-5, name
        else:
            torch.testing.assert_close(got[name].double(), avg, rtol=1e-6, atol=1e-6, msg=name)
    assert (out / "config.json").is_file()


def test_index_holds_average_plus_factors(indexed):
    models, _, index = indexed
    numel = 0
    for shard in index.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            numel += sum(math.prod(f.get_slice(n).get_shape()) for n in f.keys())
    expected = sum(t.numel() for t in models[0].values())
    for name, tensor in models[0].items():
        if is_lowrank(name, tensor) and tensor.is_floating_point():
            m, n = tensor.shape
            expected += len(models) * max(1, int(0.25 * min(m, n))) * (m + n)
    assert numel == expected


def test_bf16_and_cli(tmp_path, capsys):
    base, models = toy_set(3, width=32, vocab=48, dtype=torch.bfloat16)
    _, paths = write_set(tmp_path / "in", base, models)
    model_flags = [a for p in paths for a in ("--model", str(p))]
    assert main(["index", "--out", str(tmp_path / "index"), "--device", "cpu", *model_flags]) == 0
    assert main(["export-task", str(tmp_path / "index"), "--task", "2", "--out", str(tmp_path / "t2")]) == 0
    got = load_output(tmp_path / "t2")
    assert got[LOWRANK].dtype == torch.bfloat16 and got[INT_BUFFER].dtype == torch.int64
    # The exported task is closer to its own fine-tune than the average is.
    avg = sum(sd[LOWRANK].double() for sd in models) / 3
    own = models[2][LOWRANK].double()
    assert (got[LOWRANK].double() - own).norm() < (avg - own).norm()
    assert main(["export-task", str(tmp_path / "index"), "--task", "3", "--out", str(tmp_path / "t3")]) == 1
    assert "task 3 out of range" in capsys.readouterr().err
    assert main(["export-task", str(tmp_path / "in" / "ft0"), "--task", "0", "--out", str(tmp_path / "x")]) == 1
    assert "not a ccsmerge index" in capsys.readouterr().err
    assert not (tmp_path / "t3").exists() and not (tmp_path / "x").exists()
