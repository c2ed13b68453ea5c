"""A BERT encoder (all-MiniLM-L6-v2) in plain PyTorch, loaded from its safetensors.

The model is the sentence-transformers checkpoint: BERT with 6 layers, hidden
size 384, 12 heads, GELU FFN of 1536, followed by mean pooling over the tokens.
Tensor names are the checkpoint's (``encoder.layer.<i>.attention.self.query.weight``
...), so a fine-tuned layer's state dict is a plain slice of the checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

LAYER_TENSORS = (
    "attention.self.query.weight", "attention.self.query.bias",
    "attention.self.key.weight", "attention.self.key.bias",
    "attention.self.value.weight", "attention.self.value.bias",
    "attention.output.dense.weight", "attention.output.dense.bias",
    "attention.output.LayerNorm.weight", "attention.output.LayerNorm.bias",
    "intermediate.dense.weight", "intermediate.dense.bias",
    "output.dense.weight", "output.dense.bias",
    "output.LayerNorm.weight", "output.LayerNorm.bias",
)


class MiniLM:
    """Weights and config of the checkpoint; functional forward passes."""

    def __init__(self, model_dir: Path):
        from safetensors.torch import load_file

        model_dir = Path(model_dir)
        self.config = json.loads((model_dir / "config.json").read_text())
        self.weights = {k: v.float() for k, v in load_file(str(model_dir / "model.safetensors")).items()
                        if not k.endswith("position_ids")}
        self.hidden = self.config["hidden_size"]
        self.heads = self.config["num_attention_heads"]
        self.layers = self.config["num_hidden_layers"]
        self.eps = self.config.get("layer_norm_eps", 1e-12)

    def layer_state(self, i: int) -> dict[str, torch.Tensor]:
        return {f"encoder.layer.{i}.{n}": self.weights[f"encoder.layer.{i}.{n}"] for n in LAYER_TENSORS}

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        w = self.weights
        positions = torch.arange(ids.shape[1])
        x = (w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][positions]
             + w["embeddings.token_type_embeddings.weight"][0])
        return F.layer_norm(x, (self.hidden,), w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"],
                            self.eps)

    def layer(self, x: torch.Tensor, mask: torch.Tensor, p: dict[str, torch.Tensor], i: int) -> torch.Tensor:
        """One encoder layer; p maps the checkpoint's names of layer i to tensors."""
        def g(name):
            return p[f"encoder.layer.{i}.{name}"]

        b, n, h = x.shape
        d = h // self.heads

        def split(t):
            return t.view(b, n, self.heads, d).transpose(1, 2)

        q = split(F.linear(x, g("attention.self.query.weight"), g("attention.self.query.bias")))
        k = split(F.linear(x, g("attention.self.key.weight"), g("attention.self.key.bias")))
        v = split(F.linear(x, g("attention.self.value.weight"), g("attention.self.value.bias")))
        keep = mask[:, None, None, :].bool()  # attend to the real tokens only
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=1.0 / math.sqrt(d))
        ctx = ctx.transpose(1, 2).reshape(b, n, h)
        a = F.linear(ctx, g("attention.output.dense.weight"), g("attention.output.dense.bias"))
        x = F.layer_norm(a + x, (h,), g("attention.output.LayerNorm.weight"), g("attention.output.LayerNorm.bias"),
                         self.eps)
        f = F.gelu(F.linear(x, g("intermediate.dense.weight"), g("intermediate.dense.bias")))
        f = F.linear(f, g("output.dense.weight"), g("output.dense.bias"))
        return F.layer_norm(f + x, (h,), g("output.LayerNorm.weight"), g("output.LayerNorm.bias"), self.eps)

    def bottom(self, ids: torch.Tensor, mask: torch.Tensor, upto: int) -> torch.Tensor:
        """Hidden states after layers 0 .. upto-1 (the frozen part)."""
        x = self.embed(ids)
        for i in range(upto):
            x = self.layer(x, mask, self.weights, i)
        return x

    def top(self, x: torch.Tensor, mask: torch.Tensor, params: dict[str, torch.Tensor], start: int) -> torch.Tensor:
        """Layers start .. end with `params` (the tuned layers' tensors), then mean pooling."""
        for i in range(start, self.layers):
            x = self.layer(x, mask, params, i)
        return mean_pool(x, mask)


def mean_pool(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(1) / m.sum(1).clamp(min=1.0)


def load_tokenizer(model_dir: Path, max_len: int):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    tok.enable_truncation(max_length=max_len)
    tok.no_padding()
    return tok


def encode(tok, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in tok.encode_batch(texts)]


def pad(ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(s) for s in ids)
    out = torch.zeros(len(ids), n, dtype=torch.long)
    mask = torch.zeros(len(ids), n, dtype=torch.long)
    for r, s in enumerate(ids):
        out[r, : len(s)] = torch.tensor(s)
        mask[r, : len(s)] = 1
    return out, mask
