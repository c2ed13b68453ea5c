"""Tiny Hugging Face-style checkpoints on disk for the streaming, reader and
CLI tests: toy models from ccsmerge.synthetic written in every layout
ccsmerge reads, and helpers that read a merged output folder back with
safetensors alone."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ccsmerge import MergeError
from ccsmerge.sizes import parse_size
from ccsmerge.synthetic import fine_tunes, toy_transformer

# Layouts of one model on disk.
LAYOUTS = ("safetensors", "sharded-safetensors", "bin", "sharded-bin", "file-safetensors", "file-pt")

# Files that travel with the weights; each model gets its own content so that
# a test can tell whose were copied.
AUX_NAMES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")

# An integer buffer: copied, never merged.
INT_BUFFER = "position_ids"


def toy_set(
    count: int = 3,
    *,
    layers: int = 1,
    width: int = 32,
    vocab: int = 64,
    dtype: torch.dtype = torch.float32,
    int_buffer: bool = True,
    seed: int = 0,
):
    """(base, [fine-tuned models]): contiguous state dicts of one toy architecture."""
    base = toy_transformer(layers, width, vocab, seed=seed)
    models = fine_tunes(base, count, seed=seed + 1)
    sds = []
    for sd in [base, *models]:
        sd = {k: v.to(dtype).contiguous() for k, v in sd.items()}
        if int_buffer:
            sd[INT_BUFFER] = torch.arange(vocab, dtype=torch.int64)
        sds.append(sd)
    return sds[0], sds[1:]


def _split(names: list[str], parts: int) -> list[list[str]]:
    size = -(-len(names) // parts)
    return [names[i : i + size] for i in range(0, len(names), size)]


def _index(folder: Path, sd: dict[str, torch.Tensor], shards: list[list[str]], filename, index_name: str) -> None:
    weight_map = {n: filename(i, len(shards)) for i, shard in enumerate(shards) for n in shard}
    total = sum(t.numel() * t.element_size() for t in sd.values())
    (folder / index_name).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))


def write_checkpoint(sd: dict[str, torch.Tensor], path: Path, layout: str = "safetensors", *, label: str = "") -> Path:
    """Save sd under `path` in `layout`; return what to pass to ccsmerge (a
    folder, or the file for the bare-file layouts). Folders get aux files
    whose content names `label`."""
    # Names in sorted order, the order safetensors lists them in, so that every
    # layout presents the tensors in the same order (the output follows it).
    # Cloned: torch.save would store whole shared storages.
    sd = {k: sd[k].clone().contiguous() for k in sorted(sd)}
    names = list(sd)
    if layout == "file-safetensors":
        path.mkdir(parents=True, exist_ok=True)
        save_file(sd, path / "weights.safetensors")
        return path / "weights.safetensors"
    if layout == "file-pt":
        path.mkdir(parents=True, exist_ok=True)
        torch.save(sd, path / "weights.pt")
        return path / "weights.pt"
    path.mkdir(parents=True, exist_ok=True)
    if layout == "safetensors":
        save_file(sd, path / "model.safetensors")
    elif layout == "bin":
        torch.save(sd, path / "pytorch_model.bin")
    elif layout == "sharded-safetensors":
        shards = _split(names, 3)
        name = lambda i, n: f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        for i, shard in enumerate(shards):
            save_file({k: sd[k] for k in shard}, path / name(i, len(shards)))
        _index(path, sd, shards, name, "model.safetensors.index.json")
    elif layout == "sharded-bin":
        shards = _split(names, 2)
        name = lambda i, n: f"pytorch_model-{i + 1:05d}-of-{n:05d}.bin"
        for i, shard in enumerate(shards):
            torch.save({k: sd[k] for k in shard}, path / name(i, len(shards)))
        _index(path, sd, shards, name, "pytorch_model.bin.index.json")
    else:
        raise ValueError(layout)
    for aux in AUX_NAMES:
        (path / aux).write_text(json.dumps({"file": aux, "from": label}))
    (path / "README.md").write_text(f"notes of {label}\n")  # not an aux file: stays behind
    return path


def write_set(root: Path, base, models, layout: str = "safetensors"):
    """(base path, [model paths]) under root."""
    base_path = write_checkpoint(base, root / "base", layout, label="base")
    paths = [write_checkpoint(sd, root / f"ft{i}", layout, label=f"ft{i}") for i, sd in enumerate(models)]
    return base_path, paths


def record_inputs(partial: Path, paths) -> None:
    """What an interrupted merge records beside its recipe in its partial
    folder: the fingerprints of its inputs (paths), which resume checks."""
    from ccsmerge.checkpoint import Checkpoint
    from ccsmerge.output_folder import record_inputs as record

    record(partial, [Checkpoint(p) for p in paths])


def copy_shard_records(merged: Path, partial: Path, shards) -> None:
    """The accuracy records that an interrupted merge leaves beside its finished
    shards, taken from a complete merge of the same inputs (merged)."""
    from ccsmerge import accuracy_record

    weight_map = index_of(merged)["weight_map"]
    count = len(set(weight_map.values()))
    entries = accuracy_record.read_accuracy(merged)
    for shard in shards:
        index = int(Path(shard).name.split("-")[1]) - 1
        mine = [e for e in entries if weight_map.get(re.sub(r"\[\d+\]$", "", e.name)) == Path(shard).name]
        accuracy_record.write_shard_record(partial, index, count, mine)


def index_of(folder: Path) -> dict:
    return json.loads((folder / "model.safetensors.index.json").read_text())


def shard_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("model-*-of-*.safetensors"))


def load_output(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a merged folder, read with safetensors.torch.load_file."""
    out: dict[str, torch.Tensor] = {}
    for shard in shard_files(folder):
        tensors = load_file(shard)
        assert not (tensors.keys() & out.keys()), f"{shard}: a tensor is in two shards"
        out.update(tensors)
    return out


def shard_metadata(shard: Path) -> dict[str, str]:
    with safe_open(shard, framework="pt") as f:
        return f.metadata()


def split_shard(shard: Path) -> tuple[dict, bytes]:
    """(header without __metadata__, data bytes) of a safetensors file, parsed by hand."""
    raw = shard.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    header.pop("__metadata__", None)
    return header, raw[8 + length :]


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """name -> content of every file in a folder (flat, as merged outputs are)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def smallest_budget(paths, method: str = "cart", **options) -> int:
    """The smallest memory budget ccsmerge accepts for these inputs (found by
    bisection on the planner, which refuses smaller ones): at it, the tensor
    that needs the most is merged in one-row blocks. Tests derive their
    budgets from it rather than from the planner's current estimates."""
    import ccsmerge

    def accepted(budget: int) -> bool:
        try:
            ccsmerge.plan_checkpoints(paths, method, max_memory=budget, **options)
            return True
        except ccsmerge.MergeError:
            return False

    low, high = 1, 1 << 20
    while not accepted(high):
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if accepted(mid) else (mid, high)
    return high


def budgets_until_accepted(plan, budget: int, needs: str, slack: int) -> list[str]:
    """Call plan(budget) and, after each refusal, retry at the minimum the
    refusal names (plus slack for the message's rounding) until it is
    accepted. needs: the regex of the refusal, with the tensor name and the
    size as its two groups. Returns the refused tensors, asserting that each
    is refused once: the named minimum is enough for it."""
    refused: list[str] = []
    while True:
        try:
            plan(budget)
            return refused
        except MergeError as exc:
            found = re.search(needs, str(exc))
            assert found, exc
            assert found.group(1) not in refused, exc
            refused.append(found.group(1))
            budget = parse_size(found.group(2)) + slack


# ----------------------------------------------------------------------------- refusals (tests/bad_inputs)


def tree_snapshot(root: Path) -> dict[str, str]:
    """Every entry under root: a regular file's sha256, a link's target, or
    the kind of anything else. Nothing but regular files is opened (a FIFO
    would block) and no link is followed (a loop would never end)."""
    import hashlib
    import os
    import stat

    entries = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                entries[str(path.relative_to(root))] = "link -> " + os.readlink(path)
            elif stat.S_ISREG(mode):
                entries[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                entries[str(path.relative_to(root))] = stat.filemode(mode)
    return entries


def raw_safetensors(header: dict | bytes, data: bytes) -> bytes:
    """A safetensors file by hand: 8-byte little-endian header length, JSON header, data."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def run_main(argv, capsys) -> tuple[int, str, str]:
    """ccsmerge.cli.main in this process: (exit code, stdout, stderr); argparse's exits included."""
    from ccsmerge.cli import main

    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_child(argv, timeout: float = 120, **popen) -> tuple[int, str, str]:
    """`python -m ccsmerge ARGV` in a child process that imports this
    checkout's ccsmerge: (exit code, stdout, stderr). A hang fails the test."""
    import os
    import subprocess
    import sys

    import pytest

    import ccsmerge

    env = dict(os.environ, PYTHONPATH=str(Path(ccsmerge.__file__).resolve().parents[1]))
    try:
        done = subprocess.run(
            [sys.executable, "-m", "ccsmerge", *map(str, argv)],
            capture_output=True, text=True, timeout=timeout, env=env, check=False, **popen,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"ccsmerge {' '.join(map(str, argv))} still running after {timeout} s")
    return done.returncode, done.stdout, done.stderr
