"""Values that the output cannot hold, and output dtypes that must not lose
what the merge computed (issue cases: overflow in a narrower --dtype, and a
wider --dtype given the precision of the inputs' dtype)."""

from __future__ import annotations

import pytest
import torch
from checkpoints import load_output, smallest_budget, write_checkpoint

import ccsmerge
from ccsmerge.cli import main
from ccsmerge.streaming import partial_folder

W = "layers.0.attn.q_proj.weight"


def big_models(tmp, scale=1e6, rows=64):
    """Three fp32 models whose weights are finite but beyond float16's range."""
    g = torch.Generator().manual_seed(0)
    sds = [{W: scale * (1 + 0.01 * torch.randn(rows, 32, generator=g)), "norm.weight": torch.ones(32)} for _ in range(3)]
    return [write_checkpoint(sd, tmp / f"m{i}", label=f"m{i}") for i, sd in enumerate(sds)]


@pytest.mark.parametrize("blocks", [False, True], ids=["whole", "row-blocks"])
@pytest.mark.parametrize("method", ["average", "cart"])
def test_float16_overflow_is_refused_naming_the_tensor_and_the_range(tmp_path, capsys, method, blocks):
    paths = big_models(tmp_path)
    budget = ["--max-memory", str(smallest_budget(paths, method, dtype="float16"))] if blocks else []
    if blocks:
        plan = ccsmerge.plan_checkpoints(paths, method, dtype="float16", max_memory=int(budget[1]))
        assert next(t for t in plan.tensors if t.name == W).block_rows is not None
    args = ["merge", "--method", method, *[a for p in paths for a in ("--model", str(p))], "--dtype", "float16"]
    code = main([*args, *budget, "--quiet", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("ccsmerge: error:")
    assert f"'{W}'" in err and "beyond float16's range (±65504)" in err
    largest = float(err.split("merged values reach ")[1].split(",")[0])
    assert 1e6 < largest < 1.1e6  # the largest merged value, as computed
    assert not (tmp_path / "out").exists() and not partial_folder(tmp_path / "out").exists()
    # The escape hatch writes what was asked for.
    assert main([*args, *budget, "--allow-nonfinite", "--quiet", "--out", str(tmp_path / "inf")]) == 0
    assert torch.isinf(load_output(tmp_path / "inf")[W]).all()


def cart_f64(xs: list[torch.Tensor], rank_ratio: float, lam: float) -> torch.Tensor:
    """CART from its definition, in float64 with torch.linalg.svd."""
    xs = [x.double() for x in xs]
    avg = sum(xs) / len(xs)
    k = max(1, int(rank_ratio * min(avg.shape)))
    update = torch.zeros_like(avg)
    for x in xs:
        u, s, vh = torch.linalg.svd(x - avg, full_matrices=False)
        update += u[:, :k] @ torch.diag(s[:k]) @ vh[:k]
    return avg + lam * update


def bf16_models(tmp, m=256, n=256, T=3):
    """bf16 fine-tunes whose task vectors are ~0.3 % of the weights."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(m, n, generator=g) / n**0.5
    shared = torch.randn(m, 8, generator=g) @ torch.randn(8, n, generator=g) / n
    xs = [(base + 3e-3 * (shared + torch.randn(m, n, generator=g) / n**0.5)).bfloat16() for _ in range(T)]
    return xs, [write_checkpoint({W: x}, tmp / f"m{i}", label=f"m{i}") for i, x in enumerate(xs)]


def test_bf16_inputs_merged_into_float32_keep_the_update(tmp_path):
    xs, paths = bf16_models(tmp_path)
    reference = cart_f64(xs, 0.12, 2.0)
    update = reference - sum(x.double() for x in xs) / len(xs)
    out = ccsmerge.merge_checkpoints(paths, tmp_path / "out", "cart", svd="exact", dtype="float32", device="cpu")
    got = load_output(out)[W]
    assert got.dtype == torch.float32
    error = float((got.double() - reference).norm() / update.norm())
    # Rounding the merged tensor to bf16 (what a float32 output used to hold) loses far more.
    bf16_error = float((reference.bfloat16().double() - reference).norm() / update.norm())
    assert bf16_error > 0.1
    assert error < 1e-3, error


def test_bf16_inputs_in_row_blocks_are_computed_straight_into_float32(tmp_path):
    xs, paths = bf16_models(tmp_path)
    budget = smallest_budget(paths, "average", dtype="float32")
    plan = ccsmerge.plan_checkpoints(paths, "average", dtype="float32", max_memory=budget)
    assert plan.tensors[0].block_rows is not None
    out = ccsmerge.merge_checkpoints(paths, tmp_path / "out", "average", dtype="float32", max_memory=budget, device="cpu")
    got = load_output(out)[W]
    reference = sum(x.double() for x in xs) / len(xs)
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), reference, rtol=2**-23, atol=0)
    assert not torch.equal(got, reference.bfloat16().float())  # not the bf16 rounding


def test_a_bad_regex_names_the_option(tmp_path, capsys):
    xs, paths = bf16_models(tmp_path, m=16, n=16)
    args = ["merge", *[a for p in paths for a in ("--model", str(p))], "--lowrank-include", "([", "--out", str(tmp_path / "o")]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "lowrank_include" in err and "'(['" in err and "regular expression" in err
    assert not (tmp_path / "o").exists()
