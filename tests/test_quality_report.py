"""The MiniLM quality benchmark's report (benchmarks/quality/report.py) on made-up
results: the randomized-vs-exact paired difference with its SE and the 1-SE verdict,
against the formula worked out here, and the randomized merge's accuracy record."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("matplotlib", reason="the report draws its plots with matplotlib (the quality extra)")

import ccsmerge
from ccsmerge import accuracy_record

from benchmarks.quality import report
from benchmarks.quality.run import GRIDS, ROWS
from benchmarks.quality.tasks import Task

N = 40  # test examples per task


def _record():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, 48, generator=g)
    spectrum = torch.arange(1, 49, dtype=torch.float32).pow(-1.0)  # power-law task vectors, as fine-tunes have

    def task_vector():
        u, _ = torch.linalg.qr(torch.randn(64, 48, generator=g))
        v, _ = torch.linalg.qr(torch.randn(48, 48, generator=g))
        return (u * spectrum) @ v.T

    models = [{"layer.weight": base + 0.1 * task_vector()} for _ in range(3)]
    record = []
    ccsmerge.merge(models, method="cart", record=record, device="cpu")
    return accuracy_record.summary(record)


def _inputs():
    g = torch.Generator().manual_seed(1)
    tasks = [Task(name, name, "made up", ["a", "b"], []) for name in ("one", "two")]
    sizes = {t.name: {"train": 80, "val": 20, "test": N} for t in tasks}
    exact = [(torch.rand(N, generator=g) < 0.7).float() for _ in tasks]
    exact[0][:2] = 1.0
    same = [exact[0].clone(), exact[1].clone()]
    same[0][:2] = 0.0  # two examples of task one lost by the randomized merge at the exact setting
    setting = {"lam": 2.0, "rank_ratio": 0.08}
    found = _record()
    results = {key: {"test": [(torch.rand(N, generator=g) < 0.6).float() for _ in tasks], "val": 0.6,
                     "setting": {}} for key, _ in ROWS}
    results["cart_exact"] = {"test": exact, "val": 0.7, "setting": setting, "method": "cart"}
    results["cart_randomized"] = {"test": [c.clone() for c in exact], "val": 0.7,
                                  "setting": {**setting, "rank_ratio": 0.16}, "method": "cart", "accuracy": found}
    results["cart_randomized_at_exact_setting"] = {"test": same, "setting": setting, "accuracy": found}
    for key in ("task_arithmetic", "tsv_m", "iso_c", "iso_cts"):
        results[key]["setting"] = {"lam": 1.0}
    results["ties"]["setting"] = {"lam": 1.0, "density": 0.2}
    searches = {}
    for key, method in (("task_arithmetic", "task_arithmetic"), ("ties", "ties"), ("cart_exact", "cart"),
                        ("cart_randomized", "cart"), ("tsv_m", "tsv_m"), ("iso_c", "iso_c"), ("iso_cts", "iso_cts")):
        grid = GRIDS[method]
        axes = list(grid)
        points = [{}]
        for ax in axes:
            points = [{**p, ax: v} for p in points for v in grid[ax]]
        searches[key] = [{**p, "score": 0.5} for p in points]
    curve = [{"rank_ratio": rr, "lam": 2.0, "val": 0.7, "test": 0.7} for rr in GRIDS["cart"]["rank_ratio"]]
    curves = {"rank_ratio": {"cart_exact": curve, "cart_randomized": curve},
              "lam": {"cart_randomized": [{"lam": lam, "val": 0.7, "test": 0.7} for lam in GRIDS["cart"]["lam"]]}}
    meta = {
        "args": {"max_len": 40, "tuned_layers": 2, "scale": 20.0, "lr": 5e-4, "epochs": 5, "batch": 32, "seed": 0},
        "grids": GRIDS, "start_layer": 4, "n_evals": {"val": 1, "test": 1}, "sources": {"model": "made up"},
        "task_vectors": {"common_energy_share": 0.5, "mean_pairwise_cosine": 0.1, "centred_top8pct_energy": 0.3},
        "wall_s": 1.0, "phases": {"all": 1.0}, "cpu_s": 1.0, "loadavg_start": (0.0,), "loadavg_end": (0.0,),
        "n_merged_tensors": 1, "n_merged_params": 1, "first_loss": {"one": 1.0, "two": 1.0},
        "final_loss": {"one": 0.5, "two": 0.5},
    }
    return tasks, sizes, results, searches, curves, meta, found


def test_report_states_the_paired_difference_and_the_accuracy_record(tmp_path):
    tasks, sizes, results, searches, curves, meta, found = _inputs()
    report.write(tmp_path, tasks, sizes, results, searches, curves, meta, argv=["--out", "x"])
    # randomized - exact at the identical setting: task one loses 2 of N, task two nothing
    d = [-1.0] * 2 + [0.0] * (N - 2)
    mean = sum(d) / N
    var = sum((x - mean) ** 2 for x in d) / (N - 1)
    diff, se = 100 * mean / 2, 100 * math.sqrt(var / N) / 2
    dump = json.loads((tmp_path / "results.json").read_text())
    same = dump["randomized_vs_exact"]["paired_same_setting"]
    assert same["diff"] == pytest.approx(diff) and same["se"] == pytest.approx(se)
    assert same["within_1se"] is False and abs(diff) > se
    own = dump["randomized_vs_exact"]["paired_own_choice"]
    assert own == {"diff": 0.0, "se": 0.0, "within_1se": True}
    assert dump["accuracy_record"]["cart_randomized"] == json.loads(json.dumps(found))
    text = (tmp_path / "REPORT.md").read_text()
    assert f"{diff:+.2f} ± {se:.2f} points at the identical setting (NOT within 1 SE: {abs(diff) / se:.1f} SE)" in text
    assert "+0.00 ± 0.00 with each one's own choice (identical predictions on every test example)" in text
    worst = found["estimated_error"]["worst"]
    assert text.count(f"worst {100 * worst:.3g} % (`layer.weight`)") == 2  # both randomized merges' tables
    assert f"| power iterations | min {found['power_iters']['min']}," in text
    # one setting for both: one table, and a line saying the second is the same merge
    results["cart_randomized"]["setting"] = results["cart_exact"]["setting"]
    report.write(tmp_path, tasks, sizes, results, searches, curves, meta, argv=["--out", "x"])
    text = (tmp_path / "REPORT.md").read_text()
    assert text.count("| estimated update error |") == 1 and "the same merge, the same record" in text


def test_within_one_se_words_every_case():
    from ccsmerge.demo.report import within_one_se

    assert within_one_se(0.0, 0.0) == "identical predictions on every test example"
    assert within_one_se(0.03, 0.03) == "within 1 SE" and within_one_se(-0.02, 0.05) == "within 1 SE"
    assert within_one_se(0.1, 0.04) == "NOT within 1 SE: 2.5 SE"
    assert within_one_se(0.1, 0.0) == "NOT within 1 SE (SE 0)"  # no division by a zero SE
