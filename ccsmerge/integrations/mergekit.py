"""ccsmerge's methods inside mergekit (https://github.com/arcee-ai/mergekit).

Importing this module registers, as mergekit merge methods, every method of
ccsmerge's registry that mergekit does not already have under that name
(cart, tsv_m, iso_c, iso_cts, average; mergekit's own task_arithmetic, ties,
dare_linear, dare_ties, breadcrumbs and breadcrumbs_ties are left alone).
Each one's mergekit parameters are its spec's parameters (names, types,
defaults), `lambda` accepted for `lam`; `lowrank_include`/`lowrank_exclude`
take one regex (mergekit reads a YAML list as a gradient: write `a|b`).
Each tensor is merged by ccsmerge's engine. A mergekit YAML then says, e.g.:

    merge_method: cart
    models:
      - model: org/finetune-a
      - model: org/finetune-b
      - model: org/finetune-c
    parameters: {rank_ratio: 0.12, lambda: 2.0, oversample: 16, seed: 3}
    dtype: bfloat16

and `ccsmerge-mergekit CONFIG.yml OUT_DIR [mergekit-yaml options]` runs it
with mergekit's own pipeline. mergekit ignores parameters a method does not
declare; ccsmerge-mergekit refuses them (and any per-model parameter, such
as `weight`: these methods take none) before merging, and a per-model
`weight` reaching the kernel is refused there too. Written against mergekit 0.1.5."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal, Optional, Union

import torch
import yaml
from mergekit.merge_methods import registry
from mergekit.merge_methods.base import (
    BasePolicy,
    FunctionalGroupMergeMethod,
    InputContract,
    MergeMethodSpec,
    ParameterScope,
    ParameterSpec,
    TensorGroup,
)

from ..errors import MergeError
from ..execute import merge_whole
from ..merge import full_precision_matmuls, make_config
from ..methods import REGISTRY, MethodSpec, Param, decide

LAMBDA = "lambda"  # mergekit's name for lam
WEIGHT = "weight"  # mergekit's per-model weight: declared so that it can be refused


def _value_type(p: Param):
    if p.choices is not None:
        value = Literal[p.choices]  # type: ignore[valid-type]
    elif p.type is tuple:
        # A YAML list is a gradient to mergekit: one regex (`a|b` for several) or a tuple.
        value = Union[str, tuple[str, ...]]
    else:
        value = p.type
    return Optional[value] if p.default is None else value


def _recipe_names(p: Param) -> list[str]:
    return [p.name, p.alias] if p.alias else [p.name]


def parameter_specs(spec: MethodSpec) -> tuple[ParameterSpec, ...]:
    """The method's mergekit parameters, from its spec: each Param under its
    name (lam also as `lambda`; neither has a default here, so that giving
    both can be refused), and a per-model `weight` to refuse."""
    params = []
    for p in spec.params:
        if p.alias:
            for name in _recipe_names(p):
                params.append(ParameterSpec(name, Optional[p.type], ParameterScope.SHARED, default=None,
                                            description=p.description))
        else:
            params.append(ParameterSpec(p.name, _value_type(p), ParameterScope.SHARED, default=p.default,
                                        description=p.description))
    params.append(ParameterSpec(WEIGHT, Optional[float], ParameterScope.NON_BASE, default=None,
                                description="not taken: refused when given"))
    return tuple(params)


def options_from(spec: MethodSpec, parameters: dict) -> dict:
    """ccsmerge options from the mergekit parameters the kernel received."""
    weights = parameters.pop(WEIGHT, None)
    if weights is not None and any(w is not None for w in weights.values()):
        raise MergeError(f"mergekit method '{spec.name}': takes no per-model weight (ccsmerge's {spec.name} "
                         "weighs the models equally); remove `weight`")
    options = {}
    for p in spec.params:
        given = [name for name in _recipe_names(p) if parameters.get(name) is not None]
        if len(given) > 1:
            raise MergeError(f"mergekit method '{spec.name}': give one of {' and '.join(given)}, not both")
        if given:
            options[p.name] = parameters[given[0]]
        elif not p.alias:
            options[p.name] = parameters.get(p.name, p.default)
        if p.type is tuple and isinstance(options.get(p.name), str):
            options[p.name] = (options[p.name],)
    return options


def _merge(spec: MethodSpec, group: TensorGroup, **parameters) -> torch.Tensor:
    """One tensor through ccsmerge: the non-base inputs are the models."""
    options = options_from(spec, parameters)
    xs = [entry.tensor for entry in group.entries if not entry.is_base]
    base = group.base.tensor if group.base is not None else None
    if not xs[0].is_floating_point():
        return xs[0]
    cfg = make_config(method=spec.name, device=str(xs[0].device), **options)
    job = decide(group.metadata.name or "", tuple(xs[0].shape), xs[0].dtype, cfg, len(xs))
    with full_precision_matmuls():
        return merge_whole(job, xs, base, xs[0].device)


def mergekit_method(spec: MethodSpec) -> FunctionalGroupMergeMethod:
    contract = InputContract(base=BasePolicy.REQUIRED if spec.needs_base else BasePolicy.OPTIONAL, min_non_base=2)
    method = FunctionalGroupMergeMethod(
        MergeMethodSpec(
            name=spec.name,
            pretty_name=f"{spec.title} (ccsmerge)",
            reference_url=spec.reference,
            parameters=parameter_specs(spec),
            contract=contract,
        ),
        lambda group, /, **parameters: _merge(spec, group, **parameters),
    )
    method.ccsmerge = True  # ours: replaced, not shadowed, when this module is imported again
    return method


def _theirs() -> set[str]:
    return {m.spec.name for m in registry.registered_methods() if not getattr(m, "ccsmerge", False)}


MERGEKIT_OWN = _theirs() & set(REGISTRY)  # ccsmerge methods that mergekit has under the same name
METHODS = {name: mergekit_method(spec) for name, spec in REGISTRY.items() if name not in MERGEKIT_OWN}

for _name, _method in METHODS.items():
    if _name in {m.spec.name for m in registry.registered_methods()}:
        continue  # importing twice registers once
    registry.register(_method)


def check_recipe(data) -> None:
    """Refuse, before mergekit runs, what mergekit would ignore for one of
    ccsmerge's methods: a parameter the method does not take, and any
    per-model parameter (these methods take none)."""
    if not isinstance(data, dict):
        return
    name = data.get("merge_method")
    if name not in METHODS:
        return
    spec = REGISTRY[name]
    valid = [n for p in spec.params for n in _recipe_names(p)]
    unknown = sorted(set(data.get("parameters") or {}) - set(valid))
    if unknown:
        raise MergeError(f"merge_method {name}: does not take {', '.join(unknown)} "
                         f"(its parameters: {', '.join(valid) or 'none'})")
    entries = list(data.get("models") or [])
    for piece in data.get("slices") or []:
        entries += list((piece or {}).get("sources") or [])
    for entry in entries:
        given = sorted((entry or {}).get("parameters") or {}) if isinstance(entry, dict) else []
        if given:
            raise MergeError(f"merge_method {name}: model {entry.get('model')}: takes no per-model parameters "
                             f"(got {', '.join(given)}); give the method's parameters at the top level")


def main(argv: list[str] | None = None) -> None:
    """`ccsmerge-mergekit CONFIG.yml OUT_DIR [options]`: mergekit-yaml with ccsmerge's methods registered."""
    from mergekit.scripts.run_yaml import main as mergekit_yaml

    args = sys.argv[1:] if argv is None else argv
    config = next((a for a in args if not a.startswith("-")), None)
    if config is not None and Path(config).is_file():
        try:
            check_recipe(yaml.safe_load(Path(config).read_text()))
        except MergeError as exc:
            print(f"ccsmerge-mergekit: error: {config}: {exc}", file=sys.stderr)
            raise SystemExit(1) from None
        except yaml.YAMLError:
            pass  # mergekit reports it
    mergekit_yaml(args=args, prog_name="ccsmerge-mergekit")


if __name__ == "__main__":
    main()
