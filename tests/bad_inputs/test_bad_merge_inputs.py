"""Bad inputs to a merge on disk, one table: every scenario runs through the
Python API (merge_checkpoints raises MergeError) and through the command line
(one `ccsmerge: error:` line, exit code 1). Each must name the offending file
(and tensor), leave no output and no partial folder, and leave every file
under the test folder, the inputs included, byte for byte as it was."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import yaml

from ccsmerge import MergeError, merge_checkpoints, plan_checkpoints
from ccsmerge.cli import main
from ccsmerge.streaming import partial_folder
from checkpoints import (
    budgets_until_accepted,
    load_output,
    raw_safetensors,
    shard_files,
    toy_set,
    tree_snapshot,
    write_checkpoint,
)

NAN = float("nan")
INF = float("inf")
_, MODELS = toy_set(3, width=32, vocab=32)
K = "layers.0.attn.k_proj.weight"
Q = "layers.0.attn.q_proj.weight"
V = "layers.0.attn.v_proj.weight"
BIAS = "layers.0.mlp.up_proj.bias"
NORM = "layers.0.norm.weight"
SHARD = "model-{:05d}-of-00003.safetensors"


class Case(NamedTuple):
    cli: list[str]  # `ccsmerge merge` arguments, without --out
    api: dict  # merge_checkpoints arguments, without out
    expect: list[str]  # fragments of the error message
    out: Path | None = None  # default: tmp_path / "out"
    exit_code: int = 1  # 2: refused by argparse, before ccsmerge's own checks
    cli_expect: tuple[str, ...] = ()  # further fragments of the command line's message


# ----------------------------------------------------------------------------- helpers


def write_models(tmp: Path, change: Callable[[list[dict]], None] | None = None, layout="safetensors") -> list[Path]:
    """The three toy models as folders tmp/ft0..ft2, after change(state dicts)."""
    sds = [{k: v.clone() for k, v in sd.items()} for sd in MODELS]
    if change is not None:
        change(sds)
    return [write_checkpoint(sd, tmp / f"ft{i}", layout, label=f"ft{i}") for i, sd in enumerate(sds)]


def both(paths, **options) -> tuple[list[str], dict]:
    """The same merge as command-line arguments and as merge_checkpoints arguments."""
    cli = [a for p in paths for a in ("--model", str(p))]
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        cli += [flag] if value is True else [f"{flag}={value}"]  # `=`: values such as -1GB are not options
    return cli, {"models": list(paths), **options}


class CreatesMarker:
    """Unpickling this creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# ----------------------------------------------------------------------------- scenarios

SCENARIOS: dict[str, Callable[[Path], Case]] = {}


def scenario(name: str, **bound):
    def register(builder):
        SCENARIOS[name] = (lambda tmp: builder(tmp, **bound)) if bound else builder
        return builder

    return register


@scenario("shape-differs")
def shape_differs(tmp):
    paths = write_models(tmp, lambda sds: sds[1].update({Q: torch.zeros(32, 16)}))
    return Case(*both(paths), [str(paths[1]), f"'{Q}'", "(32, 16)", "(32, 32)"])


@scenario("tensor-missing")
def tensor_missing(tmp):
    paths = write_models(tmp, lambda sds: sds[2].pop(BIAS))
    return Case(*both(paths), [str(paths[2]), f"'{BIAS}'", "missing"])


@scenario("extra-tensor")
def extra_tensor(tmp):
    paths = write_models(tmp, lambda sds: sds[2].update({"extra.weight": torch.zeros(4, 4)}))
    return Case(*both(paths), [str(paths[2]), "'extra.weight'"])


@scenario("dtype-differs")
def dtype_differs(tmp):
    paths = write_models(tmp, lambda sds: sds[1].update({NORM: sds[1][NORM].half()}))
    return Case(*both(paths), [str(paths[1]), f"'{NORM}'", "float16", "float32"])


@scenario("truncated-shard")
def truncated_shard(tmp):
    paths = write_models(tmp, layout="sharded-safetensors")
    shard = paths[1] / SHARD.format(2)
    shard.write_bytes(shard.read_bytes()[:-100])
    return Case(*both(paths), [str(shard)])


@scenario("random-bytes")
def random_bytes(tmp):
    paths = write_models(tmp)
    file = paths[2] / "model.safetensors"
    file.write_bytes(random.Random(0).randbytes(4096))
    return Case(*both(paths), [str(file)])


# name: (header, data, tensors the message names)
HEADERS = {
    "bad-json": (b'{"w": {"dtype": "F32", "shape": [2', bytes(16), []),
    "offsets-out-of-range": ({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}, bytes(16), []),
    "overlapping-ranges": (
        {
            "first.weight": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "second.weight": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
        },
        bytes(12),
        ["second.weight"],
    ),
}


def damaged_header(tmp, kind):
    header, data, tensors = HEADERS[kind]
    paths = write_models(tmp)
    file = paths[1] / "model.safetensors"
    file.write_bytes(raw_safetensors(header, data))
    return Case(*both(paths), [str(file), *tensors])


for _kind in HEADERS:
    scenario(f"header-{_kind}", kind=_kind)(damaged_header)


@scenario("index-names-missing-shard")
def index_names_missing_shard(tmp):
    paths = write_models(tmp, layout="sharded-safetensors")
    (paths[1] / SHARD.format(3)).unlink()
    index = paths[1] / "model.safetensors.index.json"
    lost = next(n for n, f in json.loads(index.read_text())["weight_map"].items() if f == SHARD.format(3))
    return Case(*both(paths), [str(index), SHARD.format(3), f"'{lost}'"])


@scenario("index-names-tensor-shard-lacks")
def index_names_tensor_shard_lacks(tmp):
    paths = write_models(tmp, layout="sharded-safetensors")
    index = paths[1] / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["ghost.weight"] = SHARD.format(1)
    index.write_text(json.dumps(data))
    return Case(*both(paths), [str(paths[1] / SHARD.format(1)), "'ghost.weight'"])


@scenario("pickle-runs-code")
def pickle_runs_code(tmp):
    paths = write_models(tmp)
    folder = paths[1]
    (folder / "model.safetensors").unlink()
    state = {k: v.clone() for k, v in MODELS[1].items()}
    torch.save({**state, "payload": CreatesMarker(tmp / "marker")}, folder / "pytorch_model.bin")
    # The marker would be a new file under tmp: the snapshot comparison catches it too.
    return Case(*both(paths), [str(folder / "pytorch_model.bin"), "weights_only"])


def nonfinite(tmp, value):
    def poison(sds):
        sds[1][V][3, 4] = value

    paths = write_models(tmp, poison)
    return Case(*both(paths), [f"'{V}'", "NaN or Inf", str(paths[1] / "model.safetensors")])


scenario("nan-input", value=NAN)(nonfinite)
scenario("inf-input", value=-INF)(nonfinite)


@scenario("model-path-missing")
def model_path_missing(tmp):
    paths = write_models(tmp)
    paths[1] = tmp / "nowhere"
    return Case(*both(paths), [str(tmp / "nowhere"), "no such file"])


def filled_output(tmp: Path) -> Path:
    out = tmp / "out"
    (out / "sub").mkdir(parents=True)
    (out / "keep.txt").write_text("earlier work\n")
    (out / "sub" / "model.safetensors").write_bytes(b"not to be touched")
    return out


@scenario("output-not-empty")
def output_not_empty(tmp):
    paths = write_models(tmp)
    out = filled_output(tmp)
    return Case(*both(paths), [str(out), "not empty", "--overwrite"], out=out)


@scenario("output-inside-input")
def output_inside_input(tmp):
    paths = write_models(tmp)
    return Case(*both(paths), [str(paths[1] / "merged"), str(paths[1]), "inside"], out=paths[1] / "merged")


@scenario("output-is-input")
def output_is_input(tmp):
    paths = write_models(tmp)
    return Case(*both(paths), [str(paths[1]), "replace"], out=paths[1])


@scenario("output-holds-input")
def output_holds_input(tmp):
    paths = write_models(tmp / "models")
    return Case(*both(paths), [str(tmp / "models"), "replace"], out=tmp / "models")


@scenario("one-model")
def one_model(tmp):
    paths = write_models(tmp)
    return Case(*both(paths[:1]), ["at least"])


BAD_OPTIONS = {
    # name: (option, value, fragments)
    "rank-ratio-zero": ("rank_ratio", 0.0, ["rank_ratio"]),
    "rank-ratio-above-one": ("rank_ratio", 1.5, ["rank_ratio"]),
    "rank-ratio-nan": ("rank_ratio", NAN, ["rank_ratio"]),
    "lam-nan": ("lam", NAN, ["lam", "finite"]),
    "lam-inf": ("lam", INF, ["lam", "finite"]),
    "density-zero": ("density", 0.0, ["density"]),
    "density-above-one": ("density", 1.5, ["density"]),
    "max-memory-lots": ("max_memory", "lots", ["'lots'"]),
    "max-memory-negative": ("max_memory", "-1GB", ["'-1GB'"]),
    "max-memory-zero": ("max_memory", "0", ["'0'", "positive"]),
}


def bad_option(tmp, option):
    key, value, fragments = BAD_OPTIONS[option]
    return Case(*both(write_models(tmp), **{key: value}), fragments)


for _option in BAD_OPTIONS:
    scenario(f"option-{_option}", option=_option)(bad_option)


@scenario("unknown-method")
def unknown_method(tmp):
    # argparse refuses it (exit code 2); the API's MergeError lists the valid methods.
    valid = ["average", "task_arithmetic", "ties", "cart"]
    return Case(*both(write_models(tmp), method="slerp"), valid, exit_code=2, cli_expect=("'slerp'",))


@scenario("unknown-recipe-key")
def unknown_recipe_key(tmp):
    paths = write_models(tmp)
    recipe = tmp / "recipe.yml"
    data = {"merge_method": "cart", "models": [{"model": str(p)} for p in paths], "parameters": {"lamda": 1.0}}
    recipe.write_text(yaml.safe_dump(data))
    # The recipe's `parameters` and the API's options: either way the valid names are listed.
    api = {"models": paths, "lamda": 1.0}
    return Case([str(recipe)], api, ["lamda", "valid", "rank_ratio", "power_iters"], cli_expect=(str(recipe), "lambda"))


@scenario("different-architectures")
def different_architectures(tmp):
    def rename(sds):
        sds[1] = {"model." + k: v for k, v in sds[1].items()}

    paths = write_models(tmp, rename)
    return Case(*both(paths), [str(paths[1]), "'embed_tokens.weight'", "missing"])


@scenario("budget-below-one-row-block")
def budget_below_one_row_block(tmp):
    paths = write_models(tmp)
    # embed_tokens.weight (averaged) fits in 1 KB row blocks; the first low-rank tensor does not.
    return Case(*both(paths, max_memory="1KB"), [f"'{K}'", "(32, 32)", "needs at least", "1.0 KB"])


# ----------------------------------------------------------------------------- the table


def run_cli(argv, capsys) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("via", ["api", "cli"])
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_bad_input_is_refused_cleanly(tmp_path, capsys, name, via):
    case = SCENARIOS[name](tmp_path)
    out = case.out or tmp_path / "out"
    out_existed = out.exists()
    before = tree_snapshot(tmp_path)

    if via == "api":
        with pytest.raises(MergeError) as info:
            merge_checkpoints(out=out, device="cpu", **case.api)
        message = str(info.value)
    else:
        code, stdout, err = run_cli(["merge", *case.cli, "--device", "cpu", "--quiet", "--out", out], capsys)
        assert code == case.exit_code, err
        assert stdout == "" and "Traceback" not in err
        lines = err.splitlines()
        if case.exit_code == 2:  # argparse: its usage, then one error line
            assert lines[-1].startswith("ccsmerge merge: error: "), err
        else:
            assert len(lines) == 1 and lines[0].startswith("ccsmerge: error: "), err
        message = lines[-1]
        assert all(fragment in message for fragment in case.cli_expect), (case.cli_expect, message)

    for fragment in case.expect:
        assert fragment in message, (fragment, message)
    assert tree_snapshot(tmp_path) == before  # inputs untouched, nothing new (no marker, no output)
    assert out.exists() == out_existed
    assert not partial_folder(out).exists()


# ----------------------------------------------------------------------------- what the flags allow


@pytest.mark.parametrize("via", ["api", "cli"])
@pytest.mark.parametrize("method", ["average", "cart"])
def test_allow_nonfinite_merges_nan_and_inf(tmp_path, capsys, method, via):
    def poison(sds):
        sds[1][V][3, 4] = NAN
        sds[2][NORM][0] = INF

    paths = write_models(tmp_path, poison)
    out = tmp_path / "out"
    before = tree_snapshot(tmp_path)
    if via == "api":
        merge_checkpoints(paths, out, method=method, device="cpu", allow_nonfinite=True)
    else:
        cli, _ = both(paths, method=method, allow_nonfinite=True)
        code, _, err = run_cli(["merge", *cli, "--device", "cpu", "--quiet", "--out", out], capsys)
        assert code == 0, err
    merged = load_output(out)
    assert merged[V].isnan().any() and merged[NORM].isinf().any()
    assert merged[Q].isfinite().all()
    assert {k: v for k, v in tree_snapshot(tmp_path).items() if not k.startswith("out")} == before
    assert not partial_folder(out).exists()


def test_the_minimum_budget_named_is_enough(tmp_path):
    """Raising the budget to the minimum a refusal names lets that tensor through."""
    paths = write_models(tmp_path)
    refused = budgets_until_accepted(
        lambda budget: plan_checkpoints(paths, max_memory=budget, device="cpu"), 1000,
        r"tensor '([^']+)' .*needs at least ([\d.]+ [KMG]?B) ", slack=100,  # the message rounds to 0.1 KB
    )
    assert K in refused


@pytest.mark.parametrize("via", ["api", "cli"])
def test_overwrite_replaces_a_non_empty_output(tmp_path, capsys, via):
    paths = write_models(tmp_path)
    out = filled_output(tmp_path)
    inputs = {k: v for k, v in tree_snapshot(tmp_path).items() if not k.startswith("out")}
    if via == "api":
        merge_checkpoints(paths, out, device="cpu", overwrite=True)
    else:
        cli, _ = both(paths, overwrite=True)
        code, _, err = run_cli(["merge", *cli, "--device", "cpu", "--quiet", "--out", out], capsys)
        assert code == 0, err
    assert not (out / "keep.txt").exists() and not (out / "sub").exists()
    assert shard_files(out) and set(load_output(out)) == set(MODELS[0])
    assert {k: v for k, v in tree_snapshot(tmp_path).items() if not k.startswith("out")} == inputs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ft0", "ft1", "ft2", "out"]  # no partial, no old copy
