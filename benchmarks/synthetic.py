"""Synthetic weights with the spectra that make a top-k meaningful.

A fine-tuned weight here is   base + shared + specific_t + noise_t :
  base        i.i.d. N(0, base_std^2), like a pre-trained init;
  shared      one low-rank update common to every task (it cancels in theta_t - theta_avg);
  specific_t  U_t diag(s) V_t^T with random orthonormal U_t, V_t (QR of a Gaussian) and a
              power-law spectrum s_i = c * i^-decay, i = 1..rank;
  noise_t     a small Gaussian floor at the level of the last s_i, so the spectrum
              has a tail instead of dropping to zero at `rank`.
The specific part's Frobenius norm is delta_rel * ||base||_F. Generation runs on
`device` (fast on a GPU) in float32 and is cast to `dtype` at the end."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TaskSpectrum:
    rank_fraction: float = 0.25  # rank of the task-specific part, as a fraction of min(m, n)
    decay: float = 1.0  # s_i = c * i^-decay
    delta_rel: float = 0.05  # ||specific||_F / ||base||_F
    base_std: float = 0.02
    shared_rank: int = 16
    noise: bool = True


def generator(seed: int, device: torch.device | str) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def orthonormal(rows: int, cols: int, gen: torch.Generator, device) -> torch.Tensor:
    """rows x cols with orthonormal columns (cols <= rows), Haar-like."""
    g = torch.randn(rows, cols, generator=gen, device=device)
    q, r = torch.linalg.qr(g)
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def power_law(rank: int, decay: float, frobenius: float, device) -> torch.Tensor:
    s = torch.arange(1, rank + 1, device=device, dtype=torch.float32).pow(-decay)
    return s * (frobenius / s.norm())


def lowrank(m: int, n: int, s: torch.Tensor, gen: torch.Generator, device) -> torch.Tensor:
    """U diag(s) V^T with random orthonormal factors."""
    r = s.numel()
    u = orthonormal(m, r, gen, device)
    v = orthonormal(n, r, gen, device)
    return (u * s) @ v.T


def noise_floor(m: int, n: int, level: float, gen: torch.Generator, device) -> torch.Tensor:
    """Gaussian matrix whose largest singular value is about `level`."""
    return torch.randn(m, n, generator=gen, device=device) * (level / (math.sqrt(m) + math.sqrt(n)))


def decaying_matrix(m: int, n: int, *, seed: int = 0, device="cpu", spectrum: TaskSpectrum = TaskSpectrum(),
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One m x n matrix with a power-law spectrum plus a noise tail (no base)."""
    gen = generator(seed, device)
    rank = max(1, int(spectrum.rank_fraction * min(m, n)))
    s = power_law(rank, spectrum.decay, 1.0, device)
    a = lowrank(m, n, s, gen, device)
    if spectrum.noise:
        a += noise_floor(m, n, float(s[-1]), gen, device)
    return a.to(dtype)


def task_matrices(m: int, n: int, T: int, *, seed: int = 0, device="cpu", dtype: torch.dtype = torch.float32,
                  spectrum: TaskSpectrum = TaskSpectrum()) -> list[torch.Tensor]:
    """T fine-tuned versions of one m x n weight (see the module docstring)."""
    gen = generator(seed, device)
    base = torch.randn(m, n, generator=gen, device=device) * spectrum.base_std
    base_norm = spectrum.base_std * math.sqrt(m * n)
    shared_rank = min(spectrum.shared_rank, m, n)
    common = base + lowrank(m, n, power_law(shared_rank, spectrum.decay, spectrum.delta_rel * base_norm, device),
                            gen, device)
    rank = max(1, int(spectrum.rank_fraction * min(m, n)))
    s = power_law(rank, spectrum.decay, spectrum.delta_rel * base_norm, device)
    out = []
    for _ in range(T):
        x = common + lowrank(m, n, s, gen, device)
        if spectrum.noise:
            x += noise_floor(m, n, float(s[-1]), gen, device)
        out.append(x.to(dtype))
    return out


def layer_shapes(d_model: int, d_ff: int) -> dict[str, tuple[int, ...]]:
    """One Llama-style decoder layer: attention with biases, gated MLP, a norm."""
    return {
        "input_layernorm.weight": (d_model,),
        "self_attn.q_proj.weight": (d_model, d_model),
        "self_attn.q_proj.bias": (d_model,),
        "self_attn.k_proj.weight": (d_model, d_model),
        "self_attn.k_proj.bias": (d_model,),
        "self_attn.v_proj.weight": (d_model, d_model),
        "self_attn.v_proj.bias": (d_model,),
        "self_attn.o_proj.weight": (d_model, d_model),
        "mlp.gate_proj.weight": (d_ff, d_model),
        "mlp.up_proj.weight": (d_ff, d_model),
        "mlp.down_proj.weight": (d_model, d_ff),
    }


def synthetic_model(T: int, layers: int, d_model: int, d_ff: int, *, dtype: torch.dtype = torch.bfloat16,
                    seed: int = 0, gen_device="cpu", spectrum: TaskSpectrum = TaskSpectrum()) -> list[dict]:
    """T state dicts (on the CPU) of a `layers`-layer model; 2-D weights follow
    task_matrices, 1-D tensors are base + small per-task noise."""
    models: list[dict[str, torch.Tensor]] = [{} for _ in range(T)]
    index = 0
    for layer in range(layers):
        for suffix, shape in layer_shapes(d_model, d_ff).items():
            name = f"model.layers.{layer}.{suffix}"
            index += 1
            if len(shape) == 2:
                xs = task_matrices(*shape, T, seed=seed * 100_003 + index, device=gen_device, dtype=dtype,
                                   spectrum=spectrum)
            else:
                gen = generator(seed * 100_003 + index, gen_device)
                base = torch.randn(shape, generator=gen, device=gen_device) * spectrum.base_std
                xs = [(base + 0.1 * spectrum.base_std * torch.randn(shape, generator=gen, device=gen_device))
                      .to(dtype) for _ in range(T)]
            for sd, x in zip(models, xs):
                sd[name] = x.cpu()
    return models


def model_bytes(models: list[dict]) -> int:
    return sum(x.numel() * x.element_size() for sd in models for x in sd.values())
