"""Fuzzing the readers of untrusted input: safetensors files, index files,
torch .bin files and YAML recipes. Whatever the bytes, reading either works
(and agrees with safetensors' own loader) or raises MergeError; nothing
else escapes, nothing crashes or hangs.

CCSMERGE_FUZZ_EXAMPLES sets the examples per test (default 150 in CI; the
README gives a longer run)."""

from __future__ import annotations

import json
import os
import pickle
import struct
import tempfile
from pathlib import Path

import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from ccsmerge.checkpoint import Checkpoint
from ccsmerge.errors import MergeError
from ccsmerge.recipe import Recipe, load_recipe

EXAMPLES = int(os.environ.get("CCSMERGE_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=5000,  # a hang fails the test
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I8", "U8", "BOOL", "F8_E4M3", "XX", "", "f32"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
small_ints = st.integers(-4, 64) | st.sampled_from([2**31, 2**40, 2**63 - 1, 2**64])


def read_everything(path: Path) -> dict[str, torch.Tensor] | None:
    """All tensors through Checkpoint, or None when it refuses with MergeError."""
    try:
        ckpt = Checkpoint(path)
        return {name: ckpt.read(name).clone() for name in ckpt.tensors}
    except MergeError:
        return None


@st.composite
def safetensors_bytes(draw) -> bytes:
    """A header of plausible shape (names, dtypes, shapes, offsets all drawn,
    often inconsistent), data, and sometimes a truncation or a flipped byte."""
    header: dict[str, object] = {}
    if draw(st.booleans()):
        string_map = st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=3)
        header["__metadata__"] = draw(string_map | json_values)
    for i in range(draw(st.integers(0, 3))):
        name = draw(st.text(min_size=0, max_size=6)) if draw(st.booleans()) else f"t{i}"
        entry = {
            "dtype": draw(st.sampled_from(DTYPES)),
            "shape": draw(st.lists(small_ints, max_size=3)),
            "data_offsets": draw(st.lists(small_ints, min_size=0, max_size=3)),
        }
        if draw(st.integers(0, 9)) == 0:
            entry = draw(json_values)
        header[name] = entry
    text = json.dumps(header).encode()
    if draw(st.booleans()):
        text += b" " * (-len(text) % 8)
    length = len(text) if draw(st.integers(0, 4)) else draw(st.integers(0, 2**64 - 1))
    blob = struct.pack("<Q", length) + text + draw(st.binary(max_size=96))
    if blob and draw(st.integers(0, 3)) == 0:
        cut = draw(st.integers(0, len(blob)))
        blob = blob[:cut]
    if blob and draw(st.integers(0, 3)) == 0:
        at = draw(st.integers(0, len(blob) - 1))
        blob = blob[:at] + bytes([draw(st.integers(0, 255))]) + blob[at + 1 :]
    return blob


@FUZZ
@given(safetensors_bytes())
def test_safetensors_files_load_or_raise_merge_error(blob):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        path.write_bytes(blob)
        got = read_everything(path)
        if got is not None:
            expected = load_file(path)  # safetensors' own loader: the reference
            assert got.keys() == expected.keys()
            for name, tensor in expected.items():
                assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor)


@FUZZ
@given(st.binary(max_size=256), st.sampled_from([".safetensors", ".bin", ".pt"]))
def test_random_bytes_are_refused(blob, suffix):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"weights{suffix}"
        path.write_bytes(blob)
        got = read_everything(path)
        if got is not None:  # only a (tiny) valid safetensors file can load
            assert suffix == ".safetensors"
            expected = load_file(path)
            assert got.keys() == expected.keys() and all(torch.equal(got[n], t) for n, t in expected.items())


@st.composite
def index_documents(draw):
    """An index: mostly a weight_map with drawn names and targets, sometimes any JSON."""
    if draw(st.integers(0, 4)) == 0:
        return draw(json_values)
    targets = st.sampled_from(["a.safetensors", "missing.safetensors", "../a.safetensors", "/etc/passwd", "", "."])
    weight_map = draw(st.dictionaries(st.sampled_from(["w", "b", "x", ""]), targets | json_values, max_size=4))
    return {"metadata": draw(json_values), "weight_map": weight_map}


@FUZZ
@given(index_documents(), st.booleans())
def test_index_files_load_or_raise_merge_error(document, as_text):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        save_file({"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2)}, folder / "a.safetensors")
        text = json.dumps(document) if as_text else json.dumps(document)[: len(json.dumps(document)) // 2]
        (folder / "model.safetensors.index.json").write_text(text)
        got = read_everything(folder)
        if got is not None:
            shard = load_file(folder / "a.safetensors")
            assert set(got) <= set(shard) and all(torch.equal(got[n], shard[n]) for n in got)


class _Marker:
    """Unpickling this would create a file: weights_only loading must never do it."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@FUZZ
@given(st.integers(0, 3), st.binary(max_size=32))
def test_bin_files_never_run_code(variant, noise):
    with tempfile.TemporaryDirectory() as tmp:
        marker = Path(tmp) / "ran"
        path = Path(tmp) / "pytorch_model.bin"
        payload = {"w": torch.ones(2), "evil": _Marker(str(marker))}
        if variant == 0:
            torch.save(payload, path)
        elif variant == 1:
            path.write_bytes(pickle.dumps(payload))
        elif variant == 2:
            torch.save({"w": torch.ones(2)}, path)
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2] + noise)
        else:
            torch.save([torch.ones(2)], path)
        got = read_everything(path)
        assert not marker.exists()
        assert got is None


recipe_keys = st.sampled_from(
    ["merge_method", "base_model", "models", "parameters", "dtype", "ccsmerge_version", "slices", "weight"]
)
parameter_keys = st.sampled_from(
    ["rank_ratio", "lambda", "density", "svd", "oversample", "power_iters", "seed", "lowrank_include", "lam", "k"]
)


@st.composite
def recipe_documents(draw):
    doc = draw(st.dictionaries(recipe_keys, json_values, max_size=5))
    if draw(st.booleans()):
        doc["merge_method"] = draw(st.sampled_from(["cart", "ties", "average", "task_arithmetic", "slerp", 3]))
        doc["models"] = draw(
            st.lists(st.fixed_dictionaries({"model": st.text(min_size=1, max_size=5)}) | json_values, max_size=4)
        )
        doc["parameters"] = draw(st.dictionaries(parameter_keys, json_values | st.floats(-2, 3), max_size=4))
    return doc


@FUZZ
@given(recipe_documents() | json_values | st.text(max_size=64).map(lambda s: {"raw": s}))
def test_recipes_load_or_raise_merge_error(document):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "recipe.yml"
        if isinstance(document, dict) and set(document) == {"raw"}:
            path.write_text(document["raw"])
        else:
            path.write_text(yaml.safe_dump(document))
        try:
            recipe = load_recipe(path)
        except MergeError:
            return
        assert isinstance(recipe, Recipe) and len(recipe.models) >= 2
