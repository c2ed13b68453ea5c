"""A merge that is killed, interrupted or runs out of disk never leaves an
output that looks complete, and --resume finishes it with the bytes an
uninterrupted merge writes. Same inputs and seed give the same bytes; runs
release their files and threads."""

from __future__ import annotations

import random
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import ccsmerge
from ccsmerge.streaming import partial_folder
from checkpoints import smallest_budget

MODELS = 4
BLOCKING_BUDGET = "180KB"  # the 64 x 48 matrices are merged in row blocks under it


def write_models(root: Path, count: int) -> list[Path]:
    g = torch.Generator().manual_seed(0)
    base = {f"layers.{i}.weight": torch.randn(64, 48, generator=g) for i in range(count)}
    base.update({f"layers.{i}.bias": torch.randn(48, generator=g) for i in range(count)})
    paths = []
    for t in range(MODELS):
        sd = {name: w + 0.1 * torch.randn(w.shape, generator=g) for name, w in base.items()}
        folder = root / f"model-{t}"
        folder.mkdir()
        save_file(sd, folder / "model.safetensors")
        (folder / "config.json").write_text('{"model_type": "toy"}')
        paths.append(folder)
    return paths


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> list[Path]:
    """Four models of 200 small matrices and 200 biases: many tensors and
    shards, so that a kill lands in the middle of the merge."""
    return write_models(tmp_path_factory.mktemp("inputs"), 200)


@pytest.fixture(scope="module")
def few_inputs(tmp_path_factory) -> list[Path]:
    return write_models(tmp_path_factory.mktemp("few"), 12)


def cli(inputs: list[Path], out: Path, *extra: str) -> list[str]:
    args = [sys.executable, "-m", "ccsmerge", "merge", "--method", "cart", "--device", "cpu", "--quiet"]
    args += ["--out", str(out), "--out-shard-size", "40KB", *extra]
    return args + [a for p in inputs for a in ("--model", str(p))]


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("reference") / "merged"
    subprocess.run(cli(inputs, out), check=True)
    return files(out)


def wait_for(predicate, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def finished_shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("model-*.safetensors"))


def test_kills_at_random_points_then_resume_gives_identical_bytes(inputs, reference, tmp_path):
    rng = random.Random(0)
    for attempt in range(3):
        out = tmp_path / f"merged-{attempt}"
        partial = partial_folder(out)
        process = subprocess.Popen(cli(inputs, out))
        assert wait_for(partial.exists), "the merge never started writing"
        time.sleep(rng.uniform(0.0, 1.0))
        process.send_signal(signal.SIGKILL)
        process.wait()
        if not out.exists():
            # Whatever was in flight, nothing complete-looking is left behind.
            assert partial.exists()
            assert not any(partial.glob("*.index.json"))
            subprocess.run(cli(inputs, out, "--resume"), check=True)
        assert not partial.exists()
        assert files(out) == reference


def test_resume_keeps_the_finished_shards(inputs, reference, tmp_path):
    out = tmp_path / "merged"
    partial = partial_folder(out)
    process = subprocess.Popen(cli(inputs, out))
    assert wait_for(lambda: len(finished_shards(partial)) >= 2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    if out.exists():
        pytest.skip("the merge finished before it could be killed")
    kept = {p.name: p.stat().st_ino for p in finished_shards(partial)}
    subprocess.run(cli(inputs, out, "--resume"), check=True)
    assert files(out) == reference
    for name, inode in kept.items():
        assert (out / name).stat().st_ino == inode  # moved along, not rewritten


def test_ctrl_c_stops_cleanly_and_says_where(inputs, reference, tmp_path):
    out = tmp_path / "merged"
    partial = partial_folder(out)
    process = subprocess.Popen(cli(inputs, out), stderr=subprocess.PIPE, text=True)
    assert wait_for(lambda: len(finished_shards(partial)) >= 1)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    if process.returncode == 0:
        pytest.skip("the merge finished before the interrupt")
    assert process.returncode == 130
    assert "interrupted while merging tensor 'layers." in stderr and "--resume" in stderr
    assert "Traceback" not in stderr
    assert not out.exists()
    assert not list(partial.glob("*.part"))  # the shard being written was removed
    subprocess.run(cli(inputs, out, "--resume"), check=True)
    assert files(out) == reference


def test_a_full_disk_removes_the_partial_output(inputs, tmp_path):
    out = tmp_path / "merged"

    def small_files_only():  # writes past 200 KB fail with EFBIG, like a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    result = subprocess.run(
        cli(inputs, out, "--out-shard-size", "1MB"), preexec_fn=small_files_only, capture_output=True, text=True
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "File too large" in lines[0] and "was removed" in lines[0]
    assert ".safetensors.part" in lines[0]  # names the file
    assert not out.exists() and not partial_folder(out).exists()


def test_same_inputs_and_seed_give_identical_bytes(few_inputs, tmp_path):
    inputs = few_inputs
    kwargs = dict(method="cart", device="cpu", out_shard_size="40KB")
    first = ccsmerge.merge_checkpoints(inputs, tmp_path / "a", seed=7, **kwargs)
    second = ccsmerge.merge_checkpoints(inputs, tmp_path / "b", seed=7, **kwargs)
    blocked = ccsmerge.merge_checkpoints(inputs, tmp_path / "c", seed=7, max_memory=BLOCKING_BUDGET, **kwargs)
    blocked_again = ccsmerge.merge_checkpoints(inputs, tmp_path / "d", seed=7, max_memory=BLOCKING_BUDGET, **kwargs)
    other_seed = ccsmerge.merge_checkpoints(inputs, tmp_path / "e", seed=8, **kwargs)
    plan = ccsmerge.plan_checkpoints(inputs, method="cart", max_memory=BLOCKING_BUDGET)
    assert any(t.block_rows is not None for t in plan.tensors)
    assert files(first) == files(second)
    assert files(blocked) == files(blocked_again)
    # The seed matters: the randomized SVD's update changes (a little) with it.
    assert not torch.equal(weight(first, "layers.3.weight"), weight(other_seed, "layers.3.weight"))


def weight(folder: Path, name: str) -> torch.Tensor:
    for shard in folder.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            if name in f.keys():
                return f.get_tensor(name)
    raise KeyError(name)


def test_merges_release_files_and_threads(few_inputs, tmp_path):
    inputs = few_inputs
    process = psutil.Process()
    ccsmerge.merge_checkpoints(inputs, tmp_path / "warm-up", device="cpu", method="average")
    fds, threads = process.num_fds(), threading.active_count()
    for i in range(3):
        out = tmp_path / f"run-{i}"
        ccsmerge.merge_checkpoints(inputs, out, device="cpu", method="average", max_memory=BLOCKING_BUDGET)
    with pytest.raises(ccsmerge.MergeError):
        ccsmerge.merge_checkpoints(inputs, tmp_path / "run-0", device="cpu", method="average")  # exists: refused
    assert process.num_fds() == fds
    assert threading.active_count() == threads


def test_nonfinite_inputs_are_refused_unless_allowed(tmp_path):
    paths = []
    for t in range(3):
        sd = {"w": torch.full((4, 6), float(t)), "b": torch.zeros(3)}
        if t == 1:
            sd["w"][2, 3] = float("nan")
        path = tmp_path / f"m{t}.safetensors"
        save_file(sd, path)
        paths.append(path)
    with pytest.raises(ccsmerge.MergeError, match=r"tensor 'w': model 1 has NaN or Inf.*m1\.safetensors"):
        ccsmerge.merge_checkpoints(paths, tmp_path / "refused", method="average", device="cpu")
    assert not (tmp_path / "refused").exists() and not partial_folder(tmp_path / "refused").exists()
    out = ccsmerge.merge_checkpoints(paths, tmp_path / "allowed", method="average", device="cpu", allow_nonfinite=True)
    merged = load_file(next(out.glob("*.safetensors")))["w"]
    expected = torch.full((4, 6), 1.0)
    expected[2, 3] = float("nan")
    torch.testing.assert_close(merged, expected, equal_nan=True)
    # CART has no SVD of a matrix holding NaN: with the flag, whole or in row blocks, it is the average.
    blocking = smallest_budget(paths, "cart")
    plan = ccsmerge.plan_checkpoints(paths, max_memory=blocking)
    assert {t.name: t.block_rows for t in plan.tensors}["w"] is not None
    for budget in (None, blocking):
        with pytest.warns(UserWarning, match="tensor 'w': NaN/Inf inputs have no SVD"):
            out = ccsmerge.merge_checkpoints(
                paths, tmp_path / f"cart-{budget}", device="cpu", allow_nonfinite=True, max_memory=budget
            )
        merged = load_file(next(out.glob("*.safetensors")))["w"]
        torch.testing.assert_close(merged, expected, equal_nan=True)
