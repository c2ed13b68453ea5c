"""ccsmerge's methods inside mergekit, end to end: a mergekit YAML run by
`ccsmerge-mergekit` gives the bytes of `ccsmerge merge` on the same
checkpoints; every ccsmerge parameter reaches the merge or is refused; and
ccsmerge's Breadcrumbs gives mergekit 0.1.5's own breadcrumbs output. Runs
where mergekit is installed (the `mergekit` extra)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

mergekit = pytest.importorskip("mergekit")
transformers = pytest.importorskip("transformers")

from tiny_llamas import llama_family, tensors  # noqa: E402


@pytest.fixture(scope="module")
def llamas(tmp_path_factory) -> tuple[Path, list[Path]]:
    """A tiny Llama and three fine-tunes of it, saved by transformers."""
    return llama_family(tmp_path_factory.mktemp("llamas"), vocab_size=96, hidden_size=48, intermediate_size=112,
                        num_hidden_layers=2)


@pytest.mark.parametrize(
    "method,parameters,flags",
    [
        ("cart", "{rank_ratio: 0.25, lam: 2.0, seed: 3}", ["--rank-ratio", "0.25", "--lam", "2", "--seed", "3"]),
        ("tsv_m", "{lam: 0.8, svd: exact}", ["--lam", "0.8", "--svd", "exact"]),
        ("iso_cts", "{lam: 1.2, common_space_fraction: 0.5}", ["--lam", "1.2", "--common-space-fraction", "0.5"]),
    ],
)
def test_mergekit_yaml_equals_ccsmerge_merge(llamas, tmp_path, method, parameters, flags):
    base, paths = llamas
    needs_base = method != "cart"
    config = tmp_path / "merge.yml"
    lines = [f"merge_method: {method}"]
    lines += [f"base_model: {base}"] if needs_base else []
    lines += ["models:"] + [f"  - model: {p}" for p in paths]
    lines += [f"parameters: {parameters}", "dtype: float32"]
    config.write_text("\n".join(lines) + "\n")
    via_mergekit = tmp_path / "mergekit-out"
    subprocess.run(
        [sys.executable, "-m", "ccsmerge.integrations.mergekit", str(config), str(via_mergekit)],
        check=True,
        capture_output=True,
    )
    via_ccsmerge = tmp_path / "ccsmerge-out"
    command = [sys.executable, "-m", "ccsmerge", "merge", "--method", method, "--device", "cpu", "--quiet", *flags]
    command += ["--base", str(base)] if needs_base else []
    command += [a for p in paths for a in ("--model", str(p))] + ["--out", str(via_ccsmerge)]
    subprocess.run(command, check=True)
    a, b = tensors(via_mergekit), tensors(via_ccsmerge)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_methods_are_registered_once():
    import importlib

    from mergekit.merge_methods import registry

    import ccsmerge.integrations.mergekit as integration

    importlib.reload(integration)  # a second import must not register twice
    names = [m.spec.name for m in registry.registered_methods()]
    for method in ("cart", "tsv_m", "iso_c", "iso_cts", "average"):
        assert names.count(method) == 1
    # mergekit's own methods of the same names are not shadowed
    for method in ("ties", "task_arithmetic", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties"):
        assert names.count(method) == 1
        assert not getattr(registry.get(method), "ccsmerge", False), method


# ----------------------------------------------------------------------------- in-process mergekit runs


def run_mergekit(config: dict, out: Path) -> dict[str, torch.Tensor]:
    """mergekit's own pipeline (run_merge) on a recipe, with ccsmerge's methods registered."""
    import ccsmerge.integrations.mergekit  # noqa: F401  (registers the methods)
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    options = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, device="cpu")
    run_merge(MergeConfiguration.model_validate(config), str(out), options)
    return tensors(out)


def state_dicts(base: Path, paths: list[Path]):
    return tensors(base), [tensors(p) for p in paths]


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
def test_breadcrumbs_equals_mergekit(llamas, tmp_path, method):
    """mergekit's breadcrumbs (magnitude_outliers, no rescale, no normalize)
    and ccsmerge's on the same checkpoints: the same bytes. gamma is chosen
    so that every tensor drops at least one outlier: for a tensor with
    int(gamma * N) = 0, mergekit 0.1.5 keeps int(density * N) of the smallest
    magnitudes, and so does ccsmerge (the counts are the same)."""
    import ccsmerge

    base, paths = llamas
    parameters = {"density": 0.5, "gamma": 0.05, "lambda": 0.7}
    config = {
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in paths],
        "parameters": parameters,
        "dtype": "float32",
    }
    theirs = run_mergekit(config, tmp_path / "mergekit")
    base_sd, models = state_dicts(base, paths)
    ours = ccsmerge.merge(models, method, base=base_sd, device="cpu", density=0.5, gamma=0.05, lam=0.7)
    assert theirs.keys() == ours.keys()
    changed = 0
    for name in ours:
        assert torch.equal(theirs[name], ours[name]), name
        changed += not torch.equal(ours[name], base_sd[name])
    assert changed == len(ours)


def test_recipe_lambda_and_engine_parameters_reach_the_merge(llamas, tmp_path):
    """`lambda: 0.5` gives the λ = 0.5 merge (it was dropped, giving λ = 2), and
    oversample, power_iters, seed and lowrank_exclude arrive too."""
    import ccsmerge

    base, paths = llamas
    parameters = {"lambda": 0.5, "rank_ratio": 0.25, "oversample": 12, "power_iters": 2, "seed": 4,
                  "lowrank_exclude": "o_proj|down_proj"}
    config = {"merge_method": "cart", "models": [{"model": str(p)} for p in paths], "parameters": parameters,
              "dtype": "float32"}
    theirs = run_mergekit(config, tmp_path / "mergekit")
    _, models = state_dicts(base, paths)
    options = dict(lam=0.5, rank_ratio=0.25, oversample=12, power_iters=2, seed=4, lowrank_exclude=("o_proj|down_proj",))
    ours = ccsmerge.merge(models, "cart", device="cpu", **options)
    assert theirs.keys() == ours.keys()
    for name in ours:
        assert torch.equal(theirs[name], ours[name]), name
    default = ccsmerge.merge(models, "cart", device="cpu", **{**options, "lam": 2.0})
    assert not torch.equal(default["model.layers.0.mlp.up_proj.weight"], ours["model.layers.0.mlp.up_proj.weight"])


# A value other than the default for every parameter a ccsmerge method declares.
NON_DEFAULT = {
    "rank_ratio": 0.3,
    "rank": 3,
    "adapter_rank_ratio": 0.5,
    "lam": 0.5,
    "svd": "exact",
    "oversample": 7,
    "power_iters": 2,
    "seed": 9,
    "tolerance": 0.05,
    "lowrank_include": ("w",),
    "lowrank_exclude": ("w",),
    "lowrank_stacked": ("experts",),
    "default_excludes": False,
    "common_space_fraction": 0.5,
}


def _mergekit_methods():
    import ccsmerge.integrations.mergekit as integration

    return integration


@pytest.mark.parametrize("method", ["average", "cart", "tsv_m", "iso_c", "iso_cts"])
def test_every_parameter_reaches_the_merge(method, monkeypatch):
    import ccsmerge
    from ccsmerge.methods import REGISTRY
    from mergekit.merge_methods.base import TensorGroup

    integration = _mergekit_methods()
    spec = REGISTRY[method]
    mergekit_method = integration.METHODS[method]
    declared = {p.name for p in mergekit_method.spec.parameters}
    assert declared == {n for p in spec.params for n in ([p.name, p.alias] if p.alias else [p.name])} | {"weight"}

    received = []
    real = integration.make_config
    monkeypatch.setattr(integration, "make_config", lambda **o: received.append(o) or real(**o))
    torch.manual_seed(0)
    base = torch.randn(16, 12)
    xs = [base + 0.1 * torch.randn(16, 12) for _ in range(3)]
    group = TensorGroup.from_tensors([base, *xs], base_index=0, name="w")
    for p in spec.params:
        for name in [p.name, p.alias] if p.alias else [p.name]:
            value = NON_DEFAULT[p.name]
            received.clear()
            got = mergekit_method([group], parameters={name: list(value) if isinstance(value, tuple) else value})[0]
            assert received and received[-1][p.name] == value, (name, received)
            expected = ccsmerge.merge([{"w": x} for x in xs], method, base={"w": base}, device="cpu",
                                      **{p.name: value})["w"]
            assert torch.equal(got, expected), name


def test_per_model_weight_and_unknown_parameters_are_refused(llamas, tmp_path, capsys):
    import ccsmerge
    from mergekit.merge_methods.base import TensorGroup

    integration = _mergekit_methods()
    group = TensorGroup.from_tensors([torch.randn(8, 6) for _ in range(3)], name="w")
    with pytest.raises(ccsmerge.MergeError, match="takes no per-model weight"):
        integration.METHODS["cart"]([group], parameters={"weight": [1.0, 0.5, 1.0]})
    with pytest.raises(ccsmerge.MergeError, match="give one of lam and lambda"):
        integration.METHODS["cart"]([group], parameters={"lam": 1.0, "lambda": 0.5})

    base, paths = llamas
    cases = [
        ({"models": [{"model": str(paths[0]), "parameters": {"weight": 0.7}}] + [{"model": str(p)} for p in paths[1:]]},
         "takes no per-model parameters (got weight)"),
        ({"models": [{"model": str(p)} for p in paths], "parameters": {"density": 0.5}},
         "does not take density"),
    ]
    for edit, message in cases:
        config = tmp_path / "merge.yml"
        config.write_text(yaml.safe_dump({"merge_method": "cart", "dtype": "float32", **edit}))
        with pytest.raises(SystemExit) as exc:
            integration.main([str(config), str(tmp_path / "out")])
        assert exc.value.code == 1
        err = capsys.readouterr().err
        assert err.startswith("ccsmerge-mergekit: error: ") and message in err, err
        assert not (tmp_path / "out").exists()
