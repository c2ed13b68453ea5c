"""Bad inputs raise ccsmerge.MergeError (a ValueError) naming the tensor or
option at fault, before anything is returned; good inputs are left alone."""

from __future__ import annotations

import math

import pytest
import torch

import ccsmerge
from ccsmerge import MergeError
from ccsmerge.config import METHODS, MergeConfig
from ccsmerge.methods import REGISTRY
from ccsmerge.merge import make_config  # the module (ccsmerge.merge the attribute is the function)
import reference as R

W = "layers.0.attn.q_proj.weight"
B = "layers.0.attn.q_proj.bias"


def models_and_base(T=3, dtype=torch.float32, seed=0):
    return R.model_set(T, dtype=dtype, seed=seed)


def test_merge_error_is_a_value_error():
    assert issubclass(MergeError, ValueError)


# ----------------------------------------------------------------------------- structure


def test_tensor_missing_from_a_model():
    models, _ = models_and_base()
    del models[2][B]
    with pytest.raises(MergeError, match=rf"'{B}'.*model 2"):
        ccsmerge.merge(models)


def test_extra_tensor_in_a_model():
    models, _ = models_and_base()
    models[1]["extra.weight"] = torch.zeros(3, 3)
    with pytest.raises(MergeError, match=r"'extra\.weight'.*model 1"):
        ccsmerge.merge(models)


def test_base_missing_a_tensor_or_with_an_extra_one():
    models, base = models_and_base()
    del base[W]
    with pytest.raises(MergeError, match=rf"'{W}'.*base"):
        ccsmerge.merge(models, "task_arithmetic", base=base)
    models, base = models_and_base()
    base["only.in.base"] = torch.zeros(2)
    with pytest.raises(MergeError, match=r"'only\.in\.base'.*base"):
        ccsmerge.merge(models, "ties", base=base)


def test_different_shapes():
    models, _ = models_and_base()
    models[1][W] = models[1][W][:, :-1].clone()
    with pytest.raises(MergeError, match=rf"'{W}'.*shape.*model 1") as info:
        ccsmerge.merge(models)
    assert "(40, 23)" in str(info.value) and "(40, 24)" in str(info.value)


def test_different_shapes_in_base():
    models, base = models_and_base()
    base[B] = torch.zeros(41)
    with pytest.raises(MergeError, match=rf"'{B}'.*base"):
        ccsmerge.merge(models, "task_arithmetic", base=base)


def test_different_dtypes():
    models, _ = models_and_base()
    models[2][B] = models[2][B].double()
    with pytest.raises(MergeError, match=rf"'{B}'.*dtype.*model 2"):
        ccsmerge.merge(models)


def test_non_tensor_value():
    models, _ = models_and_base()
    models[1][B] = [1.0, 2.0]
    with pytest.raises(MergeError, match=rf"'{B}'.*model 1"):
        ccsmerge.merge(models)


@pytest.mark.parametrize("count", [0, 1])
def test_fewer_than_two_models(count):
    models, _ = models_and_base()
    with pytest.raises(MergeError, match="at least 2"):
        ccsmerge.merge(models[:count])


def test_a_single_state_dict_instead_of_a_list():
    models, _ = models_and_base()
    with pytest.raises(MergeError, match="at least 2"):
        ccsmerge.merge(models[0])


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_base_required(method):
    models, _ = models_and_base()
    with pytest.raises(MergeError, match=rf"{method}.*base"):
        ccsmerge.merge(models, method)


def test_non_floating_buffers_that_differ():
    models, base = models_and_base()
    models[2]["bn.num_batches_tracked"] = torch.tensor(8)
    with pytest.raises(MergeError, match=r"'bn\.num_batches_tracked'.*model 2"):
        ccsmerge.merge(models)
    models, base = models_and_base()
    base["bn.num_batches_tracked"] = torch.tensor(0)
    with pytest.raises(MergeError, match=r"'bn\.num_batches_tracked'.*base"):
        ccsmerge.merge(models, "ties", base=base)


# ----------------------------------------------------------------------------- options


@pytest.mark.parametrize("rank_ratio", [0.0, -0.1, 1.5, math.nan, math.inf])
def test_rank_ratio_out_of_range(rank_ratio):
    models, _ = models_and_base()
    with pytest.raises(MergeError, match="rank_ratio"):
        ccsmerge.merge(models, rank_ratio=rank_ratio)


@pytest.mark.parametrize("rank_ratio", [1e-9, 1.0])
def test_rank_ratio_edges_accepted(rank_ratio):
    models, _ = models_and_base()
    out = ccsmerge.merge(models, rank_ratio=rank_ratio, svd="exact")
    assert set(out) == set(models[0])


@pytest.mark.parametrize("density", [0.0, -0.5, 1.01, math.nan])
def test_density_out_of_range(density):
    models, base = models_and_base()
    with pytest.raises(MergeError, match="density"):
        ccsmerge.merge(models, "ties", base=base, density=density)


@pytest.mark.parametrize("lam", [math.nan, math.inf, -math.inf])
def test_non_finite_lam(lam):
    models, _ = models_and_base()
    with pytest.raises(MergeError, match="lam"):
        ccsmerge.merge(models, lam=lam)


def test_unknown_method_lists_the_valid_ones():
    models, _ = models_and_base()
    with pytest.raises(MergeError, match="method") as info:
        ccsmerge.merge(models, "slerp")
    listed = {"average", "linear", "task_arithmetic", "ties", "cart", "tsv_m", "iso_c", "iso_cts",
              "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties"}
    for name in listed:
        assert name in str(info.value)
    assert set(METHODS) == listed


@pytest.mark.parametrize(
    "options,field",
    [
        ({"svd": "lanczos"}, "svd"),
        ({"oversample": -1}, "oversample"),
        ({"power_iters": -2}, "power_iters"),
        ({"seed": -1}, "seed"),
        ({"tolerance": 1.0}, "tolerance"),
        ({"tolerance": "fast"}, "tolerance"),
        ({"tolerance": 0.01, "svd": "exact"}, "tolerance applies to svd='randomized' only"),
        ({"tolerance": 0.01, "power_iters": 0}, "power_iters caps the adaptive iterations"),
        ({"method": "average", "tolerance": 0.01}, "does not take tolerance"),
    ],
)
def test_other_bad_options(options, field):
    models, _ = models_and_base()
    with pytest.raises(MergeError, match=field):
        ccsmerge.merge(models, **options)


def test_unknown_option_lists_valid_options():
    with pytest.raises(MergeError, match="foo") as info:
        make_config(foo=1)
    message = str(info.value)
    assert "unknown option" in message
    for field in ("method", "device", "allow_nonfinite", *REGISTRY["cart"].param_names):  # cart's options
        assert field in message, field
    with pytest.raises(MergeError, match="unknown option; valid options for ties: .*density") as info:
        make_config(method="ties", ranks="4")


def test_make_config_accepts_valid_options():
    cfg = make_config(method="ties", density=0.5, lam=0.25)
    assert cfg.method == "ties" and cfg.density == 0.5 and cfg.lam == 0.25
    assert make_config().lam == 2.0  # cart's default


def test_cuda_requested_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    models, _ = models_and_base()
    with pytest.raises(MergeError, match="CUDA"):
        ccsmerge.merge(models, device="cuda")


def test_unknown_device():
    models, _ = models_and_base()
    with pytest.raises(MergeError, match="device"):
        ccsmerge.merge(models, device="not-a-device")


# ----------------------------------------------------------------------------- non-finite values


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("name", [W, B, "model.embed_tokens.weight", "scale"])
@pytest.mark.parametrize("method", ["cart", "average", "task_arithmetic", "ties"])
def test_non_finite_input_names_tensor_and_model(bad, name, method):
    models, base = models_and_base()
    models[1][name] = models[1][name].clone()
    models[1][name].reshape(-1)[0] = bad
    with pytest.raises(MergeError, match=rf"'{name}'.*model 1.*(NaN|Inf)"):
        ccsmerge.merge(models, method, base=base)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_non_finite_base_is_named(method):
    models, base = models_and_base()
    base[W] = base[W].clone()
    base[W][3, 4] = math.nan
    with pytest.raises(MergeError, match=rf"'{W}'.*base"):
        ccsmerge.merge(models, method, base=base)


def test_non_finite_in_half_precision_exact_svd():
    models, _ = models_and_base(dtype=torch.bfloat16)
    models[0][W] = models[0][W].clone()
    models[0][W][0, 0] = math.inf
    with pytest.raises(MergeError, match=rf"'{W}'.*model 0"):
        ccsmerge.merge(models, svd="exact")


# ----------------------------------------------------------------------------- inputs left alone


def _snapshot(sds):
    return [{k: v.clone() for k, v in sd.items()} for sd in sds]


def _assert_unchanged(before, after, label):
    for i, (b, a) in enumerate(zip(before, after)):
        assert list(b) == list(a), f"{label} {i}: keys changed"
        for name in b:
            assert a[name].dtype == b[name].dtype, f"{label} {i}: '{name}' dtype changed"
            assert torch.equal(a[name], b[name]), f"{label} {i}: '{name}' was modified in place"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "method,options",
    [
        ("cart", {}),
        ("cart", {"svd": "exact"}),
        ("average", {}),
        ("task_arithmetic", {}),
        ("ties", {}),
    ],
)
def test_merge_does_not_modify_its_inputs(device, method, options, dtype):
    """Inputs on `device`, computed on `device` (so no copy to another device
    shields them)."""
    models, base = models_and_base(dtype=dtype)
    models = [{k: v.to(device) for k, v in sd.items()} for sd in models]
    base = {k: v.to(device) for k, v in base.items()}
    models_before, base_before = _snapshot(models), _snapshot([base])
    out = ccsmerge.merge(models, method, base=base, device=device, **options)
    _assert_unchanged(models_before, models, "model")
    _assert_unchanged(base_before, [base], "base")
    # Modifying the result does not reach back into the inputs either.
    for value in out.values():
        value.zero_() if value.is_floating_point() else value.fill_(0)
    _assert_unchanged(models_before, models, "model")
    _assert_unchanged(base_before, [base], "base")


def test_failed_merge_does_not_modify_its_inputs():
    models, base = models_and_base()
    models[2][B] = models[2][B].clone()
    models[2][B][-1] = math.nan
    models_before, base_before = _snapshot(models), _snapshot([base])
    with pytest.raises(MergeError):
        ccsmerge.merge(models, "task_arithmetic", base=base, device="cpu")
    for b, a in zip(models_before, models):
        for name in b:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, equal_nan=True)
    # The tensors merged before the bad one was met are the ones a partial
    # merge could have touched.
    for name in base_before[0]:
        assert torch.equal(base[name], base_before[0][name]), f"base '{name}' was modified in place"
