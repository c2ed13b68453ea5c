"""TSV-M, Iso-C and Iso-CTS against float64 references written here from the
papers' formulas, closed forms they must meet, and the streaming path."""

from __future__ import annotations

import pytest
import torch
from checkpoints import load_output, toy_set, write_set

import ccsmerge
import reference as R
from ccsmerge.cli import main

FAMILY = ("tsv_m", "iso_c", "iso_cts")


def family_models(T=4, m=40, n=30, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(m, n, generator=g, dtype=dtype), "b": torch.randn(n, generator=g, dtype=dtype)}
    models = [
        {k: v + 0.1 * torch.randn(v.shape, generator=g, dtype=dtype) for k, v in base.items()} for _ in range(T)
    ]
    return base, models


@pytest.mark.parametrize("T,m,n", [(4, 40, 30), (3, 24, 50), (8, 33, 33), (2, 16, 9)])
@pytest.mark.parametrize("lam", [1.0, 0.7])
def test_exact_family_matches_the_float64_references(T, m, n, lam):
    base, models = family_models(T, m, n, seed=T + m)
    xs = [sd["w"] for sd in models]
    refs = {
        "tsv_m": R.ref_tsv_m(xs, base["w"], lam),
        "iso_c": R.ref_iso_c(xs, base["w"], lam),
        "iso_cts": R.ref_iso_cts(xs, base["w"], lam, 0.8),
    }
    for method in FAMILY:
        merged = ccsmerge.merge(models, method, base=base, lam=lam, **R.exact_svd(method), device="cpu")
        torch.testing.assert_close(merged["w"], refs[method], rtol=1e-10, atol=1e-10, msg=method)
        bias = R.ref_mean_task_vector([sd["b"] for sd in models], base["b"], lam)
        torch.testing.assert_close(merged["b"], bias, rtol=1e-12, atol=1e-12, msg=method)


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.5, 1.0])
def test_iso_cts_common_space_fraction(fraction):
    base, models = family_models(3, 36, 28, seed=5)
    merged = ccsmerge.merge(models, "iso_cts", base=base, common_space_fraction=fraction, device="cpu")
    expected = R.ref_iso_cts([sd["w"] for sd in models], base["w"], 1.0, fraction)
    torch.testing.assert_close(merged["w"], expected, rtol=1e-10, atol=1e-10)


def test_isotropic_updates_have_one_singular_value():
    """Iso-C's and Iso-CTS's updates are sigma_bar times an orthonormal
    product: every singular value equals lam * sigma_bar."""
    base, models = family_models(4, 40, 30, seed=1)
    for method in ("iso_c", "iso_cts"):
        merged = ccsmerge.merge(models, method, base=base, lam=1.5, device="cpu")
        s = torch.linalg.svdvals(merged["w"] - base["w"])
        assert float(s.max() - s.min()) < 1e-10 * float(s.max()), method
    total = sum(sd["w"] - base["w"] for sd in models)
    s = torch.linalg.svdvals(ccsmerge.merge(models, "iso_c", base=base, lam=1.5, device="cpu")["w"] - base["w"])
    torch.testing.assert_close(s, 1.5 * torch.linalg.svdvals(total).mean().expand_as(s))


def test_tsv_m_of_orthogonal_low_rank_tasks_is_task_arithmetic():
    """Task vectors of rank <= r/T in mutually orthogonal row and column spaces
    keep all their triplets, the concatenated bases are already orthonormal,
    and TSV-M is base + lam * sum_t delta_t."""
    g = torch.Generator().manual_seed(3)
    m, n, T, k = 24, 20, 4, 5
    q_left = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64)).Q
    q_right = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
    base = {"w": torch.randn(m, n, generator=g, dtype=torch.float64)}
    deltas = []
    for t in range(T):
        s = torch.rand(k, generator=g, dtype=torch.float64) + 0.5
        deltas.append(q_left[:, t * k : (t + 1) * k] @ torch.diag(s) @ q_right[:, t * k : (t + 1) * k].T)
    models = [{"w": base["w"] + d} for d in deltas]
    for svd in ("exact", "randomized"):
        merged = ccsmerge.merge(models, "tsv_m", base=base, lam=0.9, svd=svd, device="cpu")
        torch.testing.assert_close(merged["w"], base["w"] + 0.9 * sum(deltas), rtol=1e-9, atol=1e-9)


def test_randomized_tsv_m_is_close_to_exact_on_decaying_spectra():
    from ccsmerge.synthetic import decaying_matrix

    g = torch.Generator().manual_seed(11)
    base = {"w": torch.randn(200, 160, generator=g)}
    models = [{"w": base["w"] + decaying_matrix(200, 160, decay=1.0, generator=g)} for _ in range(4)]
    exact = ccsmerge.merge(models, "tsv_m", base=base, svd="exact", device="cpu")["w"]
    fast = ccsmerge.merge(models, "tsv_m", base=base, device="cpu")["w"]
    update = (exact - base["w"]).norm()
    assert float((fast - exact).norm() / update) < 1e-3


@pytest.mark.parametrize("method", FAMILY)
def test_streaming_equals_in_memory(tmp_path, method):
    base, models = toy_set(4, width=32, vocab=64)
    base_path, paths = write_set(tmp_path, base, models)
    out = ccsmerge.merge_checkpoints(paths, tmp_path / "out", method, base=base_path, device="cpu")
    got = load_output(out)
    expected = ccsmerge.merge(models, method, base=base, device="cpu")
    for name, ref in expected.items():
        assert torch.equal(got[name], ref), name
    plan = ccsmerge.plan_checkpoints(paths, method, base=base_path)
    policies = {t.policy for t in plan.tensors}
    assert method.replace("_", "-") in policies and "mean-task-vector" in policies


def test_streaming_needs_whole_matrices(tmp_path):
    base, models = toy_set(3, width=32, vocab=64)
    base_path, paths = write_set(tmp_path, base, models)
    with pytest.raises(ccsmerge.MergeError, match="iso_c needs the whole matrix"):
        ccsmerge.plan_checkpoints(paths, "iso_c", base=base_path, max_memory="20KB")


def test_cli_and_recipe(tmp_path, capsys):
    base, models = toy_set(3, width=32, vocab=64)
    base_path, paths = write_set(tmp_path, base, models)
    model_flags = [a for p in paths for a in ("--model", str(p))]
    flags = ["--method", "iso_cts", "--base", str(base_path), "--common-space-fraction", "0.5", "--device", "cpu"]
    assert main(["merge", *flags, "--quiet", "--out", str(tmp_path / "a"), *model_flags]) == 0
    recipe = (tmp_path / "a" / "ccsmerge.yml").read_text()
    assert "merge_method: iso_cts" in recipe and "common_space_fraction: 0.5" in recipe
    assert main(["merge", str(tmp_path / "a" / "ccsmerge.yml"), "--quiet", "--out", str(tmp_path / "b")]) == 0
    assert load_output(tmp_path / "a").keys() == load_output(tmp_path / "b").keys()
    for name, tensor in load_output(tmp_path / "a").items():
        assert torch.equal(tensor, load_output(tmp_path / "b")[name])
    expected = ccsmerge.merge(models, "iso_cts", base=base, common_space_fraction=0.5, device="cpu")
    assert all(torch.equal(load_output(tmp_path / "a")[n], t) for n, t in expected.items())
    assert main(["merge", "--method", "tsv_m", "--quiet", "--out", str(tmp_path / "c"), *model_flags]) == 1
    assert "needs a base model" in capsys.readouterr().err
