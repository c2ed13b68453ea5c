"""One mergekit recipe, two tools: mergekit 0.1.5's own pipeline (the one
`mergekit-yaml` runs) and `ccsmerge merge recipe.yml`, on the same tiny Llama
checkpoints saved by transformers, must give the same tensors.

They are bit-identical: both compute in float32 from float32 inputs, with
the same operations in the same order (mergekit's generalized task
arithmetic: w_t * tau_t stacked and summed, the sign election on the
weighted values, the division by the (agreeing) weights' sum, then lam,
then the base; linear: a running addcmul over the models, then the division),
and round once to the output dtype. Only the input-dtype cases would round
differently (mergekit computes in the input dtype, ccsmerge in float32 from
it); they are compared within that dtype's rounding."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

mergekit = pytest.importorskip("mergekit")
transformers = pytest.importorskip("transformers")

from tiny_llamas import llama_family, tensors  # noqa: E402

from ccsmerge.cli import main  # noqa: E402

LAYERS = 3


@pytest.fixture(scope="module")
def llamas(tmp_path_factory) -> tuple[Path, list[Path]]:
    """A tiny Llama and three fine-tunes of it, saved by transformers (float32)."""
    return llama_family(tmp_path_factory.mktemp("llamas"), vocab_size=64, hidden_size=32, intermediate_size=64,
                        num_hidden_layers=LAYERS)


def run_mergekit(config: dict, out: Path) -> dict[str, torch.Tensor]:
    """mergekit's own pipeline on the recipe (what mergekit-yaml runs)."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    options = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, device="cpu")
    run_merge(MergeConfiguration.model_validate(config), str(out), options)
    return tensors(out)


def run_ccsmerge(config: dict, folder: Path) -> dict[str, torch.Tensor]:
    folder.mkdir(parents=True, exist_ok=True)
    recipe = folder / "recipe.yml"
    recipe.write_text(yaml.safe_dump(config, sort_keys=False))
    assert main(["merge", str(recipe), "--device", "cpu", "--quiet", "--out", str(folder / "out")]) == 0
    return tensors(folder / "out")


def engine_takes(option: str) -> bool:
    from ccsmerge.streaming import prepare_merge

    return option in inspect.signature(prepare_merge).parameters


def models_of(paths, per_model=None):
    per_model = per_model or [None] * len(paths)
    return [{"model": str(p), **({"parameters": pm} if pm else {})} for p, pm in zip(paths, per_model)]


def cases(base: Path, paths: list[Path]) -> dict[str, dict]:
    """The recipes (mergekit requires every model's weight for its task-arithmetic family)."""
    weights = [{"weight": w} for w in (0.6, 0.3, 1.1)]
    return {
        "linear": {"merge_method": "linear", "models": models_of(paths, weights)},
        "linear-unnormalized": {"merge_method": "linear", "models": models_of(paths, weights),
                                "parameters": {"normalize": False}},
        "task-arithmetic-weights": {"merge_method": "task_arithmetic", "base_model": str(base),
                                    "models": models_of(paths, weights), "parameters": {"lambda": 0.8}},
        "ties-weights": {"merge_method": "ties", "base_model": str(base), "models": models_of(paths, weights),
                         "parameters": {"density": 0.5}},
        "ties-per-model-density": {
            "merge_method": "ties", "base_model": str(base),
            "models": models_of(paths, [{"density": 0.3, "weight": 0.5}, {"density": 0.6}, {"density": 0.9}]),
            "parameters": {"lambda": 1.2, "normalize": False, "weight": 1.0},
        },
        "filters": {
            "merge_method": "ties", "base_model": str(base),
            "models": models_of(paths, [{"density": [{"filter": "mlp", "value": 0.2}]}, None, None]),
            "parameters": {"density": [{"filter": "self_attn", "value": 0.5}, {"value": 0.7}],
                           "weight": [{"filter": "down_proj", "value": 0.5}, {"value": 1.0}]},
        },
        "gradients": {
            "merge_method": "task_arithmetic", "base_model": str(base), "models": models_of(paths, weights),
            "parameters": {"lambda": [0.2, 1.0, 0.4], "normalize": True},
        },
        "gradient-in-a-filter": {
            "merge_method": "ties", "base_model": str(base), "models": models_of(paths),
            "parameters": {"density": [{"filter": "mlp", "value": [0.2, 0.8]}, {"value": 0.5}], "weight": 1.0},
        },
        "breadcrumbs-per-model": {
            "merge_method": "breadcrumbs", "base_model": str(base),
            "models": models_of(paths, [{"density": 0.5, "gamma": 0.05, "weight": 0.7},
                                        {"density": 0.8, "gamma": 0.02}, {"density": 0.6, "weight": 1.3}]),
            "parameters": {"lambda": 0.9, "weight": 1.0},
        },
        "breadcrumbs-ties-per-model": {
            "merge_method": "breadcrumbs_ties", "base_model": str(base),
            "models": models_of(paths, [{"density": 0.5, "gamma": 0.05}, {"density": 0.7}, {"gamma": 0.03}]),
            "parameters": {"density": 0.6, "gamma": 0.01, "normalize": True, "weight": 0.8},
        },
        "out-dtype": {"merge_method": "ties", "base_model": str(base), "models": models_of(paths, weights),
                      "parameters": {"density": 0.5}, "out_dtype": "bfloat16"},
    }


CASES = ["linear", "linear-unnormalized", "task-arithmetic-weights", "ties-weights", "ties-per-model-density",
         "filters", "gradients", "gradient-in-a-filter", "breadcrumbs-per-model", "breadcrumbs-ties-per-model",
         "out-dtype"]


@pytest.mark.parametrize("case", CASES)
def test_recipe_gives_mergekits_tensors(llamas, tmp_path, case):
    base, paths = llamas
    config = cases(base, paths)[case]
    theirs = run_mergekit(config, tmp_path / "mergekit")
    ours = run_ccsmerge(config, tmp_path / "ccsmerge")
    assert theirs.keys() == ours.keys()
    reference = tensors(base)
    changed = 0
    for name in ours:
        assert ours[name].dtype == theirs[name].dtype, name
        assert torch.equal(ours[name], theirs[name]), name
        changed += not torch.equal(ours[name].float(), reference[name].float())
    assert changed > len(ours) // 2  # the merge did something


def test_mergekit_yaml_itself_agrees(llamas, tmp_path):
    """The `mergekit-yaml` command on one recipe, as a user runs it."""
    base, paths = llamas
    config = cases(base, paths)["ties-per-model-density"]
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(yaml.safe_dump(config, sort_keys=False))
    subprocess.run([sys.executable, "-m", "mergekit.scripts.run_yaml", str(recipe), str(tmp_path / "mergekit"),
                    "--no-copy-tokenizer", "--quiet"], check=True, capture_output=True)
    ours = run_ccsmerge(config, tmp_path / "ccsmerge")
    theirs = tensors(tmp_path / "mergekit")
    assert theirs.keys() == ours.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name


@pytest.mark.skipif(not engine_takes("input_dtype"), reason="the engine does not cast inputs (input_dtype) yet")
@pytest.mark.parametrize("dtypes", [{"dtype": "float32", "out_dtype": "bfloat16"}, {"dtype": "bfloat16"}],
                         ids=["dtype-and-out-dtype", "dtype-alone"])
def test_dtype_and_out_dtype_as_mergekit(llamas, tmp_path, dtypes):
    """dtype casts the inputs (mergekit computes in it; ccsmerge in float32
    from the cast inputs), out_dtype is the output's, dtype alone both."""
    base, paths = llamas
    config = {**cases(base, paths)["task-arithmetic-weights"], **dtypes}
    theirs = run_mergekit(config, tmp_path / "mergekit")
    ours = run_ccsmerge(config, tmp_path / "ccsmerge")
    assert theirs.keys() == ours.keys()
    out_dtype = getattr(torch, dtypes.get("out_dtype", dtypes["dtype"]))
    # the magnitudes of the terms (base and task vectors, cast as both tools cast them) per element
    cast = [{k: v.to(getattr(torch, dtypes["dtype"])).float() for k, v in tensors(p).items()} for p in (base, *paths)]
    inputs = {k: cast[0][k].abs() + sum((sd[k] - cast[0][k]).abs() for sd in cast[1:]) for k in cast[0]}
    for name in ours:
        assert ours[name].dtype == theirs[name].dtype == out_dtype, name
        if dtypes["dtype"] == "float32":  # both compute in float32 and round once
            assert torch.equal(ours[name], theirs[name]), name
        else:  # mergekit rounds each step to bfloat16: within a few of its ulps of the terms' magnitude
            scale = (inputs[name] + theirs[name].float().abs()).clamp(min=torch.finfo(out_dtype).tiny)
            ulps = (ours[name].float() - theirs[name].float()).abs() / (scale * torch.finfo(out_dtype).eps)
            assert float(ulps.max()) <= 4, (name, float(ulps.max()))
