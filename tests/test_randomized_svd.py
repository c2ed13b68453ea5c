"""ccsmerge.ops.randomized_svd / centered_randomized_svd / centered_exact_svd
against the float64 SVD (Eckart-Young optimum)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ccsmerge.ops import centered_exact_svd, centered_randomized_svd, randomized_svd
import reference as R
from conftest import UNIT_ROUNDOFF, compute_dtype, skip_unless_available

SHAPES = [(120, 80), (80, 120), (100, 100), (300, 40), (40, 300), (7, 5), (1, 9), (9, 1)]


def _reconstruct(u, s, vh):
    return (u.double().cpu() * s.double().cpu().unsqueeze(-2)) @ vh.double().cpu()


def _check_factors(a, k, u, s, vh, dtype):
    m, n = a.shape[-2:]
    cdt = compute_dtype(dtype)
    assert u.shape == (m, k) and s.shape == (k,) and vh.shape == (k, n)
    assert u.dtype == s.dtype == vh.dtype == cdt
    assert u.device == s.device == vh.device == a.device
    # float32: ~100 sqrt(max(m, n)) roundoffs. float64: 1e-10, a million times
    # looser than LAPACK's SVD gives, yet tighter than what a float32 computation reaches.
    tol = 100 * max(m, n) ** 0.5 * UNIT_ROUNDOFF[cdt] if cdt == torch.float32 else 1e-10
    eye = torch.eye(k, dtype=torch.float64)
    torch.testing.assert_close(u.double().cpu().mT @ u.double().cpu(), eye, rtol=0, atol=tol)
    torch.testing.assert_close(vh.double().cpu() @ vh.double().cpu().mT, eye, rtol=0, atol=tol)
    s64 = s.double().cpu()
    assert bool((s64 >= 0).all())
    assert bool((s64[:-1] >= s64[1:] * (1 - tol)).all()), "singular values not in descending order"


def _check_near_optimal(a64, k, u, s, vh, cdt, factor=1.02):
    """||A - U S Vh||_F <= factor * ||A - A_k||_F (the rank-k optimum), or,
    when A has rank <= k, a rounding-level error."""
    err = float((a64 - _reconstruct(u, s, vh)).norm())
    opt = R.ref_truncation_error(a64, k)
    # Rounding level; CholeskyQR2 (the CUDA orthonormalisation) carries larger
    # constants than Householder QR, hence 200 rather than a tighter factor.
    floor = 200 * max(a64.shape) ** 0.5 * UNIT_ROUNDOFF[cdt] * float(a64.norm())
    assert err <= factor * opt + floor, f"rank-{k} error {err:.6e} vs optimum {opt:.6e} (x{err / max(opt, 1e-300):.4f})"
    return err, opt


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("decay", [1.0, 2.0])
def test_randomized_svd_near_optimal(device, shape, decay):
    m, n = shape
    a64 = R.decaying_matrix(m, n, decay=decay, seed=m * 7 + n)
    r = min(m, n)
    for k in sorted({1, max(1, r // 4), max(1, r // 2), r}):
        for dtype in (torch.float32, torch.float64):
            a = a64.to(dtype).to(device)
            u, s, vh = randomized_svd(a, k, oversample=10, power_iters=2, seed=k)
            _check_factors(a, k, u, s, vh, dtype)
            _check_near_optimal(a.double().cpu(), k, u, s, vh, compute_dtype(dtype))
            # The leading singular values themselves are accurate.
            s_true = torch.linalg.svdvals(a.double().cpu())[:k]
            assert abs(float(s[0]) - float(s_true[0])) <= 1e-4 * float(s_true[0])


@pytest.mark.parametrize("shape", [(60, 40), (40, 60), (33, 33), (1, 5)], ids=str)
def test_randomized_svd_full_rank_is_exact(device, shape):
    """k = min(m, n): the sketch spans the whole range, so the factorisation is exact."""
    k = min(shape)
    for dtype in (torch.float32, torch.float64):
        a64 = R.decaying_matrix(*shape, decay=1.0, seed=1)
        a = a64.to(dtype).to(device)
        for oversample, power_iters in [(10, 2), (0, 0)]:
            u, s, vh = randomized_svd(a, k, oversample=oversample, power_iters=power_iters)
            _check_factors(a, k, u, s, vh, dtype)
            err = float((a.double().cpu() - _reconstruct(u, s, vh)).norm())
            assert err <= 200 * max(shape) ** 0.5 * UNIT_ROUNDOFF[compute_dtype(dtype)] * float(a64.norm())
            torch.testing.assert_close(
                s.double().cpu(), torch.linalg.svdvals(a.double().cpu()), rtol=0,
                atol=200 * UNIT_ROUNDOFF[compute_dtype(dtype)] * float(a64.norm()),
            )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_randomized_svd_accepts_half_precision(device, dtype):
    """bf16/fp16 inputs are computed in float32; the result is near-optimal
    for the matrix the half-precision values represent."""
    a = R.decaying_matrix(90, 60, decay=1.5, seed=3, scale=4.0).to(dtype).to(device)
    for k in (1, 10, 60):
        u, s, vh = randomized_svd(a, k)
        _check_factors(a, k, u, s, vh, dtype)
        _check_near_optimal(a.double().cpu(), k, u, s, vh, torch.float32)
    # Same result as handing it the float32 copy of the values.
    u, s, vh = randomized_svd(a, 10, seed=5)
    u2, s2, vh2 = randomized_svd(a.float(), 10, seed=5)
    torch.testing.assert_close(_reconstruct(u, s, vh), _reconstruct(u2, s2, vh2), rtol=1e-5, atol=1e-5)


@settings(max_examples=25, deadline=None, derandomize=True, database=None)
@given(
    m=st.integers(1, 70),
    n=st.integers(1, 70),
    k_frac=st.floats(0.0, 1.0),
    decay=st.floats(1.0, 3.0),
    seed=st.integers(0, 2**31 - 1),
    oversample=st.integers(10, 20),
    power_iters=st.integers(2, 4),
    f64=st.booleans(),
)
def test_randomized_svd_property(m, n, k_frac, decay, seed, oversample, power_iters, f64):
    dtype = torch.float64 if f64 else torch.float32
    a64 = R.decaying_matrix(m, n, decay=decay, seed=seed % 10_000)
    k = max(1, min(min(m, n), round(k_frac * min(m, n))))
    a = a64.to(dtype)
    u, s, vh = randomized_svd(a, k, oversample=oversample, power_iters=power_iters, seed=seed)
    _check_factors(a, k, u, s, vh, dtype)
    _check_near_optimal(a.double(), k, u, s, vh, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_randomized_svd_factors_orthonormal_with_wide_spectrum(device, dtype):
    """A spectrum spanning 5.5 decades (sigma_i = i^-3, i = 1..70): the factors
    stay orthonormal to working precision whatever the conditioning, as a
    float64 SVD's do (float64: to 1e-10; float32: to ~1e-5)."""
    a = R.decaying_matrix(70, 70, decay=3.0, seed=1).to(dtype).to(device)
    for k in (35, 70):
        u, s, vh = randomized_svd(a, k)
        _check_factors(a, k, u, s, vh, dtype)
        _check_near_optimal(a.double().cpu(), k, u, s, vh, dtype)


def test_randomized_svd_is_deterministic_per_seed(device):
    a = R.decaying_matrix(80, 50, decay=1.0, seed=2).float().to(device)
    first = randomized_svd(a, 8, seed=123)
    second = randomized_svd(a, 8, seed=123)
    for x, y in zip(first, second):
        assert torch.equal(x, y)
    other = randomized_svd(a, 8, seed=124)
    assert not torch.equal(first[0], other[0])
    assert not torch.equal(first[2], other[2])
    # A different seed is still a near-optimal factorisation.
    _check_near_optimal(a.double().cpu(), 8, *other, torch.float32)


def test_randomized_svd_rejects_bad_arguments():
    a = torch.randn(10, 6)
    for k in (0, 7, -1):
        with pytest.raises(ValueError):
            randomized_svd(a, k)
    with pytest.raises(ValueError):
        randomized_svd(torch.randn(10), 1)
    with pytest.raises(ValueError):
        randomized_svd(torch.randn(2, 10, 6), 1)
    with pytest.raises(ValueError):
        randomized_svd(a, 2, oversample=-1)
    with pytest.raises(ValueError):
        randomized_svd(a, 2, power_iters=-1)


# ----------------------------------------------------------------------------- centered


def _centered_inputs(T, shape, seed, dtype, device):
    base, thetas = R.task_set(T, *shape, decay=1.5, seed=seed)
    xs = [th.to(dtype).to(device) for th in thetas]
    center64 = R.ref_mean(xs)
    center = center64.to(compute_dtype(dtype)).to(device)
    return xs, center


@pytest.mark.parametrize("shape", [(60, 40), (40, 60), (50, 50)], ids=str)
@pytest.mark.parametrize("T", [2, 3, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_centered_randomized_svd_equals_per_matrix(device, shape, T, dtype):
    """centered_randomized_svd(xs, C) factorises every xs[t] - C as
    randomized_svd would the explicitly centered matrix (same seed, same sketch)."""
    k = 6
    xs, center = _centered_inputs(T, shape, T, dtype, device)
    u, s, vh = centered_randomized_svd(xs, center, k, oversample=10, power_iters=2, seed=7)
    m, n = shape
    cdt = compute_dtype(dtype)
    assert u.shape == (T, m, k) and s.shape == (T, k) and vh.shape == (T, k, n)
    assert u.dtype == s.dtype == vh.dtype == cdt
    for t, x in enumerate(xs):
        d = x.to(cdt) - center
        ut, st_, vht = randomized_svd(d, k, oversample=10, power_iters=2, seed=7)
        rec = _reconstruct(u[t], s[t], vh[t])
        rec_single = _reconstruct(ut, st_, vht)
        scale = float(d.double().norm())
        tol = 1e-4 if cdt == torch.float32 else 1e-10
        assert float((rec - rec_single).norm()) <= tol * scale
        torch.testing.assert_close(s[t].double().cpu(), st_.double().cpu(), rtol=tol, atol=tol * scale)
        # And both are near-optimal for the centered matrix.
        _check_near_optimal(d.double().cpu(), k, u[t], s[t], vh[t], cdt)


def test_centered_randomized_svd_without_center(device):
    xs = [R.decaying_matrix(40, 30, decay=1.0, seed=s).float().to(device) for s in range(3)]
    u, s, vh = centered_randomized_svd(xs, None, 5, seed=3)
    for t, x in enumerate(xs):
        ut, st_, vht = randomized_svd(x, 5, seed=3)
        assert float((_reconstruct(u[t], s[t], vh[t]) - _reconstruct(ut, st_, vht)).norm()) <= 1e-5 * float(
            x.double().norm()
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_centered_exact_svd_matches_reference(device, dtype):
    xs, center = _centered_inputs(4, (45, 30), 2, dtype, device)
    k = 7
    u, s, vh = centered_exact_svd(xs, center, k)
    assert u.shape == (4, 45, k) and s.shape == (4, k) and vh.shape == (4, k, 30)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    for t, x in enumerate(xs):
        d = x.double().cpu() - center.double().cpu()
        ref = R.ref_truncated(d, k)
        assert float((_reconstruct(u[t], s[t], vh[t]) - ref).norm()) <= tol * float(d.norm())


def test_centered_svd_k_out_of_range():
    xs = [torch.randn(8, 5) for _ in range(2)]
    c = torch.stack(xs).mean(0)
    for fn in (centered_exact_svd, centered_randomized_svd):
        with pytest.raises(ValueError):
            fn(xs, c, 0)
        with pytest.raises(ValueError):
            fn(xs, c, 6)


def test_cuda_randomized_svd_agrees_with_cpu(cuda_device):
    """Different generators, so different sketches, but both devices reach the
    same (well-separated) rank-k truncation."""
    skip_unless_available(cuda_device)
    a64 = R.decaying_matrix(150, 90, decay=2.0, seed=9)
    k = 10
    ref = R.ref_truncated(a64, k)
    for dev in ("cpu", cuda_device):
        u, s, vh = randomized_svd(a64.float().to(dev), k)
        assert float((_reconstruct(u, s, vh) - ref).norm()) <= 1e-3 * float(ref.norm())


def test_factorizations_run_on_one_thread_and_restore_the_count():
    from ccsmerge.numerics import one_thread_factorizations

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with one_thread_factorizations(torch.device("cpu")):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError), one_thread_factorizations(torch.device("cpu")):
            raise RuntimeError("inside")
        assert torch.get_num_threads() == 2
        with one_thread_factorizations(torch.device("cuda")):  # a device without CPU threads: unchanged
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("tolerance", [None, "auto"])
def test_merge_factorizations_see_one_thread_and_gemms_all(monkeypatch, tolerance):
    """The randomized engine's QR, Cholesky and eigh run on one thread (their barriers stall
    when the cores are shared); the merge keeps the caller's thread count elsewhere."""
    import ccsmerge

    seen = {}

    def recording(name, fn):
        def call(*args, **kwargs):
            seen.setdefault(name, set()).add(torch.get_num_threads())
            return fn(*args, **kwargs)
        return call

    for name in ("qr", "eigh", "cholesky_ex"):
        monkeypatch.setattr(torch.linalg, name, recording(name, getattr(torch.linalg, name)))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(0)
        base = torch.randn(96, 64, generator=g)
        models = [{"w": base + 0.05 * torch.randn(96, 64, generator=g)} for _ in range(3)]
        ccsmerge.merge(models, method="cart", rank_ratio=0.25, tolerance=tolerance)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert seen.get("eigh") == {1}
    assert all(counts == {1} for counts in seen.values()), seen
