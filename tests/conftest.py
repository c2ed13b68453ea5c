"""Shared fixtures: the devices the tests run on, implementation selectors
and tolerances.

Devices: "cpu" always and "cuda" (skipped cleanly where no GPU is available).
CCSMERGE_TEST_DEVICES=cpu,cuda (a comma list) replaces that list."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `import reference`

import ccsmerge  # noqa: E402
from ccsmerge import _extension  # noqa: E402

DEVICE_ENV = "CCSMERGE_TEST_DEVICES"


def devices_under_test() -> list[str]:
    env = os.environ.get(DEVICE_ENV, "").strip()
    if env:
        return [d.strip() for d in env.split(",") if d.strip()]
    return ["cpu", "cuda"]


def skip_unless_available(device: str) -> None:
    kind = torch.device(device).type
    if kind == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    if kind not in ("cpu", "cuda"):
        pytest.skip(f"device {device!r} is not covered by these tests")


@pytest.fixture(params=devices_under_test())
def device(request) -> str:
    skip_unless_available(request.param)
    return request.param


@pytest.fixture
def cuda_device() -> str:
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    return "cuda"


def has_ext(op: str, device: str) -> bool:
    return _extension.has_kernel(op, torch.device(device).type)


IMPLS = ("ops", "ext", "fallback")


def get_impl(op: str, impl: str, device: str):
    """The callable for ccsmerge op `op`: the public wrapper (ccsmerge.ops),
    the compiled kernel (torch.ops.ccsmerge.<op>.default) or the pure-PyTorch
    fallback (ccsmerge.fallback). Skips when the compiled kernel is missing."""
    if impl == "ops":
        return getattr(ccsmerge.ops, op)
    if impl == "fallback":
        return getattr(ccsmerge.fallback, op)
    if not has_ext(op, device):
        pytest.skip(f"no compiled {op} kernel for {device}")
    return getattr(torch.ops.ccsmerge, op).default


@pytest.fixture(params=IMPLS)
def impl(request) -> str:
    return request.param


@pytest.fixture(autouse=True)
def _full_precision_matmuls():
    """The reference comparisons assume IEEE float32 GEMMs (no TF32), whatever
    the process default is; restored afterwards."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(previous)


# Unit roundoff of each dtype (half the spacing of numbers in [1, 2)).
UNIT_ROUNDOFF = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    torch.bfloat16: 2.0**-8,
    torch.float16: 2.0**-11,
}

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The engine's compute dtype, by the documented rule."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b||_F / ||b||_F in float64 on the CPU."""
    a64 = a.detach().to("cpu", torch.float64)
    b64 = b.detach().to("cpu", torch.float64)
    return float((a64 - b64).norm() / b64.norm())


def assert_within(actual: torch.Tensor, expected: torch.Tensor, bound, what: str = "") -> None:
    """|actual - expected| <= bound elementwise (bound: a number or a tensor
    broadcastable to the shapes), compared in float64 on the CPU."""
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    b = bound.detach().to("cpu", torch.float64) if isinstance(bound, torch.Tensor) else torch.tensor(float(bound))
    err = (a - e).abs()
    bad = ~(err <= b)
    if bool(bad.any()):
        excess = torch.where(bad, err - b.expand_as(err), torch.zeros_like(err))
        i = int(excess.reshape(-1).argmax())
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {err.numel()} elements out of bounds; worst at flat index {i}: "
            f"actual {a.reshape(-1)[i].item()!r}, expected {e.reshape(-1)[i].item()!r}, "
            f"|diff| {err.reshape(-1)[i].item():.3e} > bound {b.expand_as(err).reshape(-1)[i].item():.3e}"
        )
