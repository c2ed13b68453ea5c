"""The engine benchmarks' presets: one configuration of all four parts per (device, preset)."""

from __future__ import annotations

from dataclasses import dataclass

@dataclass(frozen=True)
class Preset:
    # a: one matrix
    a_size: tuple[int, int] = (4096, 4096)
    a_tasks: tuple[int, ...] = (2, 8)
    a_rank_ratio: float = 0.08
    a_rounds: int = 3
    a_max_seconds: float = 90.0  # per T: no new round starts past this
    a_exact_max_T: int = 1000  # ccs_exact runs up to this T (official_cart is the reference beyond)
    # b: mean bandwidth
    b_tasks: int = 8
    b_sizes: tuple[tuple[int, int], ...] = ((4096, 4096), (8192, 8192))
    b_dtypes: tuple[str, ...] = ("bfloat16", "float32")
    b_repeats: int = 20
    b_copy_mib: int = 2048
    # c: end-to-end model
    c_tasks: int = 8
    c_layers: int = 2
    c_d_model: int = 4096
    c_d_ff: int = 11008
    c_rank_ratio: float = 0.12
    c_rounds: int = 1
    c_compare_layers: int = 1  # layers merged by both ccsmerge and official_cart
    c_official_budget_s: float = 150.0  # official_cart is skipped when estimated slower
    # d: low-rank step
    d_shapes: tuple[tuple[int, int], ...] = ((768, 768), (3072, 768), (4096, 4096))
    d_rank_ratios: tuple[float, ...] = (0.01, 0.08, 0.32)
    d_power_iters: tuple[int, ...] = (0, 1, 2, 4)
    d_repeats: int = 5
    d_exact_repeats: int = 2
    d_max_seconds: float = 20.0  # per method and matrix: no new round past this times the number of methods
    d_drivers: tuple[str | None, ...] = (None,)
    d_dtypes: tuple[str, ...] = ("float32", "bfloat16")
    d_kinds: tuple[str, ...] = ("decaying",)
    # further (m, n, dtype, kind, rank ratios) cases
    d_extra: tuple[tuple[int, int, str, str, tuple[float, ...]], ...] = (
        (768, 768, "float32", "gaussian", (0.01, 0.08, 0.32)), (3072, 768, "float32", "gaussian", (0.01, 0.08, 0.32)),
        (4096, 4096, "float32", "gaussian", (0.01, 0.08, 0.32)))
    d_float64_reference_max: float = 1e12  # max(m,n) * min(m,n)^2 up to which the optimum comes from float64
    d_wide_sketch_max_numel: int = 1 << 40  # larger matrices skip sketches wider than min(m, n) / 2
    d_matrices: str | None = None  # a safetensors file of further 2-D matrices (e.g. real centered task vectors)


CUDA_DRIVERS = (None, "gesvd", "gesvdj", "gesvda")

FULL_SHAPES = ((768, 768), (3072, 768), (4096, 4096), (11008, 4096))
FULL_RATIOS = (0.01, 0.04, 0.08, 0.16, 0.32)
SMALL_GAUSSIAN = ((768, 768, "float32", "gaussian", (0.01, 0.08, 0.32)),
                  (3072, 768, "float32", "gaussian", (0.01, 0.08, 0.32)))

PRESETS = {
    ("cuda", "quick"): Preset(a_max_seconds=60.0, d_drivers=CUDA_DRIVERS),
    ("cuda", "full"): Preset(
        a_tasks=(2, 8, 20), a_rounds=5, a_max_seconds=600.0, b_sizes=((4096, 4096), (8192, 8192), (16384, 8192)),
        b_repeats=50, c_layers=8, c_rounds=2, c_compare_layers=8, c_official_budget_s=1200.0,
        d_shapes=FULL_SHAPES, d_rank_ratios=FULL_RATIOS, d_repeats=10, d_exact_repeats=3, d_drivers=CUDA_DRIVERS,
    ),
    ("cpu", "quick"): Preset(
        a_tasks=(2, 3), a_rounds=2, a_max_seconds=45.0, b_sizes=((4096, 4096),), b_repeats=5, b_copy_mib=512,
        c_tasks=4, c_layers=2, c_d_model=768, c_d_ff=3072, c_compare_layers=2, c_official_budget_s=60.0,
        d_shapes=((768, 768), (3072, 768)), d_repeats=3, d_exact_repeats=1, d_max_seconds=3.0,
        d_extra=SMALL_GAUSSIAN + ((4096, 4096, "float32", "decaying", (0.08,)),), d_float64_reference_max=2e9,
    ),
    ("cpu", "full"): Preset(
        a_size=(2048, 2048), a_tasks=(2, 8, 20), a_rounds=2, a_max_seconds=150.0, a_exact_max_T=8,
        b_sizes=((4096, 4096), (8192, 8192)), b_repeats=10, b_copy_mib=1024,
        c_tasks=8, c_layers=1, c_d_model=1024, c_d_ff=4096, c_compare_layers=1, c_official_budget_s=900.0,
        d_shapes=FULL_SHAPES[:3], d_rank_ratios=FULL_RATIOS, d_dtypes=("float32",),
        d_extra=((11008, 4096, "float32", "decaying", (0.01, 0.08, 0.32)),)
        + tuple((m, n, "bfloat16", "decaying", (0.01, 0.08, 0.32)) for m, n in FULL_SHAPES[:2])
        + tuple((m, n, "bfloat16", "decaying", (0.08,)) for m, n in FULL_SHAPES[2:])
        + tuple((m, n, "float32", "gaussian", (0.08,)) for m, n in FULL_SHAPES[:3]),
        d_repeats=3, d_exact_repeats=1, d_max_seconds=2.0, d_float64_reference_max=2e9,
        d_wide_sketch_max_numel=4096 * 4096,
    ),
}
