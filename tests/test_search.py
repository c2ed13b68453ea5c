"""ccsmerge.search against brute force: every setting of the grid merged on
its own with ccsmerge.merge and scored with the same evaluator."""

from __future__ import annotations

import pytest
import torch

import ccsmerge
import reference as R
from ccsmerge import lowrank
from ccsmerge.synthetic import decaying_matrix


def task_set(T=4, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = {
        "layer.weight": torch.randn(48, 40, generator=g, dtype=dtype),
        "other.weight": torch.randn(30, 36, generator=g, dtype=dtype),
        "layer.bias": torch.randn(40, generator=g, dtype=dtype),
        "steps": torch.tensor([7]),
    }
    models = []
    for _ in range(T):
        sd = dict(base)
        for name in ("layer.weight", "other.weight"):
            sd[name] = base[name] + decaying_matrix(*base[name].shape, generator=g, dtype=dtype)
        sd["layer.bias"] = base["layer.bias"] + 0.1 * torch.randn(40, generator=g, dtype=dtype)
        models.append(sd)
    return base, models


def make_evaluator(target):
    """Higher is better: minus the distance to a target state dict."""

    def evaluate(state):
        assert state["steps"].dtype == torch.int64
        floats = [n for n, t in target.items() if t.is_floating_point()]
        return -sum(float((state[n].double() - target[n].double()).norm()) for n in floats)

    return evaluate


GRIDS = {
    "cart": dict(lam=[0.5, 1.0, 2.0], rank_ratio=[0.05, 0.1, 0.3]),
    "task_arithmetic": dict(lam=[0.2, 0.5, 1.0]),
    "ties": dict(lam=[0.5, 1.0], density=[0.1, 0.5]),
    "tsv_m": dict(lam=[0.5, 1.0]),
    "iso_c": dict(lam=[0.5, 1.5]),
    "iso_cts": dict(lam=[0.5, 1.0], common_space_fraction=[0.5, 0.8]),
}


@pytest.mark.parametrize("method", list(GRIDS))
def test_search_equals_brute_force(method):
    base, models = task_set()
    target = models[0]
    evaluate = make_evaluator(target)
    needs_base = method != "cart"
    grid = GRIDS[method]
    base_arg = base if needs_base else None
    result = ccsmerge.search(models, evaluate, method, base=base_arg, **R.exact_svd(method), device="cpu", **grid)
    others = [values for axis, values in grid.items() if axis != "lam"]
    assert len(result.table) == len(grid["lam"]) * (len(others[0]) if others else 1)
    for row in result.table:
        setting = {k: v for k, v in row.items() if k != "score"}
        merged = ccsmerge.merge(models, method, base=base if needs_base else None, **R.exact_svd(method), device="cpu", **setting)
        assert row["score"] == pytest.approx(evaluate(merged), rel=1e-10), setting
    assert result.best_score == max(row["score"] for row in result.table)
    best_row = max(result.table, key=lambda row: row["score"])
    assert {k: v for k, v in best_row.items() if k != "score"} == result.best


def test_cart_grid_computes_each_matrix_svd_once(monkeypatch):
    base, models = task_set(dtype=torch.float32)
    calls = []
    real = lowrank.randomized_svd_over_rows

    def counting(rows, shape, spans, k, **kw):
        calls.append(k)
        return real(rows, shape, spans, k, **kw)

    real_adaptive = lowrank.adaptive_randomized_svd_over_rows

    def counting_adaptive(rows, shape, spans, k, **kw):  # tolerance="auto", the default
        calls.append(k)
        return real_adaptive(rows, shape, spans, k, **kw)

    monkeypatch.setattr(ccsmerge.methods.cart, "randomized_svd_over_rows", counting)
    monkeypatch.setattr(ccsmerge.methods.cart, "adaptive_randomized_svd_over_rows", counting_adaptive)
    grid = dict(lam=[0.5, 1, 1.5, 2, 3], rank_ratio=[0.05, 0.1, 0.15, 0.2, 0.3])
    result = ccsmerge.search(models, make_evaluator(models[1]), "cart", device="cpu", **grid)
    assert len(result.table) == 25
    assert len(calls) == 2  # one per low-rank matrix, at the largest rank
    assert sorted(calls) == sorted(max(1, int(0.3 * min(s))) for s in [(48, 40), (30, 36)])


def test_randomized_cart_search_is_close_to_brute_force():
    base, models = task_set(dtype=torch.float32)
    evaluate = make_evaluator(models[2])
    result = ccsmerge.search(models, evaluate, "cart", lam=[1.0, 2.0], rank_ratio=[0.1, 0.3], device="cpu")
    for row in result.table:
        merged = ccsmerge.merge(models, "cart", lam=row["lam"], rank_ratio=row["rank_ratio"], device="cpu")
        assert row["score"] == pytest.approx(evaluate(merged), rel=1e-3)


def test_bad_grids_are_refused():
    base, models = task_set()
    with pytest.raises(ccsmerge.MergeError, match="no 'density'"):
        ccsmerge.search(models, lambda sd: 0.0, "cart", density=[0.1])
    with pytest.raises(ccsmerge.MergeError, match="rank_ratio"):
        ccsmerge.search(models, lambda sd: 0.0, "cart", rank_ratio=[0.1, 1.5])
    with pytest.raises(ccsmerge.MergeError, match="at least one value"):
        ccsmerge.search(models, lambda sd: 0.0, "cart", lam=[])
    with pytest.raises(ccsmerge.MergeError, match="rank fixes CART's k"):
        ccsmerge.search(models, lambda sd: 0.0, "cart", rank=3, rank_ratio=[0.1, 0.2])


def test_cli_search(tmp_path, monkeypatch, capsys):
    from checkpoints import toy_set, write_set

    from ccsmerge.cli import main

    base, models = toy_set(3, width=32, vocab=48)
    _, paths = write_set(tmp_path, base, models)
    (tmp_path / "scoring.py").write_text(
        "def closeness(state):\n"
        "    import torch\n"
        "    return -float(sum(t.double().norm() for t in state.values() if t.is_floating_point()))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    args = ["search", "--method", "cart", "--evaluate", "scoring:closeness", "--lam", "0.5,2"]
    args += ["--rank-ratio", "0.1,0.2"]
    assert main(args + ["--device", "cpu"] + [a for p in paths for a in ("--model", str(p))]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 + 4 + 1 and out[-1].startswith("best: ")
    assert main(["search", "--evaluate", "scoring:missing", "--model", str(paths[0]), "--model", str(paths[1])]) == 1
    assert "cannot load it" in capsys.readouterr().err
