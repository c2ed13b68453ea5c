"""Merges computed from low-rank task vectors (LoRA adapters), exactly.

Each input's task vector on a module is given as factors Δ_t = L_t R_t
(L_t = s_t B_t, m x r_t; R_t = A_t, r_t x n), or None where the input leaves
the module as the base's. With L = [L_1 | ... | L_T] and R = [R_1; ...; R_T]
every task vector, their mean and every centered task vector lie in
span(L) x span(R^T): with L = Q_L R_L and R^T = Q_R R_R (thin QR),
Δ_t - mean_u Δ_u = Q_L [R_L (E_t - I/T) R_R^T] Q_R^T, where E_t selects
task t's block. Every SVD a method needs is therefore the SVD of an R x R
core (R = Σ r_t), and the merge costs O((m + n) R^2) plus the output's one
m x n product, with no m x n task vector formed.

A factored merge returns (left, right, base_scale): merged =
base_scale * W0 + left @ right. The small factorisations run in float64.

Where a dense formula takes singular vectors of zero singular values (TSV-M's
r/T triplets of a rank-r_t task vector, Iso-C's flat spectrum over min(m, n)
values of a rank-R sum), those vectors are arbitrary: the factored merges use
the nonzero part of each spectrum (singular values above NONZERO times the
largest). The planner gives a tensor this path only where at least one
model changes it by factors."""

from __future__ import annotations

import torch

from ..lowrank import product_svd
from ..tensor_values import per_model

# Relative size below which a singular value of a product of factors is zero.
NONZERO = 1e-10
WORK = torch.float64


def _stacked(deltas, coefficients=None):
    """(L, R, blocks): the concatenated factors (left ones times each model's
    coefficient) in float64, and each model's column range in them."""
    lefts, rights, blocks, at = [], [], [], 0
    for t, delta in enumerate(deltas):
        if delta is None:
            blocks.append((at, at))
            continue
        left, right = delta
        c = 1.0 if coefficients is None else float(coefficients[t])
        lefts.append(left.to(WORK) * c)
        rights.append(right.to(WORK))
        blocks.append((at, at + left.shape[1]))
        at += left.shape[1]
    return torch.cat(lefts, 1), torch.cat(rights, 0), blocks


def _qr_pair(left, right):
    q_left, r_left = torch.linalg.qr(left)
    q_right, r_right = torch.linalg.qr(right.mT)
    return q_left, r_left, q_right, r_right


def _svd_of_product(left, right):
    """U, s, Vh of left @ right without forming it, trimmed to the nonzero singular values."""
    u, s, vh = product_svd(left, right)
    keep = _nonzero(s)
    return u[:, :keep], s[:keep], vh[:keep]


def _nonzero(s: torch.Tensor) -> int:
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0
    return int((s > NONZERO * s[0]).sum())


def _nearest_orthonormal_tall(a: torch.Tensor) -> torch.Tensor:
    """The polar factor P Q^T of a tall m x K matrix a = P D Q^T, through a thin QR."""
    if a.shape[1] > a.shape[0]:
        from .svd_family import _nearest_orthonormal

        return _nearest_orthonormal(a)
    q, r = torch.linalg.qr(a)
    p, _, qh = torch.linalg.svd(r)
    return q @ (p @ qh)


def _zero(shape):
    """An update of no columns: the merge is the base's tensor (times base_scale)."""
    m, n = shape
    return torch.zeros(m, 0, dtype=WORK), torch.zeros(0, n, dtype=WORK)


def _present(deltas):
    return [d for d in deltas if d is not None]


def sum_of(deltas, coefficients):
    """Σ_t c_t Δ_t as (left, right)."""
    left, right, _ = _stacked(deltas, coefficients)
    return left, right


def average_factored(job, deltas):
    T = len(deltas)
    return (*sum_of(deltas, [1.0 / T] * T), 1.0)


def linear_factored(job, deltas):
    """Σ_t w_t θ_t (normalize: / Σ w_t), θ_t = W0 + Δ_t."""
    weights = per_model(job.cfg.weight, job.tasks)
    total = float(sum(weights))
    if job.cfg.normalize:
        return (*sum_of(deltas, [w / total for w in weights]), 1.0)
    return (*sum_of(deltas, weights), total)


def task_arithmetic_factored(job, deltas):
    """W0 + lam * Σ_t w_t Δ_t (normalize: / Σ w_t, a sum near 0 left undivided, as `combine` does)."""
    weights = per_model(job.cfg.weight, job.tasks)
    scale = job.cfg.lam
    if job.cfg.normalize:
        total = float(sum(weights))
        scale = scale / (total if abs(total) >= 1e-8 else 1.0)
    return (*sum_of(deltas, [w * scale for w in weights]), 1.0)


def mean_task_vector_factored(job, deltas):
    T = len(deltas)
    return (*sum_of(deltas, [job.cfg.lam / T] * T), 1.0)


def cart_factored(job, deltas):
    """θ_avg + lam * Σ_t LowRank_k(θ_t - θ_avg) with the centered matrices'
    SVDs from R x R cores (exact)."""
    T, k, lam = len(deltas), job.rank, job.cfg.lam
    left, right, blocks = _stacked(deltas)
    q_left, r_left, q_right, r_right = _qr_pair(left, right)
    total = left.shape[1]
    mean = torch.full((total,), 1.0 / T, dtype=WORK, device=left.device)
    core = (r_left * mean) @ r_right.mT  # the average's update in the Q bases
    kept = torch.zeros_like(core)
    for start, stop in blocks:
        selector = -mean.clone()
        selector[start:stop] += 1.0
        u, s, vh = torch.linalg.svd((r_left * selector) @ r_right.mT)
        kept += (u[:, :k] * s[:k]) @ vh[:k]
    core = core + lam * kept
    return q_left @ core, q_right.mT, 1.0


def tsv_m_factored(job, deltas):
    """W0 + lam * U⊥ Σ V⊥^T over every task's top min(k, rank Δ_t) triplets."""
    k, lam = job.rank, job.cfg.lam
    us, ss, vhs = [], [], []
    for delta in _present(deltas):
        u, s, vh = _svd_of_product(delta[0].to(WORK), delta[1].to(WORK))
        us.append(u[:, :k])
        ss.append(s[:k])
        vhs.append(vh[:k])
    if not ss or sum(s.numel() for s in ss) == 0:
        return (*_zero(job.shape), 1.0)
    u_orth = _nearest_orthonormal_tall(torch.cat(us, 1))
    v_orth = _nearest_orthonormal_tall(torch.cat(vhs, 0).mT)
    return u_orth * (lam * torch.cat(ss)), v_orth.mT, 1.0


def iso_c_factored(job, deltas):
    """W0 + lam * σ̄ U V^T over the nonzero spectrum of Σ_t Δ_t."""
    left, right, _ = _stacked(deltas)
    u, s, vh = _svd_of_product(left, right)
    if s.numel() == 0:
        return (*_zero(job.shape), 1.0)
    return u * (job.cfg.lam * s.mean()), vh, 1.0


def iso_cts_factored(job, deltas):
    """Iso-CTS with r the rank of Σ_t Δ_t: its top common directions plus,
    per task, the top directions of Δ_t outside them (at most its rank)."""
    from .svd_family import iso_cts_split

    T = len(deltas)
    left, right, _ = _stacked(deltas)
    u, s, vh = _svd_of_product(left, right)
    r = s.numel()
    if r == 0:
        return (*_zero(job.shape), 1.0)
    common, per_task = iso_cts_split(r, T, job.cfg.common_space_fraction)
    us, ss, vhs = [u[:, :common]], [s[:common]], [vh[:common]]
    if per_task:
        basis = u[:, :common]
        for delta in _present(deltas):
            l_t = delta[0].to(WORK)
            specific = l_t - basis @ (basis.mT @ l_t)
            ut, st, vht = _svd_of_product(specific, delta[1].to(WORK))
            us.append(ut[:, :per_task])
            ss.append(st[:per_task])
            vhs.append(vht[:per_task])
    u_orth = _nearest_orthonormal_tall(torch.cat(us, 1))
    v_orth = _nearest_orthonormal_tall(torch.cat(vhs, 0).mT)
    sigma = torch.cat(ss).mean()
    return u_orth * (job.cfg.lam * sigma), v_orth.mT, 1.0
