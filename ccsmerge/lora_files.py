"""PEFT LoRA adapters on disk: names, factors and the writer (no merge logic).

A PEFT (0.21) adapter folder holds `adapter_model.safetensors` and
`adapter_config.json`. For an nn.Linear module M (its weight W, m x n, named
`M.weight` in the base model) the factors are `base_model.model.M.lora_A.weight`
(r x n) and `base_model.model.M.lora_B.weight` (m x r), and the adapted weight
is W + scaling * B @ A, scaling = lora_alpha / r. For an nn.Embedding
(W vocab x dim) they are `...M.lora_embedding_A` (r x vocab) and
`...M.lora_embedding_B` (dim x r), and the update is (B @ A)^T * scaling.
A module in `modules_to_save` is stored whole under its plain names
(`base_model.model.M.weight`, ...).

ccsmerge's adapters give every module scaling 1 (lora_alpha = r, and
rank_pattern / alpha_pattern per module where the rank differs), so that
B @ A is the update itself. The writer takes the update's factors in the
weight's own layout (B m x r, A r x n, B @ A = delta W) for every module,
embeddings included, and stores them as PEFT expects."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import torch

from . import lowrank
from ._version import __version__
from .checkpoint import ADAPTER_CONFIG, TORCH_TO_SAFETENSORS, Checkpoint
from .errors import MergeError
from .numerics import all_finite, compute_dtype, row_blocks
from .output_folder import AuxFiles, OutputFolder, describe_os_error
from .shard_writer import OutputTensor, named, shard_header, write_atomically

PEFT_PREFIX = "base_model.model."
ADAPTER_WEIGHTS = "adapter_model.safetensors"
REPORT_FILE = "ccsmerge-lora.json"
FACTORS = {"lora_A.weight": "A", "lora_B.weight": "B", "lora_embedding_A": "embedding_A", "lora_embedding_B": "embedding_B"}
_FACTOR_KEY = re.compile(
    r"^base_model\.model\.(?P<module>.+)\.(?P<factor>" + "|".join(map(re.escape, FACTORS)) + ")$"
)
_COPY_CHUNK = 64 * 2**20  # bytes per read while the spilled tensors are copied behind the header


# ----------------------------------------------------------------------------- names


def module_name(weight_name: str) -> str:
    """The module of a weight matrix: `model.layers.0.mlp.up_proj.weight` -> `model.layers.0.mlp.up_proj`."""
    if not weight_name.endswith(".weight") or weight_name == ".weight":
        raise MergeError(
            f"tensor '{weight_name}': not a module's weight (a LoRA module's tensor is named MODULE.weight)"
        )
    return weight_name[: -len(".weight")]


def lora_names(weight_name: str) -> tuple[str, str]:
    """(lora_A key, lora_B key) of an nn.Linear weight."""
    module = PEFT_PREFIX + module_name(weight_name)
    return f"{module}.lora_A.weight", f"{module}.lora_B.weight"


def lora_embedding_names(weight_name: str) -> tuple[str, str]:
    """(lora_embedding_A key, lora_embedding_B key) of an nn.Embedding weight."""
    module = PEFT_PREFIX + module_name(weight_name)
    return f"{module}.lora_embedding_A", f"{module}.lora_embedding_B"


def saved_module_name(weight_name: str) -> str:
    """The module a full tensor belongs to, as modules_to_save names it: `model.norm.weight` -> `model.norm`."""
    module, dot, _ = weight_name.rpartition(".")
    if not dot or not module:
        raise MergeError(
            f"tensor '{weight_name}': belongs to no submodule, so PEFT cannot save it (modules_to_save names modules)"
        )
    return module


def saved_key(weight_name: str) -> str:
    """The adapter file's key of a full tensor of a module in modules_to_save."""
    return PEFT_PREFIX + weight_name


def module_of(factor_key: str) -> tuple[str, str]:
    """(module, factor) of a LoRA factor key, factor one of "A", "B", "embedding_A", "embedding_B"."""
    match = _FACTOR_KEY.match(factor_key)
    if match is None:
        raise ValueError(f"'{factor_key}' is not a PEFT LoRA factor key ({PEFT_PREFIX}MODULE.lora_A.weight, ...)")
    return match.group("module"), FACTORS[match.group("factor")]


def weight_of(key: str) -> str:
    """The base model's tensor an adapter key stands for: a factor's module weight, or a saved tensor's name."""
    try:
        return module_of(key)[0] + ".weight"
    except ValueError:
        if not key.startswith(PEFT_PREFIX):
            raise ValueError(f"'{key}' is not a PEFT adapter key (they start with {PEFT_PREFIX})") from None
        return key[len(PEFT_PREFIX) :]


def pattern_value(pattern: Mapping[str, object], module: str, default):
    """A module's value in a rank_pattern / alpha_pattern, matched as PEFT matches
    them (the first key that, as a regex, matches the end of the module's path)."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


# ----------------------------------------------------------------------------- factors


def _balanced(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """B = U sqrt(S), A = sqrt(S) Vh: both factors of the same scale (neither
    tiny in a low-precision dtype)."""
    root = s.clamp_min(0).sqrt()
    return u * root, root[:, None] * vh


def exact_truncation(
    left: torch.Tensor, right: torch.Tensor, rank: int, *, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-`rank` factors of U = left @ right (m x R, R x n), never forming
    m x n: with left = Q_l R_l and right^T = Q_r R_r, U = Q_l (R_l R_r^T) Q_r^T,
    so U's SVD is that of the small core R_l R_r^T rotated by Q_l and Q_r.
    Returns (B m x k, A k x n, ||U - B A||_F / ||U||_F), k = min(rank, rank
    bound of the core), B @ A the truncated SVD of U with the singular values
    split evenly between B and A. Computed in dtype (default: float64 for
    float64 input, else float32)."""
    if left.dim() != 2 or right.dim() != 2 or left.shape[1] != right.shape[0]:
        raise ValueError(
            f"exact_truncation: need left (m, R) and right (R, n), got {tuple(left.shape)} and {tuple(right.shape)}"
        )
    if rank < 1:
        raise ValueError(f"exact_truncation: rank must be >= 1, got {rank}")
    if dtype is None:
        dtype = torch.float64 if torch.float64 in (left.dtype, right.dtype) else compute_dtype(left.dtype)
    u, s, vh = lowrank.product_svd(left.to(dtype), right.to(dtype))
    k = min(rank, s.numel())
    b, a = _balanced(u[:, :k], s[:k], vh[:k])
    total = float(s.double().square().sum())
    dropped = float(s[k:].double().square().sum())
    return b, a, math.sqrt(dropped / total) if total > 0 else 0.0


# rows start:stop of a dense update, on the compute device, in the compute dtype.
UpdateRows = Callable[[int, int], torch.Tensor]


def randomized_truncation(
    update: torch.Tensor | UpdateRows,
    rank: int,
    *,
    shape: tuple[int, int] | None = None,
    blocks: Sequence[tuple[int, int]] | None = None,
    oversample: int = 10,
    power_iters: int = 2,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    store_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Rank-`rank` factors (B m x k, A k x n, k = min(rank, m, n)) of a dense
    update U, given whole or as rows(start, stop) over row blocks (then with
    shape and blocks), by the randomized engine (lowrank.randomized_svd_over_rows),
    and the true relative error ||U - B A||_F / ||U||_F, summed over the row
    blocks in one more pass. store_dtype: the dtype the factors are saved in;
    they are returned in it and the error is that of the rounded factors.
    A rank of min(m, n) or more is a factorisation with an identity factor
    (exact but for the rounding to store_dtype)."""
    if callable(update):
        if shape is None or blocks is None:
            raise ValueError("randomized_truncation: an update given by rows needs shape and blocks")
        rows = update
        dtype = dtype or torch.float32
        device = torch.device(device or "cpu")
    else:
        if update.dim() != 2:
            raise ValueError(f"randomized_truncation: expected a 2-D update, got shape {tuple(update.shape)}")
        shape = tuple(update.shape)
        dtype = dtype or compute_dtype(update.dtype)
        device = update.device if device is None else torch.device(device)
        whole = update.to(device=device, dtype=dtype)
        rows = lambda start, stop: whole[start:stop]  # noqa: E731
        blocks = [(0, shape[0])]
    m, n = shape
    blocks = list(blocks)
    # The error pass over a matrix held whole: 16 MB of residual rows at a time.
    error_blocks = row_blocks(m, max(1, 2**22 // max(n, 1))) if blocks == [(0, m)] else blocks
    if rank < 1:
        raise ValueError(f"randomized_truncation: rank must be >= 1, got {rank}")
    if rank >= min(m, n):
        b, a = _identity_factors(rows, blocks, m, n, dtype, device)
    else:
        u, s, vh = lowrank.randomized_svd_over_rows(
            lambda start, stop: ([rows(start, stop)], None),
            (m, n),
            blocks,
            rank,
            oversample=oversample,
            power_iters=power_iters,
            seed=seed,
            dtype=dtype,
            device=device,
        )
        b, a = _balanced(u[0], s[0], vh[0])
    if store_dtype is not None:
        b, a = b.to(store_dtype), a.to(store_dtype)
    return b, a, residual_error(rows, error_blocks, b, a, dtype)


def _identity_factors(rows, blocks, m, n, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """U = I U (m <= n) or U I (m > n): the update itself as one factor."""
    whole = torch.empty((m, n), dtype=dtype, device=device)
    for start, stop in blocks:
        whole[start:stop] = rows(start, stop)
    eye = torch.eye(min(m, n), dtype=dtype, device=device)
    return (eye, whole) if m <= n else (whole, eye)


def residual_error(
    rows: UpdateRows, blocks: Iterable[tuple[int, int]], b: torch.Tensor, a: torch.Tensor, dtype: torch.dtype
) -> float:
    """||U - B A||_F / ||U||_F over U's row blocks (0 for U = 0)."""
    a = a.to(dtype)
    total = residual = 0.0
    for start, stop in blocks:
        block = rows(start, stop)
        total += float(torch.linalg.vector_norm(block, dtype=torch.float64)) ** 2
        diff = torch.addmm(block, b[start:stop].to(dtype), a, alpha=-1)
        residual += float(torch.linalg.vector_norm(diff, dtype=torch.float64)) ** 2
        del block, diff
    return math.sqrt(residual / total) if total > 0 else 0.0


# ----------------------------------------------------------------------------- adapter_config.json


def adapter_config(
    ranks: Mapping[str, int],
    modules_to_save: Sequence[str] = (),
    *,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
    r: int | None = None,
) -> dict:
    """A PEFT-loadable adapter_config.json for the LoRA modules `ranks` (module ->
    rank, exact module paths) and the whole modules `modules_to_save`, with every
    module's scaling 1: lora_alpha = r (default: the most common rank) and, for
    the modules of another rank, rank_pattern and alpha_pattern entries (regexes
    matching that module's path alone) giving alpha = rank."""
    if not ranks:
        raise MergeError("an adapter needs at least one LoRA module (PEFT refuses an empty target_modules)")
    for module, rank in ranks.items():
        if not isinstance(rank, int) or rank < 1:
            raise MergeError(f"module '{module}': rank must be a positive integer, got {rank!r}")
    if r is None:
        r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {re.escape(module): rank for module, rank in ranks.items() if rank != r}
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "r": r,
        "lora_alpha": r,
        "target_modules": list(ranks),
        "modules_to_save": list(modules_to_save) or None,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "bias": "none",
        "lora_bias": False,
        "lora_dropout": 0.0,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "exclude_modules": None,
    }


def module_scaling(config: Mapping, module: str) -> float:
    """The scaling PEFT applies to a module of an adapter with this config."""
    rank = pattern_value(config.get("rank_pattern") or {}, module, config["r"])
    alpha = pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


# ----------------------------------------------------------------------------- the writer


class AdapterWriter:
    """Writes a PEFT adapter folder `out`: add() each LoRA module's factors,
    add_full() each tensor of a module saved whole, set_report() what the report
    should say besides the per-module entries, then finish(config). Tensors are
    appended to a spill file in the partial folder as they come (memory: none
    kept), and copied behind the safetensors header at finish(); the folder is
    built beside `out` and renamed into place when complete (output_folder.py),
    so a failure or abort() leaves nothing. An existing non-empty `out` is
    refused unless overwrite. dtype: the dtype floating tensors are saved in
    (default: as given). inputs: paths `out` must not replace."""

    def __init__(
        self,
        out: str | Path,
        *,
        overwrite: bool = False,
        inputs: Sequence[str | Path] = (),
        dtype: torch.dtype | None = None,
    ):
        self.folder = OutputFolder(out, inputs, overwrite=overwrite, resumable=False)
        self.folder.check()
        self.out = self.folder.out
        self.dtype = dtype
        self.ranks: dict[str, int] = {}  # LoRA module -> rank
        self.modules: dict[str, dict] = {}  # LoRA module -> its report entry
        self.saved: dict[str, list[str]] = {}  # module saved whole -> its tensors
        self.report: dict = {}
        self._entries: list[OutputTensor] = []  # the spilled tensors, in file order
        self._spill = None
        self._claimed = False
        self._finished = False

    # --- lifecycle

    def begin(self, checkpoints: Sequence[Checkpoint] = ()) -> None:
        """Claim the partial folder; checkpoints: the opened inputs, checked
        unchanged before publishing. The first add() begins by itself."""
        if self._claimed:
            return
        with self._guard():
            record = (json.dumps({"format": "ccsmerge-lora", "complete": False}) + "\n").encode()
            self.folder.claim((REPORT_FILE, record), checkpoints)
            self._claimed = True
            spill = self.folder.partial / (ADAPTER_WEIGHTS + ".data")
            self._spill = open(spill, "wb")

    def __enter__(self) -> "AdapterWriter":
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if kind is not None:
            self.abort()

    def abort(self) -> None:
        """Give up: the partial folder is removed, `out` is left as it was."""
        if self._spill is not None:
            try:
                self._spill.close()
            except OSError:
                pass
            self._spill = None
        if self._claimed:
            self.folder.discard()  # a published folder stays: only its lock goes
        self._claimed = False

    # --- tensors

    def add(self, weight_name: str, b: torch.Tensor, a: torch.Tensor, *, embedding: bool = False, **info) -> None:
        """The LoRA module of `weight_name` with B @ A its weight's update (B m x r,
        A r x n, in the weight's layout also for an embedding); info (relative
        error, ...) goes into its report entry."""
        self.begin()
        with self._guard():
            module = module_name(weight_name)
            if b.dim() != 2 or a.dim() != 2 or b.shape[1] != a.shape[0]:
                raise MergeError(
                    f"tensor '{weight_name}': LoRA factors must be B (m, r) and A (r, n), "
                    f"got {tuple(b.shape)} and {tuple(a.shape)}"
                )
            if module in self.ranks or module in self.saved:
                raise MergeError(f"tensor '{weight_name}': module '{module}' is already in the adapter")
            if embedding:
                a_key, b_key = lora_embedding_names(weight_name)
                self._append(weight_name, a_key, b.mT)  # lora_embedding_A (r x vocab)
                self._append(weight_name, b_key, a.mT)  # lora_embedding_B (dim x r)
            else:
                a_key, b_key = lora_names(weight_name)
                self._append(weight_name, a_key, a)
                self._append(weight_name, b_key, b)
        rank = int(a.shape[0])
        self.ranks[module] = rank
        self.modules[module] = {
            "tensor": weight_name,
            "kind": "lora_embedding" if embedding else "lora",
            "shape": [int(b.shape[0]), int(a.shape[1])],
            "rank": rank,
            **info,
        }

    def add_full(self, weight_name: str, tensor: torch.Tensor) -> None:
        """A tensor of a module saved whole (modules_to_save)."""
        self.begin()
        with self._guard():
            module = saved_module_name(weight_name)
            if module in self.ranks:
                raise MergeError(f"tensor '{weight_name}': module '{module}' is a LoRA module of the adapter")
            if weight_name in self.saved.get(module, ()):
                raise MergeError(f"tensor '{weight_name}': already in the adapter")
            self._append(weight_name, saved_key(weight_name), tensor)
        self.saved.setdefault(module, []).append(weight_name)

    def set_report(self, report: Mapping) -> None:
        """What ccsmerge-lora.json says besides the modules (merged into it)."""
        self.report.update(report)

    def config(self, **options) -> dict:
        """adapter_config() of what was added; options: base_model_name_or_path, task_type, r."""
        return adapter_config(self.ranks, list(self.saved), **options)

    def _append(self, weight_name: str, key: str, tensor: torch.Tensor) -> None:
        if tensor.is_floating_point() and self.dtype is not None:
            tensor = tensor.to(self.dtype)
        if tensor.dtype not in TORCH_TO_SAFETENSORS:
            raise MergeError(f"tensor '{weight_name}': dtype {tensor.dtype} cannot be saved in safetensors")
        if tensor.is_floating_point() and not all_finite(tensor):
            raise MergeError(f"tensor '{weight_name}': its adapter tensor '{key}' has NaN or Inf values")
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        try:
            self._spill.write(memoryview(data))
        except OSError as exc:
            raise named(exc, Path(self._spill.name)) from None
        self._entries.append(OutputTensor(key, tuple(tensor.shape), tensor.dtype))

    # --- the end

    def finish(self, config: Mapping | None = None) -> Path:
        """Write the adapter's files and rename the folder into place; config:
        the adapter_config.json (default: self.config()), which must name the
        added modules and give each the scaling 1. Returns `out`."""
        self.begin()
        with self._guard():
            config = dict(self.config() if config is None else config)
            self._check_config(config)
            spill = Path(self._spill.name)
            self._spill.flush()
            os.fsync(self._spill.fileno())
            self._spill.close()
            self._spill = None
            self._write_weights(spill)
            spill.unlink()
            partial = self.folder.partial
            _write_json(partial / ADAPTER_CONFIG, config)
            _write_json(partial / REPORT_FILE, self._report_json())
            self.folder.publish(AuxFiles())
            self._finished = True
        self.abort()  # the lock's descriptor
        return self.out

    def _check_config(self, config: dict) -> None:
        targets = config.get("target_modules") or []
        if isinstance(targets, str) or set(targets) != set(self.ranks):
            raise MergeError(f"{ADAPTER_CONFIG}: target_modules must list the adapter's LoRA modules, got {targets!r}")
        if set(config.get("modules_to_save") or []) != set(self.saved):
            raise MergeError(
                f"{ADAPTER_CONFIG}: modules_to_save must list the modules saved whole ({sorted(self.saved)})"
            )
        for module, rank in self.ranks.items():
            if pattern_value(config.get("rank_pattern") or {}, module, config.get("r")) != rank:
                raise MergeError(
                    f"{ADAPTER_CONFIG}: module '{module}' has rank {rank}, which r/rank_pattern do not give"
                )
            scaling = module_scaling(config, module)
            if scaling != 1.0:
                raise MergeError(f"{ADAPTER_CONFIG}: module '{module}' would be scaled by {scaling}, not 1")
        for saved in self.saved:
            for module in self.ranks:
                if module == saved or module.startswith(saved + "."):
                    raise MergeError(
                        f"module '{saved}' is saved whole and holds the LoRA module '{module}': "
                        "PEFT allows one or the other"
                    )

    def _write_weights(self, spill: Path) -> None:
        target = self.folder.partial / ADAPTER_WEIGHTS
        part = target.with_name(target.name + ".part")
        try:
            with open(part, "wb") as out, open(spill, "rb") as data:
                out.write(shard_header(self._entries, {"format": "pt"}))
                while chunk := data.read(_COPY_CHUNK):
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.replace(part, target)
        except OSError as exc:
            raise named(exc, part) from None

    def _report_json(self) -> dict:
        return {
            "format": "ccsmerge-lora",
            "ccsmerge_version": __version__,
            **self.report,
            "modules": self.modules,
            "modules_to_save": self.saved,
        }

    @contextlib.contextmanager
    def _guard(self):
        """Around each step: a failure aborts the writer (nothing is left); an
        OS error becomes one MergeError line naming its file."""
        try:
            yield
        except BaseException as exc:
            self.abort()
            if isinstance(exc, OSError):
                raise MergeError(describe_os_error(exc, self.out) + "; nothing was written") from None
            raise


def _write_json(path: Path, content: Mapping) -> None:
    write_atomically(path, (json.dumps(content, indent=2, sort_keys=False) + "\n").encode())
