"""Stacks of weight matrices (mixture-of-experts experts stored as one
(E, m, n) tensor): CART, TSV-M, Iso-C and Iso-CTS per slice against float64
references per slice (torch.linalg.svd), the randomized engine per slice,
row blocks of whole slices byte-identical to whole merges, bias stacks
averaged, the selection patterns, the planner's refusal of a slice over the
budget, and the rule the plan shows."""

from __future__ import annotations

import re

import pytest
import torch
from checkpoints import load_output, run_main, write_set

import ccsmerge
import reference as R
from ccsmerge.methods import decide
from ccsmerge.methods.params import DEFAULT_LOWRANK_EXCLUDE, DEFAULT_LOWRANK_STACKED
from ccsmerge.merge import make_config
from ccsmerge.planning import DEVICE_RESERVE, plan_tensor
from ccsmerge.sizes import parse_size

E = 4
GATE_UP = "model.layers.0.mlp.experts.gate_up_proj"  # GPT-OSS layout: (E, hidden, 2 * intermediate)
DOWN = "model.layers.0.mlp.experts.down_proj"
GATE_UP_BIAS = "model.layers.0.mlp.experts.gate_up_proj_bias"  # (E, 2 * intermediate): a bias per expert
DOWN_BIAS = "model.layers.0.mlp.experts.down_proj_bias"
Q = "model.layers.0.self_attn.q_proj.weight"
CLS = "vit.embeddings.cls_token"  # 3-D, not a stack of matrices
LAYOUT = {
    GATE_UP: (E, 12, 20),
    DOWN: (E, 18, 14),
    GATE_UP_BIAS: (E, 20),
    DOWN_BIAS: (E, 14),
    Q: (16, 12),
    CLS: (1, 1, 12),
    "model.norm.weight": (12,),
}
STACKS = (GATE_UP, DOWN)


def expert_models(T: int = 3, dtype=torch.float64, seed: int = 0):
    """(base, T fine-tunes): every matrix and every expert slice a task_set
    (decaying task spectra, so that the randomized engine is close to exact)."""
    base, models = {}, [{} for _ in range(T)]
    for i, (name, shape) in enumerate(LAYOUT.items()):
        if len(shape) >= 2 and name not in (GATE_UP_BIAS, DOWN_BIAS, CLS):
            *lead, m, n = shape
            parts = [R.task_set(T, m, n, seed=seed * 1000 + 50 * i + e) for e in range(max(1, *lead) if lead else 1)]
            b = torch.stack([p[0] for p in parts]).reshape(shape)
            thetas = [torch.stack([p[1][t] for p in parts]).reshape(shape) for t in range(T)]
        else:
            g = R.generator(seed * 1000 + 50 * i)
            b = torch.randn(shape, generator=g, dtype=torch.float64)
            thetas = [b + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(T)]
        base[name] = b.to(dtype)
        for t in range(T):
            models[t][name] = thetas[t].to(dtype)
    return base, models


def per_slice(reference, name, models, base=None):
    """The float64 reference applied to every slice of a stack, stacked."""
    xs = [sd[name] for sd in models]
    slices = []
    for e in range(xs[0].shape[0]):
        one = [x[e] for x in xs]
        slices.append(reference(one, base[name][e] if base is not None else None))
    return torch.stack(slices)


def close(got, expected, tol):
    scale = expected.abs().max()
    assert float((got.double() - expected).abs().max()) <= tol * float(scale), (got, expected)


# ----------------------------------------------------------------------------- per-slice results


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("rank_ratio,lam", [(0.12, 2.0), (0.5, 1.0)])
def test_cart_per_slice_equals_the_float64_reference(dtype, tol, rank_ratio, lam):
    _, models = expert_models(dtype=dtype)
    merged = ccsmerge.merge(models, "cart", svd="exact", rank_ratio=rank_ratio, lam=lam, device="cpu")
    for name in STACKS:
        k = R.ref_rank(LAYOUT[name][-2:], rank_ratio)
        expected = per_slice(lambda xs, _: R.ref_cart_tensor(xs, k, lam), name, models)
        assert merged[name].dtype == dtype and merged[name].shape == LAYOUT[name]
        close(merged[name], expected, tol)
        average = R.ref_mean([sd[name] for sd in models])
        assert float((merged[name].double() - average).abs().max()) > 1e-3  # the step was taken
    k = R.ref_rank(LAYOUT[Q], rank_ratio)
    close(merged[Q], R.ref_cart_tensor([sd[Q] for sd in models], k, lam), tol)


@pytest.mark.parametrize("method", ["tsv_m", "iso_c", "iso_cts"])
def test_svd_family_per_slice_equals_the_float64_reference(method):
    base, models = expert_models(T=4)
    lam = 0.8
    references = {
        "tsv_m": lambda xs, b: R.ref_tsv_m(xs, b, lam),
        "iso_c": lambda xs, b: R.ref_iso_c(xs, b, lam),
        "iso_cts": lambda xs, b: R.ref_iso_cts(xs, b, lam, 0.8),
    }
    merged = ccsmerge.merge(models, method, base=base, lam=lam, **R.exact_svd(method), device="cpu")
    for name in STACKS:
        close(merged[name], per_slice(references[method], name, models, base), 1e-10)
    for name in (GATE_UP_BIAS, DOWN_BIAS, CLS):
        close(merged[name], R.ref_mean_task_vector([sd[name] for sd in models], base[name], lam), 1e-12)


def test_randomized_cart_per_slice_is_close_and_is_each_slice_merged_as_a_matrix():
    _, models = expert_models(dtype=torch.float32)
    merged = ccsmerge.merge(models, "cart", seed=5, device="cpu")
    again = ccsmerge.merge(models, "cart", seed=5, device="cpu")
    for name in STACKS:
        assert torch.equal(merged[name], again[name])  # deterministic
        k = R.ref_rank(LAYOUT[name][-2:], 0.12)
        close(merged[name], per_slice(lambda xs, _: R.ref_cart_tensor(xs, k, 2.0), name, models), 2e-3)
        # Slice e is the 2-D merge of that slice under the name NAME[e]: its own seed.
        for e in range(E):
            one = ccsmerge.merge([{f"{name}[{e}]": sd[name][e]} for sd in models], "cart", seed=5, device="cpu")
            assert torch.equal(merged[name][e], one[f"{name}[{e}]"]), (name, e)
    other = ccsmerge.merge(models, "cart", seed=6, device="cpu")
    assert not torch.equal(merged[GATE_UP], other[GATE_UP])


def test_bias_stacks_and_other_3d_tensors_are_averaged():
    _, models = expert_models()
    merged = ccsmerge.merge(models, "cart", svd="exact", device="cpu")
    for name in (GATE_UP_BIAS, DOWN_BIAS, CLS, "model.norm.weight"):
        close(merged[name], R.ref_mean([sd[name] for sd in models]), 1e-14)
    cfg = make_config(method="cart")
    assert decide(GATE_UP_BIAS, LAYOUT[GATE_UP_BIAS], torch.float32, cfg, 3).rule == "bias stack"
    # Whatever the excludes: without the defaults too; only an include changes it.
    no_defaults = make_config(method="cart", default_excludes=False)
    assert decide(DOWN_BIAS, LAYOUT[DOWN_BIAS], torch.float32, no_defaults, 3).treatment == "average"
    included = make_config(method="cart", lowrank_include=("down_proj_bias",))
    assert decide(DOWN_BIAS, LAYOUT[DOWN_BIAS], torch.float32, included, 3).treatment == "low-rank"


# ----------------------------------------------------------------------------- selection


def _decision(name, shape, **options):
    job = decide(name, shape, torch.float32, make_config(method="cart", **options), 3)
    return job.treatment, job.rank, job.rule


def test_the_selection_patterns_of_stacks():
    assert DEFAULT_LOWRANK_STACKED == (r"experts\.",)
    assert _decision(GATE_UP, (32, 2880, 5760)) == (
        "stacked-low-rank", 345, "stacked 'experts\\\\.': 32 slices of 2880 x 5760"
    )
    llama4 = "model.layers.3.feed_forward.experts.down_proj"
    assert _decision(llama4, (16, 8192, 5120))[0] == "stacked-low-rank"
    assert _decision("model.layers.0.mlp.shared_experts.up_proj", (2, 64, 32))[0] == "stacked-low-rank"
    assert _decision("blocks.0.w", (4, 8, 6)) == ("average", None, "3-D")
    assert _decision("blocks.0.w", (4, 8, 6), lowrank_stacked=(r"blocks\.\d+\.w$",))[0] == "stacked-low-rank"
    assert _decision("blocks.0.w", (4, 8, 6), lowrank_include=("blocks",)) == (
        "stacked-low-rank", 1, "include 'blocks': 4 slices of 8 x 6"
    )
    assert _decision(GATE_UP, (4, 8, 6), lowrank_stacked=()) == ("average", None, "3-D")
    assert _decision(GATE_UP, (4, 8, 6), lowrank_exclude=("gate_up",)) == ("average", None, "exclude 'gate_up'")
    # Leading dimensions beyond one: every trailing matrix is a slice.
    assert _decision(GATE_UP, (2, 3, 8, 6))[2] == "stacked 'experts\\\\.': 6 slices of 8 x 6"
    assert _decision(GATE_UP, (4, 0, 6)) == ("average", None, "empty")
    assert decide(GATE_UP, (4, 8, 6), torch.int32, make_config(method="cart"), 3).treatment == "copied"
    with pytest.raises(ccsmerge.MergeError, match="lowrank_stacked"):
        make_config(method="cart", lowrank_stacked=("(",))


@pytest.mark.parametrize(
    "name,shape,pattern",
    [
        ("shared.weight", (64, 32), r"(^|\.)shared\.weight$"),  # T5
        ("model.shared.weight", (64, 32), r"(^|\.)shared\.weight$"),  # BART
        ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", (32, 4), r"relative_\w*bias"),
        ("swin.encoder.layers.0.blocks.0.attention.self.relative_position_bias_table", (49, 4), r"relative_\w*bias"),
        ("vision_encoder.layers.0.attn.rel_pos_h", (27, 16), r"(^|[._])rel_pos"),
        ("encoder.layers.0.self_attn.pos_bias_u", (4, 8), r"(^|[._])pos_bias_[uv]$"),
        ("gpt_neox.layers.0.attention.rotary_emb.cos_cached", (2048, 32), r"(^|[._])(cos|sin)_cached$"),
        ("transformer.h.0.attn.rotary_emb.sin_cached", (2048, 32), r"(^|[._])(cos|sin)_cached$"),
        ("bert.embeddings.token_type_embeddings.weight", (2, 32), "embed"),
        ("bert.embeddings.position_embeddings.weight", (64, 32), "embed"),
        ("model.decoder.embed_positions.weight", (66, 32), "embed"),
        ("cls.predictions.decoder.weight", (64, 32), r"(^|\.)predictions\.decoder\."),
    ],
)
def test_default_excludes_keep_tables_out(name, shape, pattern):
    assert pattern in DEFAULT_LOWRANK_EXCLUDE
    assert _decision(name, shape) == ("average", None, f"default exclude {pattern!r}")
    assert _decision(name, shape, default_excludes=False)[0] == "low-rank"


@pytest.mark.parametrize(
    "name",
    [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.qkv_proj.weight",
        "model.layers.0.mlp.gate_up_proj.weight",
        "transformer.h.0.attn.c_attn.weight",
        "encoder.block.0.layer.0.SelfAttention.q.weight",
        "encoder.block.0.layer.1.EncDecAttention.o.weight",
        "decoder.block.0.layer.2.DenseReluDense.wo.weight",
        "bert.encoder.layer.0.attention.self.query.weight",
        "cls.predictions.transform.dense.weight",
        "bert.pooler.dense.weight",
        "model.layers.0.mlp.shared_expert.gate_proj.weight",
        "model.layers.0.mlp.shared_expert_gate.weight",
        "model.layers.0.mlp.router.weight",
        "model.layers.0.block_sparse_moe.experts.3.w1.weight",
        "model.decoder.layers.0.encoder_attn.k_proj.weight",
        "encoder.layers.0.self_attn.linear_pos.weight",
        "model.layers.0.self_attn.bias_proj.weight",
        "model.layers.0.self_attn.o_proj.weight",
    ],
)
def test_linear_maps_are_not_excluded(name):
    assert _decision(name, (32, 24)) == ("low-rank", 2, "2-D weight")


# ----------------------------------------------------------------------------- streaming, row blocks, the plan


@pytest.fixture(scope="module")
def expert_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("experts")
    base, models = expert_models(dtype=torch.float32)
    base_path, paths = write_set(root, base, models)
    return base, models, base_path, paths


def _blocked(plan, name) -> int:
    t = next(t for t in plan.tensors if t.name == name)
    return t.block_rows


@pytest.mark.parametrize(
    "method,options",
    [
        ("cart", {}),
        ("cart", {"svd": "exact"}),
        ("tsv_m", {}),
        ("iso_c", {}),
        ("iso_cts", {"common_space_fraction": 0.5}),
    ],
)
def test_row_blocks_of_whole_slices_equal_the_whole_merge(tmp_path, expert_set, method, options):
    base, models, base_path, paths = expert_set
    kwargs = dict(base=base_path, device="cpu", **options)
    expected = ccsmerge.merge(models, method, base=base, device="cpu", **options)
    whole = load_output(ccsmerge.merge_checkpoints(paths, tmp_path / "whole", method, **kwargs))
    # A budget that fits one expert slice, not the whole stack: blocks of whole slices.
    budget = _budget_for_blocks(paths, method, kwargs)
    plan = ccsmerge.plan_checkpoints(paths, method, max_memory=budget, **kwargs)
    for name in STACKS:
        assert 1 <= _blocked(plan, name) < E
        stack = next(t for t in plan.tensors if t.name == name)
        assert stack.passes == 1 and stack.policy.startswith("stacked-")
    blocked = load_output(ccsmerge.merge_checkpoints(paths, tmp_path / "blocks", method, max_memory=budget, **kwargs))
    for name, tensor in expected.items():
        assert torch.equal(whole[name], tensor), name
        assert torch.equal(blocked[name], tensor), name


def _budget_for_blocks(paths, method, kwargs) -> int:
    """A budget at which the planner merges both stacks in row blocks of whole
    slices while every other tensor fits whole. DOWN's slices (18 x 14 float32,
    1008 bytes) do not start on aligned addresses inside a block."""
    whole = ccsmerge.plan_checkpoints(paths, method, max_memory="1GB", **kwargs)
    need = min(t.memory for t in whole.tensors if t.name in STACKS)
    others = max(t.memory for t in whole.tensors if t.name not in STACKS)
    assert others < need - 1
    budget = need - 1
    plan = ccsmerge.plan_checkpoints(paths, method, max_memory=budget, **kwargs)
    assert all(_blocked(plan, name) is not None for name in STACKS)
    return budget


@pytest.mark.parametrize("method", ["cart", "tsv_m", "iso_c"])
@pytest.mark.parametrize("on_gpu", [False, True])
def test_a_slice_over_the_budget_is_refused_with_the_memory_it_needs(method, on_gpu):
    """Planned from the header alone (no GPU needed): over the whole stack's
    need, row blocks of whole slices; below one slice's, a refusal naming the
    need; at that need, one slice per block."""
    shape, T = (8, 256, 512), 3
    cfg = make_config(method=method)

    def plan(budget):
        host, gpu = (1 << 40, budget) if on_gpu else (budget, None)
        return plan_tensor(GATE_UP, shape, torch.float32, cfg, T, True, host, None, gpu_budget=gpu)

    whole = plan(1 << 40)
    assert whole.block_rows is None and whole.passes == 1
    reserve = DEVICE_RESERVE if on_gpu else 0  # kept for the GPU libraries' workspaces
    need_whole = whole.device_memory if on_gpu else whole.memory
    halfway = plan(reserve + need_whole // 2)
    assert halfway.block_rows is not None and 1 <= halfway.block_rows < shape[0]
    with pytest.raises(ccsmerge.MergeError) as refused:
        plan(reserve + need_whole // shape[0] // 2)
    message = str(refused.value)
    what = "of GPU memory" if on_gpu else ""
    found = re.search(
        rf"tensor '{re.escape(GATE_UP)}' \(8, 256, 512\): merging it (on the GPU )?needs at least (\S+ \S+) ?{what}.*"
        r"one 256 x 512 slice of every input and of the result, and the workspace of one slice\), "
        r"more than the (GPU )?memory budget of",
        message,
    )
    assert found, message
    at = plan(int(parse_size(found.group(2).replace(" ", ""))) + 100_000)  # the message rounds to 0.1 MB
    assert at.block_rows is not None and at.block_rows >= 1


def test_exact_svd_of_a_stack_merges_in_row_blocks_and_tsv_m_is_not_refused(expert_set):
    _, _, base_path, paths = expert_set
    budget = _budget_for_blocks(paths, "cart", {"svd": "exact"})
    plan = ccsmerge.plan_checkpoints(paths, "cart", max_memory=budget, svd="exact")
    assert _blocked(plan, GATE_UP) is not None
    budget = _budget_for_blocks(paths, "tsv_m", {"base": base_path})
    assert _blocked(ccsmerge.plan_checkpoints(paths, "tsv_m", base=base_path, max_memory=budget), GATE_UP)


def test_the_plan_shows_the_stacked_rule(expert_set, capsys):
    _, _, base_path, paths = expert_set
    code, out, err = run_main(["plan", *[a for p in paths for a in ("--model", p)]], capsys)
    assert code == 0, err
    rows = {line.split()[0]: line for line in out.splitlines() if line.split()}
    assert "stacked-low-rank k=1" in rows[GATE_UP]
    assert "stacked 'experts\\\\.': 4 slices of 12 x 20" in rows[GATE_UP]
    assert "stacked 'experts\\\\.': 4 slices of 18 x 14" in rows[DOWN]
    assert "bias stack" in rows[GATE_UP_BIAS] and "average" in rows[GATE_UP_BIAS]
    code, out, err = run_main(
        ["plan", *[a for p in paths for a in ("--model", p)], "--lowrank-stacked", "nothing"], capsys
    )
    assert code == 0, err
    rows = {line.split()[0]: line for line in out.splitlines() if line.split()}
    assert "3-D" in rows[GATE_UP] and "average" in rows[GATE_UP]


def test_the_recipe_records_the_stacked_patterns(tmp_path, expert_set):
    _, models, _, paths = expert_set
    out = ccsmerge.merge_checkpoints(paths, tmp_path / "out", "cart", device="cpu", lowrank_stacked=["down_proj$"])
    recipe = (out / "ccsmerge.yml").read_text()
    assert "lowrank_stacked" in recipe and "down_proj$" in recipe
    got = load_output(out)
    close(got[GATE_UP], R.ref_mean([sd[GATE_UP] for sd in models]), 1e-6)  # not named: averaged
    expected = ccsmerge.merge(models, "cart", device="cpu", lowrank_stacked=("down_proj$",))
    assert torch.equal(got[DOWN], expected[DOWN])


def test_device_merges_of_stacks(device, tmp_path, expert_set):
    """On every device (CUDA where present) the in-memory merge matches the
    CPU's, and row blocks of whole slices give the whole merge's bytes."""
    base, models, base_path, paths = expert_set
    on_cpu = ccsmerge.merge(models, "cart", svd="exact", device="cpu")
    here = ccsmerge.merge(models, "cart", svd="exact", device=device)
    for name in STACKS:
        close(here[name], on_cpu[name].double(), 1e-5)
    kwargs = dict(device=device, max_gpu_memory="1GB") if device != "cpu" else dict(device=device)
    whole = load_output(ccsmerge.merge_checkpoints(paths, tmp_path / "whole", "cart", **kwargs))
    budget = _budget_for_blocks(paths, "cart", kwargs)
    blocked = load_output(ccsmerge.merge_checkpoints(paths, tmp_path / "blocks", "cart", max_memory=budget, **kwargs))
    for name in whole:
        assert torch.equal(whole[name], blocked[name]), name


# ----------------------------------------------------------------------------- search and CART-indexing


def test_search_takes_the_stacks_per_slice():
    _, models = expert_models(dtype=torch.float64)
    seen = []

    def evaluate(sd):
        seen.append(sd)
        return 0.0

    ccsmerge.search(models, evaluate, "cart", lam=[1.5], rank_ratio=[0.25], svd="exact", device="cpu")
    merged = ccsmerge.merge(models, "cart", lam=1.5, rank_ratio=0.25, svd="exact", device="cpu")
    for name in STACKS:
        close(seen[0][name], merged[name].double(), 1e-10)


def test_cart_index_exports_each_task_per_slice(tmp_path, expert_set):
    from ccsmerge.task_index import build_index, export_task

    _, models, _, paths = expert_set
    index = build_index(paths, tmp_path / "index", svd="exact", device="cpu")
    task = load_output(export_task(index, 1, tmp_path / "task1", device="cpu"))
    for name in STACKS:
        k = R.ref_rank(LAYOUT[name][-2:], 0.12)
        average = R.ref_mean([sd[name] for sd in models])
        expected = torch.stack(
            [average[e] + R.ref_truncated(models[1][name][e].double() - average[e], k) for e in range(E)]
        )
        close(task[name], expected, 2e-5)
