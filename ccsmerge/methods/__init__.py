"""The method registry: every merge method's spec (ccsmerge.methods.spec),
one module per method family. Adding a method is one module plus its line in
FAMILIES; option validation, the CLI, recipes, the planner, the executor,
search and the mergekit plugin all read REGISTRY."""

from __future__ import annotations

import torch

from ..errors import MergeError
from . import breadcrumbs, cart, dare, elementwise, svd_family, ties
from .elementwise import _inputs
from .spec import Cost, Decision, MethodSpec, Param, TensorJob, Treatment

FAMILIES = (elementwise, ties, cart, svd_family, dare, breadcrumbs)

REGISTRY: dict[str, MethodSpec] = {spec.name: spec for family in FAMILIES for spec in family.METHODS}
METHOD_NAMES: tuple[str, ...] = tuple(REGISTRY)


def method_spec(name: str) -> MethodSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise MergeError(f"method: '{name}' is not one of {', '.join(METHOD_NAMES)}") from None


def _copied_whole(job, xs, base):
    # Integer/bool buffers (step counters, position ids) are copied, and must agree.
    for i, x in enumerate(xs[1:] + ([base] if base is not None else []), start=1):
        if not torch.equal(x, xs[0]):
            label = f"model {i}" if i < len(xs) else "base"
            raise MergeError(f"tensor '{job.name}': non-floating tensor differs between model 0 and {label}")
    return xs[0].clone()


COPIED = Treatment(
    "copied",
    _copied_whole,
    None,
    Cost(host=lambda T, has_base, in_b, work, out_b: _inputs(T, has_base, in_b) + in_b + out_b,
         device=lambda T, has_base, in_b, work: 0),
    refusal="is non-floating data, copied whole",
)


def decide(name: str, shape: tuple[int, ...], dtype: torch.dtype, cfg, models: int,
           out_dtype: torch.dtype | None = None) -> TensorJob:
    """The tensor's job: its treatment, rank and the rule that chose them,
    decided once from its header (the plan and in-memory merges both call this)."""
    shape = tuple(shape)
    if not dtype.is_floating_point:
        return TensorJob(name, shape, dtype, dtype, "copied", None, "not floating", cfg, models)
    decision = method_spec(cfg.method).rule(name, shape, dtype, cfg, models)
    final = out_dtype if out_dtype is not None else dtype
    return TensorJob(name, shape, dtype, final, decision.treatment, decision.rank, decision.rule, cfg, models)


def treatment_of(job: TensorJob) -> Treatment:
    if job.treatment == "copied":
        return COPIED
    return method_spec(job.cfg.method).treatments[job.treatment]


__all__ = [
    "REGISTRY",
    "METHOD_NAMES",
    "FAMILIES",
    "method_spec",
    "decide",
    "treatment_of",
    "MethodSpec",
    "Param",
    "TensorJob",
    "Treatment",
    "Cost",
    "Decision",
]
