"""LoRA adapters as merge inputs, without peft: adapter folders written in
PEFT's layout (factors under base_model.model., adapter_config.json), merged
by every method and compared with float64 references computed here from the
dense fine-tunes W0 + s B A. (tests/integrations/ does the same with adapters
made by peft itself.)"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import ccsmerge
from ccsmerge.errors import MergeError
from ccsmerge.streaming import plan_checkpoints
from checkpoints import load_output, write_checkpoint
from reference import polar, ref_rank

F64 = torch.float64
HIDDEN, INNER, VOCAB = 24, 40, 32
PREFIX = "base_model.model."


def base_state(seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "model.embed_tokens.weight": (VOCAB, HIDDEN),
        "model.layers.0.attn.q_proj.weight": (HIDDEN, HIDDEN),
        "model.layers.0.attn.v_proj.weight": (HIDDEN // 2, HIDDEN),
        "model.layers.0.attn.v_proj.bias": (HIDDEN // 2,),
        "model.layers.0.mlp.up_proj.weight": (INNER, HIDDEN),
        "model.layers.0.mlp.down_proj.weight": (HIDDEN, INNER),
        "model.layers.0.conv.weight": (HIDDEN, INNER),  # stored (in, out), as GPT-2's Conv1D
        "model.norm.weight": (HIDDEN,),
        "lm_head.weight": (VOCAB, HIDDEN),
    }
    return {name: (torch.randn(*shape, generator=g) / math.sqrt(shape[-1])).to(dtype) for name, shape in shapes.items()}


# Each adapter: its config and, per module, its rank (the factors are random).
ADAPTERS = [
    dict(config=dict(r=4, lora_alpha=8), modules=["model.layers.0.attn.q_proj", "model.layers.0.attn.v_proj"]),
    dict(
        config=dict(r=3, lora_alpha=6, use_rslora=True, rank_pattern={"up_proj": 5}, alpha_pattern={"up_proj": 2.5}),
        modules=["model.layers.0.attn.q_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"],
        embeddings=["model.embed_tokens"],
    ),
    dict(
        config=dict(r=2, lora_alpha=2, modules_to_save=["lm_head"]),
        modules=["model.layers.0.attn.q_proj", "model.layers.0.mlp.down_proj"],
        full=["lm_head.weight"],
    ),
]


def _rank(spec, module):
    for key, value in spec["config"].get("rank_pattern", {}).items():
        if module.endswith(key):
            return value
    return spec["config"]["r"]


def _scale(spec, module):
    cfg = spec["config"]
    alpha = next((v for k, v in cfg.get("alpha_pattern", {}).items() if module.endswith(k)), cfg["lora_alpha"])
    r = _rank(spec, module)
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def write_adapters(root: Path, base: dict, specs=ADAPTERS, fmt="safetensors", seed=1):
    """The adapter folders, and each one's dense fine-tune in float64 (the reference's inputs)."""
    g = torch.Generator().manual_seed(seed)
    paths, dense = [], []
    for i, spec in enumerate(specs):
        tensors, theta = {}, {k: v.to(F64) for k, v in base.items()}
        for module in spec["modules"]:
            w = base[module + ".weight"]
            m, n = w.shape
            r = _rank(spec, module)
            if spec["config"].get("fan_in_fan_out"):  # the weight is stored (in, out): delta = (B A)^T
                a, b = torch.randn(r, m, generator=g) * 0.3, torch.randn(n, r, generator=g) * 0.3
                delta = (b.to(F64) @ a.to(F64)).T
            else:
                a, b = torch.randn(r, n, generator=g) * 0.3, torch.randn(m, r, generator=g) * 0.3
                delta = b.to(F64) @ a.to(F64)
            tensors[f"{PREFIX}{module}.lora_A.weight"], tensors[f"{PREFIX}{module}.lora_B.weight"] = a, b
            theta[module + ".weight"] += _scale(spec, module) * delta
        for module in spec.get("embeddings", []):
            vocab, dim = base[module + ".weight"].shape
            r = _rank(spec, module)
            a, b = torch.randn(r, vocab, generator=g) * 0.3, torch.randn(dim, r, generator=g) * 0.3
            tensors[f"{PREFIX}{module}.lora_embedding_A"], tensors[f"{PREFIX}{module}.lora_embedding_B"] = a, b
            theta[module + ".weight"] += _scale(spec, module) * (b.to(F64) @ a.to(F64)).T
        for name in spec.get("full", []):
            value = base[name] + 0.05 * torch.randn(base[name].shape, generator=g)
            tensors[PREFIX + name] = value.to(base[name].dtype)
            theta[name] = value.to(base[name].dtype).to(F64)
        folder = root / f"adapter{i}"
        folder.mkdir(parents=True)
        config = {"peft_type": "LORA", "target_modules": sorted({m.split(".")[-1] for m in spec["modules"]}),
                  **spec["config"]}
        (folder / "adapter_config.json").write_text(json.dumps(config))
        if fmt == "safetensors":
            save_file(tensors, folder / "adapter_model.safetensors")
        else:
            torch.save(tensors, folder / "adapter_model.bin")
        paths.append(folder)
        dense.append(theta)
    return paths, dense


@pytest.fixture(scope="module")
def lora_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base = base_state()
    base_path = write_checkpoint(base, root / "base")
    paths, dense = write_adapters(root, base)
    return root, base_path, paths, {k: v.to(F64) for k, v in base.items()}, dense


def _svd_nonzero(x):
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    keep = int((s > 1e-10 * s[0]).sum()) if s[0] > 0 else 0
    return u[:, :keep], s[:keep], vh[:keep]


def ref_cart(w0, xs, k, lam):
    avg = sum(xs) / len(xs)
    update = sum(
        (u[:, :k] * s[:k]) @ vh[:k] for u, s, vh in (torch.linalg.svd(x - avg, full_matrices=False) for x in xs)
    )
    return avg + lam * update


def ref_tsv_m(w0, xs, lam, k):
    parts = [_svd_nonzero(x - w0) for x in xs if not torch.equal(x, w0)]
    us = torch.cat([u[:, :k] for u, _, _ in parts], 1)
    vs = torch.cat([vh[:k] for _, _, vh in parts], 0)
    s = torch.cat([s[:k] for _, s, _ in parts])
    return w0 + lam * (polar(us) * s) @ polar(vs.mT).mT


def ref_iso_c(w0, xs, lam):
    u, s, vh = _svd_nonzero(sum(x - w0 for x in xs))
    return w0 + lam * s.mean() * u @ vh


def ref_iso_cts(w0, xs, lam, fraction):
    from ccsmerge.methods.svd_family import iso_cts_split

    u, s, vh = _svd_nonzero(sum(x - w0 for x in xs))
    common, per_task = iso_cts_split(s.numel(), len(xs), fraction)
    us, ss, vhs = [u[:, :common]], [s[:common]], [vh[:common]]
    basis = u[:, :common]
    for x in xs:
        if per_task and not torch.equal(x, w0):
            d = x - w0
            ut, st, vht = _svd_nonzero(d - basis @ (basis.mT @ d))
            us.append(ut[:, :per_task])
            ss.append(st[:per_task])
            vhs.append(vht[:per_task])
    return w0 + lam * torch.cat(ss).mean() * polar(torch.cat(us, 1)) @ polar(torch.cat(vhs, 0).mT).mT


def update_rank(name):
    return sum(_rank(spec, name.removesuffix(".weight")) for spec in ADAPTERS if name.removesuffix(".weight") in spec["modules"])


LOWRANK = {"model.layers.0.attn.q_proj.weight", "model.layers.0.attn.v_proj.weight",
           "model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight", "model.layers.0.conv.weight"}


def reference(method, options, name, w0, xs):
    T = len(xs)
    if method == "average":
        return sum(xs) / T
    if method == "linear":
        w = options["weight"]
        return sum(wi * x for wi, x in zip(w, xs)) / sum(w)
    if method == "task_arithmetic":
        return w0 + options.get("lam", 0.3) * sum(x - w0 for x in xs)
    lowrank = name in LOWRANK
    if method == "cart":
        if not lowrank:
            return sum(xs) / T
        R = update_rank(name)
        k = options.get("rank") or max(1, int(options.get("adapter_rank_ratio", 0.3) * R))
        return ref_cart(w0, xs, k, options.get("lam", 2.0))
    lam = options.get("lam", 1.0)
    if not lowrank:
        return w0 + lam * sum(x - w0 for x in xs) / T
    if all(torch.equal(x, w0) for x in xs):
        return w0
    if method == "tsv_m":
        return ref_tsv_m(w0, xs, lam, options.get("rank") or min(w0.shape) // T)
    if method == "iso_c":
        return ref_iso_c(w0, xs, lam)
    if method == "iso_cts":
        return ref_iso_cts(w0, xs, lam, options.get("common_space_fraction", 0.8))
    raise AssertionError(method)


CASES = [
    ("average", {}),
    ("linear", {"weight": (0.5, 1.0, 2.0)}),
    ("task_arithmetic", {"lam": 0.7}),
    ("cart", {}),
    ("cart", {"rank": 3, "lam": 1.5}),
    ("cart", {"adapter_rank_ratio": 0.5, "lam": 1.0}),
    ("tsv_m", {}),
    ("tsv_m", {"rank": 2}),
    ("iso_c", {}),
    ("iso_cts", {"common_space_fraction": 0.5}),
]


@pytest.mark.parametrize("method,options", CASES, ids=[f"{m}-{'-'.join(map(str, o.values()))}" for m, o in CASES])
def test_factored_merges_equal_float64_references(lora_set, tmp_path, method, options):
    root, base_path, paths, w0s, dense = lora_set
    out = ccsmerge.merge_checkpoints(paths, tmp_path / "out", method, base=base_path, **options)
    merged = load_output(out)
    for name, w0 in w0s.items():
        ref = reference(method, options, name, w0, [d[name] for d in dense])
        got = merged[name].to(F64)
        assert merged[name].dtype == torch.float32, name  # the base's dtype
        scale = max(float((ref - w0).norm()), 1e-6 * float(w0.norm()))
        assert float((got - ref).norm()) <= 2e-6 * scale + 1e-7 * float(w0.norm()), (name, method)


def test_plan_paths_and_the_update_rank(lora_set):
    _, base_path, paths, _, _ = lora_set
    plan = {t.name: t for t in plan_checkpoints(paths, "cart", base_path).tensors}
    assert plan["model.layers.0.attn.q_proj.weight"].path == "factors"
    assert plan["model.layers.0.attn.q_proj.weight"].update_rank == 4 + 3 + 2
    assert plan["model.layers.0.attn.q_proj.weight"].rank == max(1, int(0.3 * 9))
    assert plan["model.layers.0.mlp.up_proj.weight"].update_rank == 5
    assert plan["model.layers.0.conv.weight"].path == "base"  # no adapter touches it
    assert plan["model.norm.weight"].path == "base"
    assert plan["lm_head.weight"].path == "dense"  # modules_to_save: a full tensor
    assert plan["model.embed_tokens.weight"].path == "factors"  # averaged, from its factors
    # TIES needs dense task vectors; unnormalized linear does not keep the base where nothing changes.
    ties = {t.name: t for t in plan_checkpoints(paths, "ties", base_path).tensors}
    assert ties["model.layers.0.attn.q_proj.weight"].path == "dense"
    assert ties["model.norm.weight"].path == "base"
    linear = {t.name: t for t in plan_checkpoints(paths, "linear", base_path, weight=(1.0, 1.0, 1.0),
                                                     normalize=False).tensors}
    assert linear["model.norm.weight"].path == "dense"


def test_rank_reaching_the_update_rank_is_averaging_and_is_said(lora_set, tmp_path, capsys):
    _, base_path, paths, w0s, dense = lora_set
    with pytest.warns(UserWarning, match="plain average: k = 9 is not below R = 9"):
        out = ccsmerge.merge_checkpoints(paths, tmp_path / "out", "cart", base=base_path, rank=9,
                                         lowrank_exclude=("up_proj|down_proj|v_proj",))
    name = "model.layers.0.attn.q_proj.weight"
    average = sum(d[name] for d in dense) / 3
    assert torch.allclose(load_output(out)[name].to(F64), average, rtol=0, atol=1e-6)
    from ccsmerge.cli import main

    code = main(["plan", *[a for p in paths for a in ("--model", str(p))], "--base", str(base_path),
                              "--rank", "9", "--lowrank-exclude", "up_proj|down_proj|v_proj"])
    shown = capsys.readouterr().out
    assert code == 0 and "is the plain average" in shown and "from LoRA factors (exact)" in shown


def test_ties_and_a_mixed_merge_form_dense_task_vectors(lora_set, tmp_path):
    root, base_path, paths, w0s, dense = lora_set
    from reference import ref_ties

    out = ccsmerge.merge_checkpoints(paths, tmp_path / "ties", "ties", base=base_path, density=0.5)
    merged = load_output(out)
    for name, w0 in w0s.items():
        ref = ref_ties([d[name] for d in dense], w0, 0.5, 1.0)
        assert torch.allclose(merged[name].to(F64), ref, rtol=0, atol=2e-6), name
    # A full fine-tune beside two adapters: every tensor dense, CART with k from min(m, n).
    full = write_checkpoint({k: v.to(torch.float32) for k, v in dense[0].items()}, root / "full0")
    out = ccsmerge.merge_checkpoints([full, *paths[1:]], tmp_path / "mixed", "cart", base=base_path, svd="exact")
    merged = load_output(out)
    for name, w0 in w0s.items():
        xs = [dense[0][name].to(torch.float32).to(F64), dense[1][name], dense[2][name]]
        ref = ref_cart(w0, xs, ref_rank(w0.shape, 0.12), 2.0) if name in LOWRANK else sum(xs) / 3
        assert float((merged[name].to(F64) - ref).norm()) <= 1e-5 * float(ref.norm()), name


def test_row_blocks_and_bin_adapters_give_the_same_bytes(lora_set, tmp_path):
    root, base_path, paths, _, _ = lora_set
    whole = load_output(ccsmerge.merge_checkpoints(paths, tmp_path / "whole", "cart", base=base_path))
    plan = plan_checkpoints(paths, "cart", base_path, max_memory="28KB")
    assert any(t.path == "factors" and t.block_rows is not None for t in plan.tensors)
    blocked = load_output(ccsmerge.merge_checkpoints(paths, tmp_path / "blocked", "cart", base=base_path,
                                                     max_memory="28KB"))
    bins, _ = write_adapters(tmp_path / "bins", base_state(), fmt="bin")
    from_bin = load_output(ccsmerge.merge_checkpoints(bins, tmp_path / "bin", "cart", base=base_path))
    for name in whole:
        assert torch.equal(whole[name], blocked[name]), name
        assert torch.equal(whole[name], from_bin[name]), name


def test_bfloat16_base_merges_in_float32_and_writes_bfloat16(tmp_path):
    base = base_state(dtype=torch.bfloat16)
    base_path = write_checkpoint(base, tmp_path / "base")
    paths, dense = write_adapters(tmp_path, base)
    merged = load_output(ccsmerge.merge_checkpoints(paths, tmp_path / "out", "task_arithmetic", base=base_path, lam=1.0))
    name = "model.layers.0.attn.q_proj.weight"
    ref = base[name].to(F64) + sum(d[name] - base[name].to(F64) for d in dense)
    assert merged[name].dtype == torch.bfloat16
    assert torch.equal(merged[name], ref.to(torch.float32).to(torch.bfloat16)) or torch.allclose(
        merged[name].to(F64), ref, rtol=2**-8, atol=0)


def test_adapters_need_the_base_they_adapt(lora_set, tmp_path):
    _, base_path, paths, _, _ = lora_set
    with pytest.raises(MergeError, match=r"adapter0: a LoRA adapter .* \(--base\)"):
        ccsmerge.merge_checkpoints(paths, tmp_path / "out", "cart")
    other = write_checkpoint({k: v for k, v in base_state().items() if "q_proj" not in k}, tmp_path / "other")
    with pytest.raises(MergeError, match=r"q_proj.lora_A.weight' adapts 'model.layers.0.attn.q_proj.weight'"):
        ccsmerge.merge_checkpoints(paths, tmp_path / "out", "cart", base=other)
    for option, value in (("layer_range", (0, 1)), ("tokenizer_source", "base")):
        with pytest.raises(MergeError, match=f"{option}: not supported .* LoRA adapters"):
            ccsmerge.merge_checkpoints(paths, tmp_path / "out", "cart", base=base_path, **{option: value})
    assert not (tmp_path / "out").exists()


def test_a_zero_update_adapter_merges_as_the_base(tmp_path):
    base = base_state()
    base_path = write_checkpoint(base, tmp_path / "base")
    paths, dense = write_adapters(tmp_path, base, specs=[ADAPTERS[0]] * 3)
    zero = tmp_path / "adapter0" / "adapter_model.safetensors"  # peft's initialisation: B = 0
    from safetensors.torch import load_file

    tensors = {k: (torch.zeros_like(v) if "lora_B" in k else v) for k, v in load_file(zero).items()}
    save_file(tensors, zero)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = load_output(ccsmerge.merge_checkpoints(paths, tmp_path / "out", "tsv_m", base=base_path))
    name = "model.layers.0.attn.q_proj.weight"
    ref = ref_tsv_m(base[name].to(F64), [base[name].to(F64), dense[1][name], dense[2][name]], 1.0, HIDDEN // 3)
    assert float((merged[name].to(F64) - ref).norm()) <= 1e-5 * float((ref - base[name].to(F64)).norm())


def apply_adapter(folder: Path, base: dict) -> dict:
    """The model a LoRA output makes of the base, in float64, read the way PEFT reads it."""
    from safetensors.torch import load_file

    from ccsmerge.lora_files import module_scaling

    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(folder / "adapter_model.safetensors")
    model = {k: v.to(F64).clone() for k, v in base.items()}
    for key, value in tensors.items():
        inner = key.removeprefix(PREFIX)
        if inner.endswith(".lora_A.weight"):
            module = inner.removesuffix(".lora_A.weight")
            b = tensors[f"{PREFIX}{module}.lora_B.weight"].to(F64)
            model[module + ".weight"] += module_scaling(config, module) * b @ value.to(F64)
        elif inner.endswith(".lora_embedding_A"):
            module = inner.removesuffix(".lora_embedding_A")
            b = tensors[f"{PREFIX}{module}.lora_embedding_B"].to(F64)
            model[module + ".weight"] += module_scaling(config, module) * (b @ value.to(F64)).T
        elif "lora_" not in inner:
            model[inner] = value.to(F64)
    return model


@pytest.mark.parametrize("method,options", [("cart", {}), ("tsv_m", {}), ("task_arithmetic", {"lam": 1.0})])
def test_lora_output_is_the_merged_update_exactly(lora_set, tmp_path, method, options):
    _, base_path, paths, w0s, _ = lora_set
    dense = load_output(ccsmerge.merge_checkpoints(paths, tmp_path / "dense", method, base=base_path, **options))
    out = ccsmerge.merge_checkpoints(paths, tmp_path / "lora", method, base=base_path, output_format="lora", **options)
    applied = apply_adapter(out, w0s)
    report = json.loads((out / "ccsmerge-lora.json").read_text())
    assert report["worst_relative_error"] == 0.0
    assert set(report["modules_to_save"]) == {"lm_head"}  # a full tensor in an input: saved whole
    assert "model.layers.0.conv" not in report["modules"]  # no input changes it: left out
    for name, value in dense.items():
        assert torch.allclose(applied[name], value.to(F64), rtol=0, atol=2e-6), name


def test_truncated_lora_output_reports_its_error(lora_set, tmp_path):
    _, base_path, paths, w0s, _ = lora_set
    dense = load_output(ccsmerge.merge_checkpoints(paths, tmp_path / "dense", "cart", base=base_path, rank=3))
    out = ccsmerge.merge_checkpoints(paths, tmp_path / "lora", "cart", base=base_path, rank=3,
                                     output_format="lora", lora_rank=2)
    applied = apply_adapter(out, w0s)
    report = json.loads((out / "ccsmerge-lora.json").read_text())
    for entry in report["modules"].values():
        name = entry["tensor"]
        update = dense[name].to(F64) - w0s[name]
        error = float((applied[name] - dense[name].to(F64)).norm() / update.norm())
        # The reported error is the optimal rank-2 error of the exact update (its SVD from the factors).
        optimal = float(torch.linalg.svd(update).S[2:].square().sum().sqrt() / update.norm())
        assert entry["rank"] <= 2
        assert abs(entry["relative_error"] - optimal) <= 1e-5 and abs(error - optimal) <= 1e-5, name


def test_lora_output_refusals(lora_set, tmp_path):
    _, base_path, paths, _, _ = lora_set
    with pytest.raises(MergeError, match="give lora_rank"):
        ccsmerge.merge_checkpoints(paths, tmp_path / "out", "ties", base=base_path, output_format="lora")
    with pytest.raises(MergeError, match="lora_rank: applies to output_format='lora' only"):
        ccsmerge.merge_checkpoints(paths, tmp_path / "out", "cart", base=base_path, lora_rank=4)
    with pytest.raises(MergeError, match="output_format: 'gguf' is not one of"):
        ccsmerge.merge_checkpoints(paths, tmp_path / "out", "cart", base=base_path, output_format="gguf")
    for option, value in (("resume", True), ("overlap", False), ("out_shard_size", "1GB")):
        with pytest.raises(MergeError, match=f"{option}: not supported with output_format='lora'"):
            ccsmerge.merge_checkpoints(paths, tmp_path / "out", "cart", base=base_path, output_format="lora",
                                       **{option: value})
    assert not (tmp_path / "out").exists()


def test_fan_in_fan_out_adapters_update_the_transposed_weight(tmp_path):
    base = base_state()
    base_path = write_checkpoint(base, tmp_path / "base")
    specs = [dict(config=dict(r=r, lora_alpha=2 * r, fan_in_fan_out=True), modules=["model.layers.0.conv"])
             for r in (2, 3, 4)]
    paths, dense = write_adapters(tmp_path, base, specs=specs)
    name = "model.layers.0.conv.weight"
    plan = {t.name: t for t in plan_checkpoints(paths, "cart", base_path, rank=4).tensors}
    assert plan[name].path == "factors" and plan[name].update_rank == 9
    merged = load_output(ccsmerge.merge_checkpoints(paths, tmp_path / "out", "cart", base=base_path, rank=4))
    ref = ref_cart(base[name].to(F64), [d[name] for d in dense], 4, 2.0)
    assert float((merged[name].to(F64) - ref).norm()) <= 2e-6 * float((ref - base[name].to(F64)).norm())
    # The output's config has no fan_in_fan_out: such a module would be saved whole in a LoRA
    # output, which then has no LoRA module, and PEFT refuses an adapter without one.
    with pytest.raises(MergeError, match="at least one LoRA module"):
        ccsmerge.merge_checkpoints(paths, tmp_path / "lora", "average", base=base_path, output_format="lora")
    assert not (tmp_path / "lora").exists()


@pytest.mark.parametrize("changed", [False, True])
def test_a_saved_base_layer_counts_only_where_it_differs(tmp_path, changed):
    """PEFT saves an adapted embedding's base layer whole: equal to the base's, the
    module merges from its factors; different, it replaces the base's tensor."""
    from safetensors.torch import load_file

    base = base_state()
    base_path = write_checkpoint(base, tmp_path / "base")
    paths, dense = write_adapters(tmp_path, base)
    name = "model.embed_tokens.weight"
    file = paths[1] / "adapter_model.safetensors"
    tensors = load_file(file)
    layer = base[name] + (0.01 if changed else 0.0)
    tensors[f"{PREFIX}model.embed_tokens.base_layer.weight"] = layer
    save_file(tensors, file)
    plan = {t.name: t for t in plan_checkpoints(paths, "average", base_path).tensors}
    assert plan[name].path == ("dense" if changed else "factors")
    merged = load_output(ccsmerge.merge_checkpoints(paths, tmp_path / "out", "average", base=base_path))
    theta1 = dense[1][name] + (layer.to(F64) - base[name].to(F64))
    ref = (dense[0][name] + theta1 + dense[2][name]) / 3
    assert torch.allclose(merged[name].to(F64), ref, rtol=0, atol=2e-6)


def test_truncated_dense_lora_output_follows_the_seed(lora_set, tmp_path):
    """Dense updates (a full fine-tune among the inputs) are truncated by the randomized engine with the merge's seed."""
    from safetensors.torch import load_file

    root, base_path, paths, _, dense = lora_set
    full = write_checkpoint({k: v.to(torch.float32) for k, v in dense[0].items()}, tmp_path / "full")
    outs = {}
    for label, seed in (("a", 0), ("b", 0), ("c", 5)):
        out = ccsmerge.merge_checkpoints([full, *paths[1:]], tmp_path / label, "cart", base=base_path, svd="exact",
                                         seed=seed, output_format="lora", lora_rank=2)
        outs[label] = load_file(out / "adapter_model.safetensors")
    key = f"{PREFIX}model.layers.0.attn.q_proj.lora_A.weight"
    assert torch.equal(outs["a"][key], outs["b"][key])
    assert not torch.equal(outs["a"][key], outs["c"][key])
