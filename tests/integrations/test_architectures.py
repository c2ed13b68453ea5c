"""Every model family a Hugging Face user brings, end to end: a tiny random
base of each architecture built with transformers from a config (nothing is
downloaded), three fine-tunes of it (the base plus small random
perturbations of every tensor) saved by save_pretrained, merged by
ccsmerge.merge_checkpoints with CART (exact SVD) and TIES; the output loads
in from_pretrained with no missing, unexpected or mismatched keys, and its
tensors and forward pass equal those of float64 reference weights computed
here in plain PyTorch. Which tensors the reference gives the low-rank step
comes from the model's modules (linear maps, routers and stacked experts,
output heads excepted), not from ccsmerge's name patterns. Mixture-of-experts
models whose experts are one (E, m, n) tensor (GPT-OSS, Llama4) get the step
per slice."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402
from torch import nn  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

import ccsmerge  # noqa: E402

F64 = torch.float64
T = 3
RANK_RATIO, LAM = 0.12, 2.0  # CART's defaults
DENSITY, TIES_LAM = 0.2, 1.0  # TIES's defaults
VOCAB = 64
# Shared by the decoder-only configs: tiny, 2 layers, grouped-query attention.
CAUSAL = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
MOE = dict(num_experts_per_tok=2)


def _configs():
    t = transformers
    return {
        "llama": (lambda: t.LlamaConfig(**CAUSAL), t.LlamaForCausalLM, "causal"),
        "qwen2": (lambda: t.Qwen2Config(**CAUSAL), t.Qwen2ForCausalLM, "causal"),
        "mistral": (lambda: t.MistralConfig(**CAUSAL), t.MistralForCausalLM, "causal"),
        "gemma2": (lambda: t.Gemma2Config(**CAUSAL, head_dim=8), t.Gemma2ForCausalLM, "causal"),
        "gemma3": (lambda: t.Gemma3TextConfig(**CAUSAL, head_dim=8), t.Gemma3ForCausalLM, "causal"),
        "phi3": (lambda: t.Phi3Config(**CAUSAL), t.Phi3ForCausalLM, "causal"),
        "gpt2": (
            lambda: t.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                 bos_token_id=1, eos_token_id=2),
            t.GPT2LMHeadModel, "causal",
        ),
        "bert": (
            lambda: t.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=48, max_position_embeddings=64),
            t.BertForMaskedLM, "causal",
        ),
        "t5": (
            lambda: t.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                               decoder_start_token_id=0),
            t.T5ForConditionalGeneration, "seq2seq",
        ),
        "vit": (
            lambda: t.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                                image_size=16, patch_size=4, num_labels=3),
            t.ViTForImageClassification, "image",
        ),
        "mixtral": (lambda: t.MixtralConfig(**CAUSAL, **MOE, num_local_experts=4), t.MixtralForCausalLM, "causal"),
        "qwen2_moe": (
            lambda: t.Qwen2MoeConfig(**CAUSAL, **MOE, num_experts=4, moe_intermediate_size=24,
                                     shared_expert_intermediate_size=40),
            t.Qwen2MoeForCausalLM, "causal",
        ),
        "qwen3_moe": (
            lambda: t.Qwen3MoeConfig(**CAUSAL, **MOE, num_experts=4, moe_intermediate_size=24, head_dim=8),
            t.Qwen3MoeForCausalLM, "causal",
        ),
        "gpt_oss": (
            lambda: t.GptOssConfig(**CAUSAL, **MOE, num_local_experts=4, head_dim=8),
            t.GptOssForCausalLM, "causal",
        ),
        "llama4": (
            lambda: t.Llama4TextConfig(**CAUSAL, num_local_experts=4, num_experts_per_tok=1,
                                       intermediate_size_mlp=40, head_dim=8),
            t.Llama4ForCausalLM, "causal",
        ),
    }


ARCHITECTURES = tuple(_configs())
STACKED = ("gpt_oss", "llama4")  # experts saved as one (E, m, n) tensor per projection
MOE_ARCHITECTURES = ("mixtral", "qwen2_moe", "qwen3_moe", *STACKED)


def loading_options(arch: str) -> dict:
    """The experts' plain loop (the default grouped GEMM has no float64 kernel)."""
    return {"experts_implementation": "eager"} if arch in MOE_ARCHITECTURES else {}


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


@pytest.fixture(scope="module", params=ARCHITECTURES)
def family(request, tmp_path_factory):
    """(architecture, model class, input kind, base folder, fine-tune folders, base model)."""
    make_config, cls, kind = _configs()[request.param]
    root = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    base = cls(make_config()).eval()
    base.save_pretrained(root / "base")
    paths = []
    for t in range(T):
        tuned = cls(make_config())
        tuned.load_state_dict(base.state_dict())
        g = torch.Generator().manual_seed(100 + t)
        with torch.no_grad():
            for p in tuned.parameters():  # tied weights are one parameter: perturbed once
                p.add_(0.02 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        tuned.save_pretrained(root / f"ft{t}")
        paths.append(root / f"ft{t}")
    return request.param, cls, kind, root / "base", paths, base


# ----------------------------------------------------------------------------- the float64 references


def lowrank_selection(model: nn.Module, saved: dict[str, torch.Tensor]) -> set[str]:
    """The saved tensors that are the weight of a linear map of the network's
    body, from the model's modules: nn.Linear and GPT-2's Conv1D weights,
    router weights, experts stacked as (E, m, n); output heads excepted.
    transformers 5 renames (ViT) or fuses (Mixtral's experts) some tensors on
    loading, so each saved tensor of the base is found among the model's
    parameters by its values; experts saved one by one and fused on loading
    have no parameter of their own, and their saved names say what they are."""
    by_value = {(tuple(p.shape), p.detach().numpy().tobytes()): full for full, p in model.named_parameters()}
    heads = [model.get_output_embeddings(), getattr(model, "classifier", None), getattr(model, "score", None)]
    selected = set()
    for name, x in saved.items():
        if not x.is_floating_point() or x.dim() < 2:
            continue
        full = by_value.get((tuple(x.shape), x.numpy().tobytes()))
        if full is None:
            parts = name.split(".")
            numbered = "experts" in parts[:-2] and parts[parts.index("experts") + 1].isdigit()
            assert numbered and x.dim() == 2, f"{name}: not a parameter of the model, nor a numbered expert"
            selected.add(name)
            continue
        owner, _, leaf = full.rpartition(".")
        module = model.get_submodule(owner)
        kind = type(module).__name__
        if any(module is head for head in heads if head is not None):
            continue
        if isinstance(module, (nn.Linear, Conv1D)) or "Router" in kind:
            if leaf == "weight" and x.dim() == 2:
                selected.add(name)
        elif kind.endswith("Experts") and x.dim() == 3:
            selected.add(name)
    return selected


def truncated(d: torch.Tensor, k: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


def cart_reference(xs: list[torch.Tensor], lowrank: bool) -> torch.Tensor:
    """theta_avg + lam * sum_t LowRank_k(theta_t - theta_avg), per matrix (per slice of a stack)."""
    xs = [x.to(F64) for x in xs]
    avg = torch.stack(xs).mean(0)
    if not lowrank:
        return avg
    k = max(1, int(RANK_RATIO * min(avg.shape[-2:])))
    if avg.dim() == 2:
        return avg + LAM * sum(truncated(x - avg, k) for x in xs)
    return torch.stack([avg[e] + LAM * sum(truncated(x[e] - avg[e], k) for x in xs) for e in range(avg.shape[0])])


def ties_reference(xs: list[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    """TIES-Merging as the paper writes it: trim each task vector to its top
    max(1, int(density * N)) magnitudes, elect the sign of the trimmed sum,
    average the kept values of that sign (0 where none), base + lam * that."""
    b = base.to(F64).reshape(-1)
    keep = max(1, int(DENSITY * b.numel()))
    trimmed = []
    for x in xs:
        tau = x.to(F64).reshape(-1) - b
        mask = torch.zeros_like(tau, dtype=torch.bool)
        mask[tau.abs().argsort(descending=True, stable=True)[:keep]] = True
        trimmed.append(torch.where(mask, tau, 0.0))
    trimmed = torch.stack(trimmed)
    sign = torch.sign(trimmed.sum(0))
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
    count = agree.sum(0)
    mean = torch.where(count > 0, (trimmed * agree).sum(0) / count.clamp(min=1), 0.0)
    return (b + TIES_LAM * mean).reshape(base.shape)


def reference_weights(method: str, base_model, base_path: Path, paths: list[Path]) -> dict[str, torch.Tensor]:
    fine_tunes = [tensors(p) for p in paths]
    base = tensors(base_path)
    lowrank = lowrank_selection(base_model, base)
    out = {}
    for name, x0 in fine_tunes[0].items():
        xs = [sd[name] for sd in fine_tunes]
        if not x0.is_floating_point():
            out[name] = x0
        elif method == "cart":
            out[name] = cart_reference(xs, name in lowrank)
        else:
            out[name] = ties_reference(xs, base[name])
    return out


def load_reference(arch, cls, weights: dict[str, torch.Tensor], config_from: Path, folder: Path):
    """The model class loaded with the float64 reference weights, through
    from_pretrained (so that any key conversion on loading applies alike)."""
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in weights.items()}, folder / "model.safetensors", {"format": "pt"})
    (folder / "config.json").write_text((config_from / "config.json").read_text())
    return cls.from_pretrained(folder, dtype=F64, **loading_options(arch)).eval()


def forward(model, kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        if kind == "image":
            return model(pixel_values=torch.randn(2, 3, 16, 16, generator=g, dtype=F64)).logits
        ids = torch.randint(3, VOCAB, (2, 9), generator=g)
        if kind == "seq2seq":
            return model(input_ids=ids, decoder_input_ids=ids[:, :5]).logits
        return model(input_ids=ids).logits


# ----------------------------------------------------------------------------- the tests


def _merged(method, family, tmp_path):
    arch, cls, kind, base_path, paths, base_model = family
    options = {"svd": "exact"} if method == "cart" else {"base": base_path}
    out = ccsmerge.merge_checkpoints(paths, tmp_path / "merged", method, device="cpu", **options)
    model, info = cls.from_pretrained(out, output_loading_info=True, **loading_options(arch))
    for kind_of_key in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert not info[kind_of_key], (arch, kind_of_key, info[kind_of_key])
    expected = reference_weights(method, base_model, base_path, paths)
    got = tensors(out)
    assert got.keys() == expected.keys()
    for name, ref in expected.items():
        assert got[name].dtype == tensors(paths[0])[name].dtype, name
        if ref.is_floating_point():
            error = float((got[name].to(F64) - ref).abs().max())
            assert error <= 1e-5 * max(1.0, float(ref.abs().max())), (arch, name, error)
        else:
            assert torch.equal(got[name], ref), name
    reference = load_reference(arch, cls, expected, paths[0], tmp_path / "reference")
    logits, ref_logits = forward(model.to(F64), kind), forward(reference, kind)
    assert torch.isfinite(ref_logits).all()
    error = float((logits - ref_logits).abs().max())
    assert error <= 1e-4 * float(ref_logits.abs().max()), (arch, error)
    return out, got, expected


def test_cart_merges_loads_and_matches_the_float64_reference(family, tmp_path):
    arch, _, _, base_path, paths, base_model = family
    _, got, _ = _merged("cart", family, tmp_path)
    plan = ccsmerge.plan_checkpoints(paths, "cart", svd="exact", device="cpu")
    lowranked = {t.name for t in plan.tensors if t.policy in ("low-rank", "stacked-low-rank")}
    inputs = tensors(paths[0])
    expected = lowrank_selection(base_model, tensors(base_path))
    assert lowranked == expected, (arch, lowranked ^ expected)
    stacks = {t.name for t in plan.tensors if t.policy == "stacked-low-rank"}
    if arch in STACKED:
        assert stacks and all(inputs[n].dim() == 3 for n in stacks)
        # The experts got the per-slice step: they are not the average.
        fine_tunes = [tensors(p) for p in paths]
        for name in stacks:
            average = torch.stack([sd[name].to(F64) for sd in fine_tunes]).mean(0)
            assert float((got[name].to(F64) - average).abs().max()) > 1e-3, name
        rules = {t.rule for t in plan.tensors if t.name in stacks}
        assert all(rule.startswith("stacked 'experts\\\\.': 4 slices of ") for rule in rules), rules
        biases = [t for t in plan.tensors if t.name.endswith("_bias") and "experts" in t.name]
        assert all(t.policy == "average" and t.rule == "bias stack" for t in biases)
    else:
        assert not stacks


def test_ties_merges_loads_and_matches_the_float64_reference(family, tmp_path):
    _merged("ties", family, tmp_path)


def test_every_architecture_is_covered():
    names = set(ARCHITECTURES)
    assert {"llama", "qwen2", "mistral", "gemma2", "gemma3", "phi3", "gpt2", "bert", "t5", "vit", "mixtral",
            "qwen2_moe", "qwen3_moe", "gpt_oss", "llama4"} == names
    assert json.dumps(sorted(names))  # the parametrization's ids
