"""PEFT LoRA adapters of a tiny Llama, made by peft itself, and float64
references of every method on the dense models they define.

The adapters differ in everything a merge of adapters must handle: rank
(4, 8, 2), scaling (alpha / r and rslora's alpha / sqrt(r)), target modules
(q,v / q,k,v,o / gate,up,down), an embedding target, modules_to_save
(a full lm_head). peft initialises B = 0 (an embedding's A = 0): every
factor is drawn at random before saving, so every update is nonzero.

The references never read adapter files: each adapter is applied to a
float64 copy of the base by peft's merge_and_unload, and the methods run in
plain float64 PyTorch on those dense state dicts. Where the dense formula is
ambiguous for low-rank updates, the references implement the documented
adapter definitions: singular values count as nonzero above
RANK_THRESHOLD * sigma_max; TSV-M takes k_t = min(k, r_t) triplets of task
t; Iso-C and Iso-CTS work on the nonzero part of the task-vector sum
(r -> R_sum), and Iso-CTS takes at most the nonzero directions of each
projected task vector; CART's default k on a module that only adapters
touch is max(1, int(adapter_rank_ratio * R)), R the sum of their ranks there."""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import torch
from safetensors.torch import load_file

from reference import polar, ref_breadcrumbs_kept
from reference import ref_consensus as consensus
from reference import ref_truncated as truncated

F64 = torch.float64
RANK_THRESHOLD = 1e-10
HIDDEN, LAYERS, VOCAB, INTERMEDIATE = 64, 2, 128, 96

CONFIG = dict(
    vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False,
)

# name -> LoraConfig arguments. k and v are 32 x 64 (grouped-query attention).
ADAPTERS = {
    "qv_r4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"]),
    "qkvo_r8_rslora": dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                           modules_to_save=["lm_head"]),
    "mlp_r2": dict(r=2, lora_alpha=3, target_modules=["gate_proj", "up_proj", "down_proj"]),
}
# The adapter behind the full fine-tune of the mixed case.
FULL_SOURCE = dict(r=4, lora_alpha=4, target_modules=["q_proj", "o_proj", "up_proj"])
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def llama_config(**overrides):
    import transformers

    return transformers.LlamaConfig(**{**CONFIG, **overrides})


def load_base(base: Path, dtype=None):
    import transformers

    return transformers.LlamaForCausalLM.from_pretrained(base, dtype=dtype).eval()


def save_base(root: Path, dtype=torch.float32, seed: int = 0, **overrides) -> Path:
    import transformers

    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(llama_config(**overrides)).to(dtype)
    model.save_pretrained(root)
    return root


def randomize_adapter(model, seed: int) -> None:
    """Nonzero random factors (peft's B = 0 would make every update zero) and
    a perturbed copy of every module to save."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                std = 0.1 if ("lora_A" in name or "lora_embedding_A" in name) else 0.02
                p.copy_(std * torch.randn(p.shape, generator=g, dtype=F64))
            elif "modules_to_save" in name:
                p.add_(0.01 * torch.randn(p.shape, generator=g, dtype=F64))


def save_adapter(base: Path, out: Path, seed: int, safe_serialization: bool = True, config_cls=None, **lora) -> Path:
    """An adapter of the model in `base`, made by peft, random, saved by save_pretrained."""
    import peft

    model = load_base(base)
    config = (config_cls or peft.LoraConfig)(**lora)
    wrapped = peft.get_peft_model(model, config)
    randomize_adapter(wrapped, seed)
    wrapped.save_pretrained(out, safe_serialization=safe_serialization)
    return out


def make_family(root: Path, dtype=torch.float32) -> dict:
    """The base (root/base) and the ADAPTERS (root/<name>), in `dtype`."""
    root = Path(root)
    base = save_base(root / "base", dtype)
    adapters = [save_adapter(base, root / name, seed=10 + i, **spec) for i, (name, spec) in enumerate(ADAPTERS.items())]
    return {"root": root, "base": base, "adapters": adapters}


def save_full_fine_tune(base: Path, out: Path, seed: int = 40, noise: float = 2e-3) -> Path:
    """A full fine-tune: an adapter merged into the base by merge_and_unload,
    then every parameter perturbed (a real full fine-tune's update has full
    rank; the SVD family's dense formulas are ill-posed on a rank-deficient
    update plus rounding)."""
    import peft

    adapter = save_adapter(base, out.parent / (out.name + "-source"), seed=seed, **FULL_SOURCE)
    model = peft.PeftModel.from_pretrained(load_base(base), adapter).merge_and_unload()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_((noise * torch.randn(p.shape, generator=g, dtype=F64)).to(p.dtype))
    model.save_pretrained(out)
    return out


# ----------------------------------------------------------------------------- dense float64 models


def merged_state(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """The adapter applied to a float64 copy of the base by peft's merge_and_unload."""
    import peft

    model = peft.PeftModel.from_pretrained(load_base(base, F64), adapter).merge_and_unload()
    return {name: x.detach().to(F64).clone() for name, x in model.state_dict().items()}


def dense_inputs(base: Path, models: list[Path]) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]], list[bool]]:
    """(base, one dense float64 state dict per model, which models are adapters)."""
    saved = {name: x.to(F64) for name, x in tensors(base).items()}
    dense, is_adapter = [], []
    for path in models:
        adapter = (Path(path) / "adapter_config.json").exists()
        sd = merged_state(base, path) if adapter else {n: x.to(F64) for n, x in tensors(path).items()}
        dense.append({name: sd[name] for name in saved})
        is_adapter.append(adapter)
    return saved, dense, is_adapter


def is_weight_matrix(name: str, x: torch.Tensor) -> bool:
    """The low-rank selection of a Llama: the attention and MLP projections
    (embeddings and the head are kept out by default)."""
    return x.dim() == 2 and name.rsplit(".", 2)[-2] in PROJECTIONS


# ----------------------------------------------------------------------------- linear algebra


def numerical_rank(s: torch.Tensor, scale: float | None = None) -> int:
    top = float(s.max()) if scale is None else scale
    return int((s > RANK_THRESHOLD * top).sum()) if top > 0 else 0


def truncation_error(a: torch.Tensor, k: int) -> float:
    """||a - a_k||_F / ||a||_F, the optimal relative rank-k error."""
    s = torch.linalg.svdvals(a)
    total = float(s.pow(2).sum())
    return math.sqrt(float(s[k:].pow(2).sum()) / total) if total > 0 else 0.0


def rank_of(d: torch.Tensor) -> int:
    return numerical_rank(torch.linalg.svdvals(d))


# ----------------------------------------------------------------------------- the methods


def per_model(value, T):
    return list(value) if isinstance(value, (tuple, list)) else [value] * T


def cart(xs, deltas, is_adapter, shape, rank=None, rank_ratio=0.12, lam=2.0, adapter_rank_ratio=0.3):
    avg = torch.stack(xs).mean(0)
    touched = [t for t, d in enumerate(deltas) if bool(d.any())]
    if rank is not None:
        k = rank
    elif all(is_adapter[t] for t in touched):
        k = max(1, int(adapter_rank_ratio * sum(rank_of(deltas[t]) for t in touched)))
    else:
        k = max(1, int(rank_ratio * min(shape)))
    return avg + lam * sum(truncated(x - avg, k) for x in xs)


def tsv_m(base, deltas, is_adapter, rank=None, lam=1.0):
    T = len(deltas)
    k = rank if rank is not None else max(1, min(base.shape) // T)
    us, ss, vs = [], [], []
    for d, adapter in zip(deltas, is_adapter):
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        kt = min(k, numerical_rank(s)) if adapter else k
        us.append(u[:, :kt])
        ss.append(s[:kt])
        vs.append(vh[:kt].T)
    return base + lam * (polar(torch.cat(us, 1)) * torch.cat(ss)) @ polar(torch.cat(vs, 1)).T


def iso_c(base, deltas, lam=1.0):
    u, s, vh = torch.linalg.svd(sum(deltas), full_matrices=False)
    r = numerical_rank(s)
    return base + lam * s[:r].mean() * (u[:, :r] @ vh[:r])


def iso_cts(base, deltas, lam=1.0, common_space_fraction=0.8):
    T = len(deltas)
    u, s, vh = torch.linalg.svd(sum(deltas), full_matrices=False)
    r = numerical_rank(s)
    per_task = min(round((r - int(r * common_space_fraction)) / T), r // T)
    common = r - per_task * T
    us, ss, vs = [u[:, :common]], [s[:common]], [vh[:common].T]
    basis = u[:, :common]
    for d in deltas:
        if not per_task:
            break
        ut, st, vht = torch.linalg.svd(d - basis @ (basis.T @ d), full_matrices=False)
        kt = min(per_task, numerical_rank(st, float(s[0])))
        us.append(ut[:, :kt])
        ss.append(st[:kt])
        vs.append(vht[:kt].T)
    return base + lam * torch.cat(ss).mean() * (polar(torch.cat(us, 1)) @ polar(torch.cat(vs, 1)).T)


def ties(base, deltas, density=0.2, lam=1.0):
    taus = torch.stack([d.reshape(-1) for d in deltas])
    keep = max(1, int(density * taus.shape[1]))
    trimmed = torch.zeros_like(taus)
    for t in range(len(deltas)):
        top = taus[t].abs().argsort(descending=True, stable=True)[:keep]
        trimmed[t, top] = taus[t, top]
    return base + lam * consensus(trimmed, True, True).reshape(base.shape)


def dare(base, deltas, name, ties_, density=1.0, lam=1.0, seed=0):
    """Yu et al. 2024: tau_t * m_t / p, m_t ~ Bernoulli(p) from the method's
    counter-based generator (its definition: the draws of entry i of task t)."""
    from ccsmerge.methods.dare import stream_key, uniform_bits

    taus = torch.stack([d.reshape(-1) for d in deltas])
    if density < 1:
        for t in range(len(deltas)):
            u = uniform_bits(stream_key(seed, name, t), 0, taus.shape[1], "cpu").double() / 2.0**53
            taus[t] = torch.where(u < density, taus[t] / density, 0.0)
    return base + lam * consensus(taus, ties_, False).reshape(base.shape)


def breadcrumbs(base, deltas, ties_, density=1.0, gamma=0.01, lam=1.0):
    """Davari & Belilovsky 2024 with mergekit's counts (reference.ref_breadcrumbs_kept)."""
    kept = ref_breadcrumbs_kept(torch.stack([d.reshape(-1) for d in deltas]), density, gamma)
    return base + lam * consensus(kept, ties_, False).reshape(base.shape)


def reference_tensor(method: str, name: str, base: torch.Tensor, xs: list[torch.Tensor], is_adapter: list[bool],
                     **options) -> torch.Tensor:
    """One tensor of the merge of the dense float64 models xs (base: the base's tensor)."""
    deltas = [x - base for x in xs]
    T = len(xs)
    if not any(bool(d.any()) for d in deltas):
        return base.clone()
    lowrank = is_weight_matrix(name, base)
    if method == "average":
        return torch.stack(xs).mean(0)
    if method == "linear":
        w = per_model(options.get("weight", 1.0), T)
        total = sum(wt * x for wt, x in zip(w, xs))
        return total / sum(w) if options.get("normalize", True) else total
    if method == "task_arithmetic":
        w = per_model(options.get("weight", 1.0), T)
        return base + options.get("lam", 0.3) * sum(wt * d for wt, d in zip(w, deltas))
    if method == "cart":
        if not lowrank:
            return torch.stack(xs).mean(0)
        return cart(xs, deltas, is_adapter, base.shape, options.get("rank"), options.get("rank_ratio", 0.12),
                    options.get("lam", 2.0), options.get("adapter_rank_ratio", 0.3))
    if method in ("tsv_m", "iso_c", "iso_cts"):
        lam = options.get("lam", 1.0)
        if not lowrank:
            return base + lam * sum(deltas) / T
        if method == "tsv_m":
            return tsv_m(base, deltas, is_adapter, options.get("rank"), lam)
        if method == "iso_c":
            return iso_c(base, deltas, lam)
        return iso_cts(base, deltas, lam, options.get("common_space_fraction", 0.8))
    if method == "ties":
        return ties(base, deltas, options.get("density", 0.2), options.get("lam", 1.0))
    if method in ("dare_linear", "dare_ties"):
        return dare(base, deltas, name, method == "dare_ties", options.get("density", 1.0), options.get("lam", 1.0),
                    options.get("seed", 0))
    if method in ("breadcrumbs", "breadcrumbs_ties"):
        return breadcrumbs(base, deltas, method == "breadcrumbs_ties", options.get("density", 1.0),
                           options.get("gamma", 0.01), options.get("lam", 1.0))
    raise ValueError(method)


def reference_merge(method: str, base: dict, dense: list[dict], is_adapter: list[bool], **options) -> dict:
    return {name: reference_tensor(method, name, b, [sd[name] for sd in dense], is_adapter, **options)
            for name, b in base.items()}


# ----------------------------------------------------------------------------- forward passes and bad inputs


def logits(model, seed: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, 11), generator=g)
    with torch.no_grad():
        return model(input_ids=ids).logits.to(F64)


def model_with(base: Path, weights: dict[str, torch.Tensor], dtype=F64):
    """The base's architecture holding `weights` (float64 references)."""
    model = load_base(base, dtype)
    model.load_state_dict({n: w.to(dtype) for n, w in weights.items()})
    return model


class _Touch:
    """A pickle that creates a file when unpickled in full (what weights_only refuses)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def save_pickle_adapter(source: Path, out: Path, marker: Path) -> Path:
    """An adapter folder whose adapter_model.bin runs code when unpickled."""
    out.mkdir(parents=True)
    (out / "adapter_config.json").write_text((source / "adapter_config.json").read_text())
    sd = load_file(source / "adapter_model.safetensors")
    payload = dict(sd)
    payload[next(iter(sd))] = _Touch(marker)
    torch.save(payload, out / "adapter_model.bin", pickle_protocol=pickle.HIGHEST_PROTOCOL)
    return out


def edit_config(folder: Path, **changes) -> None:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
