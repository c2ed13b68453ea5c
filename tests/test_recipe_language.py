"""mergekit's recipe language as ccsmerge reads it: per-model parameters,
filter lists, gradients, linear, normalize, dtype/out_dtype, tokenizer_source
and slices; each accepted feature merged against a float64 plain-PyTorch
reference written here, each refusal's message naming the key and why, and
every recipe an output records making the same merge again. (The same
recipes against mergekit itself: tests/integrations/test_recipe_vs_mergekit.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from checkpoints import load_output, smallest_budget, toy_set, write_set

import ccsmerge
from ccsmerge import Filtered, Gradient, MergeError
from ccsmerge.cli import main
from ccsmerge.merge import make_config
from ccsmerge.recipe import dump_recipe, load_recipe, recipe_arguments, recipe_of
from ccsmerge.tensor_values import layer_position, stack_sizes

F64 = torch.float64
LAYERS = 3


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    base, models = toy_set(3, layers=LAYERS, width=16, vocab=32)
    root = tmp_path_factory.mktemp("inputs")
    base_path, paths = write_set(root, base, models)
    return base, models, base_path, paths


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def merged_by_recipe(tmp_path: Path, data: dict, *extra: str) -> dict[str, torch.Tensor]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    recipe = write(tmp_path / "recipe.yml", data)
    out = tmp_path / "out"
    assert main(["merge", str(recipe), "--device", "cpu", "--quiet", "--out", str(out), *extra]) == 0
    merged = load_output(out)
    # The recipe the output records makes the same merge again.
    again = tmp_path / "again"
    assert main(["merge", str(out / "ccsmerge.yml"), "--device", "cpu", "--quiet", "--out", str(again)]) == 0
    for name, tensor in load_output(again).items():
        assert torch.equal(tensor, merged[name]), name
    return merged


def floating(sd):
    return [n for n, t in sd.items() if t.is_floating_point()]


def close(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    assert torch.allclose(got.to(F64), want, rtol=1e-5, atol=1e-6), name


# ----------------------------------------------------------------------------- float64 references


def ref_linear(xs, weights, normalize):
    total = sum(w * x.to(F64) for w, x in zip(weights, xs))
    return total / sum(weights) if normalize else total


def ref_top(tau: torch.Tensor, density: float) -> torch.Tensor:
    """TIES' trim: the top max(1, int(density * N)) magnitudes (found by sorting)."""
    if density >= 1:
        return tau
    flat = tau.reshape(-1)
    keep = max(1, int(density * flat.numel()))
    order = sorted(range(flat.numel()), key=lambda i: -abs(flat[i].item()))[:keep]
    out = torch.zeros_like(flat)
    out[order] = flat[order]
    return out.reshape(tau.shape)


def ref_outliers(tau: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Breadcrumbs' mask: of N ranked ascending by magnitude, keep int(density * N) below the int(gamma * N) largest."""
    if density >= 1:
        return tau
    flat = tau.reshape(-1)
    n = flat.numel()
    target, top = int(density * n), int(gamma * n)
    bottom = max(0, n - target - top)
    order = sorted(range(n), key=lambda i: (abs(flat[i].item()), i))[bottom:bottom + target]
    out = torch.zeros_like(flat)
    out[order] = flat[order]
    return out.reshape(tau.shape)


def ref_gta(xs, base, *, weights, lam, normalize, sparsify=None, consensus=False):
    """mergekit's generalized task arithmetic: base + lam * sum_t w_t tau_t
    (TIES: over the values agreeing with the sign of the weighted sum, + at 0),
    divided by the (agreeing) weights' sum when normalize."""
    b = base.to(F64)
    taus = [x.to(F64) - b for x in xs]
    if sparsify is not None:
        taus = [sparsify(t, tau) for t, tau in enumerate(taus)]
    weighted = [w * tau for w, tau in zip(weights, taus)]
    if consensus:
        total = sum(weighted)
        sign = torch.where(total >= 0, 1.0, -1.0).to(F64)
        masks = [(torch.sign(v) == sign).to(F64) for v in weighted]
    else:
        masks = [torch.ones_like(b) for _ in weighted]
    mixed = sum(v * m for v, m in zip(weighted, masks))
    divisor = sum(w * m for w, m in zip(weights, masks))
    if consensus:
        divisor = torch.where(divisor == 0, 1.0, divisor)
    elif abs(float(divisor.reshape(-1)[0])) < 1e-8:
        divisor = torch.ones_like(divisor)
    if normalize:
        mixed = mixed / divisor
    return b + lam * mixed


def recipe(method, paths, base_path=None, parameters=None, per_model=None, **top):
    per_model = per_model or [{}] * len(paths)
    data = {"merge_method": method}
    if base_path is not None:
        data["base_model"] = str(base_path)
    data["models"] = [{"model": str(p), **({"parameters": pm} if pm else {})} for p, pm in zip(paths, per_model)]
    if parameters:
        data["parameters"] = parameters
    data.update(top)
    return data


# ----------------------------------------------------------------------------- per-model parameters


@pytest.mark.parametrize("normalize", [True, False])
def test_linear_with_per_model_weights(tmp_path, inputs, normalize):
    _, models, _, paths = inputs
    weights = [0.7, 0.2, 0.5]
    data = recipe("linear", paths, parameters={"normalize": normalize}, per_model=[{"weight": w} for w in weights])
    merged = merged_by_recipe(tmp_path, data)
    for name in floating(models[0]):
        close(merged[name], ref_linear([m[name] for m in models], weights, normalize), name)
    assert torch.equal(merged["position_ids"], models[0]["position_ids"])


def test_linear_weights_default_to_one_and_flags_give_one_per_model(tmp_path, inputs):
    _, models, _, paths = inputs
    merged = merged_by_recipe(tmp_path / "a", recipe("linear", paths))
    for name in floating(models[0]):
        close(merged[name], ref_linear([m[name] for m in models], [1, 1, 1], True), name)
    flags = ["merge", "--method", "linear", *[a for p in paths for a in ("--model", str(p))]]
    out = tmp_path / "flags"
    assert main([*flags, "--weight", "3", "1", "0", "--device", "cpu", "--quiet", "--out", str(out)]) == 0
    got = load_output(out)
    for name in floating(models[0]):
        close(got[name], ref_linear([m[name] for m in models], [3, 1, 0], True), name)
    recorded = yaml.safe_load((out / "ccsmerge.yml").read_text())
    assert [m["parameters"]["weight"] for m in recorded["models"]] == [3.0, 1.0, 0.0]


def test_task_arithmetic_per_model_weight_and_mergekits_lambda_default(tmp_path, inputs):
    base, models, base_path, paths = inputs
    weights = [1.0, -0.5, 0.25]
    data = recipe("task_arithmetic", paths, base_path, per_model=[{"weight": w} for w in weights])
    merged = merged_by_recipe(tmp_path / "sum", data)
    for name in floating(base):
        want = ref_gta([m[name] for m in models], base[name], weights=weights, lam=1.0, normalize=False)
        close(merged[name], want, name)
    data["parameters"] = {"normalize": True, "lambda": 0.6}
    merged = merged_by_recipe(tmp_path / "normalized", data)
    for name in floating(base):
        want = ref_gta([m[name] for m in models], base[name], weights=weights, lam=0.6, normalize=True)
        close(merged[name], want, name)


@pytest.mark.parametrize("normalize", [True, False])
def test_ties_per_model_weight_and_density(tmp_path, inputs, normalize):
    base, models, base_path, paths = inputs
    weights, densities = [0.9, 0.4, 0.6], [0.3, 0.7, 0.5]
    per_model = [{"weight": w, "density": d} for w, d in zip(weights, densities)]
    data = recipe("ties", paths, base_path, parameters={"normalize": normalize, "lambda": 0.8}, per_model=per_model)
    merged = merged_by_recipe(tmp_path, data)
    for name in floating(base):
        want = ref_gta([m[name] for m in models], base[name], weights=weights, lam=0.8, normalize=normalize,
                       sparsify=lambda t, tau: ref_top(tau, densities[t]), consensus=True)
        close(merged[name], want, name)


def test_ties_density_defaults_to_mergekits(tmp_path, inputs):
    """mergekit's ties keeps every entry unless density is given (ccsmerge's flag default is 0.2)."""
    base, models, base_path, paths = inputs
    args = recipe_arguments(load_recipe(write(tmp_path / "r.yml", recipe("ties", paths, base_path))))
    assert args["density"] == 1.0 and make_config(**{k: v for k, v in args.items() if k not in (
        "models", "base", "dtype")}).lam == 1.0


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
def test_breadcrumbs_per_model_density_gamma_and_weight(tmp_path, inputs, method):
    base, models, base_path, paths = inputs
    densities, gammas, weights = [0.5, 0.8, 1.0], [0.05, 0.0, 0.1], [1.0, 0.5, 2.0]
    per_model = [{"density": d, "gamma": g, "weight": w} for d, g, w in zip(densities, gammas, weights)]
    data = recipe(method, paths, base_path, parameters={"lambda": 0.7}, per_model=per_model)
    merged = merged_by_recipe(tmp_path, data)
    for name in floating(base):
        want = ref_gta([m[name] for m in models], base[name], weights=weights, lam=0.7, normalize=False,
                       sparsify=lambda t, tau: ref_outliers(tau, densities[t], gammas[t]),
                       consensus=method.endswith("ties"))
        close(merged[name], want, name)


def test_dare_per_model_density_reaches_each_model(inputs):
    """Model 1's drop uses model 1's density: with the others weighted 0,
    per-model densities give the merge of model 1's density for all."""
    base, models, _, _ = inputs
    per_model = ccsmerge.merge(models, "dare_linear", base=base, device="cpu", density=(0.3, 0.6, 0.9),
                               weight=(0.0, 1.0, 0.0), seed=5)
    alone = ccsmerge.merge(models, "dare_linear", base=base, device="cpu", density=0.6, weight=(0.0, 1.0, 0.0), seed=5)
    other = ccsmerge.merge(models, "dare_linear", base=base, device="cpu", density=0.3, weight=(0.0, 1.0, 0.0), seed=5)
    name = "layers.1.mlp.up_proj.weight"
    assert torch.equal(per_model[name], alone[name]) and not torch.equal(per_model[name], other[name])


# ----------------------------------------------------------------------------- filters and gradients


def test_filter_lists_first_match_wins_and_fall_through(tmp_path, inputs):
    """Top level: attn tensors 0.3, mlp 0.6, the rest 0.9; model 0's own list
    (up_proj 0.1, no default) falls through to the top level's elsewhere."""
    base, models, base_path, paths = inputs
    top = {"density": [{"filter": "attn", "value": 0.3}, {"filter": "mlp", "value": 0.6}, {"value": 0.9}]}
    per_model = [{"density": [{"filter": "up_proj", "value": 0.1}]}, {}, {}]
    merged = merged_by_recipe(tmp_path, recipe("ties", paths, base_path, parameters=top, per_model=per_model))

    def density(t, name):
        if t == 0 and "up_proj" in name:
            return 0.1
        return 0.3 if "attn" in name else 0.6 if "mlp" in name else 0.9

    for name in floating(base):
        want = ref_gta([m[name] for m in models], base[name], weights=[1, 1, 1], lam=1.0, normalize=True,
                       sparsify=lambda t, tau: ref_top(tau, density(t, name)), consensus=True)
        close(merged[name], want, name)
    plan = ccsmerge.plan_checkpoints(paths, **{k: v for k, v in recipe_arguments(
        load_recipe(tmp_path / "out" / "ccsmerge.yml")).items() if k != "models"})
    shown = {t.name: t.job.cfg.density for t in plan.tensors if t.dtype.is_floating_point}
    assert shown["layers.0.mlp.up_proj.weight"] == (0.1, 0.6, 0.6)
    assert shown["layers.2.attn.q_proj.weight"] == (0.3, 0.3, 0.3)
    assert shown["lm_head.weight"] == (0.9, 0.9, 0.9)


def test_a_filter_list_without_a_match_takes_the_default(inputs):
    base, models, _, _ = inputs
    got = ccsmerge.merge(models, "task_arithmetic", base=base, device="cpu", lam=Filtered([("attn", 0.5)]))
    for name in floating(base):
        lam = 0.5 if "attn" in name else 0.3  # ccsmerge's default for task_arithmetic
        want = ref_gta([m[name] for m in models], base[name], weights=[1, 1, 1], lam=lam, normalize=False)
        close(got[name], want, name)


def test_gradient_over_the_layers(tmp_path, inputs):
    """lambda [0, 1] over 3 layers: layer i takes i / 2; tensors outside the layers t = 0 (mergekit)."""
    base, models, base_path, paths = inputs
    data = recipe("task_arithmetic", paths, base_path, parameters={"lambda": [0.0, 1.0]})
    merged = merged_by_recipe(tmp_path, data)
    for name in floating(base):
        layer = next((i for i in range(LAYERS) if name.startswith(f"layers.{i}.")), None)
        lam = 0.0 if layer is None else layer / (LAYERS - 1)
        want = ref_gta([m[name] for m in models], base[name], weights=[1, 1, 1], lam=lam, normalize=False)
        close(merged[name], want, name)


def test_gradient_interpolation_as_mergekit():
    g = Gradient([0.0, 0.5, 1.0, 0.0])
    assert [g.at(i / 4) for i in range(5)] == pytest.approx([0.0, 0.375, 0.75, 0.75, 0.0])
    assert Gradient([True, False]).at(0.99) is True and Gradient(["a", "b", "c"]).at(0.5) == "b"
    sizes = stack_sizes([f"model.layers.{i}.w" for i in range(5)] + ["model.embed.weight"])
    assert sizes == {"model.layers": 5}
    assert layer_position("model.layers.3.w", sizes) == 0.75 and layer_position("model.embed.weight", sizes) == 0
    assert layer_position("h.0.w", {"h": 1}) == 1.0  # one layer: t = 1, as mergekit has it
    # a block's sub-layers (T5: encoder.block.N.layer.M.) take the block's place, not the sub-layer's
    t5 = [f"encoder.block.{i}.layer.{j}.w" for i in range(3) for j in range(2)]
    assert stack_sizes(t5) == {"encoder.block": 3}
    assert [layer_position(f"encoder.block.{i}.layer.1.w", stack_sizes(t5)) for i in range(3)] == [0.0, 0.5, 1.0]


def test_per_tensor_values_in_row_blocks_equal_whole(tmp_path, inputs):
    base, models, base_path, paths = inputs
    options = dict(density=(Filtered([("mlp", 0.3), (None, 0.7)]), 0.5, Gradient([0.2, 0.9])),
                   weight=(1.0, 0.5, Gradient([2.0, 1.0])), lam=Gradient([0.5, 1.5]))
    whole = ccsmerge.merge(models, "ties", base=base, device="cpu", **options)
    budget = smallest_budget(paths, "ties", base=base_path, **options)
    plan = ccsmerge.plan_checkpoints(paths, "ties", base=base_path, max_memory=budget, **options)
    assert any(t.block_rows is not None for t in plan.tensors)
    out = ccsmerge.merge_checkpoints(paths, tmp_path / "rows", "ties", base=base_path, device="cpu",
                                     max_memory=budget, **options)
    for name, tensor in load_output(out).items():
        assert torch.equal(tensor, whole[name]), name


# ----------------------------------------------------------------------------- top-level keys


def arguments(tmp_path: Path, data: dict) -> dict:
    return recipe_arguments(load_recipe(write(tmp_path / "recipe.yml", data)))


def test_dtype_out_dtype_tokenizer_source_and_slices_map_to_the_engine(tmp_path, inputs):
    _, _, base_path, paths = inputs
    (tmp_path / "tok").mkdir()
    both = arguments(tmp_path, recipe("ties", paths, base_path, dtype="float32", out_dtype="bfloat16"))
    assert both["input_dtype"] == "float32" and both["dtype"] == "bfloat16"
    alone = arguments(tmp_path, recipe("ties", paths, base_path, dtype="float16"))
    assert alone["input_dtype"] == "float16" and alone["dtype"] == "float16"  # the output is in dtype too
    out_only = arguments(tmp_path, recipe("ties", paths, base_path, out_dtype="float16"))
    assert "input_dtype" not in out_only and out_only["dtype"] == "float16"
    assert arguments(tmp_path, recipe("ties", paths, base_path, tokenizer_source="base"))["tokenizer_source"] == "base"
    relative = arguments(tmp_path, recipe("ties", paths, base_path, tokenizer_source="tok"))
    assert relative["tokenizer_source"] == str((tmp_path / "tok").resolve())
    sliced = {
        "merge_method": "ties",
        "base_model": str(base_path),
        "slices": [{"sources": [{"model": str(p), "layer_range": [1, 3], **({"parameters": {"weight": 0.5}} if i == 1
                                                                          else {})}
                                for i, p in enumerate([base_path, *paths])]}],
        "parameters": {"density": 0.5},
    }
    got = arguments(tmp_path, sliced)
    assert got["layer_range"] == (1, 3)
    assert got["models"] == [str(p.resolve()) for p in paths]  # the base's source is the base
    assert got["base"] == str(base_path.resolve()) and got["density"] == 0.5
    assert got["weight"] == (0.5, 1.0, 1.0)


def test_the_base_among_the_models_is_the_base(tmp_path, inputs):
    _, _, base_path, paths = inputs
    got = arguments(tmp_path, recipe("ties", [base_path, *paths], base_path))
    assert got["models"] == [str(p.resolve()) for p in paths] and got["base"] == str(base_path.resolve())
    linear = arguments(tmp_path, recipe("linear", [base_path, *paths], base_path))
    assert linear["models"] == [str(p.resolve()) for p in [base_path, *paths]] and linear["base"] is None


def test_recorded_recipes_give_the_same_arguments(tmp_path, inputs):
    """recipe_of records every engine argument: reading it back gives them again."""
    _, _, base_path, paths = inputs
    options = dict(method="ties", lam=Gradient([0.5, 1.0]), weight=(0.5, Gradient([1, 2]), 1.0),
                   density=(Filtered([("attn", 0.4), (None, Gradient([0.2, 0.6]))]), 0.5, 0.9), normalize=False)
    cfg = make_config(**options)
    recorded = recipe_of(cfg, paths, base_path, "bfloat16", input_dtype="float32", tokenizer_source="base",
                         layer_range=(0, 2))
    path = tmp_path / "recorded.yml"
    path.write_text(dump_recipe(recorded))
    got = recipe_arguments(load_recipe(path))
    assert got["input_dtype"] == "float32" and got["dtype"] == "bfloat16"
    assert got["tokenizer_source"] == "base" and got["layer_range"] == (0, 2)
    assert got["models"] == [str(p.resolve()) for p in paths] and got["base"] == str(base_path.resolve())
    for name in ("lam", "weight", "density", "normalize"):
        assert got[name] == getattr(cfg, name), name


def test_an_older_recorded_recipes_dtype_is_the_output_dtype(tmp_path, inputs):
    _, _, base_path, paths = inputs
    got = arguments(tmp_path, recipe("ties", paths, base_path, dtype="float16", ccsmerge_version="0.1.0"))
    assert got["dtype"] == "float16" and "input_dtype" not in got


def test_int8_mask_is_accepted_as_having_no_effect(tmp_path, inputs):
    base, models, base_path, paths = inputs
    merged = merged_by_recipe(tmp_path, recipe("ties", paths, base_path, parameters={"int8_mask": True,
                                                                                    "density": 0.5}))
    for name in floating(base):
        want = ref_gta([m[name] for m in models], base[name], weights=[1, 1, 1], lam=1.0, normalize=True,
                       sparsify=lambda t, tau: ref_top(tau, 0.5), consensus=True)
        close(merged[name], want, name)


# ----------------------------------------------------------------------------- refusals


def _with(edit):
    def make(paths, base_path):
        data = recipe("ties", paths, base_path)
        edit(data, paths, base_path)
        return data

    return make


REFUSALS = {
    # name: (the recipe, fragments of the one error line)
    "top-level-key": (_with(lambda d, p, b: d.update(normalize=True)),
                      ["normalize", "unknown key", "merge_method", "slices", "out_dtype", "parameters: {normalize"]),
    "model-entry-key": (_with(lambda d, p, b: d["models"][0].update(weight=0.5)),
                        ["models.0.weight", "unknown key; valid keys: model, parameters"]),
    "parameters-key": (_with(lambda d, p, b: d.update(parameters={"densty": 0.5})),
                       ["parameters.densty", "unknown key", "density", "lambda"]),
    "per-model-key": (_with(lambda d, p, b: d["models"][1].update(parameters={"wieght": 0.5})),
                      ["models.1.parameters.wieght", "unknown key", "per-model parameters of ties", "density, weight"]),
    "shared-per-model": (_with(lambda d, p, b: d["models"][1].update(parameters={"lambda": 0.5})),
                         ["models.1.parameters.lambda", "not a per-model parameter of ties",
                          "top-level parameters"]),
    "no-per-model": (lambda p, b: recipe("cart", p, per_model=[{"weight": 0.5}, {}, {}]),
                     ["models.0.parameters", "method 'cart' takes no per-model parameters (got weight)"]),
    "filter-entry-key": (_with(lambda d, p, b: d.update(parameters={"density": [{"filtr": "attn", "value": 0.5}]})),
                         ["parameters.density.0.filtr", "unknown key; valid keys: filter, value"]),
    "filter-value": (_with(lambda d, p, b: d.update(parameters={"density": [{"filter": "attn", "value": 1.5}]})),
                     ["parameters.density.0.value", "less than or equal to 1"]),
    "gradient-value": (_with(lambda d, p, b: d.update(parameters={"density": [0.5, 2.0]})),
                       ["parameters.density.1", "less than or equal to 1"]),
    "slice-key": (_with(lambda d, p, b: d.update(models=None, slices=[{"sources": [
        {"model": str(m), "layer_range": [0, 2]} for m in p], "residual_weight": 0.1}])),
        ["slices.0", "residual_weight", "not supported"]),
    "slice-source-key": (_with(lambda d, p, b: d.update(models=None, slices=[{"sources": [
        {"model": str(m), "layer_range": [0, 2], "layers": 2} for m in p]}])),
        ["slices.0.sources.0.layers", "unknown key; valid keys: model, layer_range, parameters"]),
    "frankenmerge-ranges": (_with(lambda d, p, b: d.update(models=None, slices=[{"sources": [
        {"model": str(m), "layer_range": [0, 2] if i else [1, 3]} for i, m in enumerate(p)]}])),
        ["slices.0.sources.1.layer_range", "differs", "frankenmerge"]),
    "frankenmerge-slices": (_with(lambda d, p, b: d.update(models=None, slices=[
        {"sources": [{"model": str(m), "layer_range": r} for m in p]} for r in ([0, 2], [1, 3])])),
        ["slices", "2 slices", "frankenmerge", "one slice"]),
    "models-and-slices": (_with(lambda d, p, b: d.update(slices=[{"sources": [
        {"model": str(m), "layer_range": [0, 2]} for m in p]}])), ["models", "slices", "one of the two"]),
    "union": (_with(lambda d, p, b: d.update(tokenizer_source="union")), ["tokenizer_source", "union", "not supported"]),
    "modules": (_with(lambda d, p, b: d.update(modules={})), ["modules", "not supported"]),
    "tokenizer": (_with(lambda d, p, b: d.update(tokenizer={"source": "base"})), ["tokenizer", "tokenizer_source"]),
    "chat-template": (_with(lambda d, p, b: d.update(chat_template="chatml")), ["chat_template", "not supported"]),
    "rescale": (_with(lambda d, p, b: d.update(parameters={"rescale": True})), ["parameters.rescale", "L1"]),
    "base-entry-parameters": (
        lambda p, b: recipe("ties", [b, *p], b, per_model=[{"weight": 0.5}, {}, {}, {}]),
        ["models.0.parameters", "base model's entry takes no parameters"]),
    "linear-base": (lambda p, b: recipe("linear", p, b), ["base_model", "linear takes no base", "list it under models"]),
    "lam-and-lambda": (_with(lambda d, p, b: d.update(parameters={"lam": 1.0, "lambda": 0.5})),
                       ["parameters", "give one of lam and lambda"]),
    "int8-mask-value": (_with(lambda d, p, b: d.update(parameters={"int8_mask": "yes"})),
                        ["parameters.int8_mask", "true or false"]),
    "lora": (_with(lambda d, p, b: d["models"][0].update(model=str(p[0]) + "+adapter")), ["model+lora", "LoRA"]),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_name_the_key_and_why(tmp_path, inputs, capsys, case):
    _, _, base_path, paths = inputs
    make, fragments = REFUSALS[case]
    path = write(tmp_path / "recipe.yml", make(paths, base_path))
    assert main(["merge", str(path), "--device", "cpu", "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"ccsmerge: error: {path}"), err
    for fragment in fragments:
        assert fragment in err[0], (fragment, err[0])
    assert not (tmp_path / "out").exists()


def test_per_model_values_are_checked_against_the_models(tmp_path, inputs, capsys):
    base, models, _, paths = inputs
    with pytest.raises(MergeError, match="weight: 2 values given, one per model is 3"):
        ccsmerge.merge(models, "linear", weight=(0.5, 0.5))
    flags = ["merge", "--method", "linear", *[a for p in paths for a in ("--model", str(p))]]
    assert main([*flags, "--weight", "1", "2", "--out", str(tmp_path / "out")]) == 1
    assert "weight: 2 values given, one per model is 3" in capsys.readouterr().err
    with pytest.raises(MergeError, match="lam takes one value for every model, not one per model"):
        ccsmerge.merge(models, "ties", base=base, lam=(0.5, 0.5, 0.5))
    with pytest.raises(MergeError, match="weight: the weights sum to 0"):
        ccsmerge.merge(models, "linear", weight=(1.0, -1.0, 0.0))
    with pytest.raises(MergeError, match="method 'cart' does not take weight"):
        ccsmerge.merge(models, "cart", weight=(1.0, 1.0, 1.0))


def test_a_per_tensor_value_invalid_for_a_tensor_names_it(inputs):
    base, models, _, _ = inputs
    with pytest.raises(MergeError, match=r"tensor 'layers.1.[^']*': seed: Input should be a valid integer, got a number with a fractional part$"):
        ccsmerge.merge(models, "dare_linear", base=base, density=0.5, seed=Gradient([0, 3]))
    with pytest.raises(MergeError, match=r"density: 1.5: Input should be less than or equal to 1"):
        ccsmerge.merge(models, "ties", base=base, density=Filtered([("attn", 1.5)]))
    with pytest.raises(MergeError, match="search: normalize: values by tensor"):
        ccsmerge.search(models, lambda sd: 0.0, "ties", base=base, density=[0.5], normalize=Gradient([True, False]))
