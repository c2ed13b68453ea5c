"""`ccsmerge extract-lora` against peft: the adapter of a tiny Llama fine-tune,
loaded by PeftModel.from_pretrained(base, out), gives the logits of the base
plus the truncated update (torch.linalg.svd in float64) and, at full rank, the
fine-tune's own logits. Runs where transformers and peft are installed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from ccsmerge import extract_lora  # noqa: E402
from ccsmerge.lora_files import module_name  # noqa: E402

RANK = 16
F64 = torch.float64


def _config():
    # head_dim 12 with one key/value head: k_proj and v_proj are 12 x 48, below the rank.
    return transformers.LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=40, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=32)


def _gapped_update(shape, rank, gen, scale):
    """A rank-`rank` update with a tail 10^4 smaller: randomized and optimal truncations agree."""
    m, n = shape
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=F64))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=F64))
    top = min(rank, k)
    s = torch.cat([torch.linspace(1.0, 0.5, top, dtype=F64), 1e-4 * torch.rand(k - top, generator=gen, dtype=F64)])
    return scale * (u * s) @ v.T


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory) -> tuple[Path, Path, dict, dict]:
    root = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(_config())
    base.save_pretrained(root / "base")
    tuned = transformers.LlamaForCausalLM(_config())
    tuned.load_state_dict(base.state_dict())
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if p.dim() == 2:
                p.add_(_gapped_update(p.shape, RANK, gen, 0.2 * float(p.norm()) / max(p.shape) ** 0.5).float())
            else:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    tuned.save_pretrained(root / "tuned")
    return root / "base", root / "tuned", base.state_dict(), tuned.state_dict()


def _logits(model, tokens):
    model.eval()
    with torch.no_grad():
        return model(tokens).logits.double()


def _tokens():
    return torch.randint(0, 96, (3, 12), generator=torch.Generator().manual_seed(2))


def test_peft_loads_the_truncated_update(llama_pair, tmp_path):
    base_path, tuned_path, base_sd, tuned_sd = llama_pair
    out = tmp_path / "adapter"
    result = extract_lora(base_path, tuned_path, out, RANK, device="cpu", dtype="float32")
    ranks = {module: entry["rank"] for module, entry in result.modules.items()}
    assert ranks["model.layers.0.self_attn.k_proj"] == 12 and ranks["model.layers.0.self_attn.q_proj"] == RANK
    assert "model.embed_tokens" in ranks and "model.norm" in result.modules_to_save
    # The reference: the base plus every matrix's truncated update in float64, the rest the fine-tune's.
    reference = transformers.LlamaForCausalLM(_config())
    state = {}
    for name, weight in base_sd.items():
        delta = tuned_sd[name].double() - weight.double()
        if weight.dim() == 2:
            u, s, vh = torch.linalg.svd(delta, full_matrices=False)
            k = ranks[module_name(name)]
            delta = (u[:, :k] * s[:k]) @ vh[:k]
        state[name] = (weight.double() + delta).float()
    reference.load_state_dict(state)
    loaded = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(base_path), out)
    # Every module took the rank and the scaling 1 the adapter means.
    for module, rank in ranks.items():
        layer = loaded.base_model.model.get_submodule(module)
        assert layer.r["default"] == rank and layer.scaling["default"] == 1.0
    tokens = _tokens()
    got, want = _logits(loaded, tokens), _logits(reference, tokens)
    base_logits = _logits(transformers.LlamaForCausalLM.from_pretrained(base_path), tokens)
    assert float((want - base_logits).abs().max()) > 0.05  # the update moves the logits
    torch.testing.assert_close(got, want, rtol=0, atol=2e-4)
    # merge_and_unload gives the reference weights themselves.
    merged = loaded.merge_and_unload().state_dict()
    for name, value in state.items():
        torch.testing.assert_close(merged[name], value, rtol=0, atol=1e-5)


def test_full_rank_adapter_gives_the_fine_tune(llama_pair, tmp_path):
    base_path, tuned_path, _, _ = llama_pair
    out = tmp_path / "adapter"
    result = extract_lora(base_path, tuned_path, out, 96, device="cpu", dtype="float32", max_memory="60kB")
    assert any("block_rows" in entry for entry in result.modules.values())  # some matrices read in row blocks
    assert result.worst[1] < 1e-6
    loaded = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(base_path), out)
    tuned = transformers.LlamaForCausalLM.from_pretrained(tuned_path)
    tokens = _tokens()
    torch.testing.assert_close(_logits(loaded, tokens), _logits(tuned, tokens), rtol=0, atol=1e-4)
