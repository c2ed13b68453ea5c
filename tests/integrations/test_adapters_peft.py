"""PEFT LoRA adapters as merge inputs, end to end with adapters made by peft
(lora_reference.py): every method's merge of the adapters (and of adapters
mixed with a full fine-tune) equals the float64 reference on peft's
merge_and_unload models; the plan's path per tensor; the LoRA output loaded
by PeftModel.from_pretrained gives the dense output's logits (untruncated),
or the optimal truncation's within its reported error (truncated); bad
adapters are refused with one line naming the file."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import lora_reference as L  # noqa: E402

import ccsmerge  # noqa: E402
from ccsmerge.cli import main  # noqa: E402
from ccsmerge.errors import MergeError  # noqa: E402

F64 = torch.float64

CASES = [
    ("average", {}),
    ("linear", {"weight": (0.5, 1.0, 2.0)}),
    ("task_arithmetic", {"lam": 0.7, "weight": (1.0, 0.5, 2.0)}),
    ("cart", {}),  # the default svd (randomized): the factor path is exact all the same
    ("cart", {"rank": 3}),
    ("cart", {"rank_ratio": 0.5, "lam": 1.0}),
    ("cart", {"adapter_rank_ratio": 0.5}),
    ("tsv_m", {}),
    ("tsv_m", {"rank": 3}),
    ("iso_c", {}),
    ("iso_cts", {}),
    ("iso_cts", {"common_space_fraction": 0.5, "lam": 1.5}),
    ("ties", {}),
    ("ties", {"density": 0.5, "lam": 0.8}),
    ("dare_linear", {"density": 0.5, "seed": 3}),
    ("dare_ties", {"density": 0.4, "seed": 1, "lam": 0.9}),
    ("breadcrumbs", {"density": 0.8, "gamma": 0.05}),
    ("breadcrumbs_ties", {"density": 0.7, "gamma": 0.02}),
]
IDS = [f"{m}-{'-'.join(f'{k}={v}' for k, v in o.items()) or 'defaults'}" for m, o in CASES]
FACTOR_METHODS = ("average", "linear", "task_arithmetic", "cart", "tsv_m", "iso_c", "iso_cts")
RELATIVE = 1e-5  # float32 rounding of the merge, relative to the tensor's largest entry


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return L.make_family(tmp_path_factory.mktemp("lora"))


@pytest.fixture(scope="module")
def dense(family):
    return L.dense_inputs(family["base"], family["adapters"])


@pytest.fixture(scope="module")
def full(family):
    return L.save_full_fine_tune(family["base"], family["root"] / "full")


def merge(models, out, method, base, **options):
    return ccsmerge.merge_checkpoints(models, out, method, base=base, device="cpu", **options)


def assert_close(got: dict, ref: dict, dtype, relative=RELATIVE, label=""):
    assert got.keys() == ref.keys(), (label, got.keys() ^ ref.keys())
    worst = {}
    for name, r in ref.items():
        assert got[name].dtype == dtype, (label, name, got[name].dtype)
        scale = max(float(r.abs().max()), 1e-30)
        worst[name] = float((got[name].to(F64) - r).abs().max()) / scale
    bad = {n: e for n, e in worst.items() if e > relative}
    assert not bad, (label, bad)
    return max(worst.values())


def extended(options: dict, T: int) -> dict:
    """Per-model options padded with 1.0 for the models added to the case."""
    return {k: (tuple(v) + (1.0,) * (T - len(v)) if isinstance(v, tuple) else v) for k, v in options.items()}


# ----------------------------------------------------------------------------- every method, from the adapters


@pytest.mark.parametrize("method,options", CASES, ids=IDS)
def test_adapters_merge_equals_the_float64_reference(family, dense, tmp_path, method, options):
    base, models, is_adapter = dense
    out = merge(family["adapters"], tmp_path / "out", method, family["base"], **options)
    expected = L.reference_merge(method, base, models, is_adapter, **options)
    assert_close(L.tensors(out), expected, torch.float32, label=method)


@pytest.mark.parametrize("method,options", CASES, ids=IDS)
def test_adapters_mixed_with_a_full_fine_tune(family, full, tmp_path, method, options):
    models = [*family["adapters"], full]
    base, dense_models, is_adapter = L.dense_inputs(family["base"], models)
    assert is_adapter == [True, True, True, False]
    options = extended(options, len(models))
    if method in ("tsv_m", "iso_cts"):
        # Dense task vectors of adapters: their singular vectors beyond each rank are arbitrary.
        with pytest.raises(MergeError, match=f"{method} needs each task vector's singular vectors"):
            merge(models, tmp_path / "out", method, family["base"], **options)
        assert not (tmp_path / "out").exists()
        return
    # a full fine-tune makes every tensor dense: CART there is randomized unless told otherwise
    engine = {"svd": "exact"} if method == "cart" else {}
    out = merge(models, tmp_path / "out", method, family["base"], **options, **engine)
    expected = L.reference_merge(method, base, dense_models, is_adapter, **options)
    # dense SVDs in float32: their rounding is amplified by the spectral gaps of a full-rank update
    relative = 1e-4 if method in ("cart", "tsv_m", "iso_c", "iso_cts") else RELATIVE
    assert_close(L.tensors(out), expected, torch.float32, relative=relative, label=method)


def test_references_see_what_the_adapters_are(family, dense):
    """The fixtures are what the tests claim: ranks 4, 8, 2 on their targets,
    rslora's scaling, a replaced lm_head, an adapted embedding, and nothing
    else changed."""
    base, models, _ = dense
    changed = [{n for n in base if not torch.equal(sd[n], base[n])} for sd in models]
    layer = "model.layers.0."
    assert changed[0] == {"model.embed_tokens.weight"} | {
        f"model.layers.{i}.self_attn.{p}.weight" for i in range(L.LAYERS) for p in ("q_proj", "v_proj")}
    assert "lm_head.weight" in changed[1] and f"{layer}self_attn.o_proj.weight" in changed[1]
    assert all("mlp" in n for n in changed[2])
    assert L.rank_of(models[0][f"{layer}self_attn.q_proj.weight"] - base[f"{layer}self_attn.q_proj.weight"]) == 4
    assert L.rank_of(models[1][f"{layer}self_attn.k_proj.weight"] - base[f"{layer}self_attn.k_proj.weight"]) == 8
    assert L.rank_of(models[2][f"{layer}mlp.down_proj.weight"] - base[f"{layer}mlp.down_proj.weight"]) == 2
    # rslora: the update is (alpha / sqrt(r)) B A, not (alpha / r) B A
    from safetensors.torch import load_file

    sd = load_file(family["adapters"][1] / "adapter_model.safetensors")
    prefix = "base_model.model.model.layers.0.self_attn.k_proj."
    BA = sd[prefix + "lora_B.weight"].to(F64) @ sd[prefix + "lora_A.weight"].to(F64)
    delta = models[1][f"{layer}self_attn.k_proj.weight"] - base[f"{layer}self_attn.k_proj.weight"]
    assert torch.allclose(delta, 16 / math.sqrt(8) * BA, rtol=0, atol=1e-6 * float(delta.abs().max()))


def test_bfloat16_base_gives_a_bfloat16_merge_of_the_float32_result(tmp_path):
    """The output keeps the base's dtype; the merge runs in float32, so each
    value is the float64 reference rounded to bfloat16 (within one ulp)."""
    family = L.make_family(tmp_path / "bf16", torch.bfloat16)
    base, models, is_adapter = L.dense_inputs(family["base"], family["adapters"])
    for method, options in [("average", {}), ("cart", {}), ("tsv_m", {}), ("task_arithmetic", {"lam": 1.0})]:
        out = merge(family["adapters"], tmp_path / f"out-{method}", method, family["base"], **options)
        got = L.tensors(out)
        expected = L.reference_merge(method, base, models, is_adapter, **options)
        assert got.keys() == expected.keys()
        for name, ref in expected.items():
            assert got[name].dtype == torch.bfloat16, name
            bound = 2.0**-8 * ref.abs() + 1e-6 * float(ref.abs().max())
            assert bool(((got[name].to(F64) - ref).abs() <= bound).all()), (method, name)


def test_float64_base_is_merged_in_float64(tmp_path):
    """With a float64 base the factor path's result is exact to float64 rounding."""
    family = L.make_family(tmp_path / "f64", F64)
    base, models, is_adapter = L.dense_inputs(family["base"], family["adapters"])
    for method, options in [("cart", {}), ("tsv_m", {"rank": 3}), ("iso_c", {}), ("iso_cts", {})]:
        out = merge(family["adapters"], tmp_path / f"out-{method}", method, family["base"], **options)
        expected = L.reference_merge(method, base, models, is_adapter, **options)
        assert_close(L.tensors(out), expected, F64, relative=1e-10, label=method)


def test_bin_adapter_is_read_like_its_safetensors(family, dense, tmp_path):
    spec = L.ADAPTERS["qkvo_r8_rslora"]
    bin_adapter = L.save_adapter(family["base"], tmp_path / "bin", seed=11, safe_serialization=False, **spec)
    assert (bin_adapter / "adapter_model.bin").exists() and not (bin_adapter / "adapter_model.safetensors").exists()
    adapters = family["adapters"]
    a = L.tensors(merge([adapters[0], bin_adapter, adapters[2]], tmp_path / "a", "cart", family["base"]))
    b = L.tensors(merge(adapters, tmp_path / "b", "cart", family["base"]))
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


# ----------------------------------------------------------------------------- the plan


def paths_of(plan) -> dict[str, str]:
    return {t.name: t.path for t in plan.tensors}


def expected_paths(base: dict, dense_path: str) -> dict[str, str]:
    """Adapted tensors take `dense_path` (the embedding too: the copy of the
    base's embedding that peft saves beside its factors changes nothing);
    lm_head (a replaced tensor) "dense"; the rest (norms) "base"."""
    out = {}
    for name in base:
        if name == "lm_head.weight":
            out[name] = "dense"
        elif name == "model.embed_tokens.weight" or L.is_weight_matrix(name, base[name]):
            out[name] = dense_path
        else:
            out[name] = "base"
    return out


@pytest.mark.parametrize("method", ["average", "task_arithmetic", "cart", "tsv_m", "iso_c", "iso_cts"])
def test_plan_takes_the_factor_path_for_exact_methods(family, dense, method):
    plan = ccsmerge.plan_checkpoints(family["adapters"], method, base=family["base"], device="cpu")
    assert paths_of(plan) == expected_paths(dense[0], "factors")


@pytest.mark.parametrize("method", ["ties", "dare_ties", "breadcrumbs"])
def test_plan_forms_dense_task_vectors_for_elementwise_methods(family, dense, method):
    plan = ccsmerge.plan_checkpoints(family["adapters"], method, base=family["base"], device="cpu")
    assert paths_of(plan) == expected_paths(dense[0], "dense")


def test_plan_with_a_full_fine_tune_is_dense_where_it_changed(family, dense, full):
    plan = ccsmerge.plan_checkpoints([*family["adapters"], full], "cart", base=family["base"], device="cpu")
    assert set(paths_of(plan).values()) == {"dense"}


def test_cli_plan_prints_paths_and_warns_when_cart_is_averaging(family, capsys):
    """k >= the rank of the updates (the MLP's R = 2 at --rank 2 ... ) makes CART an average: said so."""
    flags = ["--base", str(family["base"])] + [a for p in family["adapters"] for a in ("--model", str(p))]
    assert main(["plan", "--method", "cart", "--device", "cpu", "--rank", "2", *flags]) in (0, None)
    text = capsys.readouterr()
    printed = text.out + text.err
    assert "factors" in printed and "base" in printed
    warnings = [line for line in printed.splitlines() if "average" in line.lower() and "mlp" in line]
    assert warnings, printed
    assert main(["plan", "--method", "cart", "--device", "cpu", "--rank", "1", *flags]) in (0, None)
    text = capsys.readouterr()
    assert not [line for line in (text.out + text.err).splitlines() if "average" in line.lower() and "mlp" in line]


def test_cli_merge_equals_the_api(family, tmp_path):
    flags = ["--base", str(family["base"])] + [a for p in family["adapters"] for a in ("--model", str(p))]
    assert main(["merge", "--method", "cart", "--rank", "3", "--device", "cpu", "--quiet", *flags,
                 "--out", str(tmp_path / "cli")]) in (0, None)
    a = L.tensors(tmp_path / "cli")
    b = L.tensors(merge(family["adapters"], tmp_path / "api", "cart", family["base"], rank=3))
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


# ----------------------------------------------------------------------------- the LoRA output


def peft_logits(base: Path, adapter: Path) -> torch.Tensor:
    model = peft.PeftModel.from_pretrained(L.load_base(base), adapter).eval()
    return L.logits(model)


@pytest.mark.parametrize("method,options", [("cart", {}), ("task_arithmetic", {"lam": 0.7}), ("tsv_m", {"rank": 3})])
def test_lora_output_untruncated_gives_the_dense_logits(family, tmp_path, method, options):
    dense_out = merge(family["adapters"], tmp_path / "dense", method, family["base"], **options)
    lora_out = merge(family["adapters"], tmp_path / "lora", method, family["base"], output_format="lora", **options)
    assert (lora_out / "adapter_config.json").exists()
    expected = L.logits(transformers.LlamaForCausalLM.from_pretrained(dense_out).eval())
    got = peft_logits(family["base"], lora_out)
    assert float((got - expected).abs().max()) <= 1e-5 * float(expected.abs().max())
    # the same at a lora_rank the merged update fits in (at most the sum of the ranks, 14)
    fitting = merge(family["adapters"], tmp_path / "fits", method, family["base"], output_format="lora",
                    lora_rank=14, **options)
    got = peft_logits(family["base"], fitting)
    assert float((got - expected).abs().max()) <= 1e-5 * float(expected.abs().max())


def reported_errors(folder: Path) -> dict[str, float]:
    """Per weight, the reported relative Frobenius error of its truncated
    update (ccsmerge-lora.json: modules -> {tensor, rank, relative_error, ...})."""
    report = json.loads((folder / "ccsmerge-lora.json").read_text())
    return {entry["tensor"]: float(entry["relative_error"]) for entry in report["modules"].values()}


def test_lora_output_truncated_is_the_optimal_truncation_with_its_error(family, dense, tmp_path):
    """At lora_rank 3 every adapted module whose merged update has a larger
    rank (up to 12; the embedding's 4) is truncated: the adapter holds its
    best rank-3 approximation, each module's reported error is the optimal
    one (Eckart-Young, from the float64 SVD of the dense update), and the
    logits are those of the base plus the optimal truncations."""
    rank = 3
    base, models, is_adapter = dense
    method, options = "task_arithmetic", {"lam": 0.7}
    lora_out = merge(family["adapters"], tmp_path / "lora", method, family["base"], output_format="lora",
                     lora_rank=rank, **options)
    merged = L.reference_merge(method, base, models, is_adapter, **options)
    truncated = {}
    optimal = {}
    for name, b in base.items():
        update = merged[name] - b
        lora_module = L.is_weight_matrix(name, b) or name == "model.embed_tokens.weight"
        if lora_module and L.rank_of(update) > rank:
            truncated[name] = b + L.truncated(update, rank)
            optimal[name] = L.truncation_error(update, rank)
        else:
            truncated[name] = merged[name]
    reported = reported_errors(lora_out)
    assert optimal, "nothing was truncated"
    assert set(optimal) <= set(reported), sorted(set(optimal) - set(reported))
    for name, error in optimal.items():
        assert reported[name] == pytest.approx(error, rel=1e-4, abs=1e-7), name
        assert error > 1e-3, name  # the truncation is real
    for name in set(reported) - set(optimal):  # the modules whose update fits rank 3: kept exactly
        assert reported[name] == 0.0, name
    got = peft_logits(family["base"], lora_out)
    expected = L.logits(L.model_with(family["base"], truncated))
    untruncated = L.logits(L.model_with(family["base"], merged))
    scale = float(expected.abs().max())
    assert float((got - expected).abs().max()) <= 1e-4 * scale
    assert float((got - untruncated).abs().max()) > 10 * float((got - expected).abs().max())


def test_lora_output_carries_replaced_tensors_in_modules_to_save(family, tmp_path):
    lora_out = merge(family["adapters"], tmp_path / "lora", "average", family["base"], output_format="lora")
    config = json.loads((lora_out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert "lm_head" in (config.get("modules_to_save") or [])


# ----------------------------------------------------------------------------- refusals


def refused(models, out, base, match, method="cart"):
    with pytest.raises(ccsmerge.MergeError) as info:
        ccsmerge.merge_checkpoints(models, out, method, base=base, device="cpu")
    message = str(info.value)
    assert "\n" not in message.strip(), message
    assert match in message, message
    assert not Path(out).exists()
    return message


def test_dora_adapter_is_refused_by_name(family, tmp_path):
    dora = L.save_adapter(family["base"], tmp_path / "dora", seed=3, r=4, lora_alpha=8, use_dora=True,
                          target_modules=["q_proj"])
    message = refused([dora, family["adapters"][0]], tmp_path / "out", family["base"], "DoRA")
    assert "dora" in message


def test_other_peft_types_are_refused_by_name(family, tmp_path):
    ia3 = L.save_adapter(family["base"], tmp_path / "ia3", seed=3, config_cls=peft.IA3Config,
                         target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    message = refused([ia3, family["adapters"][0]], tmp_path / "out", family["base"], "IA3")
    assert "ia3" in message


def test_an_adapter_needs_a_base(family, tmp_path):
    refused(family["adapters"], tmp_path / "out", None, "base")


def test_an_adapter_of_another_shape_is_refused_naming_the_tensor(family, tmp_path):
    other = L.save_base(tmp_path / "other", intermediate_size=80)
    wrong = L.save_adapter(other, tmp_path / "wrong", seed=4, **L.ADAPTERS["mlp_r2"])
    message = refused([wrong, family["adapters"][0]], tmp_path / "out", family["base"], "mlp")
    assert "wrong" in message and "80" in message


def test_adapter_bin_is_read_with_weights_only(family, tmp_path):
    marker = tmp_path / "unpickled"
    evil = L.save_pickle_adapter(family["adapters"][0], tmp_path / "evil", marker)
    refused([evil, family["adapters"][1]], tmp_path / "out", family["base"], "evil")
    assert not marker.exists()
