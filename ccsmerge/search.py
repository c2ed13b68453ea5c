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

from . import ops
from .config import DEFAULT_LAM
from .errors import MergeError
from .fallback import compute_dtype
from .merge import full_precision_matmuls, make_config, resolve_device, validate_models
from .methods import METHODS, cart_factors, cart_uses_lowrank, check_finite, lowrank_rank

StateDict = Mapping[str, torch.Tensor]

# The grid axis each method has besides λ.
SECOND_AXIS = {"cart": "rank_ratio", "ties": "density", "iso_cts": "common_space_fraction"}


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
    rank_ratio: Sequence[float] | None = None,
    density: Sequence[float] | None = None,
    common_space_fraction: Sequence[float] | None = None,
    device: str | torch.device = "auto",
    **options,
) -> SearchResult:
    """Score every (lam, rank_ratio | density | common_space_fraction) setting
    of `method` with evaluate(state_dict) and return the best and the table.

    Grids default to the single default value; other options are merge's.
    The state dicts passed to evaluate are in the inputs' dtype and device."""
    axes = {"rank_ratio": rank_ratio, "density": density, "common_space_fraction": common_space_fraction}
    second = SECOND_AXIS.get(method)
    for name, values in axes.items():
        if values is not None and name != second:
            raise MergeError(f"search: method '{method}' has no '{name}' to search")
    cfg = make_config(method=method, device=str(device), **options)
    lams = list(lam) if lam is not None else [DEFAULT_LAM[cfg.method]]
    if second is None:
        seconds = [None]
    else:
        seconds = list(axes[second]) if axes[second] is not None else [getattr(cfg, second)]
    if not lams or not seconds:
        raise MergeError("search: every grid needs at least one value")
    for value in seconds:  # validate every setting before any work
        make_config(method=method, **({second: value} if second else {}), **options)
    names = validate_models(models, base, cfg)
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
                    value_ = reference[name] if name not in update else reference[name] + scale * update[name]
                    state[name] = value_.to(x0.dtype).to(x0.device)
                setting = {"lam": scale, **({second: value} if second else {})}
                table.append({**setting, "score": float(evaluate(state))})
                del state
    best = max(table, key=lambda row: row["score"])
    return SearchResult({k: v for k, v in best.items() if k != "score"}, best["score"], table)


def _cart_updates(models, names, ratios, cfg, device):
    """(θ_avg, Σ_t U_t S_t V_tᵀ at each ratio's rank), from one SVD per matrix at the largest rank."""
    largest = cfg.model_copy(update={"rank_ratio": max(ratios)})
    reference, factors = {}, {}
    for name in names:
        xs = [sd[name].to(device) for sd in models]
        if not xs[0].is_floating_point():
            reference[name] = xs[0].clone().to(models[0][name].device)
            continue
        center = ops.mean(xs)
        check_finite(name, center, xs, allow=cfg.allow_nonfinite)
        reference[name] = center
        if cart_uses_lowrank(name, tuple(xs[0].shape), xs[0].dtype, cfg, len(xs)):
            u, s, vh = cart_factors(name, xs, center, largest)
            factors[name] = (u * s.unsqueeze(-2), vh)
    for ratio in ratios:
        update = {}
        for name, (us, vh) in factors.items():
            k = lowrank_rank(reference[name].shape, ratio)
            update[name] = torch.einsum("tmk,tkn->mn", us[..., :k], vh[:, :k, :])
        yield reference, update


def _linear_updates(models, base, names, second, values, cfg, device):
    """(θ_base, merge at λ = 1 minus θ_base) for each value of the second axis."""
    reference = {}
    for name in names:
        x0 = models[0][name]
        ref = base[name] if base is not None else None
        if ref is None:  # average: no base, no λ
            ref = torch.zeros_like(x0, dtype=compute_dtype(x0.dtype)) if x0.is_floating_point() else x0
        reference[name] = ref.to(device).to(compute_dtype(x0.dtype)) if x0.is_floating_point() else ref.clone()
    for value in values:
        setting = cfg.model_copy(update={"lam": 1.0, **({second: value} if second else {})})
        update = {}
        for name in names:
            x0 = models[0][name]
            if not x0.is_floating_point():
                continue
            work = compute_dtype(x0.dtype)
            # In the compute dtype, so that reference + λ · update rounds once.
            xs = [sd[name].to(device).to(work) for sd in models]
            b = base[name].to(device).to(work) if base is not None else None
            merged = METHODS[cfg.method](name, xs, b, setting)
            check_finite(name, merged, xs, b, allow=cfg.allow_nonfinite)
            update[name] = merged - reference[name]
        yield reference, update
