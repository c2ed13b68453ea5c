"""DARE (dare_linear, dare_ties) and Model Breadcrumbs (breadcrumbs,
breadcrumbs_ties) against float64 references written here from the papers'
formulas; DARE's drop masks statistically (drop rate, expectation equal to
task arithmetic) and by reproducibility; every method whole = row blocks;
the CLI flags and a recipe."""

from __future__ import annotations

import math

import pytest
import torch
import yaml

import ccsmerge
from ccsmerge.cli import main
from ccsmerge.methods.dare import stream_key, uniform_bits
from checkpoints import load_output, smallest_budget, toy_set, write_set
from reference import ref_breadcrumbs_kept, ref_consensus

NEW_METHODS = ("dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties")


def task_vectors64(models, base, name):
    b = base[name].double().reshape(-1)
    return torch.stack([sd[name].double().reshape(-1) - b for sd in models]), b


def dare_mask(seed, name, t, numel):
    """The kept entries: u_i = top 53 bits of draw i / 2**53 < density is
    checked by the caller (the generator is the method's definition)."""
    return uniform_bits(stream_key(seed, name, t), 0, numel, "cpu").double() / 2.0**53


def dare64(models, base, name, *, density, lam, seed, ties, normalize=False):
    """Yu et al. 2024: tau_t * m_t / p with m_t ~ Bernoulli(p), then merged."""
    taus, b = task_vectors64(models, base, name)
    masks = torch.stack([dare_mask(seed, name, t, taus.shape[1]) < density for t in range(len(models))])
    rescaled = torch.where(masks, taus / density, 0.0)
    return (b + lam * ref_consensus(rescaled, ties, normalize)).reshape(base[name].shape)


def breadcrumbs64(models, base, name, *, density, gamma, lam, ties, normalize=False):
    """Davari & Belilovsky 2024: per task vector, drop the top gamma share and
    the bottom of |tau| so that a density share is kept (mergekit's counts:
    keep int(density N), drop int(gamma N) largest, fewer if the two exceed
    N); ranks by (|tau|, index)."""
    taus, b = task_vectors64(models, base, name)
    kept = ref_breadcrumbs_kept(taus, density, gamma)
    return (b + lam * ref_consensus(kept, ties, normalize)).reshape(base[name].shape)


@pytest.fixture(scope="module")
def toys():
    base, models = toy_set(3, width=32, vocab=48, dtype=torch.float64, int_buffer=False)
    return base, models


@pytest.mark.parametrize("ties", [False, True], ids=["dare_linear", "dare_ties"])
@pytest.mark.parametrize("normalize", [False, True], ids=["sum", "normalize"])
def test_dare_equals_the_float64_reference(toys, ties, normalize):
    base, models = toys
    method = "dare_ties" if ties else "dare_linear"
    options = dict(density=0.3, lam=0.7, seed=5)
    got = ccsmerge.merge(models, method, base=base, device="cpu", normalize=normalize, **options)
    for name in base:
        ref = dare64(models, base, name, ties=ties, normalize=normalize, **options)
        torch.testing.assert_close(got[name], ref, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("ties", [False, True], ids=["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("density,gamma", [(0.5, 0.05), (0.9, 0.3), (0.3, 0.0), (1.0, 0.1), (0.02, 0.5)])
def test_breadcrumbs_equals_the_float64_reference(toys, ties, density, gamma):
    base, models = toys
    method = "breadcrumbs_ties" if ties else "breadcrumbs"
    got = ccsmerge.merge(models, method, base=base, device="cpu", density=density, gamma=gamma, lam=1.3)
    for name in base:
        ref = breadcrumbs64(models, base, name, density=density, gamma=gamma, lam=1.3, ties=ties)
        torch.testing.assert_close(got[name], ref, rtol=1e-12, atol=1e-12, msg=name)


def test_breadcrumbs_ties_are_broken_by_index():
    """Many equal magnitudes: the kept ones are the stable ascending order's."""
    base = {"w": torch.zeros(4, 16)}
    models = [{"w": torch.tensor([1.0, -1.0, 2.0, -2.0] * 16).reshape(4, 16) * (t + 1)} for t in range(2)]
    got = ccsmerge.merge(models, "breadcrumbs", base=base, device="cpu", density=0.4, gamma=0.2)
    ref = breadcrumbs64(models, base, "w", density=0.4, gamma=0.2, lam=1.0, ties=False)
    assert torch.equal(got["w"], ref.float())


def test_dare_drop_rate_is_one_minus_density(toys):
    """Task vector 1 is zero: the merge's nonzero update entries are task 0's
    kept ones, a Binomial(N, density) count."""
    base, models = toys
    density = 0.3
    one = [models[0], base]
    got = ccsmerge.merge(one, "dare_linear", base=base, device="cpu", density=density, seed=11)
    kept = sum(int(((got[n] - base[n]) != 0).sum()) for n in base if base[n].numel() > 1)
    total = sum(base[n].numel() for n in base if base[n].numel() > 1)
    bound = 5 * math.sqrt(total * density * (1 - density))
    assert abs(kept - density * total) < bound, (kept, density * total, bound)
    # and each kept entry is task 0's divided by density
    name = "lm_head.weight"
    delta, tau = got[name] - base[name], models[0][name] - base[name]
    nz = delta != 0
    torch.testing.assert_close(delta[nz], tau[nz] / density, rtol=1e-12, atol=0)


def test_dare_expectation_is_task_arithmetic(toys):
    """The mean over S seeds of dare_linear converges to task arithmetic: its
    squared error has expectation sum_i sum_t tau_ti^2 (1 - p) / (p S)."""
    base, models = toys
    name, p, S = "lm_head.weight", 0.4, 48
    runs = [ccsmerge.merge(models, "dare_linear", base=base, device="cpu", density=p, seed=s)[name] for s in range(S)]
    mean = torch.stack(runs).mean(0)
    taus, b = task_vectors64(models, base, name)
    arithmetic = (b + taus.sum(0)).reshape(mean.shape)
    expected = float((taus**2).sum()) * (1 - p) / (p * S)
    ratio = float(((mean - arithmetic) ** 2).sum()) / expected
    assert 0.8 < ratio < 1.2, ratio  # chi-square over thousands of entries: tight


def test_generator_is_uniform_and_counter_based():
    bits = uniform_bits(stream_key(0, "w", 0), 0, 200_000, "cpu")
    u = bits.double() / 2.0**53
    assert 0 <= float(u.min()) and float(u.max()) < 1
    counts = torch.histc(u, bins=20, min=0, max=1)
    expected = 200_000 / 20
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 60, chi2  # 19 degrees of freedom: p < 1e-5 beyond this
    # Draw i does not depend on where the run of draws starts (row blocks).
    assert torch.equal(uniform_bits(stream_key(0, "w", 0), 1234, 100, "cpu"), bits[1234:1334])
    # Tasks, names and seeds have their own streams.
    for key in (stream_key(0, "w", 1), stream_key(0, "v", 0), stream_key(1, "w", 0)):
        assert not torch.equal(uniform_bits(key, 0, 100, "cpu"), bits[:100])


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_is_reproducible_from_the_seed(toys, method):
    base, models = toys
    a = ccsmerge.merge(models, method, base=base, device="cpu", density=0.5, seed=3)
    b = ccsmerge.merge(models, method, base=base, device="cpu", density=0.5, seed=3)
    c = ccsmerge.merge(models, method, base=base, device="cpu", density=0.5, seed=4)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.equal(a["lm_head.weight"], c["lm_head.weight"])
    # A tensor's mask depends on its name, not on the other tensors.
    name = "lm_head.weight"
    alone = ccsmerge.merge([{name: sd[name]} for sd in models], method, base={name: base[name]}, device="cpu",
                           density=0.5, seed=3)
    assert torch.equal(alone[name], a[name])


# ----------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=str)
def wide(request, tmp_path_factory):
    """Width-64 toys; bfloat16 task vectors have many equal magnitudes."""
    base, models = toy_set(3, width=64, vocab=256, dtype=request.param)
    base_path, paths = write_set(tmp_path_factory.mktemp("wide"), base, models)
    return base, models, base_path, paths


OPTIONS = {
    "dare_linear": {"density": 0.4, "seed": 7},
    "dare_ties": {"density": 0.4, "seed": 7, "lam": 0.8},
    "breadcrumbs": {"density": 0.5, "gamma": 0.05},
    "breadcrumbs_ties": {"density": 0.6, "gamma": 0.1, "normalize": True},
}


@pytest.mark.parametrize("method", NEW_METHODS)
def test_row_blocks_equal_the_whole_merge(tmp_path, wide, method):
    base, models, base_path, paths = wide
    options = OPTIONS[method]
    # A few rows per block (one-row blocks would only make the test slow).
    budget = 4 * smallest_budget(paths, method, base=base_path, **options)
    plan = ccsmerge.plan_checkpoints(paths, method, base=base_path, max_memory=budget, **options)
    blocked = [t for t in plan.tensors if t.block_rows is not None]
    assert blocked, "the budget should force row blocks"
    assert any(t.block_rows < t.shape[0] // 2 for t in blocked)
    if method.startswith("breadcrumbs"):
        assert all(t.passes > 2 for t in blocked)  # two selections, the counts, then the merge
    out = ccsmerge.merge_checkpoints(paths, tmp_path / "blocks", method, base=base_path, max_memory=budget,
                                     device="cpu", **options)
    whole = ccsmerge.merge_checkpoints(paths, tmp_path / "whole", method, base=base_path, device="cpu", **options)
    got, ref = load_output(out), load_output(whole)
    expected = ccsmerge.merge(models, method, base=base, device="cpu", **options)
    assert got.keys() == ref.keys() == expected.keys()
    for name in ref:
        assert torch.equal(got[name], ref[name]), name
        assert torch.equal(ref[name], expected[name]), name


def test_cli_flags_and_recipe(tmp_path, wide, capsys):
    base, models, base_path, paths = wide
    flags = ["merge", "--method", "dare_ties", "--density", "0.5", "--seed", "2", "--base", str(base_path)]
    flags += [a for p in paths for a in ("--model", str(p))] + ["--device", "cpu", "--quiet", "--out"]
    assert main([*flags, str(tmp_path / "cli")]) == 0
    expected = ccsmerge.merge(models, "dare_ties", base=base, device="cpu", density=0.5, seed=2)
    got = load_output(tmp_path / "cli")
    assert all(torch.equal(got[n], t) for n, t in expected.items())

    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({
        "merge_method": "breadcrumbs_ties",
        "base_model": str(base_path),
        "models": [{"model": str(p)} for p in paths],
        "parameters": {"lambda": 0.6, "density": 0.7, "gamma": 0.02, "normalize": True},
    }))
    assert main(["merge", str(recipe), "--device", "cpu", "--quiet", "--out", str(tmp_path / "recipe")]) == 0
    expected = ccsmerge.merge(models, "breadcrumbs_ties", base=base, device="cpu", lam=0.6, density=0.7,
                              gamma=0.02, normalize=True)
    got = load_output(tmp_path / "recipe")
    assert all(torch.equal(got[n], t) for n, t in expected.items())
    capsys.readouterr()


def test_foreign_options_are_refused(toys):
    base, models = toys
    with pytest.raises(ccsmerge.MergeError, match="does not take gamma"):
        ccsmerge.merge(models, "dare_linear", base=base, gamma=0.1)
    with pytest.raises(ccsmerge.MergeError, match="does not take seed"):
        ccsmerge.merge(models, "breadcrumbs", base=base, seed=1)
    with pytest.raises(ccsmerge.MergeError, match="needs a base"):
        ccsmerge.merge(models, "dare_ties")
