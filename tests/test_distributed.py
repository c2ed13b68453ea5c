"""Distributed merges (torchrun, gloo on localhost): N processes write the
same bytes as one; a failing rank fails the job with its error and leaves no
output; --resume works across ranks."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkpoints import copy_shard_records, record_inputs, toy_set, write_set

import ccsmerge
from ccsmerge.distributed import assign_shards, shard_costs
from ccsmerge.streaming import partial_folder

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")


def torchrun(nproc: int, args: list[str]) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    command += ["-m", "ccsmerge", "merge", "--distributed", "--quiet", "--device", "cpu", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    base, models = toy_set(4, layers=2, width=48, vocab=96)
    base_path, paths = write_set(tmp_path_factory.mktemp("inputs"), base, models)
    return base_path, paths


def merge_args(paths, out: Path, *extra: str) -> list[str]:
    return ["--out", str(out), "--out-shard-size", "20KB", *extra] + [a for p in paths for a in ("--model", str(p))]


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def single(inputs, tmp_path_factory) -> Path:
    """One process with the threads each distributed process gets (one): a
    CPU BLAS's summation order depends on its thread count."""
    _, paths = inputs
    out = tmp_path_factory.mktemp("single") / "merged"
    command = [sys.executable, "-m", "ccsmerge", "merge", "--quiet", "--device", "cpu", "--method", "cart"]
    subprocess.run(command + merge_args(paths, out), check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    return out


@pytest.mark.parametrize("nproc", [2, 3])
def test_processes_write_the_bytes_of_one(inputs, single, tmp_path, nproc):
    _, paths = inputs
    out = tmp_path / "merged"
    result = torchrun(nproc, merge_args(paths, out, "--method", "cart"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert files(out) == files(single)
    assert not partial_folder(out).exists()


def test_a_failing_rank_fails_the_job_and_leaves_no_output(tmp_path):
    base, models = toy_set(3, layers=2, width=32, vocab=48)
    models[1]["layers.1.mlp.up_proj.weight"][5, 5] = float("nan")
    _, paths = write_set(tmp_path / "in", base, models)
    out = tmp_path / "merged"
    result = torchrun(2, merge_args(paths, out, "--out-shard-size", "2KB"))
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("ccsmerge: error:")]
    # Every rank fails with the error; torchrun may stop the others before they print it.
    assert 1 <= len(errors) <= 2
    assert all("layers.1.mlp.up_proj.weight" in e and "NaN" in e for e in errors)
    assert all(str(paths[1]) in e for e in errors)
    assert not out.exists() and not partial_folder(out).exists()


def test_resume_across_ranks(inputs, single, tmp_path):
    _, paths = inputs
    out = tmp_path / "merged"
    partial = partial_folder(out)
    # An interrupted merge: the recipe and the first two shards are finished.
    partial.mkdir()
    shutil.copy(single / "ccsmerge.yml", partial)
    record_inputs(partial, paths)
    kept = sorted(single.glob("model-*.safetensors"))[:2]
    for shard in kept:
        shutil.copy(shard, partial)
    copy_shard_records(single, partial, kept)  # what the interrupted run left beside them
    inodes = {p.name: (partial / p.name).stat().st_ino for p in kept}
    result = torchrun(2, merge_args(paths, out, "--method", "cart", "--resume"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert files(out) == files(single)
    assert {name: (out / name).stat().st_ino for name in inodes} == inodes  # kept, not rewritten


def test_without_a_process_group_distributed_is_refused(inputs, tmp_path, monkeypatch):
    _, paths = inputs
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ccsmerge.MergeError, match="torchrun"):
        ccsmerge.merge_checkpoints(paths, tmp_path / "out", distributed=True, device="cpu")
    assert not (tmp_path / "out").exists()


def test_shard_assignment_balances_cost(inputs):
    _, paths = inputs
    plan = ccsmerge.plan_checkpoints(paths, "cart", out_shard_size="20KB")
    costs = shard_costs(plan)
    for world in (1, 2, 3, 5):
        owner = assign_shards(plan, world)
        assert owner == assign_shards(plan, world)  # the same on every rank
        assert len(owner) == len(plan.shards) and set(owner) <= set(range(world))
        loads = [sum(c for c, o in zip(costs, owner) if o == r) for r in range(world)]
        # Greedy longest-first: no rank exceeds the average by more than the largest shard.
        assert max(loads) <= sum(costs) / world + max(costs) + 1e-12
        if len(plan.shards) >= world:
            assert set(owner) == set(range(world))
