"""`ccsmerge extract-lora`: a PEFT LoRA adapter of a fine-tune's update M - B.

Every 2-D `.weight` that differs becomes a LoRA module of rank r (an
embedding's as lora_embedding), factored by the randomized engine from the
update's row blocks; every other tensor that differs (norms, biases, what the
user excludes) is saved whole (modules_to_save), and so is a weight whose
module has such a tensor (PEFT adapts a module or saves it, not both);
identical tensors are left out. Tensors are read one at a time, a matrix
whole or in row blocks as the memory budget allows, and each module's true
relative error ||U - B A||_F / ||U||_F (of the factors as saved) is reported."""

from __future__ import annotations

import re
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import Checkpoint
from .errors import MergeError
from .lora_files import AdapterWriter, randomized_truncation
from .lowrank import sketch_width
from .merge import full_precision_matmuls, resolve_device
from .numerics import all_finite, row_blocks, tensor_seed
from .planning import natural_order
from .recipe import DTYPES as DTYPE_NAMES
from .sizes import format_size, parse_size
from .streaming import default_budget

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}
# Modules taken as nn.Embedding (rows are token ids): their update is saved as lora_embedding_A/B.
EMBEDDING_MODULES = (
    r"(^|\.)(embed_tokens|embed_in|embed_positions|tok_embeddings|word_embeddings|position_embeddings"
    r"|token_type_embeddings|wte|wpe|embeddings)$"
)
# The engine's small matrices per tensor, in float32 units of (m + n) * sketch width:
# test matrix, bases, products and factors, with the float64 copies of the triplet step.
_FACTOR_COPIES = 10
_RESIDUAL_BYTES = 2**24  # the error pass of a matrix held whole works on 16 MB of rows at a time


@dataclass
class LoraExtraction:
    """What extract_lora wrote: per LoRA module its rank, shape and relative
    error; the modules saved whole and their tensors; how many tensors were
    identical (left out)."""

    out: Path
    modules: dict[str, dict]
    modules_to_save: dict[str, list[str]]
    identical: int

    @property
    def errors(self) -> dict[str, float]:
        return {module: entry["relative_error"] for module, entry in self.modules.items()}

    @property
    def worst(self) -> tuple[str, float]:
        return max(self.errors.items(), key=lambda item: item[1])

    @property
    def median(self) -> float:
        return statistics.median(self.errors.values())

    def summary(self) -> str:
        ranks = sorted({entry["rank"] for entry in self.modules.values()})
        worst_module, worst = self.worst
        return (
            f"{self.out}: {len(self.modules)} LoRA modules (rank {', '.join(map(str, ranks))}), "
            f"{len(self.modules_to_save)} modules saved whole, {self.identical} identical tensors left out; "
            f"relative error worst {worst:.3%} ({worst_module}), median {self.median:.3%}"
        )


def extract_lora(
    base: str | Path,
    model: str | Path,
    out: str | Path,
    rank: int,
    *,
    max_memory: str | int | None = None,
    seed: int = 0,
    oversample: int = 10,
    power_iters: int = 2,
    dtype: str | torch.dtype | None = None,
    device: str = "auto",
    overwrite: bool = False,
    exclude: Sequence[str] = (),
    embeddings: str = EMBEDDING_MODULES,
    task_type: str | None = None,
    progress: bool = False,
) -> LoraExtraction:
    """Write a PEFT LoRA adapter of model - base to the folder `out`, loadable
    by `PeftModel.from_pretrained(base_model, out)`. rank: every module's rank
    (min(rank, m, n) for smaller matrices). max_memory: the budget of the
    tensors read and the engine's matrices (default: half the available RAM);
    a matrix that does not fit whole is read in row blocks. oversample,
    power_iters, seed: the randomized engine's (seeded per tensor name).
    dtype: the factors' dtype (default: the model's floating dtype). exclude:
    regexes of tensors saved whole instead of factored. embeddings: the regex
    of the modules taken as embeddings."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise MergeError(f"rank: must be a positive integer, got {rank!r}")
    if oversample < 0 or power_iters < 0:
        raise MergeError(f"oversample and power_iters must be >= 0, got {oversample} and {power_iters}")
    patterns = _compile(exclude, "exclude")
    embedding = _compile([embeddings], "embeddings")[0]
    out_dtype = _dtype(dtype)
    budget = parse_size(max_memory) if max_memory is not None else default_budget()
    writer = AdapterWriter(out, overwrite=overwrite, inputs=[base, model])  # refused now, before any read
    base_ckpt, model_ckpt = Checkpoint(base), Checkpoint(model)
    names = _check_pair(base_ckpt, model_ckpt)
    if out_dtype is None:
        out_dtype = _floating_dtype(model_ckpt)
    compute = resolve_device(device)
    writer.dtype = out_dtype
    identical = 0
    with writer, full_precision_matmuls():
        writer.begin([base_ckpt, model_ckpt])
        for name in names:
            reader = _Pair(base_ckpt, model_ckpt, name, compute)
            module = name.rpartition(".")[0]
            whole_module = any(_within(module, saved) for saved in writer.saved)
            lora = (
                len(reader.shape) == 2
                and reader.floating
                and name.endswith(".weight")
                and not whole_module
                and not any(p.search(name) for p in patterns)
            )
            if lora:
                done = _extract_matrix(writer, reader, rank, budget, embedding.search(module) is not None,
                                       oversample=oversample, power_iters=power_iters, seed=seed)
            else:
                done = _save_whole(writer, reader)
            identical += not done
            if progress and done:
                print(f"  {name}: {_what(writer, name)}", file=sys.stderr)
        if not writer.ranks:
            raise MergeError(
                f"{model_ckpt.path}: no weight matrix differs from the base {base_ckpt.path}, so there is no "
                "LoRA update to extract (PEFT adapters need at least one LoRA module)"
            )
        errors = [entry["relative_error"] for entry in writer.modules.values()]
        worst = max(writer.modules.items(), key=lambda item: item[1]["relative_error"])
        writer.set_report(
            {
                "kind": "extract-lora",
                "base": str(Path(base).resolve()),
                "model": str(Path(model).resolve()),
                "rank": rank,
                "dtype": str(out_dtype).removeprefix("torch."),
                "oversample": oversample,
                "power_iters": power_iters,
                "seed": seed,
                "identical_tensors": identical,
                "relative_error": {
                    "worst": worst[1]["relative_error"],
                    "worst_module": worst[0],
                    "median": statistics.median(errors),
                },
            }
        )
        writer.finish(writer.config(base_model_name_or_path=str(base), task_type=task_type))
    return LoraExtraction(writer.out, writer.modules, writer.saved, identical)


def _what(writer: AdapterWriter, name: str) -> str:
    module = name.rpartition(".")[0]
    entry = writer.modules.get(module)
    if entry is not None and entry["tensor"] == name:
        return f"rank {entry['rank']}, relative error {entry['relative_error']:.3%}"
    return "saved whole"


def _within(module: str, saved: str) -> bool:
    return module == saved or module.startswith(saved + ".")


def _compile(patterns: Sequence[str], option: str) -> list[re.Pattern]:
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as exc:
            raise MergeError(f"{option}: {pattern!r} is not a valid regex ({exc})") from None
    return compiled


def _dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if dtype not in DTYPES:
        raise MergeError(f"dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _floating_dtype(ckpt: Checkpoint) -> torch.dtype:
    """The dtype most of the checkpoint's floating bytes are in (float64 saved as float32)."""
    sizes: dict[torch.dtype, int] = {}
    for info in ckpt.tensors.values():
        if info.dtype.is_floating_point:
            sizes[info.dtype] = sizes.get(info.dtype, 0) + info.nbytes
    found = max(sizes, key=sizes.get) if sizes else torch.float32
    return found if found in DTYPES.values() else torch.float32


def _check_pair(base: Checkpoint, model: Checkpoint) -> list[str]:
    """The tensor names, each module's other tensors before its weight (so that a
    module saved whole is known when its weight comes), after checking that both
    checkpoints hold the same names and shapes."""
    for ckpt, other, label in ((model, base, "the base"), (base, model, "the model")):
        for name, info in ckpt.tensors.items():
            if name not in other.tensors:
                raise MergeError(f"{info.file}: tensor '{name}' is not in {label} {other.path}")
    for name, info in model.tensors.items():
        theirs = base.tensors[name]
        if info.shape != theirs.shape:
            raise MergeError(
                f"{info.file}: tensor '{name}' has shape {list(info.shape)}, but in the base "
                f"({theirs.file}) it is {list(theirs.shape)}"
            )
        if info.dtype.is_floating_point != theirs.dtype.is_floating_point or (
            not info.dtype.is_floating_point and info.dtype != theirs.dtype
        ):
            raise MergeError(
                f"{info.file}: tensor '{name}' is {str(info.dtype).removeprefix('torch.')}, but in the base "
                f"({theirs.file}) it is {str(theirs.dtype).removeprefix('torch.')}"
            )

    def order(name: str):
        module, _, leaf = name.rpartition(".")
        return natural_order(module), leaf == "weight", natural_order(name)

    return sorted(model.tensors, key=order)


class _Pair:
    """One tensor of the base and the model: shapes, and the update's rows in
    the compute dtype on the compute device."""

    def __init__(self, base: Checkpoint, model: Checkpoint, name: str, device: torch.device):
        self.base, self.model, self.name, self.device = base, model, name, device
        self.info = model.tensors[name]
        base_dtype = base.tensors[name].dtype
        self.shape = self.info.shape
        self.floating = self.info.dtype.is_floating_point
        self.dtype = torch.float64 if torch.float64 in (self.info.dtype, base_dtype) else torch.float32
        self.read_bytes_per_element = self.info.dtype.itemsize + base_dtype.itemsize

    def update_rows(self, start: int, stop: int) -> torch.Tensor:
        update = self.model.read_rows(self.name, start, stop).to(self.device, self.dtype)
        return update.sub_(self.base.read_rows(self.name, start, stop).to(self.device))

    def check_finite(self, update: torch.Tensor) -> None:
        if not all_finite(update):
            for ckpt, label in ((self.model, "the model"), (self.base, "the base")):
                if not all_finite(ckpt.read(self.name)):
                    raise MergeError(f"{ckpt.tensors[self.name].file}: tensor '{self.name}' has NaN or Inf values")
            raise MergeError(f"tensor '{self.name}': the update model - base overflows")


def _extract_matrix(writer, pair: _Pair, rank, budget, embedding, *, oversample, power_iters, seed) -> bool:
    """Factor one differing matrix into the writer; False when it is identical."""
    m, n = pair.shape
    if rank >= min(m, n):  # the update itself is a factor, the other one an identity
        fixed = (m * n + min(m, n) ** 2) * 4
    else:
        fixed = _FACTOR_COPIES * (m + n) * sketch_width(rank, oversample, m, n) * 4
    whole_cost = m * n * (pair.read_bytes_per_element + 4) + min(_RESIDUAL_BYTES, m * n * 4) + fixed
    if whole_cost <= budget:
        update = pair.update_rows(0, m)
        pair.check_finite(update)
        if not bool(update.any()):
            return False
        b, a, error = randomized_truncation(
            update, rank, oversample=oversample, power_iters=power_iters, seed=tensor_seed(seed, pair.name),
            store_dtype=writer.dtype,
        )
        del update
        block_rows = None
    else:
        per_row = n * (pair.read_bytes_per_element + 8)  # the two rows read, their update, its residual
        block_rows = (budget - fixed) // per_row
        if block_rows < 1:
            raise MergeError(
                f"tensor '{pair.name}': {m}x{n} at rank {rank} needs at least "
                f"{format_size(fixed + per_row)} of memory, more than --max-memory {format_size(budget)}"
            )
        blocks = row_blocks(m, int(block_rows))
        differs = False
        for start, stop in blocks:
            update = pair.update_rows(start, stop)
            pair.check_finite(update)
            differs = differs or bool(update.any())
            del update
        if not differs:
            return False
        b, a, error = randomized_truncation(
            pair.update_rows, rank, shape=(m, n), blocks=blocks, oversample=oversample, power_iters=power_iters,
            seed=tensor_seed(seed, pair.name), dtype=pair.dtype, device=pair.device, store_dtype=writer.dtype,
        )
    info = {"relative_error": error}
    if block_rows is not None:
        info["block_rows"] = int(block_rows)
    writer.add(pair.name, b.cpu(), a.cpu(), embedding=embedding, **info)
    return True


def _save_whole(writer: AdapterWriter, pair: _Pair) -> bool:
    """A differing tensor saved whole (its module in modules_to_save); False when identical."""
    model = pair.model.read(pair.name)
    base = pair.base.read(pair.name)
    if pair.floating:
        if not all_finite(model):
            raise MergeError(f"{pair.info.file}: tensor '{pair.name}' has NaN or Inf values")
        same = torch.equal(model.to(pair.dtype), base.to(pair.dtype))
    else:
        same = torch.equal(model, base)
    if same:
        return False
    writer.add_full(pair.name, model)
    return True
