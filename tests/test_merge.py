"""ccsmerge.merge against the float64 reference implementations."""

from __future__ import annotations

import pytest
import torch

import ccsmerge
from ccsmerge.config import DEFAULT_LOWRANK_EXCLUDE
import reference as R
from conftest import UNIT_ROUNDOFF, assert_within, compute_dtype, rel_err


def on(models, device):
    if isinstance(models, dict):
        return {k: v.to(device) for k, v in models.items()}
    return [{k: v.to(device) for k, v in sd.items()} for sd in models]


def lowrank_names(models, include=(), exclude=DEFAULT_LOWRANK_EXCLUDE):
    sd = models[0]
    return {
        n for n, v in sd.items() if v.is_floating_point() and R.ref_takes_lowrank(n, tuple(v.shape), include, exclude)
    }


def check_cart_state(out, models, *, rank_ratio, lam, lowrank, upd_rtol):
    """Every floating tensor of `out` against the reference: CART for the names
    in `lowrank`, the plain average for the others; integer buffers copied."""
    for name, x0 in models[0].items():
        xs = [sd[name] for sd in models]
        got = out[name]
        assert got.dtype == x0.dtype and got.device == x0.device and got.shape == x0.shape, name
        if not x0.is_floating_point():
            assert torch.equal(got, x0), name
            continue
        avg = R.ref_mean(xs)
        u_out = UNIT_ROUNDOFF[x0.dtype]
        u_c = UNIT_ROUNDOFF[compute_dtype(x0.dtype)]
        if name in lowrank:
            k = R.ref_rank(x0.shape, rank_ratio)
            ref = R.ref_cart_tensor(xs, k, lam)
            upd = ref - avg
            spread = lam * sum(float((x.double().cpu() - avg).norm()) for x in xs)
            bound = (
                upd_rtol * float(upd.norm())
                + 50 * u_c * spread
                + 2 * u_out * float(ref.norm())
                + 4 * len(xs) * u_c * float(avg.norm())
            )
            err = float((got.double().cpu() - ref).norm())
            assert err <= bound, f"{name}: ||out - ref|| = {err:.3e} > {bound:.3e} (||update|| {float(upd.norm()):.3e})"
        else:
            # Plain average: one rounding to the output dtype after the mean.
            mag = torch.stack([x.double().cpu().abs() for x in xs]).amax(0)
            assert_within(got, avg, 2 * u_out * avg.abs() + (len(xs) + 2) * u_c * mag, name)


# ----------------------------------------------------------------------------- CART


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("T", [3, 5])
@pytest.mark.parametrize("rank_ratio,lam", [(0.25, None), (0.1, 1.5), (1.0, 0.7)])
def test_cart_exact_matches_reference(device, dtype, T, rank_ratio, lam):
    models = on(R.model_set(T, dtype=dtype, seed=T, with_base=False), device)
    out = ccsmerge.merge(models, "cart", svd="exact", rank_ratio=rank_ratio, lam=lam, device=device)
    assert set(out) == set(models[0])
    lr = lowrank_names(models)
    assert lr == {"layers.0.attn.q_proj.weight", "layers.0.mlp.up_proj.weight"}
    upd_rtol = 1e-9 if dtype == torch.float64 else 1e-3
    check_cart_state(out, models, rank_ratio=rank_ratio, lam=2.0 if lam is None else lam, lowrank=lr, upd_rtol=upd_rtol)


@pytest.mark.parametrize("T", [3, 8])
@pytest.mark.parametrize("shape", [(120, 80), (64, 200), (150, 150)], ids=str)
@pytest.mark.parametrize("rank_ratio", [0.12, 0.3])
def test_cart_randomized_defaults_within_5_percent_of_exact(device, T, shape, rank_ratio):
    """At the defaults (oversample max(10, k), 4 power iterations) the
    randomized engine's update D = merged - theta_avg is within 5% of the
    exact CART update (the package's svd="exact" and the float64 reference)."""
    _, thetas = R.task_set(T, *shape, decay=1.0, seed=T + shape[0])
    models = [{"w": th.float().to(device)} for th in thetas]
    rand = ccsmerge.merge(models, rank_ratio=rank_ratio, device=device)["w"]
    exact = ccsmerge.merge(models, rank_ratio=rank_ratio, svd="exact", device=device)["w"]
    assert rand.dtype == torch.float32 and rand.device == models[0]["w"].device
    avg = R.ref_mean([sd["w"] for sd in models])
    ref_update = R.ref_cart_tensor([sd["w"] for sd in models], R.ref_rank(shape, rank_ratio), 2.0) - avg
    d_rand = rand.double().cpu() - avg
    d_exact = exact.double().cpu() - avg
    assert float(ref_update.norm()) > 1e-2 * float(avg.norm())  # a real update, not rounding
    assert rel_err(d_rand, d_exact) <= 0.05
    assert rel_err(d_rand, ref_update) <= 0.05
    assert rel_err(d_exact, ref_update) <= 1e-3


@pytest.mark.parametrize("svd", ["exact", "randomized"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_cart_with_two_models_is_plain_average(device, svd, dtype):
    """T = 2: theta_1 - avg = -(theta_2 - avg), so the two rank-k parts cancel."""
    _, thetas = R.task_set(2, 70, 50, seed=1)
    models = [{"w": th.to(dtype).to(device)} for th in thetas]
    out = ccsmerge.merge(models, svd=svd, rank_ratio=0.2, device=device)["w"]
    avg = R.ref_mean([sd["w"] for sd in models])
    spread = float((thetas[0] - thetas[1]).norm())
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    assert float((out.double().cpu() - avg).norm()) <= tol * spread + 4 * UNIT_ROUNDOFF[dtype] * float(avg.norm())
    # ... while T = 3 with the same first two models does change the weights.
    third = {"w": R.task_set(3, 70, 50, seed=1)[1][2].to(dtype).to(device)}
    out3 = ccsmerge.merge(models + [third], svd=svd, rank_ratio=0.2, device=device)["w"]
    assert rel_err(out3, R.ref_mean([sd["w"] for sd in models + [third]])) > 1e-3


def test_cart_identical_models_give_the_model(device):
    sd = on(R.model_set(1, dtype=torch.float32, seed=3, with_base=False)[0], device)
    models = [sd, {k: v.clone() for k, v in sd.items()}, {k: v.clone() for k, v in sd.items()}]
    for svd in ("randomized", "exact"):
        out = ccsmerge.merge(models, svd=svd, device=device)
        for name, x in sd.items():
            if x.is_floating_point():
                assert bool(torch.isfinite(out[name]).all()), name
                # The centered matrices are rounding noise: a noise-sized update at most.
                assert_within(out[name], x, 16 * UNIT_ROUNDOFF[torch.float32] * float(x.double().abs().max()), name)
            else:
                assert torch.equal(out[name], x)


EXCLUDED_BY_DEFAULT = [
    "model.embed_tokens.weight",
    "embeddings.word_embeddings.weight",
    "transformer.wte.weight",
    "transformer.wpe.weight",
    "encoder.pos_emb",
    "lm_head.weight",
    "classifier.weight",
    "model.classifier.dense.weight",
    "score.weight",
    "head.weight",
    "vit.heads.0.weight",
]
LOWRANK_BY_DEFAULT = [
    "layers.0.self_attn.q_proj.weight",
    "headless.weight",
    "multihead_attn.out_proj.weight",
    "scores.weight",
    "swte.weight",
]


def _named_models(names, T=3, shape=(24, 18), dtype=torch.float64, seed=0):
    models = [dict() for _ in range(T)]
    for i, name in enumerate(names):
        _, thetas = R.task_set(T, *shape, seed=seed + 10 * i)
        for t in range(T):
            models[t][name] = thetas[t].to(dtype)
    return models


def _is_plain_average(out, models, name):
    avg = R.ref_mean([sd[name] for sd in models])
    return float((out[name].double() - avg).norm()) <= 1e-12 * float(avg.norm())


def _is_cart(out, models, name, rank_ratio):
    xs = [sd[name] for sd in models]
    ref = R.ref_cart_tensor(xs, R.ref_rank(xs[0].shape, rank_ratio), 2.0)
    return float((out[name].double() - ref).norm()) <= 1e-9 * float(ref.norm())


def test_default_exclude_patterns_keep_embeddings_and_heads_averaged():
    models = _named_models(EXCLUDED_BY_DEFAULT + LOWRANK_BY_DEFAULT)
    out = ccsmerge.merge(models, svd="exact", rank_ratio=0.25)
    for name in EXCLUDED_BY_DEFAULT:
        assert _is_plain_average(out, models, name), name
    for name in LOWRANK_BY_DEFAULT:
        assert _is_cart(out, models, name, 0.25), name
        assert not _is_plain_average(out, models, name), name


def test_lowrank_include_and_exclude():
    names = ["layers.0.q_proj.weight", "layers.0.up_proj.weight", "lm_head.weight", "model.embed_tokens.weight"]
    models = _named_models(names, seed=5)
    models = [dict(sd, **{"layers.0.q_proj.bias": sd["layers.0.q_proj.weight"][0].clone()}) for sd in models]

    def kinds(**kw):
        out = ccsmerge.merge(models, svd="exact", rank_ratio=0.25, **kw)
        cart = {n for n in names if _is_cart(out, models, n, 0.25)}
        avg = {n for n in names if _is_plain_average(out, models, n)}
        assert cart | avg == set(names) and not cart & avg
        assert _is_plain_average(out, models, "layers.0.q_proj.bias")  # 1-D: never low-rank
        return cart

    assert kinds() == {"layers.0.q_proj.weight", "layers.0.up_proj.weight"}
    # Exclude everything, then include one: exactly that one.
    assert kinds(lowrank_exclude=(".*",), lowrank_include=("q_proj",)) == {"layers.0.q_proj.weight"}
    # Include overrides the default excludes.
    assert kinds(lowrank_include=("lm_head",)) == {"layers.0.q_proj.weight", "layers.0.up_proj.weight", "lm_head.weight"}
    # An exclude list adds to the default excludes (embeddings and lm_head stay out) ...
    assert kinds(lowrank_exclude=()) == {"layers.0.q_proj.weight", "layers.0.up_proj.weight"}
    assert kinds(lowrank_exclude=("up_proj",)) == {"layers.0.q_proj.weight"}
    # ... and replacing the defaults is the explicit default_excludes=False.
    assert kinds(default_excludes=False) == set(names)
    assert kinds(default_excludes=False, lowrank_exclude=("up_proj",)) == set(names) - {"layers.0.up_proj.weight"}
    # Include matching a 1-D tensor's name does not make it low-rank.
    assert kinds(lowrank_include=("bias",)) == {"layers.0.q_proj.weight", "layers.0.up_proj.weight"}


@pytest.mark.parametrize("method", ["cart", "average", "task_arithmetic", "ties"])
def test_integer_and_bool_buffers_are_copied(device, method):
    models, base = R.model_set(3, dtype=torch.float32, seed=2)
    extras = {
        "position_ids": torch.arange(16, dtype=torch.int64).reshape(1, 16),  # 2-D but integer
        "mask": torch.tensor([True, False, True]),
        "step": torch.tensor(3, dtype=torch.int32),
    }
    for sd in models + [base]:
        sd.update({k: v.clone() for k, v in extras.items()})
    models, base = on(models, device), on(base, device)
    out = ccsmerge.merge(models, method, base=base, device=device)
    for name, value in list(extras.items()) + list(R.INT_BUFFERS.items()):
        assert out[name].dtype == value.dtype and out[name].device == models[0][name].device
        assert torch.equal(out[name].cpu(), value)
        assert out[name].data_ptr() != models[0][name].data_ptr()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_cart_half_precision_inputs_keep_their_dtype(device, dtype, svd):
    models = on(R.model_set(4, dtype=dtype, seed=6, with_base=False), device)
    out = ccsmerge.merge(models, svd=svd, rank_ratio=0.25, device=device)
    lr = lowrank_names(models)
    check_cart_state(out, models, rank_ratio=0.25, lam=2.0, lowrank=lr, upd_rtol=1e-3 if svd == "exact" else 0.05)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("method", ["average", "task_arithmetic", "ties"])
def test_other_methods_keep_dtype_and_device(device, dtype, method):
    models, base = R.model_set(3, dtype=dtype, seed=7)
    models, base = on(models, device), on(base, device)
    out = ccsmerge.merge(models, method, base=base, device=device)
    for name, x in models[0].items():
        assert out[name].dtype == x.dtype and out[name].device == x.device and out[name].shape == x.shape


# ----------------------------------------------------------------------------- average / TA / TIES


@pytest.mark.parametrize("T", [2, 3, 6])
def test_average_matches_reference(device, T):
    models = on(R.model_set(T, dtype=torch.float32, seed=T, with_base=False), device)
    out = ccsmerge.merge(models, "average", device=device)
    check_cart_state(out, models, rank_ratio=0.1, lam=1.0, lowrank=set(), upd_rtol=0)


def test_task_arithmetic_by_hand():
    # base = [1, 2, 3]; task vectors theta_t - base:
    #   t1 = [2, 2, 1]   -> [ 1,   0, -2]
    #   t2 = [1, 5, 3]   -> [ 0,   3,  0]
    #   t3 = [0.5, 2, 4] -> [-0.5, 0,  1]
    # sum = [0.5, 3, -1]; lam = 0.5: base + 0.5 * sum = [1.25, 3.5, 2.5]
    base = {"w": torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)}
    models = [
        {"w": torch.tensor([2.0, 2.0, 1.0], dtype=torch.float64)},
        {"w": torch.tensor([1.0, 5.0, 3.0], dtype=torch.float64)},
        {"w": torch.tensor([0.5, 2.0, 4.0], dtype=torch.float64)},
    ]
    out = ccsmerge.merge(models, "task_arithmetic", base=base, lam=0.5)
    assert out["w"].tolist() == [1.25, 3.5, 2.5]
    # lam defaults to 0.3: [1 + 0.15, 2 + 0.9, 3 - 0.3]
    base = {"w": torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)}
    out = ccsmerge.merge(models, "task_arithmetic", base=base)
    torch.testing.assert_close(out["w"], torch.tensor([1.15, 2.9, 2.7], dtype=torch.float64), rtol=0, atol=1e-15)


def _ties_example():
    # base = [1, 1, 1, 1, 1]; density 0.4 of 5 elements: each task vector keeps its top 2 magnitudes.
    #   tau1 = [ 4, -1,  0.5,  3,   -2  ] -> trimmed [ 4,  0, 0, 3, 0]
    #   tau2 = [-1,  5, -0.5,  2,    0.25] -> trimmed [ 0,  5, 0, 2, 0]
    #   tau3 = [-3, -6,  1,   -0.5,  0.75] -> trimmed [-3, -6, 0, 0, 0]
    # summed: [1, -1, 0, 5, 0] -> elected signs [+, -, +, +, +] (+ where the sum is 0)
    # disjoint means: [4 (only +4 agrees), -6 (only -6), 0 (none kept), (3+2)/2 = 2.5, 0]
    # lam = 1: base + [4, -6, 0, 2.5, 0] = [5, -5, 1, 3.5, 1];  lam = 0.5: [3, -2, 1, 2.25, 1]
    base = torch.ones(5, dtype=torch.float64)
    taus = [
        [4.0, -1.0, 0.5, 3.0, -2.0],
        [-1.0, 5.0, -0.5, 2.0, 0.25],
        [-3.0, -6.0, 1.0, -0.5, 0.75],
    ]
    return base, [base + torch.tensor(t, dtype=torch.float64) for t in taus]


def test_ties_by_hand():
    base, thetas = _ties_example()
    models = [{"w": th} for th in thetas]
    out = ccsmerge.merge(models, "ties", base={"w": base.clone()}, density=0.4)
    assert out["w"].tolist() == [5.0, -5.0, 1.0, 3.5, 1.0]
    out = ccsmerge.merge(models, "ties", base={"w": base.clone()}, density=0.4, lam=0.5)
    assert out["w"].tolist() == [3.0, -2.0, 1.0, 2.25, 1.0]
    # The reference implementation agrees with the hand computation.
    assert R.ref_ties(thetas, base, 0.4, 1.0).tolist() == [5.0, -5.0, 1.0, 3.5, 1.0]
    # density 1: no trimming. sums [0, -2, 1, 4.5, -1] -> signs [+ (a sum of 0 elects +, as in mergekit), -, +, +, -]
    # idx0: only 4 agrees -> 4; idx1: -1, -6 -> -3.5; idx2: 0.5, 1 -> 0.75;
    # idx3: 3, 2 -> 2.5; idx4: -2 -> -2.   base + that = [5, -2.5, 1.75, 3.5, -1]
    out = ccsmerge.merge(models, "ties", base={"w": base.clone()}, density=1.0)
    assert out["w"].tolist() == [5.0, -2.5, 1.75, 3.5, -1.0]
    assert R.ref_ties(thetas, base, 1.0, 1.0).tolist() == [5.0, -2.5, 1.75, 3.5, -1.0]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("T", [2, 3, 5])
@pytest.mark.parametrize("lam", [None, 0.7])
def test_task_arithmetic_matches_reference(device, dtype, T, lam):
    models, base = R.model_set(T, dtype=dtype, seed=T)
    # The reference reads its own copy of the base.
    ref_base = {k: v.clone() for k, v in base.items()}
    out = ccsmerge.merge(on(models, device), "task_arithmetic", base=on(base, device), lam=lam, device=device)
    scale = 0.3 if lam is None else lam
    for name, b in ref_base.items():
        if not b.is_floating_point():
            continue
        xs = [sd[name] for sd in models]
        ref = R.ref_task_arithmetic(xs, b, scale)
        mag = torch.stack([x.double().abs() for x in xs + [b]]).amax(0)
        bound = 2 * UNIT_ROUNDOFF[dtype] * ref.abs() + 4 * (T + 2) * UNIT_ROUNDOFF[compute_dtype(dtype)] * mag
        assert_within(out[name], ref, bound, name)


@pytest.mark.parametrize("density", [0.05, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("T", [2, 3, 5])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=str)
def test_ties_matches_reference(device, density, T, dtype):
    g = R.generator(int(density * 100) + T)
    shapes = {"a.weight": (6, 7), "a.bias": (30,), "conv": (2, 3, 2, 2), "single": (1,)}
    base = {n: torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for n, s in shapes.items()}
    models = [
        {n: (base[n].double() + torch.randn(s, generator=g, dtype=torch.float64)).to(dtype) for n, s in shapes.items()}
        for _ in range(T)
    ]
    ref_base = {k: v.clone() for k, v in base.items()}
    for lam in (None, 0.6):
        out = ccsmerge.merge(
            on(models, device), "ties", base=on({k: v.clone() for k, v in base.items()}, device),
            density=density, lam=lam, device=device,
        )
        for name in shapes:
            ref = R.ref_ties([sd[name] for sd in models], ref_base[name], density, 1.0 if lam is None else lam)
            mag = ref.abs() + torch.stack([sd[name].double().abs() for sd in models]).amax(0)
            bound = 2 * UNIT_ROUNDOFF[dtype] * ref.abs() + 8 * (T + 2) * UNIT_ROUNDOFF[compute_dtype(dtype)] * mag
            assert out[name].dtype == dtype
            assert_within(out[name], ref, bound, f"ties {name} density={density}")


@pytest.mark.parametrize(
    "method,expected_lam", [("cart", 2.0), ("task_arithmetic", 0.3), ("ties", 1.0)]
)
def test_default_lam_per_method(method, expected_lam):
    models, base = R.model_set(3, dtype=torch.float64, seed=9)

    def run(**kw):
        # A fresh copy of the base per call: that merge leaves its inputs
        # alone is tested on its own (tests/bad_inputs/test_bad_api_inputs.py, test_merging_the_same_inputs_twice...).
        b = {k: v.clone() for k, v in base.items()}
        cart_options = dict(svd="exact", rank_ratio=0.25) if method == "cart" else {}
        return ccsmerge.merge(models, method, base=b, **cart_options, **kw)

    default = run()
    explicit = run(lam=expected_lam)
    other = run(lam=expected_lam + 0.5)
    name = "layers.0.attn.q_proj.weight"
    for n in default:
        assert torch.equal(default[n], explicit[n]), n
    assert not torch.equal(default[name], other[name])
    xs = [sd[name] for sd in models]
    if method == "cart":
        ref = R.ref_cart_tensor(xs, R.ref_rank(xs[0].shape, 0.25), 2.0)
    elif method == "task_arithmetic":
        ref = R.ref_task_arithmetic(xs, base[name], 0.3)
    else:
        ref = R.ref_ties(xs, base[name], 0.2, 1.0)
    torch.testing.assert_close(default[name], ref, rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------------- determinism / devices


def test_cart_randomized_deterministic_per_seed(device):
    models = on(R.model_set(3, dtype=torch.float32, seed=1, with_base=False), device)
    a = ccsmerge.merge(models, device=device, seed=5)
    b = ccsmerge.merge(models, device=device, seed=5)
    c = ccsmerge.merge(models, device=device, seed=6)
    lr = lowrank_names(models)
    for name in a:
        assert torch.equal(a[name], b[name]), name
        if name in lr:
            assert not torch.equal(a[name], c[name]), name
        else:
            assert torch.equal(a[name], c[name]), name


def test_cart_randomized_does_not_depend_on_tensor_order(device):
    """Each tensor's sketch is seeded from its name, not its position."""
    models = on(R.model_set(3, dtype=torch.float32, seed=1, with_base=False), device)
    reordered = [dict(reversed(list(sd.items()))) for sd in models]
    a = ccsmerge.merge(models, device=device)
    b = ccsmerge.merge(reordered, device=device)
    assert list(b) == list(reordered[0])
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("method", ["cart", "average", "task_arithmetic", "ties"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_merging_the_same_inputs_twice_gives_the_same_result(device, method, dtype):
    models, base = R.model_set(3, dtype=dtype, seed=4)
    models, base = on(models, device), on(base, device)
    first = {k: v.clone() for k, v in ccsmerge.merge(models, method, base=base, device=device).items()}
    second = ccsmerge.merge(models, method, base=base, device=device)
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_explicit_cpu_device():
    models = R.model_set(3, dtype=torch.float32, seed=8, with_base=False)
    out = ccsmerge.merge(models, device="cpu", svd="exact", rank_ratio=0.25)
    also = ccsmerge.merge(models, device=torch.device("cpu"), svd="exact", rank_ratio=0.25)
    for name in out:
        assert out[name].device.type == "cpu"
        assert torch.equal(out[name], also[name])
    check_cart_state(out, models, rank_ratio=0.25, lam=2.0, lowrank=lowrank_names(models), upd_rtol=1e-3)


@pytest.mark.parametrize("method", ["cart", "average", "task_arithmetic", "ties"])
def test_cpu_inputs_merged_on_cuda(cuda_device, method):
    """device='cuda' with CPU inputs: computed on the GPU, returned on the CPU,
    the same result as the CPU computation within float32 rounding."""
    models, base = R.model_set(3, dtype=torch.float32, seed=12)
    gpu = ccsmerge.merge(models, method, base={k: v.clone() for k, v in base.items()}, device=cuda_device,
                         svd="exact", rank_ratio=0.25)
    cpu = ccsmerge.merge(models, method, base={k: v.clone() for k, v in base.items()}, device="cpu",
                         svd="exact", rank_ratio=0.25)
    for name, x in models[0].items():
        assert gpu[name].device.type == "cpu" and gpu[name].dtype == x.dtype
        if x.is_floating_point():
            assert rel_err(gpu[name], cpu[name]) <= 1e-4, name
        else:
            assert torch.equal(gpu[name], cpu[name])
    if method == "cart":
        check_cart_state(gpu, models, rank_ratio=0.25, lam=2.0, lowrank=lowrank_names(models), upd_rtol=1e-3)


@pytest.mark.parametrize("method", ["average", "cart", "task_arithmetic"])
def test_cuda_inputs_merged_on_cpu(cuda_device, method):
    """device='cpu' with CUDA inputs: the inputs are copied to the CPU before
    the CPU kernels read them, and the result goes back to the GPU. Large
    tensors, so a copy still in flight would show."""
    g = torch.Generator().manual_seed(0)
    shape = (2048, 1024)
    base_cpu = {"w": torch.randn(shape, generator=g), "v": torch.randn(3_000_001, generator=g)}
    models_cpu = [{k: v + torch.randn(v.shape, generator=g) for k, v in base_cpu.items()} for _ in range(3)]
    models = on(models_cpu, cuda_device)
    base = on(base_cpu, cuda_device)
    kw = dict(rank_ratio=0.01, svd="exact") if method == "cart" else {}
    out = ccsmerge.merge(models, method, base=base, device="cpu", **kw)
    ref = ccsmerge.merge(models_cpu, method, base={k: v.clone() for k, v in base_cpu.items()}, device="cpu", **kw)
    for name in ref:
        assert out[name].device.type == "cuda"
        assert torch.equal(out[name].cpu(), ref[name]), name


def test_cuda_inputs_auto_device_match_reference(cuda_device):
    models = on(R.model_set(4, dtype=torch.float32, seed=13, with_base=False), cuda_device)
    out = ccsmerge.merge(models, svd="exact", rank_ratio=0.25)  # device="auto" -> CUDA
    check_cart_state(out, models, rank_ratio=0.25, lam=2.0, lowrank=lowrank_names(models), upd_rtol=1e-3)
    out = ccsmerge.merge(models, rank_ratio=0.25)
    check_cart_state(out, models, rank_ratio=0.25, lam=2.0, lowrank=lowrank_names(models), upd_rtol=0.05)


def test_randomized_cart_same_sketch_on_every_device(cuda_device):
    """The test matrix is drawn on the CPU whatever the device, so a seed gives
    the same randomized merge on the GPU as on the CPU, up to rounding."""
    _, thetas = R.task_set(3, 120, 80, decay=1.0, seed=21)
    models = [{"w": th.float()} for th in thetas]
    cpu = ccsmerge.merge(models, rank_ratio=0.12, device="cpu", seed=3)["w"]
    gpu = ccsmerge.merge(models, rank_ratio=0.12, device=cuda_device, seed=3)["w"]
    avg = R.ref_mean([sd["w"] for sd in models])
    assert rel_err(gpu.double() - avg, cpu.double() - avg) <= 1e-3
