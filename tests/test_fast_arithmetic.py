"""Low-precision products and CholeskyQR bases (ccsmerge.fast_arithmetic), against float64.

- centered_product: op(x_t - C) @ rhs within bf16's rounding of the *centered* matrix
  (relative to the task vector, not the weights), plain and transposed, shared and per-task
  right-hand sides, without a center, on bf16 and float32 inputs.
- cholesky_qr: the span of Householder QR's basis, orthonormal after two rounds, and
  Householder QR itself for a rank-deficient panel.
- The adaptive engine with the fast products forced on: its estimate still bounds the true
  error (within 2x) on spectra with small and large gaps, T = 3 and 8, bf16 and fp32 inputs;
  a tiny tolerance keeps them off; the same seed gives the same bytes."""

from __future__ import annotations

import warnings

import pytest
import torch

from ccsmerge import accuracy, fast_arithmetic, kernels

from test_accuracy import SPECTRA, adaptive, exact_update, factors_update, rel, task_set

F64 = torch.float64
BF16_EPS = 2.0**-8


def _inputs(dtype, T=3, m=300, n=200, strength=0.02, seed=0):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(m, n, generator=gen, dtype=F64)
    xs = [(base + strength * torch.randn(m, n, generator=gen, dtype=F64)).to(dtype) for _ in range(T)]
    return xs, kernels.mean(xs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("shared", [True, False])
def test_centered_product_is_within_bf16_of_the_centered_matrix(dtype, transpose, shared):
    xs, center = _inputs(dtype)
    T, (m, n) = len(xs), xs[0].shape
    inner = m if transpose else n
    gen = torch.Generator().manual_seed(1)
    rhs = torch.randn(inner, 24, generator=gen) if shared else torch.randn(T, inner, 24, generator=gen)
    got = fast_arithmetic.centered_product(xs, center, rhs, transpose)
    assert got.dtype == torch.float32 and got.shape == (T, n if transpose else m, 24)
    for t, x in enumerate(xs):
        d = x.to(F64) - center.to(F64)
        expected = (d.mT if transpose else d) @ (rhs if shared else rhs[t]).to(F64)
        # three bf16 roundings (panel, rhs, output) of relative size <= eps/2 each
        assert rel(got[t].to(F64), expected) < 2 * BF16_EPS
        # what X R - C R in bf16 would give: the weights' rounding, 50x the task vector's
        assert rel(got[t].to(F64), expected) < 0.1 * float(x.to(F64).norm() / d.norm()) * BF16_EPS


def test_centered_product_without_center_and_row_blocks():
    xs, _ = _inputs(torch.bfloat16, m=1100, n=90)  # several row panels
    rhs = torch.randn(90, 8, generator=torch.Generator().manual_seed(2))
    got = fast_arithmetic.centered_product([x[100:900] for x in xs], None, rhs)
    for t, x in enumerate(xs):
        assert rel(got[t].to(F64), x[100:900].to(F64) @ rhs.to(F64)) < 2 * BF16_EPS


def _projector(q):
    q = q.to(F64)
    return q @ q.mT


def test_cholesky_qr_spans_what_householder_spans():
    gen = torch.Generator().manual_seed(3)
    # columns scaled over 3 decades: cond ~1e3, within CholeskyQR2's float32 range
    y = torch.randn(2, 500, 40, generator=gen) * torch.logspace(0, -3, 40)
    householder = torch.linalg.qr(y).Q
    for rounds in (1, 2):
        q = fast_arithmetic.cholesky_qr(y, rounds=rounds)
        assert q.shape == y.shape
        for t in range(2):
            # the span: the projector onto q's columns leaves y's columns in place
            yt = y[t].to(F64)
            basis = torch.linalg.qr(q[t].to(F64)).Q  # one round's basis is not quite orthonormal
            assert float((yt - _projector(basis) @ yt).norm() / yt.norm()) < 1e-4
    q = fast_arithmetic.cholesky_qr(y, rounds=2).to(F64)
    eye = torch.eye(40, dtype=F64)
    assert float((q.mT @ q - eye).abs().max()) < 1e-5
    assert float((_projector(q[0]) - _projector(householder[0])).norm()) < 1e-3
    # one round: a well-conditioned basis of the same span (enough between power iterations)
    one = fast_arithmetic.cholesky_qr(y, rounds=1).to(F64)
    assert torch.linalg.cond(one[0]) < 1.5


def test_cholesky_qr_falls_back_to_householder_on_a_rank_deficient_panel():
    gen = torch.Generator().manual_seed(4)
    y = torch.randn(400, 10, generator=gen) @ torch.randn(10, 30, generator=gen)  # rank 10 of 30
    q = fast_arithmetic.cholesky_qr(y).to(F64)
    assert torch.isfinite(q).all()
    assert float((q.mT @ q - torch.eye(30, dtype=F64)).abs().max()) < 1e-5
    assert float((y.to(F64) - _projector(q) @ y.to(F64)).norm() / y.norm()) < 1e-5


@pytest.fixture
def fast_forced(monkeypatch):
    """The fast products whatever their floor (as on a device where they are available)."""
    monkeypatch.setattr(accuracy, "FAST_SHARE", float("inf"))
    monkeypatch.setattr(fast_arithmetic, "available", lambda device, dtype: dtype == torch.float32)


@pytest.mark.parametrize("kind", SPECTRA)
@pytest.mark.parametrize("T", [3, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_estimate_with_fast_products_bounds_the_true_error(fast_forced, kind, T, dtype):
    xs = [x.to(dtype) for x in task_set(kind, T)]
    reference, _ = exact_update(xs)
    for cap in (2, 4, 6):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the cap stops every run on purpose
            factors, report = adaptive(xs, oversample=10, tolerance=1e-9, cap=cap, storage=dtype)
        assert report.fast_products and report.power_iters == cap
        true = rel(factors_update(factors), reference)
        assert true <= 2 * report.estimated_error, (cap, true, report.estimated_error)


def test_fast_products_are_deterministic(fast_forced):
    xs = [x.to(torch.bfloat16) for x in task_set("power 1", 3, strength=0.01)]
    (a, ra), (b, rb) = (adaptive(xs, oversample=10, tolerance="auto", cap=8, storage=torch.bfloat16) for _ in range(2))
    assert ra.fast_products and ra == rb
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_a_target_below_the_fast_floor_keeps_float32():
    xs = [x.float() for x in task_set("power 1", 3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, report = adaptive(xs, oversample=10, tolerance=1e-9, cap=2, storage=torch.float32)
    assert not report.fast_products


def test_bf16_inputs_with_small_task_vectors_use_the_fast_products_where_available():
    xs = [x.to(torch.bfloat16) for x in task_set("power 1", 3, strength=0.01)]
    factors, report = adaptive(xs, oversample=10, tolerance="auto", cap=8, storage=torch.bfloat16)
    assert report.fast_products == fast_arithmetic.available(torch.device("cpu"), torch.float32)
    reference, _ = exact_update(xs)
    assert rel(factors_update(factors), reference) <= report.target
