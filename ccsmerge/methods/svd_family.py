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
θ_base + λ · mean_t Δ_t, as in the papers' code. Stacks of weight matrices
(experts stored as (E, m, n)) get the treatment per slice. Every low-rank
treatment needs the whole matrix (a stack: each whole slice): over the
budget, such a tensor is refused. TSV-M's per-task SVDs run
on the randomized engine (centred on θ_base) or exactly; Iso-C and Iso-CTS
need whole spectra and use torch.linalg.svd."""

from __future__ import annotations

import torch

from .. import kernels
from ..lowrank import centered_exact_svd, centered_randomized_svd
from ..numerics import compute_dtype, tensor_seed
from .cart import oversample_for, power_iters_for
from .elementwise import MEAN_TASK_VECTOR, _inputs
from .factored import iso_c_factored, iso_cts_factored, tsv_m_factored
from .params import LAM, LOWRANK_SELECTION, RANK, SVD_ENGINE, Param, lowrank_rule
from .spec import Cost, Decision, MethodSpec, Treatment
from .stacked import stacked, treatment_for

COMMON_SPACE_FRACTION = Param(
    "common_space_fraction", float, 0.8, "Iso-CTS: share of the rank given to the common subspace", ge=0.0, le=1.0
)


def _nearest_orthonormal(a: torch.Tensor) -> torch.Tensor:
    """P Qᵀ from a = P D Qᵀ: the orthonormal matrix closest to a (its polar factor)."""
    p, _, qh = torch.linalg.svd(a, full_matrices=False)
    return p @ qh


def _task_vectors(xs: list[torch.Tensor], base: torch.Tensor, work: torch.dtype) -> list[torch.Tensor]:
    b = base.to(work)
    return [x.to(work) - b for x in xs]


def tsv_m_whole(job, xs, base):
    cfg = job.cfg
    T = len(xs)
    m, n = job.shape
    k = job.rank
    center = base.to(compute_dtype(xs[0].dtype))
    if cfg.svd == "exact":
        u, s, vh = centered_exact_svd(xs, center, k)
    else:
        u, s, vh = centered_randomized_svd(
            xs,
            center,
            k,
            oversample=oversample_for(cfg, k),
            power_iters=power_iters_for(cfg),
            seed=tensor_seed(cfg.seed, job.name),
        )
    u_all = u.permute(1, 0, 2).reshape(m, T * k)  # [U_1 | ... | U_T]
    v_all = vh.reshape(T * k, n).mT  # [V_1 | ... | V_T]
    u_orth, v_orth = _nearest_orthonormal(u_all), _nearest_orthonormal(v_all)
    left = u_orth * s.reshape(1, T * k)
    return kernels.lowrank_update(center, left, v_orth.mT.contiguous(), cfg.lam, job.out_dtype)


def iso_c_whole(job, xs, base):
    work = compute_dtype(xs[0].dtype)
    total = torch.stack(_task_vectors(xs, base, work)).sum(0)
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    center = base.to(work)
    return kernels.lowrank_update(center, u * s.mean(), vh, job.cfg.lam, job.out_dtype)


def iso_cts_split(r: int, T: int, fraction: float) -> tuple[int, int]:
    """(common directions, directions per task): the task-specific share
    rounded so that it splits evenly over the T tasks."""
    common = int(r * fraction)
    per_task = round((r - common) / T)
    per_task = min(per_task, r // T)
    return r - per_task * T, per_task


def iso_cts_whole(job, xs, base):
    work = compute_dtype(xs[0].dtype)
    deltas = _task_vectors(xs, base, work)
    T = len(deltas)
    r = min(deltas[0].shape)
    common, per_task = iso_cts_split(r, T, job.cfg.common_space_fraction)
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
    return kernels.lowrank_update(center, u_orth * sigma, v_orth.mT.contiguous(), job.cfg.lam, job.out_dtype)


# The T task vectors, their sum and full SVD factors; on a GPU also the solver's copy and workspace.
WHOLE_MATRIX_COST = Cost(
    host=lambda T, has_base, in_b, work, out_b: _inputs(T, has_base, in_b) + (T + 6) * work + in_b + out_b,
    device=lambda T, has_base, in_b, work: _inputs(T, has_base, in_b) + (T + 10) * work + in_b,
)


def _family_rule(treatment: str, rank):
    def rule(name, shape, dtype, cfg, T) -> Decision:
        lowrank, why = lowrank_rule(name, shape, dtype, cfg)
        if not lowrank:
            return Decision("mean-task-vector", None, why)
        return Decision(treatment_for(treatment, shape), rank(shape[-2:], T, cfg), why)

    return rule


def _family(name, title, summary, reference, treatment, whole, factored, params, rank, search_axis=None):
    matrix = Treatment(treatment, whole, None, WHOLE_MATRIX_COST, factored=factored,
                       per_task_spectra=treatment in ("tsv-m", "iso-cts"))
    per_slice = stacked(matrix)
    return MethodSpec(
        name=name,
        title=title,
        summary=summary,
        reference=reference,
        params=(LAM.with_default(1.0), *params, *LOWRANK_SELECTION),
        needs_base=True,
        rule=_family_rule(treatment, rank),
        treatments={
            treatment: matrix,
            per_slice.name: per_slice,
            "mean-task-vector": MEAN_TASK_VECTOR,
        },
        search_axis=search_axis,
    )


METHODS = (
    _family(
        "tsv_m", "TSV-M (Gargiulo et al. 2025)", "per-task top r/T singular triplets, orthogonalised bases",
        "https://arxiv.org/abs/2412.00081", "tsv-m", tsv_m_whole, tsv_m_factored, (RANK.with_description(
            "absolute k per task, instead of min(m, n) // T (LoRA inputs: at most each adapter's rank)"
        ), *SVD_ENGINE),
        lambda shape, T, cfg: min(cfg.rank, min(shape)) if cfg.rank is not None else max(1, min(shape) // T),
    ),
    _family(
        "iso_c", "Iso-C (Marczak et al. 2025)", "sum of task vectors with a flattened (isotropic) spectrum",
        "https://arxiv.org/abs/2502.04959", "iso-c", iso_c_whole, iso_c_factored, (), lambda shape, T, cfg: None,
    ),
    _family(
        "iso_cts", "Iso-CTS (Marczak et al. 2025)", "Iso-C's common subspace plus task-specific directions",
        "https://arxiv.org/abs/2502.04959", "iso-cts", iso_cts_whole, iso_cts_factored, (COMMON_SPACE_FRACTION,),
        lambda shape, T, cfg: None, search_axis="common_space_fraction",
    ),
)
