"""benchmarks/whole_merge.py's quick path end to end: generated bf16 fine-tunes on disk, the
official-style script and `ccsmerge merge --method cart` in subprocesses, and the accuracy
comparison (no timings asserted)."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import whole_merge as wm


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "PYTHONPATH"):  # run_all sets them for its children
        mp.setenv(key, "")
    try:
        root = tmp_path_factory.mktemp("whole-merge")
        manifest = wm.generate(wm.QUICK, root / "cache")
        plan = {name: flags for name, flags in wm.variants(False).items() if name != "ccsmerge --tolerance off"}
        runs = wm.run_all(manifest, root / "runs", 1, 2, plan)
        yield manifest, runs, wm.accuracy(manifest, runs["outs"], wm.QUICK.layers, 2)
    finally:
        mp.undo()


def test_inputs_are_sharded_llama_folders(quick_run):
    manifest, _, _ = quick_run
    layout = wm.QUICK
    for folder in manifest["models"]:
        index = json.loads((wm.Path(folder) / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) == layout.shards
        assert json.loads((wm.Path(folder) / "config.json").read_text())["model_type"] == "llama"
    read = [wm.Reader(wm.Path(m)) for m in manifest["models"]]
    name = "model.layers.0.mlp.down_proj.weight"
    assert read[0](name).dtype == torch.bfloat16
    xs = [r(name).double() for r in read]
    base_norm = (sum(xs) / len(xs)).norm()
    tau = xs[1] - xs[0]  # own_1 - own_0: a task-vector difference, ~2-3 % of the weights
    assert 0.005 < float(tau.norm() / base_norm) < 0.06
    s = torch.linalg.svdvals(tau)
    assert s[0] > 10 * s[len(s) // 2]  # a decaying spectrum, not white noise


def test_same_tensor_policy_as_ccsmerge(quick_run):
    _, runs, acc = quick_run
    assert acc["lowrank_tensors"] == 7 * wm.QUICK.layers  # q, k, v, o, gate, up, down
    assert acc["averaged_tensors"] == 2 + 2 * wm.QUICK.layers + 1  # embed, lm_head, norms
    record = json.loads((runs["outs"]["ccsmerge (defaults: tolerance auto)"] / "ccsmerge-accuracy.json").read_text())
    assert {t["name"] for t in record["tensors"]} == {r["tensor"] for r in acc["reference"]}


def test_updates_agree_with_the_official_style_script(quick_run):
    _, _, acc = quick_run
    # the engine alone: ccsmerge's float32 output against the exact float32 update (torch.linalg.svd)
    assert len(acc["reference"]) == 7 * wm.QUICK.layers
    assert max(r["float32_output_vs_exact"] for r in acc["reference"]) <= 0.05
    # the averaged tensors: the same mean, up to one bf16 rounding
    assert max(acc["averaged_vs_official_worst"].values()) <= 2.0**-8
    # both outputs bf16: the engine's error and the two roundings of nearly equal values (measured: 6.7 %)
    assert acc["update_vs_official"]["ccsmerge (defaults: tolerance auto)"]["worst"] <= 0.10
