"""Lazy, read-only access to checkpoints on disk.

A checkpoint is a Hugging Face model folder (model.safetensors, sharded
safetensors with model.safetensors.index.json, pytorch_model.bin or its
sharded form) or a single .safetensors / .pt / .bin file. Opening one reads
only headers: names, shapes and dtypes. Tensors are read one at a time, or
row block by row block, and come back as zero-copy views of the file where
the format allows (memory-mapped), so that releasing a tensor releases its
memory."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import MergeError

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
TORCH_INDEX = "pytorch_model.bin.index.json"
TORCH_SINGLE = "pytorch_model.bin"
TORCH_SUFFIXES = (".bin", ".pt", ".pth")

# safetensors dtype names <-> torch dtypes.
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
TORCH_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_DTYPES.items()}
# fp8 weights come with scale tensors (weight_scale_inv, ...) that a merge
# would treat as ordinary tensors: merging the codes and the scales apart is
# not a merge of the weights they encode.
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
MERGEABLE_DTYPES = frozenset(TORCH_TO_SAFETENSORS) - set(FP8_DTYPES)
# The safetensors header keeps this key for the file's metadata: a tensor so
# named would overwrite it in the output.
RESERVED_NAMES = ("__metadata__",)

# PEFT adapters: their config file, and the names of LoRA factors.
ADAPTER_CONFIG = "adapter_config.json"
_LORA_FACTOR = re.compile(r"(^|\.)lora_(A|B|embedding_A|embedding_B)(\.|$)")
_ADAPTER_ADVICE = (
    "an adapter is merged as a model by `ccsmerge merge` (give the adapter folder as --model and the model "
    "it adapts as --base); elsewhere merge it into its base first (with peft: "
    "PeftModel.from_pretrained(base, adapter).merge_and_unload(), then save_pretrained)"
)
# A Hugging Face Hub id: "org/name".
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")

# A tokenizer's files in a model folder.
TOKENIZER_PATTERNS = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab*",
    "merges.txt",
    "chat_template*",
    "*.tiktoken",
    "spiece.model",
    "sentencepiece*.model",
)
# Files of a model folder that travel with the merged weights.
AUX_PATTERNS = (
    "config.json",
    "generation_config.json",
    *TOKENIZER_PATTERNS,
    "preprocessor_config.json",
    "processor_config.json",
)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


class Checkpoint:
    """One model on disk: `tensors` maps names (in file order) to TensorInfo."""

    def __init__(self, path: str | Path, *, lora_factors: bool = False):
        self.path = Path(path)
        self.folder, files, weight_map = _resolve(self.path)
        self.files = files
        self.tensors: dict[str, TensorInfo] = {}
        self._eager: dict[Path, dict[str, torch.Tensor]] = {}
        for file in files:
            wanted = None if weight_map is None else {n for n, f in weight_map.items() if f == file}
            infos = _safetensors_infos(file) if file.suffix == ".safetensors" else self._torch_infos(file)
            if wanted is not None:
                missing = sorted(wanted - infos.keys())
                if missing:
                    raise MergeError(f"{file}: tensor '{missing[0]}' is listed in the index but not in the file")
                infos = {n: i for n, i in infos.items() if n in wanted}
            for name, info in infos.items():
                if name in self.tensors:
                    raise MergeError(f"{file}: tensor '{name}' is also in {self.tensors[name].file}")
                _check_mergeable(info, lora_factors)
                self.tensors[name] = info
        if not self.tensors:
            where = files[0] if len(files) == 1 else self.path
            raise MergeError(f"{where}: holds no tensors (a model to merge needs its weights)")

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self.tensors)} tensors)"

    @property
    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self.tensors.values())

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise MergeError(f"{self.path}: no tensor '{name}'") from None

    def read(self, name: str) -> torch.Tensor:
        """The whole tensor, on the CPU (a view of the memory-mapped file where possible)."""
        return self._read(self.info(name), None)

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows start:stop (along dim 0) of a tensor with at least one dimension."""
        return self._read(self.info(name), (start, stop))

    def held_itemsize(self, name: str) -> int:
        """Bytes an element of `name` holds while it is read (a view of the file's)."""
        return self.info(name).dtype.itemsize

    def aux_files(self, patterns: tuple[str, ...] = AUX_PATTERNS) -> list[Path]:
        """Config, tokenizer and generation files beside the weights (none for a bare file)."""
        return folder_files(self.folder, patterns, self.files)

    def _read(self, info: TensorInfo, rows: tuple[int, int] | None) -> torch.Tensor:
        try:
            if info.file.suffix == ".safetensors":
                with safe_open(info.file, framework="pt") as f:
                    if rows is None:
                        tensor = f.get_tensor(info.name)
                    else:
                        tensor = f.get_slice(info.name)[rows[0] : rows[1]]
            else:
                state = self._eager.get(info.file) or _torch_load(info.file, mmap=True)
                tensor = state[info.name]
                if rows is not None:
                    tensor = tensor[rows[0] : rows[1]]
        except MergeError:
            raise
        except Exception as exc:  # the libraries raise many types for damaged files
            raise MergeError(f"{info.file}: cannot read tensor '{info.name}': {exc}") from None
        if tuple(tensor.shape[1:]) != info.shape[1:] or tensor.dtype != info.dtype:
            raise MergeError(f"{info.file}: tensor '{info.name}' does not match its header")
        return tensor

    def _torch_infos(self, file: Path) -> dict[str, TensorInfo]:
        try:
            state = _torch_load(file, mmap=True)
        except _NotZipfile:
            state = _torch_load(file, mmap=False)
            warnings.warn(f"{file} is in torch's legacy format, which cannot be memory-mapped: it is loaded whole")
            self._eager[file] = state
        for name, t in state.items():
            if t.layout != torch.strided:
                raise MergeError(f"{file}: tensor '{name}' is a sparse tensor ({t.layout}); only dense tensors merge")
            if t.is_quantized:
                raise MergeError(f"{file}: tensor '{name}' is quantized ({t.dtype}); dequantize the checkpoint first")
            if t.device.type != "cpu":  # a meta tensor: a shape without data
                raise MergeError(f"{file}: tensor '{name}' holds no data (it is on the {t.device.type} device)")
        return {name: TensorInfo(name, tuple(t.shape), t.dtype, file) for name, t in state.items()}


def folder_files(folder: Path | None, patterns: tuple[str, ...], weights=()) -> list[Path]:
    """The regular files of a folder matching patterns, weights and indexes left out."""
    if folder is None:
        return []
    found = {p for pattern in patterns for p in folder.glob(pattern) if p.is_file()}
    return sorted(p for p in found if p not in weights and not p.name.endswith(".index.json"))


class _NotZipfile(Exception):
    pass


def _torch_load(file: Path, *, mmap: bool) -> dict[str, torch.Tensor]:
    """A state dict from a torch.save file, never unpickling anything but tensors."""
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except RuntimeError as exc:
        if mmap and "zipfile" in str(exc):
            raise _NotZipfile() from None
        raise MergeError(f"{file}: cannot load: {_one_line(exc)}") from None
    except Exception as exc:
        raise MergeError(f"{file}: refused or failed to load with weights_only=True: {_one_line(exc)}") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise MergeError(f"{file}: holds a {type(obj).__name__}, not a state dict")
    for name, value in obj.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise MergeError(f"{file}: entry '{name}' is a {type(value).__name__}, not a tensor")
    return obj


def _one_line(exc: Exception) -> str:
    """torch.load's errors span lines (with terminal colours); keep the line that says what failed."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(exc).splitlines()]
    lines = [line for line in lines if line]
    for line in lines:
        if "Unpickler error" in line or "Unsupported" in line:
            return line
    return lines[0] if lines else type(exc).__name__


def _check_mergeable(info: TensorInfo, lora_factors: bool = False) -> None:
    """Refuse tensors that a merge would get wrong, by file and name
    (LoRA factors are refused unless read as an adapter's, lora_factors)."""
    where = f"{info.file}: tensor '{info.name}'"
    if info.name in RESERVED_NAMES:
        raise MergeError(f"{where}: the name is reserved by the safetensors format (for a file's metadata); rename it")
    if _LORA_FACTOR.search(info.name) and not lora_factors:
        raise MergeError(f"{where} is a LoRA factor: this is a PEFT adapter, not a model; {_ADAPTER_ADVICE}")
    if info.dtype in FP8_DTYPES:
        raise MergeError(
            f"{where} is {TORCH_TO_SAFETENSORS[info.dtype]} ({str(info.dtype).replace('torch.', '')}): fp8 "
            "checkpoints carry scale tensors that a plain merge would combine wrongly; dequantize the "
            "checkpoint to bfloat16 or float32 first"
        )
    if info.dtype not in MERGEABLE_DTYPES:
        valid = ", ".join(str(d).replace("torch.", "") for d in SAFETENSORS_DTYPES.values() if d in MERGEABLE_DTYPES)
        raise MergeError(f"{where} has unsupported dtype {str(info.dtype).replace('torch.', '')} (supported: {valid})")


def _safetensors_infos(file: Path) -> dict[str, TensorInfo]:
    try:
        with safe_open(file, framework="pt") as f:
            headers = {name: f.get_slice(name) for name in f.keys()}
            infos = {}
            for name, view in headers.items():
                dtype = SAFETENSORS_DTYPES.get(view.get_dtype())
                if dtype is None:
                    raise MergeError(f"{file}: tensor '{name}' has unsupported dtype {view.get_dtype()}")
                infos[name] = TensorInfo(name, tuple(view.get_shape()), dtype, file)
            return infos
    except MergeError:
        raise
    except Exception as exc:
        raise MergeError(f"{file}: not a readable safetensors file: {exc}") from None


def _what_is(path: Path) -> str:
    """What stands at path, by stat alone (a FIFO or a device is never opened:
    a FIFO would block forever): "file" (a regular one, after symbolic links),
    "folder", "missing", or anything else as the rest of a sentence ("is a FIFO ...")."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if os.path.islink(path):
            return f"is a symbolic link to {os.readlink(path)}, which does not exist"
        return "missing"
    except (OSError, ValueError) as exc:  # a loop of links, a name the file system cannot hold, ...
        if getattr(exc, "errno", None) == errno.ELOOP:
            return "is a loop of symbolic links"
        return f"cannot be looked up ({getattr(exc, 'strerror', None) or exc})"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "folder"
    kinds = [
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ]
    kind = next((name for test, name in kinds if test(mode)), "not a regular file")
    return f"is {kind}, not a regular file (ccsmerge reads only regular files)"


def regular_file_problem(path: Path) -> str | None:
    """None when path is a regular file; else what is wrong with it ("is a FIFO ...")."""
    kind = _what_is(path)
    return {"file": None, "folder": "is a folder, not a file", "missing": "does not exist"}.get(kind, kind)


def _require_file(path: Path) -> Path:
    problem = regular_file_problem(path)
    if problem is not None:
        raise MergeError(f"{path}: {problem}")
    return path


def hub_id_hint(text: str) -> str:
    """For a path that does not exist: what to do if it is a Hugging Face Hub id ("" otherwise)."""
    if not _HUB_ID.match(text) or text.endswith((".json", ".safetensors", *TORCH_SUFFIXES)):
        return ""
    return (
        f"; ccsmerge reads local folders: if {text} is a Hugging Face Hub id, download it first "
        f"(huggingface-cli download {text} --local-dir DIR) and give DIR"
    )


def _resolve(path: Path) -> tuple[Path | None, list[Path], dict[str, Path] | None]:
    """(folder for aux files, weight files, name -> file map from an index or None)."""
    kind = _what_is(path)
    if kind == "missing":
        raise MergeError(f"{path}: no such file or folder{hub_id_hint(str(path))}")
    if kind == "folder":
        return _resolve_folder(path)
    if kind != "file":
        raise MergeError(f"{path}: {kind}")
    if path.name.endswith(".index.json"):
        files, weight_map = _read_index(path)
        return path.parent, files, weight_map
    if path.suffix == ".safetensors" or path.suffix in TORCH_SUFFIXES:
        return None, [path], None
    raise MergeError(f"{path}: not a checkpoint (expected a model folder, .safetensors, .bin, .pt or .pth)")


def _resolve_folder(path: Path) -> tuple[Path, list[Path], dict[str, Path] | None]:
    # Whatever stands at a weight file's name is taken (and refused unless a
    # regular file): a FIFO or a dangling link there is not skipped silently.
    if os.path.lexists(path / ADAPTER_CONFIG):
        raise MergeError(f"{path}: a PEFT adapter ({ADAPTER_CONFIG}), not a model; {_ADAPTER_ADVICE}")
    for index in (SAFETENSORS_INDEX, TORCH_INDEX):
        if os.path.lexists(path / index):
            files, weight_map = _read_index(_require_file(path / index))
            return path, files, weight_map
    for single in (SAFETENSORS_SINGLE, TORCH_SINGLE):
        if os.path.lexists(path / single):
            return path, [_require_file(path / single)], None
    loose = sorted(p for p in path.glob("*.safetensors") if _what_is(p) != "folder")
    if len(loose) == 1:
        return path, [_require_file(loose[0])], None
    raise MergeError(
        f"{path}: no weights found (looked for {SAFETENSORS_INDEX}, {SAFETENSORS_SINGLE}, "
        f"{TORCH_INDEX}, {TORCH_SINGLE})"
    )


def _read_index(index: Path) -> tuple[list[Path], dict[str, Path]]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise ValueError("weight_map is not an object")
    except Exception as exc:
        raise MergeError(f"{index}: not a valid index ({exc})") from None
    resolved: dict[str, Path] = {}
    for name, filename in weight_map.items():
        if not isinstance(filename, str) or not filename:
            raise MergeError(f"{index}: tensor '{name}' maps to {filename!r}, not a file name")
        relative = Path(filename)
        if relative.is_absolute() or ".." in relative.parts:
            raise MergeError(f"{index}: tensor '{name}' points outside the folder ({filename})")
        file = index.parent / relative
        problem = regular_file_problem(file)
        if problem is not None:
            raise MergeError(f"{index}: tensor '{name}' is in {filename}, which {problem}")
        resolved[name] = file
    files = list(dict.fromkeys(resolved.values()))
    return files, resolved
