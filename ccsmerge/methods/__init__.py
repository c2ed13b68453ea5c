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


def decide(name: str, shape: tuple[int, ...], dtype: torch.dtype, cfg, tasks: int,
           out_dtype: torch.dtype | None = None) -> TensorJob:
    """The tensor's job: its treatment, rank and the rule that chose them,
    decided once from its header (the plan and in-memory merges both call this)."""
    shape = tuple(shape)
    if not dtype.is_floating_point:
        return TensorJob(name, shape, dtype, dtype, "copied", None, "not floating", cfg, tasks)
    decision = method_spec(cfg.method).rule(name, shape, dtype, cfg, tasks)
    final = out_dtype if out_dtype is not None else dtype
    return TensorJob(name, shape, dtype, final, decision.treatment, decision.rank, decision.rule, cfg, tasks)


def treatment_of(job: TensorJob) -> Treatment:
    if job.treatment == "copied":
        return COPIED
    return method_spec(job.cfg.method).treatments[job.treatment]


__all__ = [
    "REGISTRY",
    "METHOD_NAMES",
    "FAMILIES",
    "method_spec",
    "method_table",
    "decide",
    "treatment_of",
    "MethodSpec",
    "Param",
    "TensorJob",
    "Treatment",
    "Cost",
    "Decision",
]


def _default_text(p: Param) -> str:
    if p.default is None:
        return f"`{p.name}`"
    if p.type is tuple:
        return f"`{p.name}`"
    return f"`{p.name}`={p.default}"


def method_table() -> str:
    """The README's method table, from the registry (tests/test_readme.py keeps them equal)."""
    lines = [
        "| method | merged tensor | base | options (defaults) | treatments (✓: also in row blocks) | search axis |",
        "|---|---|---|---|---|---|",
    ]
    for spec in REGISTRY.values():
        options = ", ".join(_default_text(p) for p in spec.params) or "none"
        treatments = ", ".join(f"{t.name}{' ✓' if t.blocks is not None else ''}" for t in spec.treatments.values())
        lines.append(
            f"| [`{spec.name}`]({spec.reference}): {spec.title} | {spec.summary} | "
            f"{'needed' if spec.needs_base else 'optional'} | {options} | {treatments} | "
            f"{', '.join(['lam'] * bool(spec.param('lam')) + ([spec.search_axis] if spec.search_axis else [])) or '—'} |"
        )
    return "\n".join(lines) + "\n"
