"""Hostile or unlucky files given to the readers, one table: adapters passed
as models, reserved tensor names, empty models, dtypes a merge would get
wrong (fp8, complex, quantized, sparse, meta), pipes, devices, sockets and
symbolic links where weights should be, and recipes that would hang or
recurse. Each is refused at the command line by `ccsmerge plan` and by
`ccsmerge merge` (the checks run when the inputs are opened, before any
planning): one `ccsmerge: error:` line naming the file (and tensor), exit
code 1, no output, no partial folder, every file under the test folder as it
was. Cases that would block forever run in a child process with a timeout."""

from __future__ import annotations

import json
import os
import socket
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from safetensors.torch import save_file

from ccsmerge.streaming import partial_folder
from checkpoints import raw_safetensors, run_child, run_main, toy_set, tree_snapshot, write_checkpoint

_, MODELS = toy_set(3, width=16, vocab=16)
Q = "layers.0.attn.q_proj.weight"
LORA_A = "base_model.model.layers.0.attn.q_proj.lora_A.weight"
LORA_B = "base_model.model.layers.0.attn.q_proj.lora_B.weight"


class Case(NamedTuple):
    args: list  # after the command: --model flags or a recipe
    expect: list  # fragments of the error line
    blocks: bool = False  # would block forever before the fix: run in a child process


def models(tmp: Path, change: Callable[[int, dict], None] | None = None, layout="safetensors") -> list[Path]:
    """The toy models as tmp/ft0..ft2 after change(i, state dict)."""
    paths = []
    for i, sd in enumerate(MODELS):
        sd = {k: v.clone() for k, v in sd.items()}
        if change is not None:
            change(i, sd)
        paths.append(write_checkpoint(sd, tmp / f"ft{i}", layout, label=f"ft{i}"))
    return paths


def flags(paths) -> list:
    return [a for p in paths for a in ("--model", p)]


def replace_weights(folder: Path, make: Callable[[Path], None]) -> Path:
    """folder's model.safetensors replaced by what make(path) puts there."""
    target = folder / "model.safetensors"
    target.unlink()
    make(target)
    return target


SCENARIOS: dict[str, Callable[[Path], Case]] = {}


def scenario(name: str, **bound):
    def register(builder):
        SCENARIOS[name] = (lambda tmp: builder(tmp, **bound)) if bound else builder
        return builder

    return register


# ----------------------------------------------------------------------------- PEFT adapters


def adapter_weights(i: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    return {LORA_A: torch.randn(4, 16, generator=g), LORA_B: torch.randn(16, 4, generator=g)}


def adapter_folders(tmp, fmt="safetensors", config=None, weights=adapter_weights) -> list[Path]:
    paths = []
    for i in range(3):
        folder = tmp / f"adapter{i}"
        folder.mkdir()
        (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, **(config or {})}))
        if fmt == "safetensors":
            save_file(weights(i), folder / "adapter_model.safetensors")
        else:
            torch.save(weights(i), folder / "adapter_model.bin")
        paths.append(folder)
    return paths


@scenario("adapter-folder", fmt="safetensors")
@scenario("adapter-folder-bin", fmt="bin")
def adapter_folder(tmp, fmt):
    paths = adapter_folders(tmp, fmt)
    return Case(flags(paths), [str(paths[0]), "LoRA adapter", "--base"])


def with_base(tmp, paths) -> list:
    base = models(tmp)[0]
    return flags(paths) + ["--base", base]


@scenario("adapter-dora", key="use_dora", value=True, what="DoRA")
@scenario("adapter-not-lora", key="peft_type", value="IA3", what="IA3 adapter")
@scenario("adapter-unknown-option", key="lora_fancy_mode", value="on", what="not known to ccsmerge")
def adapter_refused_config(tmp, key, value, what):
    paths = adapter_folders(tmp, config={key: value})
    return Case(with_base(tmp, paths), [str(paths[0] / "adapter_config.json"), key if key != "peft_type" else "LORA", what])


@scenario("adapter-shape-mismatch")
def adapter_shape_mismatch(tmp):
    def wide(i):
        g = torch.Generator().manual_seed(i)
        return {LORA_A: torch.randn(4, 17, generator=g), LORA_B: torch.randn(16, 4, generator=g)}

    paths = adapter_folders(tmp, weights=wide)
    return Case(with_base(tmp, paths), [str(paths[0] / "adapter_model.safetensors"), "16 x 17", Q])


@scenario("adapter-for-another-model")
def adapter_for_another_model(tmp):
    def elsewhere(i):
        return {k.replace("layers.0", "layers.9"): v for k, v in adapter_weights(i).items()}

    paths = adapter_folders(tmp, weights=elsewhere)
    return Case(with_base(tmp, paths), [str(paths[0] / "adapter_model.safetensors"), "layers.9", "does not have"])


@scenario("adapter-bare-files")
def adapter_bare_files(tmp):
    tmp.joinpath("adapters").mkdir()
    paths = [tmp / "adapters" / f"a{i}.safetensors" for i in range(3)]
    for i, path in enumerate(paths):
        save_file(adapter_weights(i), path)
    return Case(flags(paths), [str(paths[0]), f"'{LORA_A}'", "LoRA", "merge_and_unload"])


@scenario("lora-factors-in-a-model-folder")
def lora_factors_in_a_model_folder(tmp):
    paths = models(tmp, lambda i, sd: sd.update(adapter_weights(i)))
    return Case(flags(paths), [str(paths[0] / "model.safetensors"), f"'{LORA_A}'", "PEFT adapter"])


# ----------------------------------------------------------------------------- names, emptiness, dtypes


@scenario("reserved-name-in-bin")
def reserved_name_in_bin(tmp):
    paths = models(tmp, lambda i, sd: sd.update({"__metadata__": torch.ones(2)}), layout="bin")
    return Case(flags(paths), [str(paths[0] / "pytorch_model.bin"), "'__metadata__'", "reserved"])


@scenario("no-tensors")
def no_tensors(tmp):
    paths = []
    for i in range(3):
        (tmp / f"ft{i}").mkdir()
        save_file({}, tmp / f"ft{i}" / "model.safetensors")
        paths.append(tmp / f"ft{i}")
    return Case(flags(paths), [str(paths[0] / "model.safetensors"), "no tensors"])


@scenario("no-tensors-only-metadata")
def no_tensors_only_metadata(tmp):
    paths = models(tmp)
    file = replace_weights(paths[1], lambda p: p.write_bytes(raw_safetensors({"__metadata__": {"a": "b"}}, b"")))
    return Case(flags(paths), [str(file), "no tensors"])


@scenario("index-lists-no-tensors")
def index_lists_no_tensors(tmp):
    paths = models(tmp, layout="sharded-safetensors")
    (paths[2] / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {}}))
    return Case(flags(paths), [str(paths[2]), "no tensors"])


@scenario("fp8-e4m3", dtype=torch.float8_e4m3fn, layout="safetensors", shown="F8_E4M3")
@scenario("fp8-e5m2", dtype=torch.float8_e5m2, layout="safetensors", shown="F8_E5M2")
@scenario("fp8-e4m3-in-bin", dtype=torch.float8_e4m3fn, layout="bin", shown="float8_e4m3fn")
def fp8(tmp, dtype, layout, shown):
    def quantize(i, sd):
        sd[Q] = sd[Q].to(dtype)
        sd[Q + "_scale_inv"] = torch.ones(1)

    paths = models(tmp, quantize, layout)
    file = paths[0] / ("model.safetensors" if layout == "safetensors" else "pytorch_model.bin")
    return Case(flags(paths), [str(file), f"'{Q}'", shown, "scale", "dequantize"])


def bin_with(tmp, make_tensor, fragments):
    """.bin models holding one odd tensor; the error names the file, the tensor and fragments."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's deprecation of quantized tensors
        odd = make_tensor()
    paths = models(tmp, layout="bin")
    for path in paths:
        file = path / "pytorch_model.bin"
        state = torch.load(file, weights_only=True)
        torch.save({**state, "odd.weight": odd}, file)
    return Case(flags(paths), [str(paths[0] / "pytorch_model.bin"), "'odd.weight'", *fragments])


BIN_TENSORS = {
    "complex64": (lambda: torch.ones(4, 4, dtype=torch.complex64), ["complex64", "unsupported"]),
    "uint16": (lambda: torch.ones(4, dtype=torch.uint16), ["uint16", "unsupported"]),
    "float8_e8m0fnu": (lambda: torch.ones(4).to(torch.float8_e8m0fnu), ["float8_e8m0fnu", "unsupported"]),
    "sparse": (lambda: torch.eye(4).to_sparse(), ["sparse"]),
    "quantized": (lambda: torch.quantize_per_tensor(torch.ones(4), 0.1, 0, torch.qint8), ["quantized"]),
    "meta": (lambda: torch.empty(4, 4, device="meta"), ["no data", "meta"]),
}
for _name, (_make, _fragments) in BIN_TENSORS.items():
    scenario(f"bin-tensor-{_name}", make_tensor=_make, fragments=_fragments)(bin_with)


@scenario("header-claims-a-huge-shape")
def header_claims_a_huge_shape(tmp):
    paths = models(tmp)
    header = {"w": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 16]}}
    file = replace_weights(paths[1], lambda p: p.write_bytes(raw_safetensors(header, bytes(16))))
    return Case(flags(paths), [str(file), "overflow"])


# ----------------------------------------------------------------------------- not regular files


@scenario("fifo-as-weights")
def fifo_as_weights(tmp):
    paths = models(tmp)
    file = replace_weights(paths[1], os.mkfifo)
    return Case(flags(paths), [str(file), "FIFO", "not a regular file"], blocks=True)


@scenario("fifo-as-a-bare-file")
def fifo_as_a_bare_file(tmp):
    paths = models(tmp, layout="file-safetensors")
    paths[2].unlink()
    os.mkfifo(paths[2])
    return Case(flags(paths), [str(paths[2]), "FIFO"], blocks=True)


@scenario("fifo-as-a-shard")
def fifo_as_a_shard(tmp):
    paths = models(tmp, layout="sharded-safetensors")
    shard = paths[1] / "model-00002-of-00003.safetensors"
    shard.unlink()
    os.mkfifo(shard)
    return Case(flags(paths), [str(paths[1] / "model.safetensors.index.json"), shard.name, "FIFO"])


@scenario("fifo-as-the-index")
def fifo_as_the_index(tmp):
    paths = models(tmp, layout="sharded-safetensors")
    index = paths[1] / "model.safetensors.index.json"
    index.unlink()
    os.mkfifo(index)
    return Case(flags(paths), [str(index), "FIFO"])


@scenario("device-as-weights")
def device_as_weights(tmp):
    paths = models(tmp)
    file = replace_weights(paths[0], lambda p: p.symlink_to("/dev/zero"))
    return Case(flags(paths), [str(file), "character device"])


@scenario("socket-as-weights")
def socket_as_weights(tmp):
    paths = models(tmp)

    def bind(path):
        here = os.getcwd()
        os.chdir(path.parent)  # a relative name: socket paths are limited to about 100 bytes
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.bind(path.name)
        finally:
            os.chdir(here)

    file = replace_weights(paths[0], bind)
    return Case(flags(paths), [str(file), "socket"])


@scenario("symlink-loop-as-model")
def symlink_loop_as_model(tmp):
    paths = models(tmp)
    loop = tmp / "loop"
    loop.symlink_to("loop")
    return Case(flags([paths[0], loop]), [str(loop), "loop of symbolic links"])


@scenario("symlink-loop-as-weights")
def symlink_loop_as_weights(tmp):
    paths = models(tmp)
    file = replace_weights(paths[2], lambda p: p.symlink_to(p.name))
    return Case(flags(paths), [str(file), "loop of symbolic links"])


@scenario("dangling-symlink-as-weights")
def dangling_symlink_as_weights(tmp):
    # As a Hugging Face cache snapshot whose blob is gone.
    paths = models(tmp)
    file = replace_weights(paths[1], lambda p: p.symlink_to("../blobs/0123abcd"))
    return Case(flags(paths), [str(file), "symbolic link", "../blobs/0123abcd", "does not exist"])


@scenario("index-points-at-a-folder")
def index_points_at_a_folder(tmp):
    paths = models(tmp, layout="sharded-safetensors")
    shard = paths[1] / "model-00003-of-00003.safetensors"
    shard.unlink()
    shard.mkdir()
    return Case(flags(paths), [str(paths[1] / "model.safetensors.index.json"), shard.name, "folder"])


# ----------------------------------------------------------------------------- recipes


def recipe_file(tmp: Path, text: str | None = None) -> Path:
    path = tmp / "recipe.yml"
    if text is not None:
        path.write_text(text)
    return path


@scenario("recipe-nested-50000-deep")
def recipe_nested_deep(tmp):
    recipe = recipe_file(tmp, "models: " + "[" * 50_000 + "]" * 50_000 + "\n")
    return Case([recipe], [str(recipe), "nested more than 32 levels deep"])


@scenario("recipe-not-utf8")
def recipe_not_utf8(tmp):
    recipe = recipe_file(tmp)
    recipe.write_bytes(b"merge_method: cart\nmodels: [\xff\xfe]\n")
    return Case([recipe], [str(recipe), "not UTF-8"])


@scenario("recipe-too-large")
def recipe_too_large(tmp):
    recipe = recipe_file(tmp, "merge_method: cart\n" + "#" * (16 * 2**20) + "\n")
    return Case([recipe], [str(recipe), "too large for a merge recipe"])


@scenario("recipe-is-a-fifo")
def recipe_is_a_fifo(tmp):
    recipe = recipe_file(tmp)
    os.mkfifo(recipe)
    return Case([recipe], [str(recipe), "FIFO"], blocks=True)


@scenario("recipe-names-a-hub-id")
def recipe_names_a_hub_id(tmp):
    paths = models(tmp)
    text = f"merge_method: cart\nmodels:\n  - model: {paths[0]}\n  - model: mistralai/Mistral-7B-v0.1\n"
    recipe = recipe_file(tmp, text)
    return Case([recipe], [str(recipe), "mistralai/Mistral-7B-v0.1", "local folders", "huggingface-cli download"])


# ----------------------------------------------------------------------------- the table


@pytest.mark.parametrize("command", ["plan", "merge"])
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_bad_file_is_refused_cleanly(tmp_path, capsys, name, command):
    case = SCENARIOS[name](tmp_path)
    out = tmp_path / "out"
    argv = [command, *case.args, "--device", "cpu"]
    if command == "merge":
        argv += ["--quiet", "--out", out]
    before = tree_snapshot(tmp_path)

    code, stdout, err = run_child(argv, timeout=60) if case.blocks else run_main(argv, capsys)

    assert code == 1, err
    assert stdout == "" and "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ccsmerge: error: "), err
    for fragment in case.expect:
        assert fragment in lines[0], (fragment, lines[0])
    assert tree_snapshot(tmp_path) == before  # inputs untouched, nothing new
    assert not out.exists() and not partial_folder(out).exists()


def test_a_folder_with_a_fifo_beside_the_weights_still_merges(tmp_path, capsys):
    """Only what is read is checked: a FIFO that is not a weight file (here a
    tokenizer file) is left alone, neither opened nor copied."""
    paths = models(tmp_path)
    os.mkfifo(paths[0] / "tokenizer.model")
    code, _, err = run_child(["merge", *flags(paths), "--device", "cpu", "--quiet", "--out", tmp_path / "out"])
    assert code == 0, err
    assert not (tmp_path / "out" / "tokenizer.model").exists()
    assert (tmp_path / "out" / "tokenizer.json").read_text() == (paths[0] / "tokenizer.json").read_text()
