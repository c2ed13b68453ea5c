"""The accuracy target and the adaptive randomized SVD, against brute force.

- accuracy.rounding_floor against the measured change of the exact float64 CART
  update when the inputs are rounded to bf16 / fp32: within a factor 2 either way
  (from the full spectra; from the top 2k singular values, as the engine sees them,
  within [1/2, 2.5]).
- The a-posteriori estimate against the true error of the randomized update (vs an
  exact float64 reference on the same inputs): an upper bound of it above 1e-4 (below,
  the float32 arithmetic's level), on strengths 3 % and 1 % (bf16: a noise-flat tail).
- The adaptive path: every iterate has the fixed algorithm's bytes, whole or in row
  blocks; merge(..., tolerance=0.01) is within 1 % of exact CART; the cap warns by name.

Task sets: a random base plus a shared and a task-specific part (task vectors 3 % of
the weights' norm), spectra with small gaps at sigma_k (power law i^-1 and i^-0.5) and
a large one (flat top k values, the tail 20x lower), T = 3 and 8."""

from __future__ import annotations

import warnings

import pytest
import torch

import ccsmerge
from ccsmerge import accuracy, kernels
from ccsmerge.lowrank import adaptive_randomized_svd_over_rows, randomized_svd_over_rows

import reference as R

F64 = torch.float64
M = N = 160
K = int(0.12 * M)
SPECTRA = ("power 1", "power 0.5", "large gap")


def spectrum(kind: str) -> torch.Tensor:
    i = torch.arange(1, min(M, N) + 1, dtype=F64)
    if kind == "large gap":
        s = 0.05 * i.pow(-1.0)
        s[:K] = 1.0
        return s
    return i.pow(-float(kind.split()[1]))


def task_set(kind: str, T: int, strength: float = 0.03, seed: int = 0) -> list[torch.Tensor]:
    gen = R.generator(seed)
    base = torch.randn(M, N, generator=gen, dtype=F64)
    s = spectrum(kind)

    def part():
        return (R.random_orthonormal(M, s.numel(), gen) * s) @ R.random_orthonormal(N, s.numel(), gen).T

    shared = part()
    thetas = []
    for _ in range(T):
        tau = 0.5 * shared + part()
        thetas.append(base + tau * (strength * base.norm() / tau.norm()))
    return thetas


def exact_update(xs, k=K):
    """sum_t LowRank_k(theta_t - theta_avg) in float64 and the centered spectra (T, r)."""
    xs = [x.to(F64) for x in xs]
    avg = R.ref_mean(xs)
    spectra = torch.stack([torch.linalg.svdvals(x - avg) for x in xs])
    return sum(R.ref_truncated(x - avg, k) for x in xs), spectra


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def factors_update(factors):
    u, s, vh = (f.to(F64) for f in factors)
    return torch.einsum("tmk,tk,tkn->mn", u, s, vh)


def adaptive(xs, *, oversample, tolerance, cap, storage, blocks=None, name="w"):
    center = kernels.mean(xs)
    return adaptive_randomized_svd_over_rows(
        lambda start, stop: ([x[start:stop] for x in xs], center[start:stop]), (M, N), blocks or [(0, M)], K,
        oversample=oversample, tolerance=tolerance, max_power_iters=cap, seed=3, dtype=center.dtype,
        device=center.device, storage_dtype=storage, name=name,
    )


@pytest.mark.parametrize("kind", SPECTRA)
@pytest.mark.parametrize("T", [3, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rounding_floor_matches_the_measured_change(kind, T, dtype):
    xs = task_set(kind, T)
    exact, spectra = exact_update(xs)
    moved, _ = exact_update([x.to(dtype) for x in xs])
    measured = rel(moved, exact)
    weights_rms = float(torch.stack([x.pow(2).mean() for x in xs]).mean().sqrt())
    noise = accuracy.rounding_noise(dtype, weights_rms, T)
    full = accuracy.rounding_floor(spectra, K, (M, N), noise, float(exact.norm()))
    sketch = accuracy.rounding_floor(spectra[:, : 2 * K], K, (M, N), noise, float(exact.norm()))
    assert 0.5 <= full / measured <= 2.0, (measured, full)
    assert 0.5 <= sketch / measured <= 2.5, (measured, sketch)


def test_rounding_level_is_scale_free():
    """kappa measured on a Gaussian sample holds for values spread over many binades."""
    gen = R.generator(5)
    x = torch.randn(1 << 15, generator=gen, dtype=F64) * torch.exp(1.5 * torch.randn(1 << 15, generator=gen, dtype=F64))
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        ratio = (x.to(dtype).to(F64) - x).pow(2) / x.pow(2)  # per-entry relative error, squared
        assert float(ratio.mean().sqrt()) == pytest.approx(accuracy.rounding_level(dtype), rel=0.1)
    assert accuracy.rounding_level(F64) == 0.0


@pytest.mark.parametrize("kind", SPECTRA)
@pytest.mark.parametrize("T", [3, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("strength", [0.03, 0.01])
def test_estimate_is_an_upper_bound_of_the_true_error(kind, T, dtype, strength):
    xs = [x.to(dtype) for x in task_set(kind, T, strength)]
    reference, _ = exact_update(xs)  # the exact update of these very inputs
    for oversample in (10, K):
        for cap in (1, 2, 4, 6):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the cap stops every run on purpose
                factors, report = adaptive(xs, oversample=oversample, tolerance=1e-9, cap=cap, storage=dtype)
            assert report.power_iters == cap
            true = rel(factors_update(factors), reference)
            if true < 1e-4:  # the float32 arithmetic's own level: its margin is a model, not a bound
                assert report.estimated_error <= 1e-2
                continue
            assert true <= report.estimated_error, (oversample, cap, true, report.estimated_error)


@pytest.mark.parametrize("blocks", [None, [(0, 50), (50, 120), (120, M)]])
def test_each_iterate_has_the_fixed_algorithms_bytes(blocks):
    xs = [x.float() for x in task_set("power 1", 3)]
    center = kernels.mean(xs)
    blocks_ = blocks or [(0, M)]
    for q in (1, 3):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            adaptive_factors, report = adaptive(xs, oversample=10, tolerance=1e-9, cap=q, storage=torch.float32,
                                                blocks=blocks)
        fixed = randomized_svd_over_rows(
            lambda start, stop: ([x[start:stop] for x in xs], center[start:stop]), (M, N), blocks_, K,
            oversample=10, power_iters=q, seed=3, dtype=torch.float32, device=center.device,
        )
        assert report.power_iters == q and report.width == K + 10
        for a, b in zip(adaptive_factors, fixed):
            assert torch.equal(a, b)


def test_adaptive_stops_at_the_target_and_is_deterministic():
    xs = [x.float() for x in task_set("power 1", 8)]
    reference, _ = exact_update(xs)
    runs = [adaptive(xs, oversample=K, tolerance=0.01, cap=8, storage=torch.float32) for _ in range(2)]
    (factors, report), (again, _) = runs
    assert all(torch.equal(a, b) for a, b in zip(factors, again))
    assert not report.reached_cap and report.estimated_error <= 0.01 == report.target
    assert report.rounding_floor < 1e-4  # float32 inputs: far below the target
    assert rel(factors_update(factors), reference) <= 0.01
    # a looser target stops no later
    _, loose = adaptive(xs, oversample=K, tolerance=0.2, cap=8, storage=torch.float32)
    assert loose.power_iters <= report.power_iters


def test_auto_target_for_bf16_inputs_is_a_quarter_of_the_floor():
    xs = [x.to(torch.bfloat16) for x in task_set("power 1", 3, strength=0.01)]
    factors, report = adaptive(xs, oversample=K, tolerance="auto", cap=8, storage=torch.bfloat16)
    assert report.rounding_floor > 4 * accuracy.AUTO_MIN_TARGET  # bf16 at 1 %: a floor of tens of percent
    assert report.target == pytest.approx(accuracy.AUTO_FRACTION * report.rounding_floor)
    assert report.estimated_error <= report.target
    reference, _ = exact_update(xs)
    assert rel(factors_update(factors), reference) <= report.target


def test_resolve_target():
    assert accuracy.resolve_target(0.03, 0.5) == 0.03
    assert accuracy.resolve_target("auto", 0.2) == pytest.approx(0.05)
    assert accuracy.resolve_target("auto", 1e-5) == accuracy.AUTO_MIN_TARGET
    for bad in (0, 1, -0.1, 1.5, float("nan"), "fast", True):
        with pytest.raises(ValueError, match="tolerance"):
            accuracy.resolve_target(bad, 0.1)


def _models(T: int, dtype=torch.float32):
    xs = task_set("power 1", T)
    bias = [torch.randn(M, generator=R.generator(t), dtype=F64) for t in range(T)]
    return [{"layers.0.mlp.weight": x.to(dtype), "layers.0.mlp.bias": b.to(dtype)} for x, b in zip(xs, bias)]


def test_merge_with_tolerance_is_within_it_of_exact_cart():
    models = _models(3)
    merged = ccsmerge.merge(models, method="cart", tolerance=0.01, lam=2.0)
    xs = [m["layers.0.mlp.weight"] for m in models]
    avg = R.ref_mean(xs)
    exact = R.ref_cart_tensor(xs, K, 2.0)
    got = merged["layers.0.mlp.weight"].to(F64)
    assert rel(got - avg, exact - avg) <= 0.01
    torch.testing.assert_close(merged["layers.0.mlp.bias"].to(F64), R.ref_mean([m["layers.0.mlp.bias"] for m in models]))
    assert all(torch.equal(a, b) for a, b in zip(merged.values(),
                                                 ccsmerge.merge(models, method="cart", tolerance=0.01, lam=2.0).values()))


def test_the_cap_warns_with_the_tensor_name():
    models = _models(3)
    with pytest.warns(UserWarning, match=r"tensor 'layers\.0\.mlp\.weight': 1 power iterations \(the cap\)"):
        ccsmerge.merge(models, method="cart", tolerance=1e-4, power_iters=1, oversample=0)


def test_without_tolerance_the_merge_is_the_fixed_algorithm():
    """tolerance=None: 4 power iterations, oversample max(10, k); the default is "auto"."""
    models = _models(3)
    fixed = ccsmerge.merge(models, method="cart", tolerance=None)
    explicit = ccsmerge.merge(models, method="cart", tolerance=None, power_iters=4, oversample=max(10, K))
    assert all(torch.equal(fixed[n], explicit[n]) for n in fixed)
    record = []
    ccsmerge.merge(models, method="cart", record=record)
    assert [e.tolerance for e in record] == ["auto"]


def test_tolerance_through_the_cli_and_a_recipe(tmp_path):
    """--tolerance 0.01 and a recipe's `tolerance: auto` merge what the API merges (bf16 inputs)."""
    import yaml

    from ccsmerge.cli import main
    from checkpoints import load_output, toy_set, write_set

    _, models = toy_set(3, width=48, vocab=96, dtype=torch.bfloat16, int_buffer=False)
    _, paths = write_set(tmp_path / "in", models[0], models)
    inputs = [a for p in paths for a in ("--model", str(p))]
    for tolerance in (0.01, "auto"):
        expected = ccsmerge.merge(models, method="cart", tolerance=tolerance, device="cpu")
        out = tmp_path / f"cli-{tolerance}"
        assert main(["merge", *inputs, "--tolerance", str(tolerance), "--device", "cpu", "--quiet", "--out", str(out)]) == 0
        recipe = {"merge_method": "cart", "models": [{"model": str(p)} for p in paths],
                  "parameters": {"tolerance": tolerance}}
        (tmp_path / "recipe.yml").write_text(yaml.safe_dump(recipe))
        from_recipe = tmp_path / f"recipe-{tolerance}"
        assert main(["merge", str(tmp_path / "recipe.yml"), "--device", "cpu", "--quiet", "--out", str(from_recipe)]) == 0
        for folder in (out, from_recipe):
            got = load_output(folder)
            assert got.keys() == expected.keys()
            assert all(torch.equal(got[n], expected[n]) for n in expected), folder
