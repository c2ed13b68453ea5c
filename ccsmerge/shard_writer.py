"""Streaming writer of sharded safetensors checkpoints.

The shard layout is planned before any tensor is merged (the output names,
shapes and dtypes are known from the inputs' headers), so each shard's
header is written first and its tensors are then streamed in, whole or row
block by row block: no shard is ever buffered in memory. A shard is written
under a `.part` name and renamed once complete and synced, so a file with a
final name is always whole. The format is the one safetensors reads (an
8-byte little-endian header length, a JSON header padded to 8 bytes, the raw
little-endian data); `safe_open` checks the files in the tests."""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import SAFETENSORS_INDEX, TORCH_TO_SAFETENSORS
from .errors import MergeError

if sys.byteorder != "little":  # safetensors stores little-endian data
    raise ImportError("ccsmerge writes safetensors only on little-endian machines")


@dataclass(frozen=True)
class OutputTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def plan_shards(tensors: list[OutputTensor], max_shard_bytes: int) -> list[list[OutputTensor]]:
    """Tensors in order, cut into shards of at most max_shard_bytes (a bigger tensor gets a shard of its own)."""
    shards: list[list[OutputTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def shard_filename(index: int, count: int) -> str:
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def shard_header(tensors: list[OutputTensor], metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for t in tensors:
        header[t.name] = {
            "dtype": TORCH_TO_SAFETENSORS[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def shard_size(tensors: list[OutputTensor], metadata: dict[str, str]) -> int:
    return len(shard_header(tensors, metadata)) + sum(t.nbytes for t in tensors)


def write_index(folder: Path, shards: list[list[OutputTensor]], metadata: dict[str, str]) -> None:
    weight_map = {t.name: shard_filename(i, len(shards)) for i, shard in enumerate(shards) for t in shard}
    index = {
        "metadata": {"total_size": sum(t.nbytes for shard in shards for t in shard), **metadata},
        "weight_map": dict(sorted(weight_map.items())),
    }
    write_atomically(folder / SAFETENSORS_INDEX, json.dumps(index, indent=2).encode() + b"\n")


def write_atomically(path: Path, data: bytes) -> None:
    part = path.with_name(path.name + ".part")
    try:
        with open(part, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(part, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            part.unlink(missing_ok=True)
        raise named(exc, part) from None


def named(exc: OSError, path: Path) -> OSError:
    """exc, naming path when it names no file (a failed write or flush: a bare ENOSPC names none)."""
    return exc if exc.filename is not None else OSError(exc.errno, exc.strerror, str(path))


class ShardWriter:
    """Writes one shard: its tensors must arrive in plan order, each whole or
    in consecutive row blocks."""

    def __init__(self, path: Path, tensors: list[OutputTensor], metadata: dict[str, str]):
        self.path = path
        self.part = path.with_name(path.name + ".part")
        self.tensors = tensors
        self._next = 0  # index of the tensor being written
        self._written = 0  # bytes of it written so far
        self._file = open(self.part, "wb")
        try:
            self._file.write(shard_header(tensors, metadata))
        except OSError as exc:
            self.abort()
            raise named(exc, self.part) from None

    def write(self, name: str, chunk: torch.Tensor) -> None:
        if self._next >= len(self.tensors):
            raise MergeError(f"{self.path}: tensor '{name}' does not belong in this shard")
        expected = self.tensors[self._next]
        if name != expected.name or chunk.dtype != expected.dtype:
            raise MergeError(
                f"{self.path}: expected tensor '{expected.name}' ({expected.dtype}), got '{name}' ({chunk.dtype})"
            )
        data = chunk.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        if self._written + data.nbytes > expected.nbytes:
            raise MergeError(f"{self.path}: tensor '{name}' got more data than its shape holds")
        try:
            self._file.write(memoryview(data))
        except OSError as exc:  # name the file: a bare ENOSPC does not
            raise named(exc, self.part) from None
        self._written += data.nbytes
        if self._written == expected.nbytes:
            self._next += 1
            self._written = 0

    @property
    def complete(self) -> bool:
        return self._next == len(self.tensors)

    def close(self) -> None:
        """Sync and give the shard its final name; the shard must be complete."""
        if not self.complete:
            raise MergeError(f"{self.path}: closed before tensor '{self.tensors[self._next].name}' was written")
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self.part, self.path)
        except OSError as exc:
            raise named(exc, self.part) from None

    def abort(self) -> None:
        try:
            self._file.close()
        except OSError:  # flushing what is buffered can fail again (a full disk)
            pass
        self.part.unlink(missing_ok=True)

