"""ccsmerge.merge: the in-memory entry point."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence

import pydantic
import torch

from .config import NEEDS_BASE, MergeConfig
from .devices import parse_device
from .errors import MergeError
from .methods import METHODS, check_finite

StateDict = Mapping[str, torch.Tensor]


def make_config(**options) -> MergeConfig:
    """A validated MergeConfig; bad options raise MergeError with pydantic's explanation."""
    try:
        return MergeConfig(**options)
    except pydantic.ValidationError as exc:
        lines = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "options"
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = f"unknown option; valid options: {', '.join(MergeConfig.model_fields)}"
            lines.append(f"{where}: {msg}")
        raise MergeError("invalid merge options: " + "; ".join(lines)) from None


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = parse_device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise MergeError("device: CUDA was requested but no CUDA device is available")
    return resolved


@contextlib.contextmanager
def full_precision_matmuls():
    """The centered products subtract nearly equal numbers: TF32 (10-bit
    mantissa) matmuls would lose the digits they need, so the engine runs with
    full float32 matmuls whatever the process-wide setting is."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def validate_models(models: Sequence[StateDict], base: StateDict | None, cfg: MergeConfig) -> list[str]:
    """Check that the models (and base) share names, shapes and dtypes; return the names."""
    if isinstance(models, Mapping) or len(models) < 2:
        raise MergeError(f"merging needs at least 2 models, got {1 if isinstance(models, Mapping) else len(models)}")
    if cfg.method in NEEDS_BASE and base is None:
        raise MergeError(f"method '{cfg.method}' needs a base model (base=...)")
    names = list(models[0].keys())
    reference = set(names)
    labelled = [(f"model {i}", sd) for i, sd in enumerate(models)]
    if base is not None:
        labelled.append(("base", base))
    for label, sd in labelled[1:]:
        keys = set(sd.keys())
        if keys != reference:
            missing = sorted(reference - keys)
            extra = sorted(keys - reference)
            if missing:
                raise MergeError(f"tensor '{missing[0]}': missing from {label} ({len(missing)} missing in all)")
            raise MergeError(f"tensor '{extra[0]}': in {label} but not in model 0 ({len(extra)} extra in all)")
    for name in names:
        first = models[0][name]
        if not isinstance(first, torch.Tensor):
            raise MergeError(f"tensor '{name}': model 0 holds a {type(first).__name__}, not a tensor")
        for label, sd in labelled[1:]:
            x = sd[name]
            if not isinstance(x, torch.Tensor):
                raise MergeError(f"tensor '{name}': {label} holds a {type(x).__name__}, not a tensor")
            if x.shape != first.shape:
                raise MergeError(
                    f"tensor '{name}': shape {tuple(x.shape)} in {label}, {tuple(first.shape)} in model 0"
                )
            if x.dtype != first.dtype:
                raise MergeError(f"tensor '{name}': dtype {x.dtype} in {label}, {first.dtype} in model 0")
    return names


def to_compute_device(
    xs: list[torch.Tensor], base: torch.Tensor | None, device: torch.device
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """The inputs (and base) on the compute device. Asynchronous copies only
    towards a GPU, whose stream orders them before the kernels; a CPU consumer
    would read a device-to-host copy unfinished."""
    non_blocking = device.type == "cuda"
    moved = [x.to(device, non_blocking=non_blocking) for x in xs]
    return moved, (base.to(device, non_blocking=non_blocking) if base is not None else None)


def merge_tensor(
    name: str, xs: list[torch.Tensor], base: torch.Tensor | None, cfg: MergeConfig, device: torch.device
) -> torch.Tensor:
    """Merge one tensor: computed on `device`, returned on the inputs' device in their dtype."""
    home = xs[0].device
    if not xs[0].is_floating_point():
        # Integer/bool buffers (step counters, position ids) are copied, and must agree.
        for i, x in enumerate(xs[1:] + ([base] if base is not None else []), start=1):
            if not torch.equal(x, xs[0]):
                label = f"model {i}" if i < len(xs) else "base"
                raise MergeError(f"tensor '{name}': non-floating tensor differs between model 0 and {label}")
        return xs[0].clone()
    on_device, base_on_device = to_compute_device(xs, base, device)
    merged = METHODS[cfg.method](name, on_device, base_on_device, cfg)
    check_finite(name, merged, on_device, base_on_device, allow=cfg.allow_nonfinite)
    return merged.to(home)


def merge(
    models: Sequence[StateDict],
    method: str = "cart",
    base: StateDict | None = None,
    *,
    rank_ratio: float = 0.12,
    lam: float | None = None,
    density: float = 0.2,
    common_space_fraction: float = 0.8,
    svd: str = "randomized",
    oversample: int | None = None,
    power_iters: int | None = None,
    seed: int = 0,
    device: str | torch.device = "auto",
    lowrank_include: Sequence[str] = (),
    lowrank_exclude: Sequence[str] | None = None,
    allow_nonfinite: bool = False,
) -> dict[str, torch.Tensor]:
    """Merge T state dicts of one architecture into one.

    methods: "average"; "task_arithmetic" (needs base): base + lam * sum_t (theta_t - base);
    "ties" (needs base): TIES-Merging with `density`; "cart": theta_avg + lam * sum_t
    LowRank_k(theta_t - theta_avg) on 2-D weights, k = max(1, int(rank_ratio * min(m, n))),
    theta_avg elsewhere; the SVD family (need base): "tsv_m" (Task Singular Vectors),
    "iso_c" and "iso_cts" (isotropic merging; `common_space_fraction`), see
    ccsmerge.svd_family. lam=None takes the method's default (cart 2.0, ties 1.0,
    task_arithmetic 0.3, the SVD family 1.0). svd="exact" uses torch.linalg.svd; "randomized" the engine, with
    oversample=None meaning max(10, k) and power_iters=None meaning 4. Returns name -> tensor
    in each input's dtype and device; raises MergeError on bad input before returning anything,
    NaN/Inf inputs included unless allow_nonfinite (then they propagate elementwise, and CART
    merges a matrix holding them as the plain average, with a warning).
    """
    options = dict(
        method=method,
        rank_ratio=rank_ratio,
        lam=lam,
        density=density,
        common_space_fraction=common_space_fraction,
        svd=svd,
        oversample=oversample,
        power_iters=power_iters,
        seed=seed,
        device=str(device),
        lowrank_include=tuple(lowrank_include),
        allow_nonfinite=allow_nonfinite,
    )
    if lowrank_exclude is not None:
        options["lowrank_exclude"] = tuple(lowrank_exclude)
    cfg = make_config(**options)
    names = validate_models(models, base, cfg)
    compute_device = resolve_device(cfg.device)
    merged: dict[str, torch.Tensor] = {}
    with full_precision_matmuls():
        for name in names:
            xs = [sd[name] for sd in models]
            merged[name] = merge_tensor(name, xs, base[name] if base is not None else None, cfg, compute_device)
    return merged
