"""Fuzzing the readers of untrusted input: safetensors files, index files,
torch .bin files (tensors of every dtype and layout torch saves), model
folders whose entries are FIFOs, folders or symbolic links, YAML recipes,
sizes, devices and command lines. Whatever the input, reading either works
(and agrees with safetensors' or torch's own loader) or raises MergeError
(ValueError for sizes, argparse's exit for command lines); nothing else
escapes, nothing crashes or hangs, and no FIFO is ever opened.

CCSMERGE_FUZZ_EXAMPLES sets the examples per test (default 150 in CI; the
README gives a longer run)."""

from __future__ import annotations

import contextlib
import decimal
import io
import json
import os
import pickle
import re
import struct
import tempfile
import threading
import time
from pathlib import Path

import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from ccsmerge.checkpoint import MERGEABLE_DTYPES, Checkpoint
from ccsmerge.cli import build_parser
from ccsmerge.devices import parse_device
from ccsmerge.errors import MergeError
from ccsmerge.recipe import Recipe, load_recipe, recipe_arguments
from ccsmerge.sizes import MAX_SIZE, parse_size

EXAMPLES = int(os.environ.get("CCSMERGE_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=5000,  # a hang fails the test
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I8", "U8", "BOOL", "F8_E4M3", "XX", "", "f32"]
DTYPES += ["F8_E5M2", "U16", "C64"]  # refused: fp8 and dtypes the output cannot hold
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


def nested(depth: int) -> dict:
    return {"raw": "merge_method: cart\nmodels: " + "[" * depth + "]" * depth + "\n"}


@FUZZ
@given(
    recipe_documents() | json_values | st.text(max_size=64).map(lambda s: {"raw": s}) | st.integers(0, 999).map(nested)
)
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
        assert isinstance(recipe, Recipe) and len(recipe_arguments(recipe)["models"]) >= 2


# ----------------------------------------------------------------------------- .bin tensors of every kind

TORCH_DTYPES = [
    getattr(torch, name)
    for name in (
        "float32 float16 bfloat16 float64 int8 int16 int32 int64 uint8 uint16 uint32 uint64 bool complex64 "
        "complex128 float8_e4m3fn float8_e5m2 float8_e4m3fnuz float8_e5m2fnuz float8_e8m0fnu"
    ).split()
]
LORA_FACTORS = {"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"}  # PEFT's names, as name parts
tensor_names = st.sampled_from(["w", "b.weight", "__metadata__", "q.lora_A.weight", "q.lora_B.default.weight",
                                "lora_Ab", "x.lora_embedding_A", ""]) | st.text(max_size=6)


@st.composite
def odd_tensors(draw) -> torch.Tensor:
    shape = draw(st.lists(st.integers(0, 3), max_size=3))
    tensor = torch.arange(math_prod(shape), dtype=torch.float32).reshape(shape).to(draw(st.sampled_from(TORCH_DTYPES)))
    kind = draw(st.sampled_from(["dense", "dense", "sparse", "meta", "strided"]))
    if kind == "sparse" and tensor.dim() > 0 and tensor.dtype in (torch.float32, torch.float64, torch.int64):
        return tensor.to_sparse()
    if kind == "meta":
        return torch.empty(shape, dtype=tensor.dtype, device="meta")
    if kind == "strided" and tensor.dim() > 0:
        return tensor[::2]
    return tensor


def math_prod(shape) -> int:
    out = 1
    for n in shape:
        out *= n
    return out


@FUZZ
@given(st.dictionaries(tensor_names, odd_tensors(), min_size=0, max_size=4))
def test_bin_tensors_of_any_dtype_and_layout_load_or_raise_merge_error(state):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pytorch_model.bin"
        torch.save(state, path)
        got = read_everything(path)
        if got is not None:  # then every tensor is a dense, mergeable one, as torch loads it
            expected = torch.load(path, weights_only=True)
            assert got.keys() == expected.keys() and got
            for name, tensor in expected.items():
                assert tensor.dtype in MERGEABLE_DTYPES and tensor.layout == torch.strided
                assert name != "__metadata__" and not LORA_FACTORS & set(name.split("."))
                assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor)


# ----------------------------------------------------------------------------- folders of odd entries


class FifoWatch:
    """Catches any reader of these FIFOs: a thread keeps opening each for
    writing without blocking, which succeeds only while a reader waits in
    open(), and then lets that reader go on (to end of file), so that a
    regression fails the test instead of hanging it."""

    def __init__(self, fifos: list[Path]):
        self.fifos = fifos
        self.opened: list[Path] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.is_set():
            for fifo in self.fifos:
                try:
                    os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
                    self.opened.append(fifo)
                except OSError:  # no reader (ENXIO), or gone
                    pass
            time.sleep(0.02)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


ENTRY_NAMES = [
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "adapter_config.json",
    "a.safetensors", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
]
ENTRY_KINDS = ["file", "file", "fifo", "folder", "loop", "dangling", "link-to-file"]


def make_entry(folder: Path, name: str, kind: str, shard: int) -> None:
    path = folder / name
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    elif kind == "loop":
        path.symlink_to(name)
    elif kind == "dangling":
        path.symlink_to("../blobs/gone")
    else:
        real = path if kind == "file" else folder / f".blob-{name}"
        if name.endswith(".index.json"):
            weight_map = {"w": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
            real.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        elif name.endswith(".safetensors"):
            save_file({"w" if shard != 2 else "b": torch.full((2, 3), float(shard))}, real)
        elif name.endswith(".bin"):
            torch.save({"w": torch.ones(2, 3)}, real)
        else:
            real.write_text(json.dumps({"peft_type": "LORA"}))
        if kind == "link-to-file":
            path.symlink_to(real.name)


@FUZZ
@given(st.dictionaries(st.sampled_from(ENTRY_NAMES), st.sampled_from(ENTRY_KINDS), min_size=1), st.data())
def test_folders_of_odd_entries_load_or_raise_merge_error_and_never_open_a_fifo(entries, data):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        folder.mkdir()
        for name, kind in entries.items():
            make_entry(folder, name, kind, shard=2 if name.startswith("model-00002") else 1)
        target = folder / data.draw(st.sampled_from(["", *entries]))  # the folder or one entry as a bare path
        fifos = [folder / n for n, k in entries.items() if k == "fifo"]
        with FifoWatch(fifos) as watch:
            got = read_everything(target)
        assert watch.opened == []
        if got is not None:
            assert got and all(t.dtype == torch.float32 for t in got.values())
            assert "adapter_config.json" not in entries or target != folder


# ----------------------------------------------------------------------------- sizes, devices, command lines

_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
size_texts = st.from_regex(r"\A\s?\d{0,30}(\.\d{0,30})?\s?(|B|KB|kb|MB|GB|TB|KiB|MiB|GiB|TiB|EB|x)\s?\Z")
size_texts |= st.text(max_size=12)


@FUZZ
@given(size_texts | st.integers(-5, 2**70))
def test_sizes_parse_exactly_or_raise_value_error(text):
    try:
        got = parse_size(text)
    except ValueError:
        got = None
    # The reference: decimal arithmetic with room for every digit.
    expected = None
    match = re.fullmatch(r"\s*(\d+\.?\d*|\.\d+)\s*([a-zA-Z]*)\s*", text) if isinstance(text, str) else None
    if isinstance(text, int):
        expected = text if 0 < text <= MAX_SIZE else None
    elif match and match.group(2).lower() in _SIZE_UNITS:
        with decimal.localcontext(decimal.Context(prec=200)):
            value = int(decimal.Decimal(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])
        expected = value if 0 < value <= MAX_SIZE else None
    assert got == expected, (text, got, expected)


@FUZZ
@given(st.from_regex(r"\A(cpu|cuda|gpu|CUDA|mps|meta)(:-?\d{0,24})?\Z") | st.text(max_size=10))
def test_devices_parse_or_raise_merge_error(text):
    try:
        device = parse_device(text)
    except MergeError:
        return
    assert device.type in ("cpu", "cuda")
    if text == "auto":
        return
    kind, _, index = text.partition(":")
    assert device.type == kind and (device.index == int(index) if index else device.index is None)


ARGV_WORDS = [
    "merge", "plan", "search", "index", "export-task", "--model", "--model=A", "--mod", "A", "B", "r.yml", "--base",
    "--rank_ratio", "--rank-ratio", "0.1", "--", "-x", "--out", "o", "--device", "gpu", "--evaluate", "m:f",
    "--max_memory", "--lam", "nan", "--task", "1", "--method", "slerp", "cart", "", "-h",
]


@FUZZ
@given(st.lists(st.sampled_from(ARGV_WORDS) | st.text(max_size=6), max_size=10))
def test_command_lines_parse_or_exit_with_a_usage_error(argv):
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as exc:
            if exc.code == 0:  # --help
                return
            message = stderr.getvalue()
            assert exc.code == 2 and message.startswith("usage: ccsmerge") and ": error: " in message, message
            return
    assert args.command in ("merge", "plan", "search", "index", "export-task", "demo")
