"""The accuracy record and tolerance="auto" as CART's default.

- merge() and merge_checkpoints() record every low-rank matrix (k, iterations, sketch
  width, estimate, target, floor, cap); the in-memory and the streamed records agree,
  whole or in row blocks, and a resumed merge assembles the shards' records.
- The output rounding recorded equals the brute-force ratio of a bf16 output against
  the float32 output of the same merge; the summary warns when it dominates.
- The plan predicts the width, the iterations and the target.
- tolerance=None (API), "off" (flags, recipes) is the fixed algorithm, byte for byte
  the randomized SVD with 4 power iterations computed here from the engine's parts."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import ccsmerge
from ccsmerge import accuracy_record, kernels
from ccsmerge.accuracy_record import ACCURACY_FILE, read_accuracy, summary_lines
from ccsmerge.lowrank import randomized_svd_over_rows
from ccsmerge.numerics import tensor_seed
from ccsmerge.output_folder import partial_folder

import reference as R
from checkpoints import index_of, load_output, record_inputs, shard_files, write_set

F64 = torch.float64
NAMES = ("layers.0.attn.weight", "layers.1.mlp.weight")
SHAPES = ((96, 80), (120, 64))


def task_models(T: int = 3, dtype=torch.bfloat16, strength: float = 0.03, seed: int = 0):
    """Weights with power-law task vectors (strength of the weights' norm) and a bias."""
    gen = R.generator(seed)
    bases = [torch.randn(*shape, generator=gen, dtype=F64) for shape in SHAPES]
    models = []
    for t in range(T):
        sd = {}
        for name, base in zip(NAMES, bases):
            m, n = base.shape
            s = torch.arange(1, min(m, n) + 1, dtype=F64).pow(-1.0)
            tau = (R.random_orthonormal(m, s.numel(), gen) * s) @ R.random_orthonormal(n, s.numel(), gen).T
            sd[name] = (base + tau * (strength * base.norm() / tau.norm())).to(dtype)
        sd["layers.0.norm.bias"] = torch.randn(80, generator=gen, dtype=F64).to(dtype)
        models.append(sd)
    return models


def _record(models, **options):
    record = []
    ccsmerge.merge(models, record=record, **options)
    return record


def test_merge_records_every_lowrank_matrix():
    models = task_models()
    record = []
    merged = ccsmerge.merge(models, method="cart", lam=2.0, record=record)
    assert type(merged) is dict
    assert [e.name for e in record] == list(NAMES)  # the bias has no low-rank step
    for entry, (m, n) in zip(record, SHAPES):
        k = int(0.12 * min(m, n))
        assert (entry.shape, entry.k, entry.width) == ((m, n), k, min(k + max(10, k), m, n))
        assert entry.tolerance == "auto" and entry.svd == "randomized" and entry.out_dtype == "bfloat16"
        assert 1 <= entry.power_iters <= 8
        assert entry.target == pytest.approx(max(0.25 * entry.rounding_floor, 0.01))
        assert entry.reached_cap or entry.estimated_error <= entry.target
        # the estimate is honest: the true error against the exact float64 update of these inputs
        xs = [sd[entry.name] for sd in models]
        avg = R.ref_mean(xs)
        exact = R.ref_cart_tensor(xs, k, 2.0) - avg
        true = float((merged[entry.name].to(F64) - avg - exact).norm() / exact.norm())
        assert true <= entry.estimated_error + 2 * entry.output_rounding, (entry, true)
    found = accuracy_record.summary(record)
    assert found["matrices"] == 2 and found["estimated"] == 2
    worst = max(record, key=lambda e: e.estimated_error)
    assert found["estimated_error"]["worst_tensor"] == worst.name
    targets = sorted(e.target for e in record)
    assert found["target"] == {"min": targets[0], "median": (targets[0] + targets[1]) / 2, "max": targets[1]}


def test_summary_table_states_the_record():
    """The markdown table the reports show: the record's own numbers, as percentages."""
    record = _record(task_models(), method="cart", lam=2.0)
    rows = dict(line.strip("|").split("|")[:2] for line in accuracy_record.summary_table(accuracy_record.summary(record))[2:])
    rows = {k.strip(): v.strip() for k, v in rows.items()}
    worst = max(record, key=lambda e: e.estimated_error)
    median = sum(e.estimated_error for e in record) / 2
    assert rows["low-rank matrices"] == "2 (2 with an error estimate)"
    assert rows["estimated update error"] == (
        f"median {100 * median:.3g} %, worst {100 * worst.estimated_error:.3g} % (`{worst.name}`)"
    )
    iters = sorted(e.power_iters for e in record)
    assert rows["power iterations"] == f"min {iters[0]}, median {sum(iters) / 2:g}, max {iters[1]}"
    assert rows["stopped at the cap above the target"] == str(sum(e.reached_cap for e in record))
    assert rows["target"].startswith(f"median {100 * sum(e.target for e in record) / 2:.3g} %")
    assert rows["rounding floor of the inputs"].startswith("median ")
    assert rows["bfloat16 output rounding"].startswith("median ")
    exact = accuracy_record.summary(_record(task_models(), svd="exact"))
    table = "\n".join(accuracy_record.summary_table(exact))
    assert "estimated update error" not in table and "| target |" not in table  # exact: neither is computed
    assert accuracy_record.summary_table({"matrices": 0}) == ["No low-rank matrix was recorded."]


def test_output_rounding_matches_brute_force(tmp_path):
    """The recorded ratio against ||bf16 output - fp32 output|| / ||fp32 output - theta_avg||."""
    models = task_models(dtype=torch.float32, strength=0.003)
    _, paths = write_set(tmp_path / "in", models[0], models)
    out16 = ccsmerge.merge_checkpoints(paths, tmp_path / "bf16", dtype="bfloat16", tolerance=0.01, device="cpu")
    out32 = ccsmerge.merge_checkpoints(paths, tmp_path / "fp32", tolerance=0.01, device="cpu")
    got16, got32 = load_output(out16), load_output(out32)
    records = {e.name: e for e in read_accuracy(out16)}
    for name in NAMES:
        avg = R.ref_mean([sd[name] for sd in models])
        brute = float((got16[name].to(F64) - got32[name].to(F64)).norm() / (got32[name].to(F64) - avg).norm())
        assert records[name].output_rounding == pytest.approx(brute, rel=0.1)
        assert brute > 4 * records[name].estimated_error  # an update 0.3 % of the weights: bf16 rounds it away
    assert all(e.output_rounding == 0.0 for e in read_accuracy(out32))
    lines = summary_lines(json.loads((out16 / ACCURACY_FILE).read_text())["summary"])
    assert lines[-1].startswith("warning: in 2 of 2 matrices the bfloat16 output's rounding")
    assert not any(line.startswith("warning") for line in summary_lines(accuracy_record.summary(read_accuracy(out32))))


@pytest.mark.parametrize("budget", [None, "300KB"])
def test_the_streamed_record_is_the_in_memory_one(tmp_path, budget):
    models = task_models()
    _, paths = write_set(tmp_path / "in", models[0], models)
    out = ccsmerge.merge_checkpoints(paths, tmp_path / "out", max_memory=budget, out_shard_size="20KB", device="cpu")
    if budget is not None:
        plan = ccsmerge.plan_checkpoints(paths, max_memory=budget, out_shard_size="20KB", device="cpu")
        assert any(t.block_rows is not None for t in plan.tensors if t.rank)
    expected = _record(models, device="cpu")
    got = read_accuracy(out)
    assert [e.name for e in got] == [e.name for e in expected]
    for a, b in zip(got, expected):
        assert (a.k, a.width, a.power_iters, a.reached_cap) == (b.k, b.width, b.power_iters, b.reached_cap)
        for field in ("estimated_error", "target", "rounding_floor", "output_rounding"):
            assert getattr(a, field) == pytest.approx(getattr(b, field), rel=1e-3), field
    assert index_of(out)["metadata"]["ccsmerge_accuracy"] == json.loads((out / ACCURACY_FILE).read_text())["summary"]
    assert not list(out.glob(".accuracy-*"))  # the per-shard records are gone once published


def test_a_resumed_merge_assembles_the_shards_records(tmp_path):
    models = task_models()
    _, paths = write_set(tmp_path / "in", models[0], models)
    options = dict(out_shard_size="12KB", device="cpu")
    ref = ccsmerge.merge_checkpoints(paths, tmp_path / "ref", **options)
    shards = shard_files(ref)
    weight_map = index_of(ref)["weight_map"]
    records = {e.name: e for e in read_accuracy(ref)}
    assert len(shards) >= 3
    # An interrupted merge: the recipe, the first two shards, each with the record it left
    out = tmp_path / "out"
    partial = partial_folder(out)
    partial.mkdir()
    shutil.copy2(ref / "ccsmerge.yml", partial)
    record_inputs(partial, paths)
    for i, shard in enumerate(shards[:2]):
        shutil.copy2(shard, partial / shard.name)
        mine = [records[n] for n, f in weight_map.items() if f == shard.name and n in records]
        accuracy_record.write_shard_record(partial, i, len(shards), mine)
    ccsmerge.merge_checkpoints(paths, out, resume=True, **options)
    assert (out / ACCURACY_FILE).read_bytes() == (ref / ACCURACY_FILE).read_bytes()
    # a shard finished without a record (by an older ccsmerge): counted, the rest recorded
    out = tmp_path / "older"
    partial = partial_folder(out)
    partial.mkdir()
    shutil.copy2(ref / "ccsmerge.yml", partial)
    record_inputs(partial, paths)
    shutil.copy2(shards[0], partial / shards[0].name)
    ccsmerge.merge_checkpoints(paths, out, resume=True, **options)
    found = json.loads((out / ACCURACY_FILE).read_text())["summary"]
    missing = [n for n, f in weight_map.items() if f == shards[0].name and n in records]
    assert found["matrices"] == len(records) - len(missing)
    assert found["shards_not_recorded"] == 1


def test_the_plan_predicts_width_iterations_and_target(tmp_path, capsys):
    from ccsmerge.cli import main

    for dtype, least in ((torch.bfloat16, True), (torch.float32, False)):
        models = task_models(dtype=dtype)
        _, paths = write_set(tmp_path / str(dtype), models[0], models)
        plan = ccsmerge.plan_checkpoints(paths, device="cpu")
        planned = {t.name: t.accuracy for t in plan.tensors if t.accuracy is not None}
        assert list(planned) == list(NAMES)
        recorded = {e.name: e for e in _record(models, device="cpu")}
        for name, p in planned.items():
            assert (p.width, p.power_iters, p.target, p.target_is_least) == (recorded[name].width, 8, 0.01, least)
            assert recorded[name].power_iters <= p.power_iters and recorded[name].target >= p.target
            if not least:  # fp32 inputs: the floor is far below, auto's target is its least
                assert recorded[name].target == p.target
        fixed = ccsmerge.plan_checkpoints(paths, device="cpu", tolerance=None).tensors
        assert {t.accuracy.describe() for t in fixed if t.accuracy is not None} == {"l=19 q=4 (fixed)", "l=17 q=4 (fixed)"}
        assert main(["plan", *[a for p in paths for a in ("--model", str(p))], "--device", "cpu"]) == 0
        shown = capsys.readouterr().out
        assert "accuracy" in shown.splitlines()[0] and f"q<=8 target {'>=' if least else ''}1%" in shown
        assert "tolerance auto" in shown.splitlines()[-1]


def _fixed_cart(xs, name, lam=2.0):
    """CART with the fixed algorithm's parts: 4 power iterations, oversample max(10, k)."""
    m, n = xs[0].shape
    k = int(0.12 * min(m, n))
    center = kernels.mean(xs)
    u, s, vh = randomized_svd_over_rows(
        lambda start, stop: (xs, center), (m, n), [(0, m)], k, oversample=max(10, k), power_iters=4,
        seed=tensor_seed(0, name), dtype=torch.float32, device=center.device,
    )
    left = (u * s.unsqueeze(-2)).permute(1, 0, 2).reshape(m, -1)
    return kernels.lowrank_update(center, left, vh.reshape(-1, n), lam, xs[0].dtype)


def test_tolerance_off_is_the_fixed_algorithm_byte_for_byte(tmp_path):
    from ccsmerge.cli import main

    models = task_models()
    record = []
    merged = ccsmerge.merge(models, tolerance=None, record=record)
    for name in NAMES:
        assert torch.equal(merged[name], _fixed_cart([sd[name] for sd in models], name))
    assert all(e.tolerance is None and e.estimated_error is None and e.power_iters == 4 for e in record)
    # "off" through the flags and the recorded recipe, which merges the same bytes again
    _, paths = write_set(tmp_path / "in", models[0], models)
    out = tmp_path / "cli"
    assert main(["merge", *[a for p in paths for a in ("--model", str(p))], "--tolerance", "off", "--device", "cpu",
                 "--quiet", "--out", str(out)]) == 0
    assert "tolerance: 'off'" in (out / "ccsmerge.yml").read_text() or "tolerance: off" in (out / "ccsmerge.yml").read_text()
    again = tmp_path / "again"
    assert main(["merge", str(out / "ccsmerge.yml"), "--device", "cpu", "--quiet", "--out", str(again)]) == 0
    for folder in (out, again):
        got = load_output(folder)
        assert all(torch.equal(got[n], merged[n]) for n in NAMES)
    default = ccsmerge.merge(models)
    assert not all(torch.equal(default[n], merged[n]) for n in NAMES)  # auto is the default now


def test_exact_svd_ignores_auto_and_refuses_a_number():
    models = task_models(dtype=torch.float32)
    record = []
    exact = ccsmerge.merge(models, svd="exact", record=record)
    assert ccsmerge.merge(models, svd="exact", tolerance="auto").keys() == exact.keys()
    assert record and all(e.svd == "exact" and e.estimated_error is None for e in record)
    with pytest.raises(ccsmerge.MergeError, match="tolerance applies to svd='randomized' only"):
        ccsmerge.merge(models, svd="exact", tolerance=0.01)
    # power_iters=0 is the plain sketch (nothing to adapt); with a number it is refused
    plain = _record(models, power_iters=0)
    assert plain and all(e.power_iters == 0 and e.tolerance is None for e in plain)
    with pytest.raises(ccsmerge.MergeError, match="power_iters caps"):
        ccsmerge.merge(models, power_iters=0, tolerance=0.05)
