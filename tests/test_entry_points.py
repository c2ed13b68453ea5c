"""Every registered method through every entry point: ccsmerge.merge,
merge_checkpoints whole and in row blocks, `ccsmerge merge` flags and a
recipe. The cases are generated from the registry, so a new method is
covered the moment it is registered; each entry point must give the same
bytes (row blocks: the same values up to the GEMMs' summation order, within
a stated tolerance for low-rank treatments). The mergekit plugin's leg runs
in tests/integrations/test_mergekit.py (the mergekit CI stage)."""

from __future__ import annotations

import pytest
import torch
import yaml
from checkpoints import load_output, smallest_budget, toy_set, write_set

import ccsmerge
from ccsmerge.cli import main
from ccsmerge.methods import REGISTRY, Param

# Row blocks reorder the sums of a low-rank treatment's products: |diff| within this share of the update.
ROW_BLOCK_RTOL = 1e-5


TASKS = 3  # the models of `inputs`


def non_default(p: Param):
    """A valid value other than the default, from the parameter's declaration
    (a per-model option: a different one for each model)."""
    if p.name == "lam":
        return 0.7
    if p.per_model:
        value = p.default if p.default else 0.5
        return tuple(round(value * f, 6) for f in (0.8, 0.6, 0.4)[:TASKS])
    if p.type is float:
        return round((p.default if p.default else 0.5) * 0.8, 6)
    if p.type is int:
        return 3
    return p.default  # choices, patterns, switches: their defaults


def options_for(method: str) -> dict:
    return {p.name: non_default(p) for p in REGISTRY[method].params if non_default(p) != p.default}


def flags(options: dict) -> list[str]:
    out = []
    for name, value in options.items():
        out += [REGISTRY_PARAM[name].flag, *map(str, value if isinstance(value, tuple) else (value,))]
    return out


REGISTRY_PARAM = {p.name: p for spec in REGISTRY.values() for p in spec.params}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    base, models = toy_set(TASKS, width=48, vocab=96)
    base_path, paths = write_set(tmp_path_factory.mktemp("inputs"), base, models)
    return base, models, base_path, paths


def assert_same(got: dict, want: dict, what: str, rtol_lowrank: float = 0.0, jobs=None) -> None:
    assert got.keys() == want.keys(), what
    for name, ref in want.items():
        assert got[name].dtype == ref.dtype, (what, name)
        if torch.equal(got[name], ref):
            continue
        assert rtol_lowrank and jobs[name].rank is not None, f"{what}: '{name}' differs"
        diff = (got[name].double() - ref.double()).norm() / ref.double().norm()
        assert diff <= rtol_lowrank, f"{what}: '{name}' differs by {diff:.3g}"


@pytest.mark.parametrize("method", list(REGISTRY))
def test_every_entry_point_gives_the_same_merge(tmp_path, inputs, method, capsys):
    base, models, base_path, paths = inputs
    options = options_for(method)
    expected = ccsmerge.merge(models, method, base=base, device="cpu", **options)
    plan = ccsmerge.plan_checkpoints(paths, method, base=base_path, **options)
    jobs = {t.name: t.job for t in plan.tensors}
    assert options.keys() <= set(REGISTRY[method].param_names)
    if options:  # the options are honoured: the default merge differs
        default = ccsmerge.merge(models, method, base=base, device="cpu")
        assert any(not torch.equal(default[n], expected[n]) for n in expected), "the options changed nothing"

    whole = ccsmerge.merge_checkpoints(paths, tmp_path / "whole", method, base=base_path, device="cpu", **options)
    assert_same(load_output(whole), expected, "merge_checkpoints")

    whole_only = [t for t in REGISTRY[method].treatments.values() if t.blocks is None]
    row_options, row_expected = options, expected
    if whole_only:
        # Its low-rank matrices must be merged whole: a budget below that is refused...
        budget = smallest_budget(paths, method, base=base_path, **options)
        with pytest.raises(ccsmerge.MergeError, match=f"{method} needs the whole matrix in memory"):
            ccsmerge.plan_checkpoints(paths, method, base=base_path, max_memory=budget - 1, **options)
        # ... and with the largest ones kept out of the low-rank step, the rest goes in row blocks.
        row_options = {**options, "lowrank_exclude": ("mlp",)}
        row_expected = ccsmerge.merge(models, method, base=base, device="cpu", **row_options)
    budget = smallest_budget(paths, method, base=base_path, **row_options)
    blocked_plan = ccsmerge.plan_checkpoints(paths, method, base=base_path, max_memory=budget, **row_options)
    assert any(t.block_rows is not None for t in blocked_plan.tensors), "the budget should force row blocks"
    rows = ccsmerge.merge_checkpoints(
        paths, tmp_path / "rows", method, base=base_path, device="cpu", max_memory=budget, **row_options
    )
    assert_same(load_output(rows), row_expected, "row blocks", ROW_BLOCK_RTOL, jobs)

    cli = ["merge", "--method", method, "--base", str(base_path), *[a for p in paths for a in ("--model", str(p))]]
    assert main([*cli, *flags(options), "--device", "cpu", "--quiet", "--out", str(tmp_path / "cli")]) == 0
    assert_same(load_output(tmp_path / "cli"), expected, "ccsmerge merge flags")

    # Per-model values in the models' entries, the others under parameters.
    per_model = {k: v for k, v in options.items() if isinstance(v, tuple)}
    parameters = {(REGISTRY_PARAM[k].alias or k): v for k, v in options.items() if k not in per_model}
    # mergekit's linear averages a recipe's base_model in as one more model: a recipe gives it only where it is a base.
    recipe = {
        "merge_method": method,
        **({"base_model": str(base_path)} if method != "linear" else {}),
        "models": [{"model": str(p), "parameters": {k: v[i] for k, v in per_model.items()}}
                   for i, p in enumerate(paths)],
        "parameters": parameters,
    }
    (tmp_path / "recipe.yml").write_text(yaml.safe_dump(recipe))
    assert main(["merge", str(tmp_path / "recipe.yml"), "--device", "cpu", "--quiet", "--out", str(tmp_path / "r")]) == 0
    assert_same(load_output(tmp_path / "r"), expected, "recipe")
    # The recipe an output records makes it again.
    again = ["merge", str(tmp_path / "r" / "ccsmerge.yml"), "--device", "cpu", "--quiet", "--out", str(tmp_path / "a")]
    assert main(again) == 0
    assert_same(load_output(tmp_path / "a"), expected, "recorded recipe")


@pytest.mark.parametrize("method", list(REGISTRY))
def test_an_option_of_another_method_is_refused_everywhere(tmp_path, inputs, method, capsys):
    base, models, base_path, paths = inputs
    foreign = next(p for p in REGISTRY_PARAM.values() if p.name not in REGISTRY[method].param_names)
    value = non_default(foreign) if non_default(foreign) is not None else foreign.default
    with pytest.raises(ccsmerge.MergeError, match=rf"does not take {foreign.name}"):
        ccsmerge.merge(models, method, base=base, device="cpu", **{foreign.name: value})
    with pytest.raises(ccsmerge.MergeError, match=rf"does not take {foreign.name}"):
        ccsmerge.merge_checkpoints(paths, tmp_path / "out", method, base=base_path, **{foreign.name: value})
    assert not (tmp_path / "out").exists()
    cli = ["merge", "--method", method, "--base", str(base_path), *[a for p in paths for a in ("--model", str(p))]]
    assert main([*cli, *flags({foreign.name: value}), "--out", str(tmp_path / "cli")]) == 1
    assert f"does not take {foreign.name}" in capsys.readouterr().err


def test_unknown_keyword_is_a_merge_error_listing_the_options(inputs):
    base, models, _, _ = inputs
    with pytest.raises(ccsmerge.MergeError, match="weights: unknown option; valid options for task_arithmetic: .*lam"):
        ccsmerge.merge(models, "task_arithmetic", base=base, weights=[0.2, 0.3, 0.5])
