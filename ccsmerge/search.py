"""Hyper-parameter search: merge on a grid and score every setting with the
user's evaluate(state_dict) -> float (higher is better).

Every method is linear in λ around a reference point (θ_avg for CART, θ_base
otherwise), so each setting of the other parameters is merged once, at
λ = 1 in the compute dtype, and every λ is reference + λ · update. CART goes
further: each matrix's T truncated SVDs are computed once, at the largest
rank of the grid, and every smaller rank keeps the leading triplets of those
factors; a 5 x 5 grid of (λ, rank_ratio) costs one set of SVDs."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from . import kernels as ops
from .errors import MergeError
from .execute import merge_whole
from .merge import full_precision_matmuls, make_config, resolve_device, validate_models
from .methods import decide, method_spec
from .methods.cart import STACKED_LOWRANK, cart_factors
from .methods.params import lowrank_rank
from .methods.stacked import slices
from .numerics import check_finite, compute_dtype
from .tensor_values import check_per_model, varies

StateDict = Mapping[str, torch.Tensor]


@dataclass
class SearchResult:
    best: dict  # the best setting: {"lam": ..., and the method's other axis}
    best_score: float
    table: list[dict] = field(default_factory=list)  # every setting with its "score", in grid order


def search(
    models: Sequence[StateDict],
    evaluate: Callable[[dict[str, torch.Tensor]], float],
    method: str = "cart",
    base: StateDict | None = None,
    *,
    lam: Sequence[float] | None = None,
    device: str | torch.device = "auto",
    **options,
) -> SearchResult:
    """Score every (lam, the method's search axis) setting of `method` with
    evaluate(state_dict) and return the best and the table. The search axis
    (cart: rank_ratio, ties: density, iso_cts: common_space_fraction; see
    each method's spec) is given as a sequence under its own name.

    Grids default to the single default value; other options are merge's.
    The state dicts passed to evaluate are in the inputs' dtype and device."""
    spec = method_spec(method)
    second = spec.search_axis
    grid = options.pop(second, None) if second is not None else None
    if lam is not None and spec.param("lam") is None:
        raise MergeError(f"search: method '{method}' has no 'lam' to search")
    for name, values in options.items():
        p = spec.param(name)
        if isinstance(values, (list, tuple)) and p is not None and p.per_model:
            continue  # one value per model
        if varies(values):
            raise MergeError(f"search: {name}: values by tensor (filters, gradients) are not searched; give one value")
        if isinstance(values, (list, tuple)) and name not in ("lowrank_include", "lowrank_exclude", "lowrank_stacked"):
            raise MergeError(f"search: method '{method}' has no '{name}' to search (its axis: {second or 'lam only'})")
    cfg = make_config(method=method, device=str(device), **options)
    if second == "rank_ratio" and getattr(cfg, "rank", None) is not None:
        raise MergeError("search: rank fixes CART's k, which the rank_ratio axis varies; search rank_ratio without rank")
    has_lam = spec.param("lam") is not None
    lams = list(lam) if lam is not None else [cfg.lam if has_lam else None]
    seconds = [None] if second is None else (list(grid) if grid is not None else [getattr(cfg, second)])
    if not lams or not seconds:
        raise MergeError("search: every grid needs at least one value")
    for value in seconds:  # validate every setting before any work
        make_config(method=method, **({second: value} if second else {}), **options)
    names = validate_models(models, base, cfg)
    check_per_model(cfg, len(models))
    compute_device = resolve_device(cfg.device)

    table: list[dict] = []
    with full_precision_matmuls():
        updates = (
            _cart_updates(models, names, seconds, cfg, compute_device)
            if cfg.method == "cart"
            else _linear_updates(models, base, names, second, seconds, cfg, compute_device)
        )
        for value, (reference, update) in zip(seconds, updates):
            for scale in lams:
                state = {}
                for name in names:
                    x0 = models[0][name]
                    if name in update:
                        value_ = reference[name] + (1.0 if scale is None else scale) * update[name]
                    else:
                        value_ = reference[name]
                    state[name] = value_.to(x0.dtype).to(x0.device)
                setting = {**({"lam": scale} if has_lam else {}), **({second: value} if second else {})}
                table.append({**setting, "score": float(evaluate(state))})
                del state
    best = max(table, key=lambda row: row["score"])
    return SearchResult({k: v for k, v in best.items() if k != "score"}, best["score"], table)


def _cart_updates(models, names, ratios, cfg, device):
    """(θ_avg, Σ_t U_t S_t V_tᵀ at each ratio's rank), from one SVD per matrix at the largest rank."""
    largest = cfg.model_copy(update={"rank_ratio": max(ratios)})
    reference, factors = {}, {}
    T = len(models)
    for name in names:
        xs = [sd[name].to(device) for sd in models]
        if not xs[0].is_floating_point():
            reference[name] = xs[0].clone().to(models[0][name].device)
            continue
        center = ops.mean(xs)
        check_finite(name, center, xs, allow=cfg.allow_nonfinite)
        reference[name] = center
        job = decide(name, tuple(xs[0].shape), xs[0].dtype, largest, T)
        if job.treatment == "low-rank":
            factors[name] = [_scaled_factors(job, xs, center, device)]
        elif job.treatment == STACKED_LOWRANK.name:  # per slice of a stack of matrices
            factors[name] = [_scaled_factors(*one, device) for one in slices(job, xs, center)]
    for ratio in ratios:
        update = {}
        for name, per_matrix in factors.items():
            k = lowrank_rank(reference[name].shape, ratio)
            parts = [torch.einsum("tmk,tkn->mn", us[..., :k], vh[:, :k, :]) for us, vh in per_matrix]
            update[name] = torch.stack(parts).reshape(reference[name].shape)
        yield reference, update


def _scaled_factors(job, xs, center, device):
    """(U_t S_t, V_t^T) of every centered matrix, at the job's rank."""
    u, s, vh = cart_factors(job, lambda start, stop: (xs, center), [(0, job.shape[0])], device)
    return u * s.unsqueeze(-2), vh


def _linear_updates(models, base, names, second, values, cfg, device):
    """(θ_base, merge at λ = 1 minus θ_base) for each value of the second axis
    (for a method without λ, the merge itself against a zero reference)."""
    reference = {}
    for name in names:
        x0 = models[0][name]
        ref = base[name] if base is not None and cfg.spec.param("lam") is not None else None
        if ref is None:
            ref = torch.zeros_like(x0, dtype=compute_dtype(x0.dtype)) if x0.is_floating_point() else x0
        reference[name] = ref.to(device).to(compute_dtype(x0.dtype)) if x0.is_floating_point() else ref.clone()
    T = len(models)
    for value in values:
        update_options = {**({"lam": 1.0} if cfg.spec.param("lam") is not None else {}), **({second: value} if second else {})}
        setting = cfg.model_copy(update=update_options)
        update = {}
        for name in names:
            x0 = models[0][name]
            if not x0.is_floating_point():
                continue
            # In the compute dtype, so that reference + λ · update rounds once.
            job = decide(name, tuple(x0.shape), x0.dtype, setting, T, compute_dtype(x0.dtype))
            xs = [sd[name] for sd in models]
            b = base[name] if base is not None else None
            update[name] = merge_whole(job, xs, b, device).to(device) - reference[name]
        yield reference, update
