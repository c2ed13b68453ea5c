"""`ccsmerge demo`, reduced (--quick grids): real digits, eight fine-tuned tasks.
Checks the finding it exists to show (CART above averaging, task arithmetic
and TIES; randomized CART equal to exact CART), and that what it merged from
disk matches plain PyTorch."""

import json

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("sklearn", reason="the demo's data set ships with scikit-learn (the demo extra)")

from ccsmerge.cli import main as ccsmerge_cli
from ccsmerge.demo.tasks import LOGIT_SCALE, Suite, embed


def load_folder(folder):
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    tensors = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(folder / shard))
    return tensors


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert ccsmerge_cli(["demo", "--quick", "--device", "cpu", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    return out, results, {row["label"]: row for row in results["rows"]}


def test_fine_tuning_learns_every_task(demo):
    _, _, rows = demo
    for pre, ind in zip(rows["pretrained"]["test"], rows["individual fine-tuned"]["test"]):
        assert ind > pre + 0.15 and ind > 0.9


def test_cart_beats_averaging_task_arithmetic_and_ties(demo):
    _, _, rows = demo
    cart = rows["CART (randomized)"]
    for other in ("average", "task arithmetic", "TIES"):
        gap, se = rows[other]["cart_minus_this"]
        assert cart["mean"] > rows[other]["mean"] + 0.05, other
        assert gap > 4 * se, other  # paired over every test example of every task


def test_randomized_cart_matches_exact(demo):
    _, results, rows = demo
    assert abs(rows["CART (randomized)"]["mean"] - rows["CART (exact SVD)"]["mean"]) <= 0.002
    assert abs(results["randomized_minus_exact"][0]) <= 0.2


def test_report_states_the_randomized_merges_accuracy_record(demo):
    """The randomized CART merge's record, as its folder's ccsmerge-accuracy.json sums it up
    (every 2-D weight of the encoder, estimated at tolerance auto), in results and report."""
    out, results, _ = demo
    written = json.loads((out / "merged" / "cart-randomized" / "ccsmerge-accuracy.json").read_text())
    found = results["randomized_accuracy"]
    assert found == written["summary"]
    weights = load_file(out / "models" / "pretrained" / "model.safetensors")
    assert found["matrices"] == found["estimated"] == sum(w.dim() == 2 for w in weights.values())
    assert all(t["tolerance"] == "auto" and t["svd"] == "randomized" for t in written["tensors"])
    assert found["target"]["min"] >= 0.01  # tolerance auto's least target
    if not found["reached_cap"]:
        assert found["estimated_error"]["worst"] <= found["target"]["max"]
    report = (out / "REPORT.md").read_text()
    worst = found["estimated_error"]["worst"]
    assert f"worst {100 * worst:.3g} % (`{found['estimated_error']['worst_tensor']}`)" in report
    gap, se = results["randomized_minus_exact"]
    verdict = "identical predictions" if gap == se == 0 else ("within 1 SE" if abs(gap) <= se else "NOT within 1 SE")
    assert f"same setting: {gap:+.2f} ± {se:.2f} points ({verdict}" in report


def test_rank_sweep_is_bell_shaped(demo):
    _, results, rows = demo
    lam = rows["CART (randomized)"]["setting"]["lam"]
    sweep = sorted((r["rank_ratio"], r["score"]) for r in results["sweeps"]["cart"] if r["lam"] == lam)
    best = max(range(len(sweep)), key=lambda i: sweep[i][1])
    assert 0 < best < len(sweep) - 1, sweep


def test_settings_were_chosen_on_validation(demo):
    _, results, rows = demo
    for method, table in results["sweeps"].items():
        best = max(table, key=lambda r: r["score"])
        label = {"task_arithmetic": "task arithmetic", "ties": "TIES", "cart": "CART (randomized)"}.get(method)
        if label:
            assert rows[label]["setting"] == {k: v for k, v in best.items() if k not in ("score", "test")}


def test_merges_from_disk_match_plain_pytorch(demo):
    out, results, rows = demo
    tasks = [load_file(out / "models" / name / "model.safetensors") for name in results["tasks"]]
    base = load_file(out / "models" / "pretrained" / "model.safetensors")
    average = load_folder(out / "merged" / "average")
    arithmetic = load_folder(out / "merged" / "task_arithmetic")
    lam = rows["task arithmetic"]["setting"]["lam"]
    for name, b in base.items():
        stack = torch.stack([t[name] for t in tasks]).double()
        torch.testing.assert_close(average[name].double(), stack.mean(0), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(
            arithmetic[name].double(), b.double() + lam * (stack - b.double()).sum(0), rtol=1e-5, atol=1e-5
        )


def test_report_and_plots_are_written(demo):
    out, _, _ = demo
    report = (out / "REPORT.md").read_text()
    assert "CART (randomized)" in report and "ccsmerge merge --method cart" in report
    for plot in ("rank_sweep.png", "lambda_sweep.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_training_is_deterministic():
    def build():
        suite = Suite(seed=3)
        pretrained = suite.pretrain(steps=10)
        return [pretrained, *suite.fine_tune_all(pretrained, steps=5)]

    for a, b in zip(build(), build()):
        for name in a:
            assert torch.equal(a[name], b[name]), name


def test_stacked_fine_tuning_equals_one_task_at_a_time():
    suite = Suite(seed=1)
    pretrained = suite.pretrain(steps=10)
    stacked = suite.fine_tune_all(pretrained, steps=5)
    for task in (0, 6, 7):  # a 10-class, the 2-class and the 3-class task
        x, y, head = suite.inputs(task, "train"), suite.labels(task, "train"), suite.heads[task]
        params = {k: v.clone().requires_grad_(True) for k, v in pretrained.items()}
        optimiser = torch.optim.Adam(params.values(), lr=1e-3)
        for _ in range(5):
            optimiser.zero_grad()
            torch.nn.functional.cross_entropy(LOGIT_SCALE * embed(params, x) @ head.T, y).backward()
            optimiser.step()
        for name, value in params.items():
            torch.testing.assert_close(stacked[task][name], value.detach(), rtol=1e-4, atol=1e-5)
