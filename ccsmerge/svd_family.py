"""The SVD family of merges, per 2-D weight, on task vectors Δ_t = θ_t − θ_base:

- TSV-M (Gargiulo et al. 2025, "Task Singular Vectors"): the top ⌊r/T⌋
  singular triplets of every Δ_t (r = min(m, n)); the concatenated U's and
  V's are each replaced by their nearest orthonormal matrix (U = P D Qᵀ ->
  P Qᵀ), and merged = θ_base + λ · U⊥ Σ V⊥ᵀ.
- Iso-C (Marczak et al. 2025, "No Task Left Behind"): Δ = Σ_t Δ_t = U Σ Vᵀ
  and merged = θ_base + λ · σ̄ U Vᵀ, σ̄ the mean singular value.
- Iso-CTS (same paper): the top directions of Σ_t Δ_t (a share
  `common_space_fraction` of r, rounded so the rest splits evenly over the
  tasks) plus, per task, the top directions of Δ_t with the common left
  subspace projected out; both bases orthonormalised as in TSV-M, and the
  singular values replaced by their mean.

Tensors outside the low-rank selection (biases, norms, embeddings) get
θ_base + λ · mean_t Δ_t, as in the papers' code. TSV-M's per-task SVDs run
on the randomized engine (centred on θ_base) or exactly; Iso-C and Iso-CTS
need whole spectra and use torch.linalg.svd."""

from __future__ import annotations

import torch

from . import ops
from .config import MergeConfig
from .fallback import compute_dtype
from .lowrank import centered_exact_svd, centered_randomized_svd
from .selection import lowrank_selected


def mean_task_vector(name: str, xs: list[torch.Tensor], base: torch.Tensor, cfg: MergeConfig) -> torch.Tensor:
    """θ_base + λ · mean_t (θ_t − θ_base), elementwise."""
    work = compute_dtype(xs[0].dtype)
    b = base.to(work)
    return torch.add(b, ops.mean(xs) - b, alpha=cfg.scale).to(xs[0].dtype)


def _nearest_orthonormal(a: torch.Tensor) -> torch.Tensor:
    """P Qᵀ from a = P D Qᵀ: the orthonormal matrix closest to a (its polar factor)."""
    p, _, qh = torch.linalg.svd(a, full_matrices=False)
    return p @ qh


def _task_vectors(xs: list[torch.Tensor], base: torch.Tensor, work: torch.dtype) -> list[torch.Tensor]:
    b = base.to(work)
    return [x.to(work) - b for x in xs]


def tsv_m(name: str, xs: list[torch.Tensor], base: torch.Tensor, cfg: MergeConfig) -> torch.Tensor:
    if not lowrank_selected(name, tuple(xs[0].shape), xs[0].dtype, cfg):
        return mean_task_vector(name, xs, base, cfg)
    T = len(xs)
    m, n = xs[0].shape
    k = max(1, min(m, n) // T)
    work = compute_dtype(xs[0].dtype)
    center = base.to(work)
    if cfg.svd == "exact":
        u, s, vh = centered_exact_svd(xs, center, k)
    else:
        from .methods import tensor_seed  # noqa: PLC0415 (methods imports this module)

        u, s, vh = centered_randomized_svd(
            xs,
            center,
            k,
            oversample=cfg.oversample_for(k),
            power_iters=cfg.power_iters_for(),
            seed=tensor_seed(cfg.seed, name),
        )
    u_all = u.permute(1, 0, 2).reshape(m, T * k)  # [U_1 | ... | U_T]
    v_all = vh.reshape(T * k, n).mT  # [V_1 | ... | V_T]
    u_orth, v_orth = _nearest_orthonormal(u_all), _nearest_orthonormal(v_all)
    left = u_orth * s.reshape(1, T * k)
    return ops.lowrank_update(center, left, v_orth.mT.contiguous(), cfg.scale, xs[0].dtype)


def iso_c(name: str, xs: list[torch.Tensor], base: torch.Tensor, cfg: MergeConfig) -> torch.Tensor:
    if not lowrank_selected(name, tuple(xs[0].shape), xs[0].dtype, cfg):
        return mean_task_vector(name, xs, base, cfg)
    work = compute_dtype(xs[0].dtype)
    total = torch.stack(_task_vectors(xs, base, work)).sum(0)
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    center = base.to(work)
    return ops.lowrank_update(center, u * s.mean(), vh, cfg.scale, xs[0].dtype)


def iso_cts_split(r: int, T: int, fraction: float) -> tuple[int, int]:
    """(common directions, directions per task): the task-specific share
    rounded so that it splits evenly over the T tasks."""
    common = int(r * fraction)
    per_task = round((r - common) / T)
    per_task = min(per_task, r // T)
    return r - per_task * T, per_task


def iso_cts(name: str, xs: list[torch.Tensor], base: torch.Tensor, cfg: MergeConfig) -> torch.Tensor:
    if not lowrank_selected(name, tuple(xs[0].shape), xs[0].dtype, cfg):
        return mean_task_vector(name, xs, base, cfg)
    work = compute_dtype(xs[0].dtype)
    deltas = _task_vectors(xs, base, work)
    T = len(deltas)
    r = min(deltas[0].shape)
    common, per_task = iso_cts_split(r, T, cfg.common_space_fraction)
    u, s, vh = torch.linalg.svd(torch.stack(deltas).sum(0), full_matrices=False)
    us, ss, vhs = [u[:, :common]], [s[:common]], [vh[:common]]
    if per_task:
        basis = u[:, :common]
        for delta in deltas:
            specific = delta - basis @ (basis.mT @ delta)
            ut, st, vht = torch.linalg.svd(specific, full_matrices=False)
            us.append(ut[:, :per_task])
            ss.append(st[:per_task])
            vhs.append(vht[:per_task])
    u_orth = _nearest_orthonormal(torch.cat(us, dim=1))
    v_orth = _nearest_orthonormal(torch.cat(vhs, dim=0).mT)
    sigma = torch.cat(ss).mean()
    center = base.to(work)
    return ops.lowrank_update(center, u_orth * sigma, v_orth.mT.contiguous(), cfg.scale, xs[0].dtype)
