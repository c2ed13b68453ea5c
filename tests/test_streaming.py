"""merge_checkpoints against ccsmerge.merge on the same state dicts: whole
tensors, row blocks under a small memory budget, output dtypes, the files
around the weights (aux files, recipe, index, shards), output safety and
resuming an interrupted merge."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

import ccsmerge
from ccsmerge import MergeError
from ccsmerge.numerics import kth_smallest_magnitude as _kth_smallest_magnitude
from conftest import compute_dtype
from ccsmerge.cli import main
from ccsmerge.synthetic import toy_transformer
from checkpoints import (
    AUX_NAMES,
    INT_BUFFER,
    folder_bytes,
    index_of,
    load_output,
    record_inputs,
    shard_files,
    shard_metadata,
    smallest_budget,
    toy_set,
    write_checkpoint,
    write_set,
)

NEEDS_BASE = ("task_arithmetic", "ties")
CASES = [
    ("average", {}),
    ("task_arithmetic", {}),
    ("ties", {}),
    ("cart", {"svd": "randomized"}),
    ("cart", {"svd": "exact"}),
]
CASE_IDS = ["average", "task_arithmetic", "ties", "cart-randomized", "cart-exact"]


def partial_of(out):
    return out.parent / f".{out.name}.ccsmerge-partial"


def in_memory(models, method, base, **options):
    return ccsmerge.merge(models, method, base=base if method in NEEDS_BASE else None, device="cpu", **options)


def update_rel_err(got, ref, models) -> float:
    """||got - ref|| / ||ref - avg||: the error relative to CART's update, in float64."""
    avg = torch.stack([sd.double() for sd in models]).mean(0)
    return float((got.double() - ref.double()).norm() / (ref.double() - avg).norm())


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """Width-32 toy models (3 fine-tunes and a base) saved as model.safetensors folders."""
    base, models = toy_set(3, width=32, vocab=48)
    base_path, paths = write_set(tmp_path_factory.mktemp("small"), base, models)
    return base, models, base_path, paths


# ----------------------------------------------------------------------------- whole tensors


@pytest.mark.parametrize("method,options", CASES, ids=CASE_IDS)
def test_streaming_equals_in_memory(tmp_path, small, method, options):
    base, models, base_path, paths = small
    # With a base for every method: average and CART read it and leave it out.
    out = ccsmerge.merge_checkpoints(paths, tmp_path / "out", method, base=base_path, device="cpu", **options)
    expected = in_memory(models, method, base, **options)
    got = load_output(out)
    assert got.keys() == expected.keys()
    for name, ref in expected.items():
        assert got[name].dtype == ref.dtype and torch.equal(got[name], ref), name


@pytest.mark.parametrize("method", ["ties", "cart"])
def test_options_reach_the_merge(tmp_path, small, method):
    base, models, base_path, paths = small
    options = dict(lam=1.5, **(dict(density=0.5) if method == "ties" else dict(rank_ratio=0.3, seed=3, power_iters=2, oversample=5)))
    out = ccsmerge.merge_checkpoints(paths, tmp_path / "out", method, base=base_path, device="cpu", **options)
    expected = in_memory(models, method, base, **options)
    default = in_memory(models, method, base)
    got = load_output(out)
    assert all(torch.equal(got[n], expected[n]) for n in expected)
    assert not all(torch.equal(got[n], default[n]) for n in expected)  # the options changed something


def test_sequential_pipeline_gives_the_same_bytes(tmp_path, small):
    _, _, base_path, paths = small
    a = ccsmerge.merge_checkpoints(paths, tmp_path / "a", "ties", base=base_path, device="cpu", out_shard_size="20KB")
    b = ccsmerge.merge_checkpoints(
        paths, tmp_path / "b", "ties", base=base_path, device="cpu", out_shard_size="20KB", overlap=False
    )
    assert folder_bytes(a) == folder_bytes(b)


# ----------------------------------------------------------------------------- row blocks


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16, torch.float64], ids=str)
def wide(request, tmp_path_factory):
    """Width-64 toy models with a 512-token vocabulary, in one floating dtype,
    and a budget that forces row blocks in every method (for CART, of
    low-rank tensors too) yet holds one row block and CART's factors."""
    base, models = toy_set(3, width=64, vocab=512, dtype=request.param)
    base_path, paths = write_set(tmp_path_factory.mktemp("wide"), base, models)
    budget = int(1.2 * smallest_budget(paths, "cart"))
    return base, models, base_path, paths, budget


@pytest.mark.parametrize("method", ["average", "task_arithmetic", "ties", "cart"])
def test_row_blocks_equal_the_in_memory_merge(tmp_path, wide, method):
    base, models, base_path, paths, _ = wide
    dtype = models[0]["lm_head.weight"].dtype
    base_arg = base_path if method in NEEDS_BASE else None
    budget = smallest_budget(paths, method, base=base_arg)  # the neediest tensor in one-row blocks
    plan = ccsmerge.plan_checkpoints(paths, method, base=base_arg, max_memory=budget)
    blocked = {t.name: t for t in plan.tensors if t.block_rows is not None}
    assert blocked, "the budget should force row blocks"
    assert all(t.memory <= plan.budget for t in plan.tensors)
    if method == "cart":
        assert "low-rank" in {t.policy for t in blocked.values()}  # averaged ones: the "average" case
    if method == "ties":
        assert all(t.passes > 1 for t in blocked.values())  # threshold selection passes, then the merge

    out = ccsmerge.merge_checkpoints(paths, tmp_path / "out", method, base=base_arg, max_memory=budget, device="cpu")
    got = load_output(out)
    expected = in_memory(models, method, base)
    for name, ref in expected.items():
        assert got[name].dtype == ref.dtype, name
        t = next(t for t in plan.tensors if t.name == name)
        if method != "cart" or t.policy != "low-rank" or t.block_rows is None:
            assert torch.equal(got[name], ref), name
            continue
        # CART in row blocks: the same randomized SVD with products summed in
        # another order, so equal up to rounding.
        xs = [sd[name] for sd in models]
        g, r = got[name].double(), ref.double()
        if dtype == torch.bfloat16:
            # Both are float32 results rounded to bfloat16: discount one
            # rounding of each, then hold the rest to the float32 tolerance.
            rounding = torch.finfo(dtype).eps / 2 * (g.abs() + r.abs())
            g = r + ((g - r).abs() - rounding).clamp(min=0)
        bound = 1e-10 if dtype == torch.float64 else 1e-4
        assert update_rel_err(g, r, xs) < bound, name


@pytest.mark.parametrize(
    "method,budget", [("average", "60KB"), ("task_arithmetic", "60KB"), ("ties", "60KB"), ("cart", None)]
)
def test_scalar_empty_bool_half_and_4d_tensors(tmp_path, method, budget):
    base, models = toy_set(3, width=32, vocab=48)
    g = torch.Generator().manual_seed(7)
    for sd in [base, *models]:
        sd["logit_scale"] = torch.randn((), generator=g)
        sd["empty.weight"] = torch.zeros(0, 8)
        sd["conv.weight"] = torch.randn(40, 8, 3, 3, generator=g)
        sd["mask"] = torch.tensor([True, False, True])
        sd["half.weight"] = torch.randn(64, 16, generator=g).half()
    base_path, paths = write_set(tmp_path, base, models)
    if budget is not None:
        plan = ccsmerge.plan_checkpoints(paths, method, base=base_path, max_memory=budget)
        assert next(t for t in plan.tensors if t.name == "conv.weight").block_rows is not None
    out = ccsmerge.merge_checkpoints(paths, tmp_path / "out", method, base=base_path, max_memory=budget, device="cpu")
    got = load_output(out)
    for name, ref in in_memory(models, method, base).items():
        assert got[name].dtype == ref.dtype and got[name].shape == ref.shape and torch.equal(got[name], ref), name


def test_exact_svd_refuses_row_blocks(wide):
    _, _, _, paths, budget = wide
    with pytest.raises(MergeError, match="svd='exact'.*randomized") as info:
        ccsmerge.plan_checkpoints(paths, "cart", svd="exact", max_memory=budget)
    assert "mlp" in str(info.value)  # names the tensor (a big low-rank one)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("sizes", [[37], [1, 50, 13], [16, 16, 16, 5]], ids=lambda s: f"blocks{len(s)}")
def test_kth_smallest_magnitude_matches_kthvalue(dtype, sizes):
    g = torch.Generator().manual_seed(sum(sizes))
    T = 3
    numel = sum(sizes)
    data = torch.randn(T, numel, generator=g, dtype=dtype) * torch.logspace(-30, 30, numel, dtype=dtype)
    # Ties, zeros (both signs), duplicated magnitudes of both signs, a subnormal.
    data[0, ::3] = 0.5
    data[0, 1::7] = -0.5
    data[1, : numel // 2] = 0.0
    data[1, numel // 2 :: 2] = -0.0
    odd = data[2, 1::2]
    odd.copy_(-data[2, ::2][: odd.numel()])
    data[2, -1] = torch.finfo(dtype).tiny / 4
    edges = [0]
    for s in sizes:
        edges.append(edges[-1] + s)

    def blocks():
        return (data[:, a:b] for a, b in itertools.pairwise(edges))

    for j in sorted({1, 2, numel // 3 + 1, numel // 2, numel - 1, numel} - {0}):
        got = _kth_smallest_magnitude(blocks, j)
        expected = data.abs().kthvalue(j, dim=1).values
        assert got.dtype == dtype
        assert torch.equal(got, expected), j


# ----------------------------------------------------------------------------- dtypes and files


def test_bfloat16_stays_bfloat16_and_int_buffers_are_copied(tmp_path):
    base, models = toy_set(3, width=32, vocab=48, dtype=torch.bfloat16)
    _, paths = write_set(tmp_path, base, models)
    out = ccsmerge.merge_checkpoints(paths, tmp_path / "out", "cart", device="cpu")
    got = load_output(out)
    expected = in_memory(models, "cart", None)
    for name, ref in expected.items():
        assert got[name].dtype == models[0][name].dtype and torch.equal(got[name], ref), name
    assert got[INT_BUFFER].dtype == torch.int64 and torch.equal(got[INT_BUFFER], models[0][INT_BUFFER])


@pytest.mark.parametrize("method", ["average", "ties", "cart"])
def test_output_dtype_converts_floating_tensors_only(tmp_path, small, method):
    base, models, base_path, paths = small
    out = ccsmerge.merge_checkpoints(paths, tmp_path / "out", method, base=base_path, dtype="float16", device="cpu")
    got = load_output(out)
    expected = in_memory(models, method, base)
    for name, ref in expected.items():
        want = ref.to(torch.float16) if ref.is_floating_point() else ref
        assert got[name].dtype == want.dtype and torch.equal(got[name], want), name
    assert got[INT_BUFFER].dtype == torch.int64


def test_output_dtype_in_row_blocks(tmp_path, wide):
    base, models, base_path, paths, budget = wide
    out_dtype = {torch.float32: torch.bfloat16, torch.bfloat16: torch.float32, torch.float64: torch.float16}[
        models[0]["lm_head.weight"].dtype
    ]
    options = dict(base=base_path, dtype=str(out_dtype).removeprefix("torch."), max_memory=budget)
    plan = ccsmerge.plan_checkpoints(paths, "task_arithmetic", **options)
    assert any(t.block_rows is not None for t in plan.tensors)
    out = ccsmerge.merge_checkpoints(paths, tmp_path / "out", "task_arithmetic", device="cpu", **options)
    got = load_output(out)
    # The merge is computed in the compute dtype and rounded once, to the output
    # dtype: the same as merging the inputs converted to the compute dtype.
    def widened(sd):
        return {k: v.to(compute_dtype(v.dtype)) if v.is_floating_point() else v for k, v in sd.items()}

    for name, ref in in_memory([widened(m) for m in models], "task_arithmetic", widened(base)).items():
        want = ref.to(out_dtype) if ref.is_floating_point() else ref
        assert got[name].dtype == want.dtype and torch.equal(got[name], want), name


@pytest.mark.parametrize("with_base", [True, False])
def test_aux_files_come_from_the_base_or_the_first_model(tmp_path, small, with_base):
    _, _, base_path, paths = small
    out = ccsmerge.merge_checkpoints(paths, tmp_path / "out", "cart", base=base_path if with_base else None)
    source = base_path if with_base else paths[0]
    for name in AUX_NAMES:
        assert (out / name).read_bytes() == (source / name).read_bytes(), name
    shards = [p.name for p in shard_files(out)]
    # Nothing else travels: README.md of the inputs stays behind.
    assert sorted(os.listdir(out)) == sorted(
        [*AUX_NAMES, "ccsmerge.yml", "ccsmerge-accuracy.json", "model.safetensors.index.json", *shards]
    )


def test_recipe_beside_the_output_and_in_every_shard(tmp_path, small):
    _, _, base_path, paths = small
    out = ccsmerge.merge_checkpoints(
        paths, tmp_path / "out", "ties", base=base_path, lam=0.7, density=0.4, out_shard_size="20KB"
    )
    recipe = yaml.safe_load((out / "ccsmerge.yml").read_text())
    assert recipe["merge_method"] == "ties"
    assert recipe["base_model"] == str(base_path.resolve())
    assert [m["model"] for m in recipe["models"]] == [str(p.resolve()) for p in paths]
    assert recipe["parameters"]["lambda"] == 0.7 and recipe["parameters"]["density"] == 0.4
    shards = shard_files(out)
    assert len(shards) > 1
    for shard in shards:
        metadata = shard_metadata(shard)
        assert metadata["format"] == "pt"
        assert json.loads(metadata["ccsmerge_recipe"]) == recipe, shard.name


def test_index_covers_every_tensor(tmp_path, small):
    _, models, _, paths = small
    out = ccsmerge.merge_checkpoints(paths, tmp_path / "out", "cart", out_shard_size="20KB")
    index = index_of(out)
    names = set(models[0])
    assert set(index["weight_map"]) == names
    for shard in shard_files(out):
        with safe_open(shard, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (a safe_open handle, not a dict)
                assert index["weight_map"][name] == shard.name, name
    assert set(index["weight_map"].values()) == {p.name for p in shard_files(out)}
    got = load_output(out)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in got.values())


@pytest.mark.parametrize("size", [10_000, 30_000])
def test_out_shard_size(tmp_path, small, size):
    _, models, _, paths = small
    out = ccsmerge.merge_checkpoints(paths, tmp_path / "out", "average", out_shard_size=size)
    shards = shard_files(out)
    count = len(shards)
    assert count > 2
    assert [p.name for p in shards] == [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    oversized = 0
    for shard in shards:
        sd = load_file(shard)
        data = sum(t.numel() * t.element_size() for t in sd.values())
        if data > size:
            assert len(sd) == 1, shard.name  # only a single tensor bigger than the size gets past it
            oversized += 1
    biggest = max(t.numel() * t.element_size() for t in models[0].values())
    assert (oversized > 0) == (biggest > size)
    assert set(load_output(out)) == set(models[0])


# ----------------------------------------------------------------------------- output safety


def test_existing_output_is_refused_unless_overwrite(tmp_path, small):
    _, models, _, paths = small
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(MergeError, match="overwrite"):
        ccsmerge.merge_checkpoints(paths, out, "average")
    assert os.listdir(out) == ["keep.txt"]
    ccsmerge.merge_checkpoints(paths, out, "average", overwrite=True)
    assert not (out / "keep.txt").exists()
    got = load_output(out)
    assert all(torch.equal(got[n], t) for n, t in in_memory(models, "average", None).items())


def test_failed_overwrite_keeps_the_previous_output(tmp_path, small):
    _, models, _, paths = small
    out = ccsmerge.merge_checkpoints(paths, tmp_path / "out", "average")
    before = folder_bytes(out)
    bad = dict(models[2])
    bad["lm_head.weight"] = torch.full_like(bad["lm_head.weight"], float("nan"))
    bad_path = write_checkpoint(bad, tmp_path / "bad")
    with pytest.raises(MergeError, match="lm_head.weight"):
        ccsmerge.merge_checkpoints([*paths[:2], bad_path], out, "average", overwrite=True)
    assert folder_bytes(out) == before


def test_existing_empty_output_folder_is_used(tmp_path, small):
    _, _, _, paths = small
    (tmp_path / "out").mkdir()
    ccsmerge.merge_checkpoints(paths, tmp_path / "out", "average")
    assert shard_files(tmp_path / "out")


def test_output_onto_an_input_is_refused(tmp_path, small):
    _, models, _, _ = small
    paths = [write_checkpoint(sd, tmp_path / "in" / f"ft{i}") for i, sd in enumerate(models)]
    before = folder_bytes(paths[1])
    for target in (paths[1], tmp_path / "in"):  # the input itself, or a folder holding it
        with pytest.raises(MergeError, match="input") as info:
            ccsmerge.merge_checkpoints(paths, target, "average", overwrite=True)
        assert str(paths[1]) in str(info.value) or str(paths[0]) in str(info.value)
    assert folder_bytes(paths[1]) == before
    single = write_checkpoint(models[0], tmp_path / "file", "file-safetensors")
    with pytest.raises(MergeError, match="input"):
        ccsmerge.merge_checkpoints([single, paths[1]], single, "average", overwrite=True)


@pytest.mark.parametrize("budget", [None, "100KB"], ids=["whole", "row-blocks"])
def test_nan_midway_names_file_and_tensor_and_leaves_no_output(tmp_path, budget):
    base, models = toy_set(3, width=32, vocab=400)
    bad = "lm_head.weight"  # late in the (sorted) output order
    models[1][bad][5, 7] = float("nan")
    _, paths = write_set(tmp_path, base, models)
    out = tmp_path / "out"
    plan = ccsmerge.plan_checkpoints(paths, "average", max_memory=budget, out_shard_size="10KB")
    assert (next(t for t in plan.tensors if t.name == bad).block_rows is None) == (budget is None)
    with pytest.raises(MergeError, match=f"'{bad}'.*NaN") as info:
        ccsmerge.merge_checkpoints(paths, out, "average", max_memory=budget, out_shard_size="10KB")
    assert str(paths[1]) in str(info.value)
    assert not out.exists()
    assert not partial_of(out).exists()  # bad input: nothing worth resuming


def test_int_buffer_that_differs_is_refused(tmp_path):
    base, models = toy_set(3, width=32, vocab=48)
    models[2][INT_BUFFER][0] += 1
    _, paths = write_set(tmp_path, base, models)
    with pytest.raises(MergeError, match=f"'{INT_BUFFER}'.*differs") as info:
        ccsmerge.merge_checkpoints(paths, tmp_path / "out", "average")
    assert str(paths[2]) in str(info.value)
    assert not (tmp_path / "out").exists()


def test_truncated_shard_in_one_input_leaves_no_output(tmp_path, small):
    _, models, _, _ = small
    paths = [write_checkpoint(sd, tmp_path / f"ft{i}", "sharded-safetensors") for i, sd in enumerate(models)]
    shard = sorted(paths[2].glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-64])
    with pytest.raises(MergeError) as info:
        ccsmerge.merge_checkpoints(paths, tmp_path / "out", "cart")
    assert str(shard) in str(info.value)
    assert not (tmp_path / "out").exists() and not partial_of(tmp_path / "out").exists()


# ----------------------------------------------------------------------------- resume


def _stat(path):
    st = path.stat()
    return st.st_ino, st.st_mtime_ns, st.st_size


def test_resume_keeps_finished_shards_and_redoes_the_rest(tmp_path, small):
    _, _, base_path, paths = small
    options = dict(base=base_path, out_shard_size="10KB", device="cpu")
    ref = ccsmerge.merge_checkpoints(paths, tmp_path / "ref", "ties", **options)
    other = ccsmerge.merge_checkpoints(paths, tmp_path / "other", "ties", lam=0.5, **options)
    shards = [p.name for p in shard_files(ref)]
    assert len(shards) >= 5

    # What an interrupted merge leaves: its recipe, finished shards, a shard
    # being written; plus a damaged shard and one from another merge.
    out = tmp_path / "out"
    partial = partial_of(out)
    partial.mkdir()
    shutil.copy2(ref / "ccsmerge.yml", partial)
    record_inputs(partial, [*paths, base_path])
    for name in shards[:2]:
        shutil.copy2(ref / name, partial / name)
    (partial / shards[2]).write_bytes((ref / shards[2]).read_bytes()[:-16])
    shutil.copy2(other / shards[3], partial / shards[3])
    (partial / (shards[4] + ".part")).write_bytes(b"half a shard")
    kept = {name: _stat(partial / name) for name in shards[:2]}
    before = folder_bytes(partial)

    with pytest.raises(MergeError, match="--resume"):
        ccsmerge.merge_checkpoints(paths, out, "ties", **options)
    with pytest.raises(MergeError, match="cannot be resumed"):
        ccsmerge.merge_checkpoints(paths, out, "ties", resume=True, lam=0.5, **options)
    assert folder_bytes(partial) == before  # refusals leave it alone

    ccsmerge.merge_checkpoints(paths, out, "ties", resume=True, **options)
    assert folder_bytes(out) == folder_bytes(ref)
    assert {name: _stat(out / name) for name in shards[:2]} == kept
    assert not partial.exists()


def test_resume_with_another_shard_size_leaves_no_stale_shards(tmp_path, small):
    # The shard size is not part of the recipe: a resume with another one must
    # either be refused or give exactly the uninterrupted output.
    _, _, _, paths = small
    first = ccsmerge.merge_checkpoints(paths, tmp_path / "first", "average", out_shard_size="10KB")
    ref = ccsmerge.merge_checkpoints(paths, tmp_path / "ref", "average", out_shard_size="30KB")
    partial = partial_of(tmp_path / "out")
    partial.mkdir()
    shutil.copy2(first / "ccsmerge.yml", partial)
    record_inputs(partial, paths)
    for shard in shard_files(first)[:2]:
        shutil.copy2(shard, partial / shard.name)
    try:
        out = ccsmerge.merge_checkpoints(paths, tmp_path / "out", "average", out_shard_size="30KB", resume=True)
    except MergeError as exc:
        assert "resume" in str(exc)
        return
    assert sorted(os.listdir(out)) == sorted(os.listdir(ref))
    assert folder_bytes(out) == folder_bytes(ref)


def test_overwrite_discards_an_interrupted_merge(tmp_path, small):
    _, _, _, paths = small
    ref = ccsmerge.merge_checkpoints(paths, tmp_path / "ref", "cart", out_shard_size="10KB")
    partial = partial_of(tmp_path / "out")
    partial.mkdir()
    (partial / "model-00001-of-00099.safetensors").write_bytes(b"stale")
    out = ccsmerge.merge_checkpoints(paths, tmp_path / "out", "cart", out_shard_size="10KB", overwrite=True)
    assert folder_bytes(out) == folder_bytes(ref)
    assert not partial.exists()


@pytest.fixture(scope="module")
def interruptible(tmp_path_factory):
    """Three width-128 fine-tunes of an 8-layer toy model, the CLI flags of an
    exact-SVD merge of them into 100 KB shards (about 60 shards over a few
    tenths of a second, so that it can be stopped between two of them), the
    environment to run it in, and its uninterrupted output."""
    root = tmp_path_factory.mktemp("interruptible")
    base = toy_transformer(8, 128, 64)
    g = torch.Generator().manual_seed(5)
    paths = []
    for i in range(3):
        sd = {k: (v + 0.01 * torch.randn(v.shape, generator=g)).contiguous() for k, v in base.items()}
        paths.append(write_checkpoint(sd, root / f"ft{i}", label=f"ft{i}"))
    flags = ["--svd", "exact", "--out-shard-size", "100KB", "--device", "cpu", "--quiet"]
    for p in paths:
        flags += ["--model", str(p)]
    # One thread in the subprocess and here alike, so that all merges compute
    # the same bits (and a busy machine does not slow OpenMP to a crawl).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with threads(1):
        ref = ccsmerge.merge_checkpoints(paths, root / "ref", "cart", svd="exact", out_shard_size="100KB", device="cpu")
    return flags, env, folder_bytes(ref)


@contextlib.contextmanager
def threads(n):
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def merge_until_a_shard_is_finished(flags, env, out, sig):
    """Run `python -m ccsmerge merge` and send it `sig` once its first shard is
    finished; (exit code, stderr). Skips if it finished first."""
    partial = partial_of(out)
    log = out.parent / "stderr.txt"
    with open(log, "wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ccsmerge", "merge", *flags, "--out", str(out)],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=env,
        )
    sent = False
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and not sent:
            assert time.monotonic() < deadline, "no shard was finished in time"
            if partial.is_dir() and any(partial.glob("model-*.safetensors")):
                proc.send_signal(sig)
                sent = True
            else:
                time.sleep(0.002)
    finally:
        if proc.poll() is None and not sent:
            proc.kill()
        proc.wait(timeout=120)
    if not sent or out.exists():
        assert proc.returncode == 0, log.read_text()
        pytest.skip("the merge finished before it could be interrupted")
    return proc.returncode, log.read_text()


def test_killed_merge_resumes_to_identical_bytes(tmp_path, capsys, interruptible):
    flags, env, ref = interruptible
    out = tmp_path / "out"
    partial = partial_of(out)
    code, _ = merge_until_a_shard_is_finished(flags, env, out, signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert not out.exists() and partial.is_dir()
    finished = sorted(partial.glob("model-*.safetensors"))
    assert finished
    kept = {p.name: _stat(p) for p in finished}

    with threads(1):
        # Neither a plain rerun nor a resume with other options touches the partial merge.
        assert main(["merge", *flags, "--out", str(out)]) != 0
        assert "--resume" in capsys.readouterr().err
        assert main(["merge", *flags, "--rank-ratio", "0.2", "--resume", "--out", str(out)]) != 0
        assert "cannot be resumed" in capsys.readouterr().err
        assert {p.name: _stat(p) for p in sorted(partial.glob("model-*.safetensors"))} == kept

        assert main(["merge", *flags, "--resume", "--out", str(out)]) == 0
    assert folder_bytes(out) == ref
    assert {name: _stat(out / name) for name in kept} == kept  # not rewritten
    assert len(shard_files(out)) > len(kept)
    assert not partial.exists()


def test_ctrl_c_keeps_the_finished_shards_for_resume(tmp_path, interruptible):
    flags, env, ref = interruptible
    out = tmp_path / "out"
    partial = partial_of(out)
    code, err = merge_until_a_shard_is_finished(flags, env, out, signal.SIGINT)
    assert code == 130
    assert len(err.splitlines()) == 1 and err.startswith("ccsmerge: ") and "--resume" in err, err
    assert "Traceback" not in err
    assert not out.exists()
    kept = {p.name: _stat(p) for p in partial.glob("model-*.safetensors")}
    assert kept

    with threads(1):
        assert main(["merge", *flags, "--resume", "--out", str(out)]) == 0
    assert folder_bytes(out) == ref
    assert {name: _stat(out / name) for name in kept} == kept
