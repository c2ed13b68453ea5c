"""Tiny Llama checkpoints saved by transformers, and reading a folder's
tensors back: what the tests against mergekit share."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a folder's safetensors files (an input or an output)."""
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def llama_family(root: Path, fine_tunes: int = 3, noise: float = 0.02, **config) -> tuple[Path, list[Path]]:
    """A random tiny Llama (float32) saved as root/base, and fine-tunes of it
    (every parameter plus noise * N(0, 1)) as root/ft0, root/ft1, ..."""
    import transformers

    config = transformers.LlamaConfig(num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32,
                                      **config)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config)
    base.save_pretrained(root / "base")
    paths = []
    for t in range(fine_tunes):
        tuned = transformers.LlamaForCausalLM(config)
        tuned.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in tuned.parameters():
                p.add_(noise * torch.randn_like(p))
        tuned.save_pretrained(root / f"ft{t}")
        paths.append(root / f"ft{t}")
    return root / "base", paths
