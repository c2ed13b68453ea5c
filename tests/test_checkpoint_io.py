"""Reading checkpoints from disk (ccsmerge.checkpoint) in every supported
layout, and the merged outputs they give: the same weights in any layout
merge to the same tensors and shard bytes. Bad inputs raise MergeError
naming the file (and the tensor) before any output appears."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import save_file

import ccsmerge
from ccsmerge import MergeError
from ccsmerge.checkpoint import Checkpoint
from checkpoints import (
    AUX_NAMES,
    INT_BUFFER,
    LAYOUTS,
    load_output,
    shard_files,
    split_shard,
    toy_set,
    write_checkpoint,
    write_set,
)

W = "layers.0.attn.q_proj.weight"


@pytest.fixture(scope="module")
def toy():
    return toy_set(3, width=32, vocab=48)


# ----------------------------------------------------------------------------- reading


@pytest.mark.parametrize("layout", LAYOUTS)
def test_reader_sees_every_tensor_with_its_values(tmp_path, toy, layout):
    base, _ = toy
    ckpt = Checkpoint(write_checkpoint(base, tmp_path / "m", layout, label="m"))
    assert set(ckpt.tensors) == set(base)
    for name, expected in base.items():
        info = ckpt.tensors[name]
        assert info.shape == tuple(expected.shape) and info.dtype == expected.dtype, name
        assert info.nbytes == expected.numel() * expected.element_size(), name
        assert torch.equal(ckpt.read(name), expected), name
        if expected.dim():
            rows = expected.shape[0]
            assert torch.equal(ckpt.read_rows(name, 1, rows - 1), expected[1 : rows - 1]), name
    assert ckpt.total_bytes == sum(t.numel() * t.element_size() for t in base.values())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_aux_files_come_from_folders_only(tmp_path, toy, layout):
    base, _ = toy
    ckpt = Checkpoint(write_checkpoint(base, tmp_path / "m", layout, label="m"))
    expected = [] if layout.startswith("file-") else sorted(AUX_NAMES)
    assert sorted(p.name for p in ckpt.aux_files()) == expected


def test_index_file_can_be_given_directly(tmp_path, toy):
    base, _ = toy
    folder = write_checkpoint(base, tmp_path / "m", "sharded-safetensors")
    ckpt = Checkpoint(folder / "model.safetensors.index.json")
    assert set(ckpt.tensors) == set(base)
    assert torch.equal(ckpt.read(W), base[W])


def test_state_dict_wrapper_and_legacy_torch_format(tmp_path, toy):
    base, _ = toy
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {k: v.clone() for k, v in base.items()}}, wrapped)
    legacy = tmp_path / "legacy.bin"
    torch.save({k: v.clone() for k, v in base.items()}, legacy, _use_new_zipfile_serialization=False)
    assert torch.equal(Checkpoint(wrapped).read(W), base[W])
    # The pre-zipfile format cannot be memory-mapped: loaded whole, with a warning.
    with pytest.warns(UserWarning, match="legacy"):
        ckpt = Checkpoint(legacy)
    assert all(torch.equal(ckpt.read(n), t) for n, t in base.items())
    assert torch.equal(ckpt.read_rows(W, 3, 7), base[W][3:7])


# ----------------------------------------------------------------------------- merging from every layout


@pytest.fixture(scope="module")
def reference_output(tmp_path_factory, toy):
    """CART (and TIES) merged from single model.safetensors folders."""
    base, models = toy
    root = tmp_path_factory.mktemp("reference")
    base_path, paths = write_set(root, base, models, "safetensors")
    outs = {}
    for method in ("cart", "ties"):
        outs[method] = ccsmerge.merge_checkpoints(
            paths, root / f"out-{method}", method, base=base_path, out_shard_size="20KB"
        )
    return outs


@pytest.mark.parametrize("method", ["cart", "ties"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_merges_to_the_same_tensors_and_shard_bytes(tmp_path, toy, reference_output, layout, method):
    base, models = toy
    base_path, paths = write_set(tmp_path, base, models, layout)
    out = ccsmerge.merge_checkpoints(paths, tmp_path / "out", method, base=base_path, out_shard_size="20KB")
    expected = ccsmerge.merge(models, method, base=base, device="cpu")
    got = load_output(out)
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    # Same layout of shards; headers differ only in the recorded input paths.
    ref_shards = shard_files(reference_output[method])
    assert [p.name for p in shard_files(out)] == [p.name for p in ref_shards]
    assert len(ref_shards) > 1
    for mine, ref in zip(shard_files(out), ref_shards):
        assert split_shard(mine) == split_shard(ref), mine.name


def test_mixed_layouts_merge_like_one_layout(tmp_path, toy, reference_output):
    base, models = toy
    base_path = write_checkpoint(base, tmp_path / "base", "file-pt")
    paths = [
        write_checkpoint(models[0], tmp_path / "a", "sharded-bin"),
        write_checkpoint(models[1], tmp_path / "b", "file-safetensors"),
        write_checkpoint(models[2], tmp_path / "c", "sharded-safetensors"),
    ]
    out = ccsmerge.merge_checkpoints(paths, tmp_path / "out", "ties", base=base_path, out_shard_size="20KB")
    for mine, ref in zip(shard_files(out), shard_files(reference_output["ties"]), strict=True):
        assert split_shard(mine) == split_shard(ref), mine.name


# ----------------------------------------------------------------------------- bad inputs


def test_missing_path(tmp_path):
    with pytest.raises(MergeError, match="no such file or folder") as info:
        Checkpoint(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(info.value)


def test_folder_without_weights(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    with pytest.raises(MergeError, match="no weights found") as info:
        Checkpoint(tmp_path / "m")
    assert str(tmp_path / "m") in str(info.value)


def test_unsupported_file_type(tmp_path):
    (tmp_path / "weights.txt").write_text("1 2 3")
    with pytest.raises(MergeError, match="not a checkpoint"):
        Checkpoint(tmp_path / "weights.txt")


def test_index_pointing_to_a_missing_shard(tmp_path, toy):
    base, _ = toy
    folder = write_checkpoint(base, tmp_path / "m", "sharded-safetensors")
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    gone = max(weight_map.values())
    (folder / gone).unlink()
    with pytest.raises(MergeError, match="does not exist") as info:
        Checkpoint(folder)
    assert gone in str(info.value) and "model.safetensors.index.json" in str(info.value)
    named = [n for n, f in weight_map.items() if f == gone]
    assert any(f"'{n}'" in str(info.value) for n in named)


def test_index_listing_a_tensor_its_shard_lacks(tmp_path, toy):
    base, _ = toy
    folder = write_checkpoint(base, tmp_path / "m", "sharded-safetensors")
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["ghost.weight"] = index["weight_map"][W]
    index_path.write_text(json.dumps(index))
    with pytest.raises(MergeError, match="'ghost.weight'") as info:
        Checkpoint(folder)
    assert index["weight_map"][W] in str(info.value)


def test_index_pointing_outside_the_folder(tmp_path, toy):
    base, _ = toy
    folder = write_checkpoint(base, tmp_path / "m", "sharded-safetensors")
    save_file({"x": torch.zeros(2)}, tmp_path / "outside.safetensors")
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"][W] = "../outside.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(MergeError, match="outside the folder"):
        Checkpoint(folder)


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_safetensors_file(tmp_path, toy, keep):
    base, _ = toy
    file = write_checkpoint(base, tmp_path / "m", "file-safetensors")
    raw = file.read_bytes()
    file.write_bytes(raw[: int(len(raw) * keep)])
    with pytest.raises(MergeError) as info:
        Checkpoint(file)
    assert str(file) in str(info.value)


def test_truncated_bin_file(tmp_path, toy):
    base, _ = toy
    folder = write_checkpoint(base, tmp_path / "m", "bin")
    file = folder / "pytorch_model.bin"
    file.write_bytes(file.read_bytes()[:-200])
    with pytest.raises(MergeError) as info:
        Checkpoint(folder)
    assert str(file) in str(info.value)


class _CreatesMarker:
    """Unpickling this would create the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_object_in_bin_is_refused_not_executed(tmp_path, toy):
    base, _ = toy
    marker = tmp_path / "was-unpickled"
    folder = tmp_path / "m"
    folder.mkdir()
    file = folder / "pytorch_model.bin"
    torch.save({W: base[W].clone(), "payload": _CreatesMarker(marker)}, file)
    with pytest.raises(MergeError, match="weights_only") as info:
        Checkpoint(folder)
    assert str(file) in str(info.value)
    assert not marker.exists()
    # And through a whole merge.
    with pytest.raises(MergeError):
        ccsmerge.merge_checkpoints([folder, folder], tmp_path / "out")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_non_tensor_entries_in_bin(tmp_path, toy):
    base, _ = toy
    file = tmp_path / "with-step.pt"
    torch.save({W: base[W].clone(), "step": 3}, file)
    with pytest.raises(MergeError, match="'step'.*not a tensor") as info:
        Checkpoint(file)
    assert str(file) in str(info.value)
    listed = tmp_path / "list.pt"
    torch.save([base[W].clone()], listed)
    with pytest.raises(MergeError, match="not a state dict"):
        Checkpoint(listed)


def test_unknown_tensor_name(tmp_path, toy):
    base, _ = toy
    ckpt = Checkpoint(write_checkpoint(base, tmp_path / "m"))
    with pytest.raises(MergeError, match="'nope'"):
        ckpt.read("nope")


def _three(tmp_path, toy, edit):
    """Three fine-tuned folders, the third edited by `edit(sd)`."""
    _, models = toy
    sds = [dict(sd) for sd in models]
    edit(sds[2])
    return [write_checkpoint(sd, tmp_path / f"ft{i}") for i, sd in enumerate(sds)]


def test_tensor_missing_from_one_model(tmp_path, toy):
    paths = _three(tmp_path, toy, lambda sd: sd.pop(W))
    with pytest.raises(MergeError, match=f"'{W}'.*missing") as info:
        ccsmerge.merge_checkpoints(paths, tmp_path / "out")
    assert str(paths[2]) in str(info.value)
    assert not (tmp_path / "out").exists()


def test_extra_tensor_in_one_model(tmp_path, toy):
    paths = _three(tmp_path, toy, lambda sd: sd.update({"extra.weight": torch.zeros(3)}))
    with pytest.raises(MergeError, match="'extra.weight'") as info:
        ccsmerge.merge_checkpoints(paths, tmp_path / "out")
    assert str(paths[2]) in str(info.value)


def test_shape_mismatch(tmp_path, toy):
    paths = _three(tmp_path, toy, lambda sd: sd.update({W: sd[W][:, :-1].contiguous()}))
    with pytest.raises(MergeError, match=f"'{W}'.*shape") as info:
        ccsmerge.merge_checkpoints(paths, tmp_path / "out")
    assert str(paths[2]) in str(info.value) and "(32, 31)" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_dtype_mismatch(tmp_path, toy):
    paths = _three(tmp_path, toy, lambda sd: sd.update({W: sd[W].double()}))
    with pytest.raises(MergeError, match=f"'{W}'.*dtype") as info:
        ccsmerge.plan_checkpoints(paths)
    assert str(paths[2]) in str(info.value) and "float64" in str(info.value)


def test_base_mismatch_is_labelled_as_the_base(tmp_path, toy):
    base, models = toy
    base = dict(base)
    base[W] = base[W][:-1].contiguous()
    base_path, paths = write_set(tmp_path, base, models)
    with pytest.raises(MergeError, match=f"base.*'{W}'") as info:
        ccsmerge.plan_checkpoints(paths, "ties", base=base_path)
    assert str(base_path) in str(info.value)


def test_bad_file_does_not_mask_good_ones(tmp_path, toy):
    # One unreadable input among good ones is named, not the first input.
    _, models = toy
    paths = [write_checkpoint(sd, tmp_path / f"ft{i}", "file-safetensors") for i, sd in enumerate(models)]
    paths[1].write_bytes(b"\x00" * 16)
    with pytest.raises(MergeError) as info:
        ccsmerge.merge_checkpoints(paths, tmp_path / "out")
    assert str(paths[1]) in str(info.value)
    assert str(paths[0]) not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_int_buffer_read_back(tmp_path, toy):
    base, _ = toy
    ckpt = Checkpoint(write_checkpoint(base, tmp_path / "m", "sharded-bin"))
    assert ckpt.tensors[INT_BUFFER].dtype == torch.int64
    assert torch.equal(ckpt.read(INT_BUFFER), base[INT_BUFFER])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # zipfile .bin files are memory-mapped: no legacy warning
        Checkpoint(write_checkpoint(base, tmp_path / "n", "bin"))
