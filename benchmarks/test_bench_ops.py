"""pytest-benchmark micro-benchmarks of the ccsmerge ops against plain PyTorch.

    python -m pytest benchmarks/test_bench_ops.py --benchmark-only [--out DIR]

Each comparison shares a benchmark group (e.g. "mean T=8 2048x2048 bfloat16 cpu"), so
pytest-benchmark's table puts the contenders side by side. Parametrised over the CPU and,
when one is available, the CUDA device; CUDA calls synchronize before returning, so the
wall-clock timer sees the whole GPU work. These live outside tests/ (the repository's
testpaths), so a plain `pytest` never collects them."""

from __future__ import annotations

import pytest
import torch

import synthetic
from machine import load_ccsmerge

ccsmerge = load_ccsmerge()

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SVD_SHAPES = [(768, 768), (3072, 768)]
RANK_RATIO = 0.08


def synced(fn, device: str):
    """fn, followed by a device synchronization on CUDA."""
    if device != "cuda":
        return fn

    def call():
        out = fn()
        torch.cuda.synchronize()
        return out

    return call


def run(benchmark, fn, device: str, rounds: int, warmup: int = 1):
    return benchmark.pedantic(synced(fn, device), rounds=rounds, warmup_rounds=warmup, iterations=1)


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


# --------------------------------------------------------------------------- mean


@pytest.fixture(params=["bfloat16", "float32"])
def mean_inputs(request, device):
    T, m, n = 8, 2048, 2048
    gen = synthetic.generator(0, device)
    xs = [torch.randn(m, n, generator=gen, device=device).to(getattr(torch, request.param)) for _ in range(T)]
    return xs, f"mean T={T} {m}x{n} {request.param} {device}"


def test_mean_ccsmerge(benchmark, device, mean_inputs):
    xs, group = mean_inputs
    benchmark.group = group
    out = run(benchmark, lambda: ccsmerge.ops.mean(xs), device, rounds=20)
    assert out.dtype == torch.float32


def test_mean_torch_stack(benchmark, device, mean_inputs):
    xs, group = mean_inputs
    benchmark.group = group
    run(benchmark, lambda: torch.stack(xs).float().mean(0), device, rounds=20)


# --------------------------------------------------------------------------- rank-k SVD


@pytest.fixture(params=SVD_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def svd_input(request, device):
    m, n = request.param
    a = synthetic.decaying_matrix(m, n, seed=1, device=device)
    k = max(1, int(RANK_RATIO * min(m, n)))
    return a, k, f"rank-{k} SVD {m}x{n} {device}"


@pytest.mark.parametrize("power_iters", [2, 4])
def test_svd_ccsmerge_randomized(benchmark, svd_input, device, power_iters):
    a, k, group = svd_input
    benchmark.group = group
    u, s, vh = run(benchmark, lambda: ccsmerge.ops.randomized_svd(a, k, oversample=10, power_iters=power_iters),
                   device, rounds=10)
    assert u.shape == (a.shape[0], k)


def test_svd_torch_svd_lowrank(benchmark, svd_input, device):
    a, k, group = svd_input
    benchmark.group = group
    run(benchmark, lambda: torch.svd_lowrank(a, q=k + 10, niter=2), device, rounds=10)


def test_svd_torch_linalg_svd(benchmark, svd_input, device):
    a, k, group = svd_input
    benchmark.group = group
    run(benchmark, lambda: torch.linalg.svd(a, full_matrices=False), device, rounds=3)


# --------------------------------------------------------------------------- low-rank update


@pytest.fixture
def update_inputs(device):
    m, n, r = 4096, 4096, 8 * 327  # T = 8 tasks of rank 8% of 4096
    gen = synthetic.generator(0, device)
    center = torch.randn(m, n, generator=gen, device=device)
    left = torch.randn(m, r, generator=gen, device=device) / r**0.5
    right = torch.randn(r, n, generator=gen, device=device)
    return center, left, right, f"lowrank update {m}x{n} r={r} -> bf16 {device}"


def test_lowrank_update_ccsmerge(benchmark, device, update_inputs):
    center, left, right, group = update_inputs
    benchmark.group = group
    out = run(benchmark, lambda: ccsmerge.ops.lowrank_update(center, left, right, 2.0, torch.bfloat16), device,
              rounds=5)
    assert out.dtype == torch.bfloat16


def test_lowrank_update_torch_addmm(benchmark, device, update_inputs):
    center, left, right, group = update_inputs
    benchmark.group = group
    run(benchmark, lambda: torch.addmm(center, left, right, alpha=2.0).to(torch.bfloat16), device, rounds=5)


def test_lowrank_update_torch_addmm_tf32(benchmark, device, update_inputs):
    """The same GEMM on TF32 tensor cores, as ccsmerge's CUDA kernel does for a bf16 output."""
    if device != "cuda":
        pytest.skip("TF32 is a CUDA mode")
    center, left, right, group = update_inputs
    benchmark.group = group
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        run(benchmark, lambda: torch.addmm(center, left, right, alpha=2.0).to(torch.bfloat16), device, rounds=5)
    finally:
        torch.set_float32_matmul_precision(previous)
