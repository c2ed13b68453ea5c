"""Independent float64 reference implementations for the ccsmerge tests.

Everything here is written from the method descriptions in plain PyTorch and
deliberately imports nothing from ccsmerge, so the tests compare the package
against an implementation that shares none of its code."""

from __future__ import annotations

import re

import torch

F64 = torch.float64


def _f64(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to(device="cpu", dtype=F64)


# ----------------------------------------------------------------------------- ops


def ref_mean(xs) -> torch.Tensor:
    """Mean of the tensors' values, in float64 on the CPU."""
    return torch.stack([_f64(x) for x in xs]).mean(0)


def ref_centered_matmul(xs, center, rhs, transpose: bool) -> torch.Tensor:
    """(T, rows, l): op(xs[t] - center) @ rhs_t in float64, forming the centered matrices."""
    r64 = _f64(rhs)
    outs = []
    for t, x in enumerate(xs):
        d = _f64(x) if center is None else _f64(x) - _f64(center)
        if transpose:
            d = d.T
        outs.append(d @ (r64 if r64.dim() == 2 else r64[t]))
    return torch.stack(outs)


def ref_lowrank_update(center, left, right, alpha: float) -> torch.Tensor:
    return _f64(center) + alpha * (_f64(left) @ _f64(right))


def ref_truncated(a: torch.Tensor, k: int) -> torch.Tensor:
    """Best rank-k approximation of a (Eckart-Young) from the float64 SVD."""
    u, s, vh = torch.linalg.svd(_f64(a), full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


def ref_truncation_error(a: torch.Tensor, k: int) -> float:
    """||a - a_k||_F, the optimal rank-k error (the tail of the spectrum)."""
    s = torch.linalg.svdvals(_f64(a))
    return float(s[k:].pow(2).sum().sqrt())


def ref_rank(shape, rank_ratio: float) -> int:
    return max(1, int(rank_ratio * min(shape)))


# ----------------------------------------------------------------------------- methods


def ref_cart_tensor(xs, k: int, lam: float) -> torch.Tensor:
    """theta_avg + lam * sum_t LowRank_k(theta_t - theta_avg), exact float64 SVD."""
    avg = ref_mean(xs)
    update = torch.zeros_like(avg)
    for x in xs:
        update += ref_truncated(_f64(x) - avg, k)
    return avg + lam * update


def ref_task_arithmetic(xs, base, lam: float) -> torch.Tensor:
    b = _f64(base)
    return b + lam * sum(_f64(x) - b for x in xs)


def ref_ties(xs, base, density: float, lam: float) -> torch.Tensor:
    """TIES-Merging written out element by element (meant for tiny tensors).

    trim: keep the top max(1, int(density * N)) magnitudes of each task vector
    (found by sorting); elect: the sign of the sum of the trimmed values (+
    where the sum is 0, as mergekit elects it); disjoint mean: the mean of the kept, non-zero values whose sign is the
    elected one (0 when there are none); result: base + lam * that."""
    b = _f64(base).reshape(-1)
    n = b.numel()
    keep = max(1, int(density * n))
    trimmed = []
    for x in xs:
        tau = (_f64(x).reshape(-1) - b).tolist()
        order = sorted(range(n), key=lambda i: abs(tau[i]), reverse=True)
        kept = set(order[:keep])
        trimmed.append([tau[i] if i in kept else 0.0 for i in range(n)])
    out = []
    for i in range(n):
        column = [tr[i] for tr in trimmed]
        total = sum(column)
        sign = 1 if total >= 0 else -1
        agreeing = [v for v in column if v != 0.0 and ((v > 0) - (v < 0)) == sign]
        merged = sum(agreeing) / len(agreeing) if agreeing else 0.0
        out.append(b[i].item() + lam * merged)
    return torch.tensor(out, dtype=F64).reshape(base.shape)


def ref_consensus(taus, ties: bool, normalize: bool):
    """Task arithmetic's sum (or mean) of (T, N) task vectors, or TIES' elected
    sign (that of the sum) and the sum (or mean) of the values agreeing with it."""
    if not ties:
        return taus.mean(0) if normalize else taus.sum(0)
    elected = taus.sum(0).sign()
    agree = (taus.sign() == elected) & (taus != 0)
    total = (taus * agree).sum(0)
    return total / agree.sum(0).clamp(min=1) if normalize else total


def ref_breadcrumbs_kept(taus, density: float, gamma: float):
    """Model Breadcrumbs' kept values of (T, N) task vectors, with mergekit's
    counts: keep int(density N) after dropping the int(gamma N) largest |tau|
    (fewer if the two exceed N), ranked by the float32 magnitude, then the index."""
    N = taus.shape[1]
    kept = torch.zeros_like(taus)
    for t in range(taus.shape[0]):
        if density >= 1:
            kept[t] = taus[t]
            continue
        keep = int(density * N)
        bottom = max(0, N - keep - int(gamma * N))
        chosen = torch.sort(taus[t].float().abs(), stable=True).indices[bottom : bottom + keep]
        kept[t, chosen] = taus[t, chosen]
    return kept


def polar(a: torch.Tensor) -> torch.Tensor:
    """The orthonormal polar factor P Q^T of a = P D Q^T."""
    p, _, qh = torch.linalg.svd(a, full_matrices=False)
    return p @ qh


def ref_tsv_m(xs, base, lam):
    """TSV-M: each task's top r/T triplets, the concatenated bases replaced by their polar factors."""
    deltas = [x.double() - base.double() for x in xs]
    T, r = len(deltas), min(base.shape)
    k = max(1, r // T)
    us, ss, vs = [], [], []
    for d in deltas:
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(vh[:k].T)
    update = polar(torch.cat(us, 1)) @ torch.diag(torch.cat(ss)) @ polar(torch.cat(vs, 1)).T
    return base.double() + lam * update


def ref_iso_c(xs, base, lam):
    """Iso-C: the sum of the task vectors with every singular value set to their mean."""
    total = sum(x.double() - base.double() for x in xs)
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    return base.double() + lam * s.mean() * (u @ vh)


def ref_iso_cts(xs, base, lam, fraction):
    """Iso-CTS: the common subspace of the sum plus per-task directions outside it, isotropic."""
    deltas = [x.double() - base.double() for x in xs]
    T, r = len(deltas), min(base.shape)
    specific_total = round((r - int(r * fraction)) / T) * T
    common = r - specific_total
    per_task = specific_total // T
    u, s, vh = torch.linalg.svd(sum(deltas), full_matrices=False)
    us, ss, vs = [u[:, :common]], [s[:common]], [vh[:common].T]
    for d in deltas:
        projected = d - u[:, :common] @ u[:, :common].T @ d
        ut, st, vht = torch.linalg.svd(projected, full_matrices=False)
        us.append(ut[:, :per_task])
        ss.append(st[:per_task])
        vs.append(vht[:per_task].T)
    return base.double() + lam * torch.cat(ss).mean() * (polar(torch.cat(us, 1)) @ polar(torch.cat(vs, 1)).T)


def ref_mean_task_vector(xs, base, lam):
    return base.double() + lam * sum(x.double() - base.double() for x in xs) / len(xs)


def ref_average_state(models) -> dict[str, torch.Tensor]:
    return {name: ref_mean([sd[name] for sd in models]) for name in models[0]}


# ----------------------------------------------------------------------------- data


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_orthonormal(m: int, r: int, gen: torch.Generator) -> torch.Tensor:
    q, r_ = torch.linalg.qr(torch.randn(m, r, generator=gen, dtype=F64))
    return q * torch.sign(torch.diagonal(r_))  # Haar-distributed


def power_law_spectrum(r: int, decay: float, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.arange(1, r + 1, dtype=F64).pow(-decay)


def decaying_matrix(
    m: int, n: int, *, decay: float = 1.0, scale: float = 1.0, rank: int | None = None, seed: int = 0
) -> torch.Tensor:
    """float64 m x n matrix U diag(s) V^T with s_i = scale * i^-decay
    (i = 1..rank) and Haar-random orthonormal U, V."""
    gen = generator(seed)
    r = min(m, n) if rank is None else rank
    u = random_orthonormal(m, r, gen)
    v = random_orthonormal(n, r, gen)
    return (u * power_law_spectrum(r, decay, scale)) @ v.T


def task_set(
    T: int, m: int, n: int, *, decay: float = 1.5, shared_rank: int = 4, seed: int = 0
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A base weight and T fine-tuned versions of it (float64):
    theta_t = base + shared low-rank update + task-specific update with a
    power-law spectrum."""
    gen = generator(seed)
    base = 0.1 * torch.randn(m, n, generator=gen, dtype=F64)
    shared = decaying_matrix(m, n, decay=decay, scale=0.5, rank=min(shared_rank, m, n), seed=seed + 1)
    thetas = [
        base + shared + decaying_matrix(m, n, decay=decay, scale=1.0, seed=seed + 100 + t) for t in range(T)
    ]
    return base, thetas


# Names and shapes of a small "model": every kind of tensor a merge meets.
MODEL_LAYOUT = {
    "layers.0.attn.q_proj.weight": (40, 24),  # tall 2-D: low-rank step
    "layers.0.attn.q_proj.bias": (40,),  # 1-D: average
    "layers.0.mlp.up_proj.weight": (20, 56),  # wide 2-D: low-rank step
    "layers.0.norm.weight": (24,),
    "model.embed_tokens.weight": (30, 12),  # excluded by default
    "lm_head.weight": (30, 12),  # excluded by default
    "conv.weight": (4, 3, 3, 3),  # 4-D: average
    "scale": (),  # 0-D float
}
INT_BUFFERS = {"bn.num_batches_tracked": torch.tensor(7, dtype=torch.int64)}


def model_set(T: int, *, dtype=F64, seed: int = 0, with_base: bool = True, decay: float = 1.5):
    """T state dicts (and a base) with the MODEL_LAYOUT tensors; 2-D weights
    are built by task_set so the task vectors have decaying spectra."""
    models = [dict() for _ in range(T)]
    base = {}
    for i, (name, shape) in enumerate(MODEL_LAYOUT.items()):
        if len(shape) == 2:
            b, thetas = task_set(T, *shape, decay=decay, seed=seed * 1000 + 10 * i)
        else:
            gen = generator(seed * 1000 + 10 * i)
            b = torch.randn(shape, generator=gen, dtype=F64)
            thetas = [b + 0.3 * torch.randn(shape, generator=gen, dtype=F64) for _ in range(T)]
        base[name] = b.to(dtype)
        for t in range(T):
            models[t][name] = thetas[t].to(dtype)
    for name, value in INT_BUFFERS.items():
        base[name] = value.clone()
        for sd in models:
            sd[name] = value.clone()
    return (models, base) if with_base else models


DEFAULT_EXCLUDE_NAMES = ("model.embed_tokens.weight", "lm_head.weight")


def ref_takes_lowrank(name: str, shape, include=(), exclude=()) -> bool:
    if len(shape) != 2 or min(shape) == 0:
        return False
    if any(re.search(p, name) for p in include):
        return True
    return not any(re.search(p, name) for p in exclude)


def exact_svd(method: str) -> dict:
    """svd="exact" for the methods that take an svd option (the others always solve exactly)."""
    from ccsmerge.methods import REGISTRY

    return {"svd": "exact"} if REGISTRY[method].param("svd") else {}
