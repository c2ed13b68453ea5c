"""The four ccsmerge ops (mean, centered_matmul, orthonormalize,
lowrank_update) against the float64 references in tests/reference.py.

Each op is exercised three ways on every device: the public wrapper
(ccsmerge.ops), the compiled kernel (torch.ops.ccsmerge.<op>.default) and the
pure-PyTorch fallback (ccsmerge.fallback). Bounds are elementwise forward
error bounds in the compute dtype, so they stay tight but hold on any BLAS."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import ccsmerge
import reference as R
from conftest import (
    FLOAT_DTYPES,
    UNIT_ROUNDOFF,
    assert_within,
    compute_dtype,
    get_impl,
    has_ext,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- data


def _randn(shape, *, seed, dtype=torch.float32, device="cpu", scale=1.0, offset=0.0):
    g = R.generator(seed)
    x = offset + scale * torch.randn(shape, generator=g, dtype=torch.float64)
    return x.to(dtype).to(device)


def make_stack(T, shape, *, dtype, device, layout="contiguous", seed=0, offset=0.0, scale=1.0):
    """T same-shape tensors laid out in memory as `layout` says:
    contiguous; transposed (non-contiguous views of (n, m) tensors);
    misaligned (contiguous views that start one element into their storage);
    mixed (alternating aligned and misaligned)."""
    xs = []
    for t in range(T):
        s = seed * 100 + t
        if layout == "transposed":
            x = _randn(tuple(reversed(shape)), seed=s, dtype=dtype, device=device, offset=offset, scale=scale).mT
            assert not x.is_contiguous() or min(shape) <= 1
        elif layout == "misaligned" or (layout == "mixed" and t % 2 == 1):
            numel = 1
            for d in shape:
                numel *= d
            buf = _randn((numel + 1,), seed=s, dtype=dtype, device=device, offset=offset, scale=scale)
            x = buf[1:].view(shape)
            assert x.data_ptr() % 16 != 0
        else:
            x = _randn(shape, seed=s, dtype=dtype, device=device, offset=offset, scale=scale)
        xs.append(x)
    return xs


def u_of(dtype):
    return UNIT_ROUNDOFF[dtype]


# ----------------------------------------------------------------------------- mean

MEAN_SHAPES = [(64, 48), (37, 41), (5,), (3, 4, 5), (1,), (0, 3)]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("T", [1, 2, 3, 5, 8, 33])
def test_mean_matches_reference(device, impl, dtype, T):
    fn = get_impl("mean", impl, device)
    for shape in MEAN_SHAPES:
        xs = make_stack(T, shape, dtype=dtype, device=device, seed=T, offset=0.5, scale=2.0)
        out = fn(xs)
        assert out.shape == xs[0].shape
        assert out.dtype == compute_dtype(dtype)
        assert out.device == xs[0].device
        ref = R.ref_mean(xs)
        # T-1 additions and one division, each rounding in the compute dtype.
        magnitude = torch.stack([x.double().cpu().abs() for x in xs]).amax(0)
        assert_within(out, ref, (T + 1) * u_of(compute_dtype(dtype)) * magnitude, f"mean {shape} T={T}")


@pytest.mark.parametrize("layout", ["transposed", "misaligned", "mixed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_mean_non_contiguous_and_misaligned(device, impl, dtype, layout):
    fn = get_impl("mean", impl, device)
    for T, shape in [(3, (37, 41)), (8, (16, 24)), (35, (9, 7))]:
        xs = make_stack(T, shape, dtype=dtype, device=device, layout=layout, seed=T)
        out = fn(xs)
        assert out.shape == torch.Size(shape)
        if impl != "fallback":  # the compiled kernel (and its fake) return contiguous tensors
            assert out.is_contiguous()
        ref = R.ref_mean(xs)
        magnitude = torch.stack([x.double().cpu().abs() for x in xs]).amax(0)
        assert_within(out, ref, (T + 1) * u_of(torch.float32) * magnitude, f"mean {layout} T={T}")
        # The layout must not change the values: same numbers, contiguous copies.
        assert torch.equal(out, fn([x.contiguous() for x in xs]))


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "misaligned", "mixed"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("T", [1, 2, 7, 33])
def test_mean_cpu_kernel_bitwise_equals_fallback(dtype, T, layout):
    """Both sum in input order in the compute dtype, then divide once."""
    if not has_ext("mean", "cpu"):
        pytest.skip("no compiled CPU mean kernel")
    xs = make_stack(T, (37, 41), dtype=dtype, device="cpu", layout=layout, seed=3, offset=1.0, scale=3.0)
    kernel = torch.ops.ccsmerge.mean.default(xs)
    assert torch.equal(kernel, ccsmerge.fallback.mean(xs))
    assert torch.equal(kernel, ccsmerge.ops.mean(xs))


@pytest.mark.parametrize("layout", ["contiguous", "odd", "transposed", "misaligned", "mixed", "large"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("T", [1, 3, 32, 33, 70])
def test_mean_cuda_kernel_bitwise_equals_cpu_kernel(cuda_device, dtype, T, layout):
    """The CUDA kernel sums in input order too (also across its 32-input
    launches) and divides with IEEE division: the same bits as the CPU kernel,
    on the vectorised path, the tail and the unaligned path alike."""
    if not (has_ext("mean", "cuda") and has_ext("mean", "cpu")):
        pytest.skip("needs compiled CPU and CUDA mean kernels")
    if layout == "large" and T > 3:
        pytest.skip("large inputs with few T only")
    shape = {"contiguous": (64, 48), "large": (1201, 1009)}.get(layout, (37, 41))  # odd sizes elsewhere
    mem_layout = "contiguous" if layout in ("odd", "large") else layout
    xs = make_stack(T, shape, dtype=dtype, device=cuda_device, layout=mem_layout, seed=T, offset=1.0, scale=3.0)
    gpu = torch.ops.ccsmerge.mean.default(xs)
    cpu = torch.ops.ccsmerge.mean.default([x.cpu() for x in xs])
    assert gpu.device.type == "cuda" and gpu.dtype == cpu.dtype
    assert torch.equal(gpu.cpu(), cpu)


@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_mean_output_dtype_is_one_rounding_of_the_mean(device, impl, dtype, out_dtype):
    """mean(xs, dtype) rounds the accumulated mean once: the same bits as
    rounding the compute-dtype mean, on every path (fused on the CPU)."""
    fn = get_impl("mean", impl, device)
    for T, shape, layout in [(3, (37, 41), "contiguous"), (8, (2100,), "contiguous"), (5, (16, 24), "mixed")]:
        xs = make_stack(T, shape, dtype=dtype, device=device, layout=layout, seed=T, offset=1.0, scale=3.0)
        out = fn(xs, out_dtype)
        assert out.dtype == out_dtype and out.shape == torch.Size(shape) and out.device == xs[0].device
        assert torch.equal(out, fn(xs).to(out_dtype))


def test_mean_rejects_a_non_floating_output_dtype():
    if not has_ext("mean", "cpu"):
        pytest.skip("no compiled CPU mean kernel")
    with pytest.raises(RuntimeError, match="output dtype"):
        torch.ops.ccsmerge.mean.default([torch.ones(3), torch.zeros(3)], torch.int32)


def test_mean_rejects_empty_list():
    with pytest.raises(ValueError):
        ccsmerge.ops.mean([])


# ----------------------------------------------------------------------------- centered_matmul

CM_SHAPES = [(48, 20), (20, 48), (33, 33)]  # tall, wide, square


def _centered_matmul_case(T, shape, dtype, device, *, transpose, with_center, per_task, layout, seed):
    cdt = compute_dtype(dtype)
    m, n = shape
    # Task weights = a common part + small deltas: the centered products
    # subtract nearly equal numbers, as in a merge.
    common = _randn(shape, seed=seed, dtype=torch.float64, scale=2.0)
    xs = []
    for t in range(T):
        delta = _randn(shape, seed=seed * 50 + t + 1, dtype=torch.float64, scale=0.1)
        x = (common + delta).to(dtype).to(device)
        if layout == "transposed":
            x = x.mT.contiguous().mT
            assert not x.is_contiguous()
        elif layout == "misaligned":
            buf = torch.empty(x.numel() + 1, dtype=dtype, device=device)
            buf[1:] = x.reshape(-1)
            x = buf[1:].view(shape)
            assert x.data_ptr() % 16 != 0
        xs.append(x)
    center = R.ref_mean(xs).to(cdt).to(device) if with_center else None
    inner = m if transpose else n
    l = 6
    rshape = (T, inner, l) if per_task else (inner, l)
    rhs = _randn(rshape, seed=seed + 7, dtype=cdt, device=device)
    if layout == "transposed":
        rhs = rhs.mT.contiguous().mT  # column-major rhs
        if center is not None:
            center = center.mT.contiguous().mT
    return xs, center, rhs


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("T", [1, 3, 8])
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("with_center", [True, False], ids=["center", "nocenter"])
@pytest.mark.parametrize("per_task", [False, True], ids=["shared_rhs", "per_task_rhs"])
def test_centered_matmul_matches_reference(device, impl, dtype, T, transpose, with_center, per_task):
    fn = get_impl("centered_matmul", impl, device)
    cdt = compute_dtype(dtype)
    for shape in CM_SHAPES:
        xs, center, rhs = _centered_matmul_case(
            T, shape, dtype, device, transpose=transpose, with_center=with_center, per_task=per_task,
            layout="contiguous", seed=T,
        )
        out = fn(xs, center, rhs, transpose)
        rows = shape[1] if transpose else shape[0]
        assert out.shape == (T, rows, rhs.shape[-1])
        assert out.dtype == cdt and out.device == xs[0].device
        ref = R.ref_centered_matmul(xs, center, rhs, transpose)
        inner = shape[0] if transpose else shape[1]
        xmax = max(float(x.double().abs().max()) for x in xs)
        cmax = float(center.double().abs().max()) if center is not None else 0.0
        bound = 4 * (inner + 2) * u_of(cdt) * (xmax + cmax) * float(rhs.double().abs().max())
        assert_within(out, ref, bound, f"centered_matmul {shape}")


@pytest.mark.parametrize("layout", ["transposed", "misaligned"])
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("per_task", [False, True], ids=["shared_rhs", "per_task_rhs"])
def test_centered_matmul_non_contiguous(device, impl, layout, transpose, per_task):
    fn = get_impl("centered_matmul", impl, device)
    for dtype in (torch.float32, torch.bfloat16):
        xs, center, rhs = _centered_matmul_case(
            3, (37, 21), dtype, device, transpose=transpose, with_center=True, per_task=per_task,
            layout=layout, seed=5,
        )
        out = fn(xs, center, rhs, transpose)
        ref = R.ref_centered_matmul(xs, center, rhs, transpose)
        inner = 37 if transpose else 21
        xmax = max(float(x.double().abs().max()) for x in xs)
        bound = 4 * (inner + 2) * u_of(torch.float32) * 2 * xmax * float(rhs.double().abs().max())
        assert_within(out, ref, bound, f"centered_matmul {layout}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "mixed"])
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("with_center", [False, True], ids=["no_center", "center"])
def test_centered_matmul_narrow_inputs_over_several_panels(device, impl, dtype, layout, transpose, with_center):
    """bf16/fp16 inputs tall enough that the CPU kernel converts them in
    several row panels (4 MiB of float32 each: 2097 rows of 500 here), with
    a last panel shorter than the others."""
    fn = get_impl("centered_matmul", impl, device)
    shape = (2600, 500)
    xs, center, rhs = _centered_matmul_case(
        3, shape, dtype, device, transpose=transpose, with_center=with_center, per_task=True, layout=layout,
        seed=7,
    )
    out = fn(xs, center, rhs, transpose)
    ref = R.ref_centered_matmul(xs, center, rhs, transpose)
    inner = shape[0] if transpose else shape[1]
    xmax = max(float(x.double().abs().max()) for x in xs)
    cmax = float(center.double().abs().max()) if center is not None else 0.0
    bound = 4 * (inner + 2) * u_of(torch.float32) * (xmax + cmax) * float(rhs.double().abs().max())
    assert_within(out, ref, bound, f"centered_matmul {dtype} {layout}")


def test_centered_matmul_shared_rhs_equals_repeated_per_task_rhs(device):
    """A shared (r, l) rhs means the same rhs for every t."""
    xs, center, rhs = _centered_matmul_case(
        4, (30, 20), torch.float64, device, transpose=False, with_center=True, per_task=False,
        layout="contiguous", seed=1,
    )
    shared = ccsmerge.ops.centered_matmul(xs, center, rhs)
    repeated = ccsmerge.ops.centered_matmul(xs, center, rhs.expand(4, *rhs.shape).contiguous())
    torch.testing.assert_close(shared, repeated, rtol=1e-12, atol=1e-12)


def test_centered_matmul_rejects_empty_list(device):
    with pytest.raises(ValueError):
        ccsmerge.ops.centered_matmul([], None, torch.zeros(3, 2, device=device))


# ----------------------------------------------------------------------------- orthonormalize

ORTHO_SHAPES = [(50, 7), (3, 50, 7), (8, 40, 40), (2, 1, 1), (2, 3, 64, 10), (300, 30)]


def _check_orthonormal_basis(q, y, what):
    cdt = q.dtype
    u = u_of(cdt)
    l = y.shape[-1]
    q64 = q.double().cpu()
    y64 = y.double().cpu()
    eye = torch.eye(l, dtype=torch.float64).expand(q64.shape[:-2] + (l, l))
    assert_within(q64.mT @ q64, eye, 100 * l * u, f"{what}: Q^T Q = I")
    # Same column space: Q Q^T Y = Y.
    resid = q64 @ (q64.mT @ y64) - y64
    scale = y64.flatten(-2).norm(dim=-1).clamp_min(1e-300)
    assert bool((resid.flatten(-2).norm(dim=-1) <= 1e3 * u * scale).all()), f"{what}: span(Q) misses Y"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", ORTHO_SHAPES, ids=str)
def test_orthonormalize_matches_reference(device, impl, dtype, shape):
    fn = get_impl("orthonormalize", impl, device)
    y = _randn(shape, seed=len(shape) + shape[-1], dtype=dtype, device=device)
    q = fn(y)
    assert q.shape == y.shape and q.dtype == dtype and q.device == y.device
    _check_orthonormal_basis(q, y, f"orthonormalize {shape}")
    # Same projector as the float64 reference basis.
    qref = torch.linalg.qr(y.double().cpu()).Q
    assert_within(
        q.double().cpu() @ q.double().cpu().mT, qref @ qref.mT, 100 * u_of(dtype) * shape[-1],
        "projector",
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_orthonormalize_ill_conditioned_and_rank_deficient(device, impl, dtype):
    """Panels a Cholesky-based QR cannot handle (exactly rank-deficient, or
    condition number ~1e6, or all zero) still give orthonormal columns whose
    span holds every column of the panel."""
    fn = get_impl("orthonormalize", impl, device)
    g = R.generator(11)
    deficient = (torch.randn(80, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 12, generator=g, dtype=torch.float64))
    graded = R.decaying_matrix(80, 12, decay=6.0, seed=2)  # singular values 1 .. 12^-6 ~ 3e-7
    zero = torch.zeros(40, 5, dtype=torch.float64)
    for what, y in [("rank 3", deficient), ("graded", graded), ("zero", zero)]:
        y = y.to(dtype).to(device)
        q = fn(y)
        assert bool(torch.isfinite(q).all()), what
        _check_orthonormal_basis(q, y, what)


# ----------------------------------------------------------------------------- lowrank_update

LR_SHAPES = [(100, 37), (5, 64), (64, 64), (1, 1)]


def _lowrank_bound(center, left, right, alpha, out_dtype, device):
    """Elementwise bound on |out - ref|: the compute-dtype GEMM error, the
    rounding to out_dtype, and (on CUDA with a bf16/fp16 output) TF32
    inputs to the product (each operand rounded to 10 mantissa bits)."""
    c = center.double().abs().cpu()
    lr = left.double().abs().cpu() @ right.double().abs().cpu()
    r = left.shape[1]
    u_c = u_of(center.dtype)
    compute_err = 2 * (r + 2) * u_c * (c + abs(alpha) * lr)
    ref = R.ref_lowrank_update(center, left, right, alpha)
    u_out = u_of(out_dtype)
    bound = 2 * u_out * ref.abs() + 2 * compute_err
    if torch.device(device).type == "cuda" and out_dtype in (torch.bfloat16, torch.float16):
        bound = bound + 2.0**-9 * abs(alpha) * lr
    if out_dtype == torch.float16:
        bound = bound + 2.0**-24  # subnormal spacing
    return ref, bound


@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("center_dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("alpha", [2.0, -0.5, 0.0])
@pytest.mark.parametrize("r", [1, 8])
def test_lowrank_update_matches_reference(device, impl, out_dtype, center_dtype, alpha, r):
    fn = get_impl("lowrank_update", impl, device)
    for m, n in LR_SHAPES:
        center = _randn((m, n), seed=m, dtype=center_dtype, device=device, scale=3.0)
        left = _randn((m, r), seed=m + 1, dtype=center_dtype, device=device)
        right = _randn((r, n), seed=m + 2, dtype=center_dtype, device=device)
        out = fn(center, left, right, alpha, out_dtype)
        assert out.shape == (m, n) and out.dtype == out_dtype and out.device == center.device
        ref, bound = _lowrank_bound(center, left, right, alpha, out_dtype, device)
        assert_within(out, ref, bound, f"lowrank_update {(m, n)} r={r} -> {out_dtype}")


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_lowrank_update_non_contiguous(device, impl, out_dtype):
    fn = get_impl("lowrank_update", impl, device)
    m, n, r = 70, 45, 5
    center = _randn((n, m), seed=1, device=device).mT  # column-major
    left = _randn((r, m), seed=2, device=device).mT
    right = _randn((n, r), seed=3, device=device).mT
    out = fn(center, left, right, 1.5, out_dtype)
    ref, bound = _lowrank_bound(center, left, right, 1.5, out_dtype, device)
    assert_within(out, ref, bound, "lowrank_update non-contiguous")
    # The wide-output row-blocked path and the same-dtype path agree on values.
    assert_within(out, fn(center.contiguous(), left.contiguous(), right.contiguous(), 1.5, out_dtype), bound)


# ----------------------------------------------------------------------------- ext input checks


_BAD_INPUTS_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    import ccsmerge  # registers torch.ops.ccsmerge
    device = sys.argv[1]
    ops = torch.ops.ccsmerge
    x = torch.zeros(6, 4, device=device)
    z = lambda *shape, **kw: torch.zeros(*shape, device=device, **kw)
    cases = [
        ("shape", lambda: ops.mean.default([x, z(4, 6)])),
        ("dtype", lambda: ops.mean.default([x, x.double()])),
        ("floating", lambda: ops.mean.default([z(3, dtype=torch.int64)] * 2)),
        ("rhs", lambda: ops.centered_matmul.default([x, x], None, z(4, 2, dtype=torch.float64), False)),
        ("rows", lambda: ops.centered_matmul.default([x, x], None, z(6, 2), False)),
        ("T = 2", lambda: ops.centered_matmul.default([x, x], None, z(3, 4, 2), False)),
        ("center", lambda: ops.centered_matmul.default([x, x], z(4, 6), z(4, 2), False)),
        ("tall", lambda: ops.orthonormalize.default(z(3, 5))),
        ("chain", lambda: ops.lowrank_update.default(x, z(6, 2), z(3, 4), 1.0, torch.float32)),
        ("floating", lambda: ops.lowrank_update.default(x, z(6, 2), z(2, 4), 1.0, torch.int32)),
    ]
    for expected, call in cases:
        print("calling", expected, flush=True)
        try:
            call()
        except RuntimeError as exc:
            assert expected in str(exc), (expected, str(exc))
            print("raised", expected, flush=True)
        else:
            raise SystemExit(f"no error for {expected!r}")
    print("ALL RAISED")
    """
)


def test_compiled_ops_reject_bad_inputs(device, tmp_path):
    """Bad arguments to the compiled kernels raise RuntimeError (from
    TORCH_CHECK) with a message saying what is wrong. Run in a child process,
    so that a crash on the error path shows as this test's failure instead of
    ending the whole test session."""
    for op in ("mean", "centered_matmul", "orthonormalize", "lowrank_update"):
        if not has_ext(op, device):
            pytest.skip(f"no compiled {op} kernel for {device}")
    script = tmp_path / "bad_inputs.py"
    script.write_text(_BAD_INPUTS_SCRIPT)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-X", "faulthandler", str(script), device], cwd=REPO, env=env, capture_output=True,
        text=True, timeout=300,
    )
    assert proc.returncode == 0 and "ALL RAISED" in proc.stdout, (
        f"exit status {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-3000:]}"
    )


def test_cuda_build_has_every_kernel(cuda_device):
    info = ccsmerge.build_info()
    assert info["cuda_available"] is True
    assert info["cuda_ext"] is True, info
    for op in ("mean", "centered_matmul", "orthonormalize", "lowrank_update"):
        assert has_ext(op, "cuda"), op


def test_build_info_reports_cpu_extension():
    info = ccsmerge.build_info()
    assert info["cpu_ext"] is True, info
    assert info["extension_error"] is None
    assert info["torch"] == torch.__version__


# ----------------------------------------------------------------------------- opcheck / fake


def _opcheck_cases(device):
    def f32(shape, seed):
        return _randn(shape, seed=seed, device=device)

    xs = [f32((12, 9), s) for s in range(3)]
    center = ccsmerge.fallback.mean(xs)
    return {
        "mean": [
            (xs,),
            ([x.to(torch.bfloat16) for x in xs],),
            ([x.double() for x in xs],),
            ([x.mT for x in xs],),
        ],
        "centered_matmul": [
            (xs, center, f32((9, 4), 10), False),
            (xs, None, f32((3, 9, 4), 11), False),
            (xs, center, f32((12, 4), 12), True),
            ([x.to(torch.float16) for x in xs], center, f32((3, 12, 4), 13), True),
        ],
        "orthonormalize": [(f32((20, 5), 20),), (f32((3, 20, 5), 21),)],
        "lowrank_update": [
            (center, f32((12, 3), 30), f32((3, 9), 31), 2.0, torch.float32),
            (center, f32((12, 3), 30), f32((3, 9), 31), -1.0, torch.bfloat16),
            (center.double(), f32((12, 3), 30).double(), f32((3, 9), 31).double(), 0.5, torch.float16),
        ],
    }


@pytest.mark.parametrize("op", ["mean", "centered_matmul", "orthonormalize", "lowrank_update"])
def test_opcheck(device, op):
    if not has_ext(op, device):
        pytest.skip(f"no compiled {op} kernel for {device}")
    for args in _opcheck_cases(device)[op]:
        torch.library.opcheck(getattr(torch.ops.ccsmerge, op).default, args)


@pytest.mark.parametrize("use_public_wrapper", [False, True], ids=["torch.ops", "ccsmerge.ops"])
def test_fake_tensor_kernels(device, use_public_wrapper):
    if not all(has_ext(op, device) for op in ("mean", "centered_matmul", "orthonormalize", "lowrank_update")):
        pytest.skip(f"no compiled kernels for {device}")
    ops = ccsmerge.ops if use_public_wrapper else None

    def call(op, *args):
        return getattr(ops, op)(*args) if ops is not None else getattr(torch.ops.ccsmerge, op).default(*args)

    with FakeTensorMode():
        for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
            cdt = compute_dtype(dtype)
            xs = [torch.empty(12, 9, dtype=dtype, device=device) for _ in range(3)]
            m = call("mean", xs)
            assert isinstance(m, torch._subclasses.fake_tensor.FakeTensor)
            assert m.shape == (12, 9) and m.dtype == cdt and m.device.type == torch.device(device).type
            c = torch.empty(12, 9, dtype=cdt, device=device)
            out = call("centered_matmul", xs, c, torch.empty(9, 4, dtype=cdt, device=device), False)
            assert out.shape == (3, 12, 4) and out.dtype == cdt
            out = call("centered_matmul", xs, None, torch.empty(3, 12, 5, dtype=cdt, device=device), True)
            assert out.shape == (3, 9, 5) and out.dtype == cdt
            q = call("orthonormalize", torch.empty(3, 12, 4, dtype=cdt, device=device))
            assert q.shape == (3, 12, 4) and q.dtype == cdt
            upd = call(
                "lowrank_update", c, torch.empty(12, 6, dtype=cdt, device=device),
                torch.empty(6, 9, dtype=cdt, device=device), 2.0, dtype,
            )
            assert upd.shape == (12, 9) and upd.dtype == dtype and upd.device.type == torch.device(device).type


def test_ops_trace_with_torch_compile(device):
    """The fake kernels let a function of the ops compile as one graph."""
    if not all(has_ext(op, device) for op in ("mean", "centered_matmul", "lowrank_update")):
        pytest.skip(f"no compiled kernels for {device}")

    def step(a, b, c, rhs):
        center = torch.ops.ccsmerge.mean.default([a, b, c])
        prod = torch.ops.ccsmerge.centered_matmul.default([a, b, c], center, rhs, False)
        return torch.ops.ccsmerge.lowrank_update.default(center, prod[0], rhs.mT, 1.0, torch.float32)

    args = [_randn((10, 6), seed=s, device=device) for s in range(3)] + [_randn((6, 6), seed=9, device=device)]
    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(*args), step(*args), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- forced fallback

_FALLBACK_SCRIPT = textwrap.dedent(
    """
    import sys, warnings
    import torch
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import ccsmerge
        data = torch.load(sys.argv[1], weights_only=True)
        exact = ccsmerge.merge(data["models"], svd="exact", rank_ratio=0.25, device="cpu")
        randomized = ccsmerge.merge(data["models"], rank_ratio=0.25, device="cpu")
        again = ccsmerge.merge(data["models"], rank_ratio=0.25, device="cpu")
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    torch.save(
        {
            "exact": exact,
            "randomized": randomized,
            "again": again,
            "messages": messages,
            "cpu_ext": ccsmerge.build_info()["cpu_ext"],
            "extension_error": ccsmerge.build_info()["extension_error"],
            "has_op": hasattr(torch.ops.ccsmerge, "mean"),
        },
        sys.argv[2],
    )
    """
)


def test_forced_fallback_warns_once_per_op_and_merges_correctly(tmp_path):
    """CCSMERGE_DISABLE_EXT=1: no compiled library, every op runs its fallback
    with one RuntimeWarning per op, and the merge still matches the reference."""
    T, shape, rank_ratio = 3, (40, 30), 0.25
    _, thetas = R.task_set(T, *shape, seed=4)
    models = [{"w": th.to(torch.float32), "b": th[0].clone()} for th in thetas]
    src, dst = tmp_path / "in.pt", tmp_path / "out.pt"
    torch.save({"models": models}, src)
    script = tmp_path / "run.py"
    script.write_text(_FALLBACK_SCRIPT)
    env = dict(os.environ, CCSMERGE_DISABLE_EXT="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, str(script), str(src), str(dst)], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    res = torch.load(dst, weights_only=True)
    assert res["cpu_ext"] is False
    assert "CCSMERGE_DISABLE_EXT" in res["extension_error"]
    assert res["has_op"] is False
    for op in ("mean", "centered_matmul", "orthonormalize", "lowrank_update"):
        hits = [m for m in res["messages"] if f"no compiled {op} kernel" in m]
        assert len(hits) == 1, (op, res["messages"])
        assert "fallback" in hits[0]

    k = R.ref_rank(shape, rank_ratio)
    ref = R.ref_cart_tensor([sd["w"] for sd in models], k, 2.0)
    avg = R.ref_mean([sd["w"] for sd in models])
    assert res["exact"]["w"].dtype == torch.float32
    assert (res["exact"]["w"].double() - ref).norm() <= 1e-4 * (ref - avg).norm()
    rand_update = res["randomized"]["w"].double() - avg
    assert (rand_update - (ref - avg)).norm() <= 0.05 * (ref - avg).norm()
    assert torch.equal(res["randomized"]["w"], res["again"]["w"])
    b_ref = R.ref_mean([sd["b"] for sd in models])
    torch.testing.assert_close(res["exact"]["b"].double(), b_ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(res["exact"]["b"], res["randomized"]["b"])
