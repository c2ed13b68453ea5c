"""What a merge method is, declared once: its parameters, whether it needs a
base, how it treats each tensor (the per-tensor rule), how each treatment
merges a whole tensor and row blocks of one, and what each treatment costs in
memory. Every consumer (option validation, the CLI, recipes, the planner, the
executor, search, the mergekit plugin, the README's method table) reads the
specs in ccsmerge.methods.REGISTRY; nothing else knows a method by name."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

# rows start:stop of the T inputs and of the base (or None), on the compute device.
RowSource = Callable[[int, int], "tuple[list[torch.Tensor], torch.Tensor | None]"]


@dataclass(frozen=True)
class Param:
    """One option: its type, default, range and one-line description. The
    option schema (MergeConfig), the CLI flags and the recipe keys are built
    from these."""

    name: str
    type: Any  # float, int, str, bool, or tuple[str, ...]
    default: Any
    description: str
    gt: float | None = None
    ge: float | None = None
    le: float | None = None
    choices: tuple[str, ...] | None = None
    alias: str | None = None  # a second recipe key ("lambda" for lam)
    per_model: bool = False  # may be given per model in a recipe (e.g. weight)
    # None given explicitly is a value, not "unset" (tolerance=None: fixed power iterations);
    # recipes and flags write it as OFF.
    none_is_value: bool = False

    def with_default(self, default: Any) -> Param:
        return dataclasses.replace(self, default=default)

    def with_description(self, description: str) -> Param:
        return dataclasses.replace(self, description=description)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


@dataclass(frozen=True)
class TensorJob:
    """What the executor does with one tensor, decided once by the method's
    rule (in the plan, or for an in-memory merge) and never re-derived."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype  # the inputs'
    out_dtype: torch.dtype  # what the treatment returns
    treatment: str
    rank: int | None  # the truncation rank of a low-rank treatment
    rule: str  # why this treatment: "2-D weight", "default exclude 'embed'", "1-D", ...
    cfg: Any  # the MergeConfig
    tasks: int  # T, the number of fine-tuned models


@dataclass(frozen=True)
class Cost:
    """Memory of a treatment. Bytes per element of the tensor (the inputs
    included) on the host and on a GPU, plus bytes kept whole whatever the
    row blocks (sketches, factors), and how many times row blocks read the
    inputs."""

    host: Callable[[int, bool, int, int, int], int]  # (T, has_base, in_bytes, work_bytes, out_bytes)
    device: Callable[[int, bool, int, int], int]  # (T, has_base, in_bytes, work_bytes)
    state: Callable[[TensorJob, int], int] = lambda job, work: 0  # host bytes kept whole
    device_state: Callable[[TensorJob, int], int] = lambda job, work: 0
    passes: Callable[[TensorJob], int] = lambda job: 1  # reads of the inputs in row blocks


WholeMerge = Callable[[TensorJob, "list[torch.Tensor]", "torch.Tensor | None"], torch.Tensor]
# (job, per-model update factors (left, right) or None) -> (left, right, base_scale):
# merged = base_scale * W0 + left @ right (ccsmerge.methods.factored).
FactoredMerge = Callable[[TensorJob, list], "tuple[torch.Tensor, torch.Tensor, float]"]
BlockMerge = Callable[[TensorJob, RowSource, "list[tuple[int, int]]", torch.device], Iterator[torch.Tensor]]


@dataclass(frozen=True)
class Treatment:
    """One way a method merges a tensor. `whole` returns the merged tensor in
    job.out_dtype; `blocks` yields its row blocks in order (in job.out_dtype,
    on the compute device), or is None: a tensor over the budget is then
    refused by the planner with the memory it needs, never given another
    treatment."""

    name: str
    whole: WholeMerge
    blocks: BlockMerge | None
    cost: Cost
    refusal: str = "needs the whole matrix in memory"  # why blocks is None
    per_slice: bool = False  # merges each trailing matrix of a stack whole; row blocks hold whole slices
    # From low-rank task vectors (LoRA adapters), exactly; None: the task vectors are formed densely.
    factored: FactoredMerge | None = None
    # Whether inputs all equal to the base merge to the base (then adapters that all
    # leave a tensor alone give the base's tensor, copied).
    keeps_equal: Callable[[Any], bool] = lambda cfg: True
    # Takes each task vector's own singular vectors (TSV-M, Iso-CTS): on a LoRA
    # adapter's dense task vector (zero, or of rank r_t) those beyond r_t are arbitrary.
    per_task_spectra: bool = False


@dataclass(frozen=True)
class Decision:
    treatment: str
    rank: int | None
    rule: str


Rule = Callable[[str, tuple[int, ...], torch.dtype, Any, int], Decision]  # (name, shape, dtype, cfg, T)


@dataclass(frozen=True)
class MethodSpec:
    name: str
    title: str  # "CART (Choi et al. 2024)"
    summary: str  # one line for the README and --help
    reference: str  # a URL
    params: tuple[Param, ...]
    needs_base: bool
    rule: Rule
    treatments: dict[str, Treatment]
    search_axis: str | None = None  # the grid axis search() offers besides lam
    search_updates: Callable | None = None  # (models, base, names, values, cfg, device) -> iterator; None: generic
    extra_checks: Callable[[Any], None] | None = None  # cross-option validation (raises ValueError)
    # What the plan states about a low-rank job's accuracy (ccsmerge.accuracy_record.Planned), or None.
    planned_accuracy: Callable[[TensorJob], Any] | None = None
    notes: dict[str, str] = field(default_factory=dict)
    # mergekit's defaults where they differ from ccsmerge's: what a recipe's
    # absent parameters take (a recipe means what mergekit makes of it).
    recipe_defaults: dict[str, Any] = field(default_factory=dict)

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    def treatment(self, name: str) -> Treatment:
        return self.treatments[name]
