"""Synthetic fine-tuned models for the built-in example and the benchmarks.

Task vectors are low-rank-ish with power-law singular values, like real
fine-tuning updates, so that truncated SVDs have a meaningful top-k (pure
Gaussian noise has a flat spectrum and no such structure)."""

from __future__ import annotations

import torch


def decaying_matrix(
    m: int, n: int, *, decay: float = 1.0, scale: float = 1.0, generator: torch.Generator, dtype=torch.float32
) -> torch.Tensor:
    """scale * U diag(i^-decay) V^T with random orthonormal U (m x r), V (n x r), r = min(m, n)."""
    r = min(m, n)
    u = torch.linalg.qr(torch.randn(m, r, generator=generator, dtype=dtype)).Q
    v = torch.linalg.qr(torch.randn(n, r, generator=generator, dtype=dtype)).Q
    s = scale * torch.arange(1, r + 1, dtype=dtype) ** (-decay)
    return (u * s) @ v.T


def toy_transformer(layers: int = 4, width: int = 256, vocab: int = 1000, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """A pretrained-like state dict shaped like a small transformer."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {"embed_tokens.weight": torch.randn(vocab, width, generator=g) * 0.02}
    for i in range(layers):
        p = f"layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[p + f"attn.{proj}.weight"] = torch.randn(width, width, generator=g) / width**0.5
        sd[p + "mlp.up_proj.weight"] = torch.randn(4 * width, width, generator=g) / width**0.5
        sd[p + "mlp.down_proj.weight"] = torch.randn(width, 4 * width, generator=g) / (4 * width) ** 0.5
        sd[p + "mlp.up_proj.bias"] = torch.zeros(4 * width)
        sd[p + "norm.weight"] = torch.ones(width)
    sd["lm_head.weight"] = torch.randn(vocab, width, generator=g) * 0.02
    return sd


def fine_tunes(
    base: dict[str, torch.Tensor], count: int, *, strength: float = 0.05, decay: float = 1.0, seed: int = 1
) -> list[dict[str, torch.Tensor]]:
    """`count` fine-tuned variants of base: each 2-D weight gets a task vector
    with a decaying spectrum (a shared part plus a task-specific part); other
    tensors get small dense noise."""
    g = torch.Generator().manual_seed(seed)
    shared = {
        name: decaying_matrix(*w.shape, decay=decay, scale=strength * w.norm().item() / 4, generator=g)
        for name, w in base.items()
        if w.dim() == 2
    }
    models = []
    for _ in range(count):
        sd = {}
        for name, w in base.items():
            if w.dim() == 2:
                own = decaying_matrix(*w.shape, decay=decay, scale=strength * w.norm().item() / 2, generator=g)
                sd[name] = w + shared[name] + own
            else:
                sd[name] = w + strength * 0.1 * torch.randn(w.shape, generator=g)
        models.append(sd)
    return models
