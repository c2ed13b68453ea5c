"""ccsmerge.merge: the in-memory entry point."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence

import pydantic
import torch

from .accuracy_record import collecting
from .config import MergeConfig, valid_options
from .devices import parse_device
from .errors import MergeError
from .execute import merge_whole
from .methods import decide
from .tensor_values import resolver

StateDict = Mapping[str, torch.Tensor]


def make_config(**options) -> MergeConfig:
    """A validated MergeConfig; bad options raise MergeError with pydantic's explanation."""
    try:
        return MergeConfig(**options)
    except pydantic.ValidationError as exc:
        lines = []
        method = options.get("method", "cart")
        errors = exc.errors()
        # A value that may be plain, per-tensor or per-model fails each of the
        # union's members: report the plain value's failure.
        errors = [e for e in errors if e["type"] != "is_instance_of"] or errors
        for err in errors:
            loc = [p for i, p in enumerate(err["loc"]) if i == 0 or isinstance(p, int)]
            where = ".".join(str(p) for p in loc) or "options"
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = f"unknown option; valid options for {method}: {', '.join(valid_options(method))}"
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


MERGEABLE_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def check_dtype(label: str, name: str, dtype: torch.dtype) -> None:
    """Floating tensors must be of a dtype the kernels compute in; fp8 weights
    come with scale tensors that a plain merge would get wrong."""
    if dtype.is_floating_point and dtype not in MERGEABLE_DTYPES:
        short = str(dtype).replace("torch.", "")
        raise MergeError(
            f"tensor '{name}': {label} holds {short}, which ccsmerge does not merge "
            "(fp8 weights come with scale tensors; dequantize to bfloat16 first)"
        )


def validate_models(models: Sequence[StateDict], base: StateDict | None, cfg: MergeConfig) -> list[str]:
    """Check that the models (and base) share names, shapes and dtypes; return the names."""
    if isinstance(models, Mapping) or len(models) < 2:
        raise MergeError(f"merging needs at least 2 models, got {1 if isinstance(models, Mapping) else len(models)}")
    if cfg.spec.needs_base and base is None:
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
        check_dtype("model 0", name, first.dtype)
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


def merge(
    models: Sequence[StateDict], method: str = "cart", base: StateDict | None = None, *,
    record: list | None = None, **options,
) -> dict[str, torch.Tensor]:
    """Merge T state dicts of one architecture into one.

    `method` is any name in ccsmerge.methods.REGISTRY (see the README's method
    table; `ccsmerge merge --help` lists each method's options): "average";
    "task_arithmetic", "ties", "tsv_m", "iso_c", "iso_cts" (these need base);
    "cart": theta_avg + lam * sum_t LowRank_k(theta_t - theta_avg) on 2-D
    weights and on each m x n slice of stacked experts (E, m, n),
    k = max(1, int(rank_ratio * min(m, n))), theta_avg elsewhere.
    options are the method's parameters (rank_ratio, lam, density, weight, svd,
    oversample, power_iters, seed, lowrank_include, lowrank_exclude,
    lowrank_stacked, default_excludes, ...) and the common ones (device,
    allow_nonfinite); an option the method does not take is a MergeError
    naming the valid ones. A per-model option (weight, density, gamma) may be
    a tuple of one value per model; any option may be a ccsmerge.Filtered or
    ccsmerge.Gradient (values by tensor name or over the layers, as mergekit
    recipes give them).
    record: a list that receives the accuracy record of every low-rank matrix
    (ccsmerge.accuracy_record.TensorAccuracy; accuracy_record.summary sums it up).
    Returns name -> tensor in each input's dtype and device; raises MergeError
    on bad input before returning anything, NaN/Inf inputs included unless
    allow_nonfinite (then they propagate elementwise, and CART merges a matrix
    holding them as the plain average, with a warning)."""
    if "device" in options:
        options["device"] = str(options["device"])
    for key in ("lowrank_include", "lowrank_exclude", "lowrank_stacked"):
        if isinstance(options.get(key), (list, str)):
            options[key] = (options[key],) if isinstance(options[key], str) else tuple(options[key])
    cfg = make_config(method=method, **options)
    names = validate_models(models, base, cfg)
    compute_device = resolve_device(cfg.device)
    config_of = resolver(cfg, names, len(models))
    merged: dict[str, torch.Tensor] = {}
    with full_precision_matmuls(), collecting() as noted:
        for name in names:
            xs = [sd[name] for sd in models]
            job = decide(name, tuple(xs[0].shape), xs[0].dtype, config_of(name), len(xs))
            merged[name] = merge_whole(job, xs, base[name] if base is not None else None, compute_device)
    if record is not None:
        record.extend(noted)
    return merged


