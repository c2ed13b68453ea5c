"""Mistakes at the command line: a typo'd flag, `--model A B`, a device
ccsmerge does not run on, a Hugging Face Hub id where a folder is expected,
sizes too large to be sizes, and a reader that goes away (`ccsmerge plan |
head`). Each gets a message that says what to type instead; none leaves an
output or a partial folder, or touches the inputs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import ccsmerge
from ccsmerge.streaming import partial_folder
from checkpoints import run_main, toy_set, tree_snapshot, write_set

VALID_DEVICES = "auto, cpu, cuda, cuda:N"
HUGE = "9" * 400


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """(root, base, [three models]) of the toy architecture."""
    root = tmp_path_factory.mktemp("usage")
    base, models = toy_set(3, width=16, vocab=16)
    base_path, paths = write_set(root, base, models)
    return root, base_path, paths


def flags(paths) -> list:
    return [a for p in paths for a in ("--model", p)]


def refused(inputs, tmp_path, capsys, argv) -> tuple[int, list[str]]:
    """Run ccsmerge argv (its `{out}` replaced by a fresh output path) and
    check that nothing was written: (exit code, stderr lines)."""
    root = inputs[0]
    out = tmp_path / "out"
    before = tree_snapshot(root)
    code, stdout, err = run_main([out if a == "{out}" else a for a in argv], capsys)
    assert stdout == "" and "Traceback" not in err, err
    assert not out.exists() and not partial_folder(out).exists()
    assert tree_snapshot(root) == before
    return code, err.splitlines()


def assert_usage_error(code, lines, command, *fragments):
    """argparse's refusal by the subcommand: its usage, then one error line."""
    assert code == 2, lines
    assert lines[0].startswith(f"usage: ccsmerge {command} "), lines  # the subcommand's usage, not the top level's
    assert lines[-1].startswith(f"ccsmerge {command}: error: "), lines
    for fragment in fragments:
        assert fragment in lines[-1], (fragment, lines[-1])


def assert_error_line(code, lines, *fragments):
    assert code == 1 and len(lines) == 1 and lines[0].startswith("ccsmerge: error: "), lines
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


# ----------------------------------------------------------------------------- typo'd flags

TYPOS = {
    # name: (command, typed, suggested)
    "underscore": ("merge", ["--rank_ratio", "0.1"], "--rank-ratio"),
    "misspelt": ("merge", ["--lamda", "2"], "--lam"),
    "plan-underscore": ("plan", ["--max_memory", "2GB"], "--max-memory"),
    "with-equals": ("plan", ["--out_shard_size=1GB"], "--out-shard-size"),
    "merge-only-flag": ("merge", ["--overwirte"], "--overwrite"),
}


@pytest.mark.parametrize("typo", list(TYPOS))
def test_a_typo_gets_the_subcommands_usage_and_the_closest_flag(inputs, tmp_path, capsys, typo):
    command, typed, suggested = TYPOS[typo]
    out = ["--out", "{out}"] if command == "merge" else []
    code, lines = refused(inputs, tmp_path, capsys, [command, *flags(inputs[2]), *typed, *out])
    assert_usage_error(code, lines, command, f"unrecognized arguments: {typed[0]}", f"did you mean {suggested}?")


def test_a_typo_in_the_index_command(inputs, tmp_path, capsys):
    argv = ["index", *flags(inputs[2]), "--rank_ratio", "0.1", "--out", "{out}"]
    code, lines = refused(inputs, tmp_path, capsys, argv)
    assert_usage_error(code, lines, "index", "--rank_ratio", "did you mean --rank-ratio?")


def test_an_unknown_word_gets_no_made_up_suggestion(inputs, tmp_path, capsys):
    code, lines = refused(inputs, tmp_path, capsys, ["plan", *flags(inputs[2]), "--zzzzzz"])
    assert_usage_error(code, lines, "plan", "unrecognized arguments: --zzzzzz")
    assert "did you mean" not in lines[-1]


# ----------------------------------------------------------------------------- --model A B


@pytest.mark.parametrize("command", ["merge", "plan", "search"])
def test_models_after_one_model_flag_are_explained(inputs, tmp_path, capsys, command):
    a, b, c = map(str, inputs[2])
    tail = {"merge": ["--out", "{out}"], "plan": [], "search": ["--evaluate", "json:loads"]}[command]
    code, lines = refused(inputs, tmp_path, capsys, [command, "--model", a, b, c, *tail])
    assert_usage_error(
        code, lines, command, f"'{b}', '{c}' follow --model {a}", "each model needs its own --model",
        f"(--model {a} --model {b} --model {c})",
    )


def test_one_model_after_a_model_flag_with_equals(inputs, tmp_path, capsys):
    a, b, c = map(str, inputs[2])
    code, lines = refused(inputs, tmp_path, capsys, ["plan", f"--model={a}", b, "--model", c])
    assert_usage_error(code, lines, "plan", f"'{b}' follows --model {a}", f"(--model {a} --model {b})")


# ----------------------------------------------------------------------------- devices


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "cuda:-1", "CUDA", "meta", "cuda:300"])
@pytest.mark.parametrize("command", ["plan", "merge", "index"])
def test_a_wrong_device_lists_the_valid_ones(inputs, tmp_path, capsys, command, device):
    out = ["--out", "{out}"] if command != "plan" else []
    code, lines = refused(inputs, tmp_path, capsys, [command, *flags(inputs[2]), "--device", device, *out])
    assert_error_line(code, lines, "device", repr(device), VALID_DEVICES)
    assert "xla" not in lines[0] and "vulkan" not in lines[0]  # not torch's list of device types


def test_cuda_300_is_not_taken_for_another_gpu():
    """torch keeps a device index in 8 bits: cuda:300 would quietly become cuda:44."""
    from ccsmerge.devices import parse_device

    with pytest.raises(ccsmerge.MergeError, match="GPU index 300 is out of range"):
        parse_device("cuda:300")
    assert parse_device("cuda:7") == torch.device("cuda", 7)
    assert parse_device("cpu") == torch.device("cpu")


# ----------------------------------------------------------------------------- Hub ids


@pytest.mark.parametrize("where", ["--model", "--base"])
def test_a_hub_id_says_how_to_download_it(inputs, tmp_path, capsys, where, monkeypatch):
    monkeypatch.chdir(tmp_path)  # org/name is relative: not a folder here
    _, base, paths = inputs
    if where == "--model":
        models = [*flags([paths[0], "org/name"]), "--base", base]
    else:
        models = [*flags(paths), "--base", "org/name"]
    code, lines = refused(inputs, tmp_path, capsys, ["merge", "--method", "ties", *models, "--out", "{out}"])
    assert_error_line(
        code, lines, "org/name: no such file or folder", "reads local folders",
        "huggingface-cli download org/name --local-dir DIR",
    )


def test_a_missing_path_that_is_no_hub_id_gets_no_hint(inputs, tmp_path, capsys):
    code, lines = refused(inputs, tmp_path, capsys, ["plan", *flags([inputs[2][0], tmp_path / "gone"])])
    assert_error_line(code, lines, f"{tmp_path / 'gone'}: no such file or folder")
    assert "huggingface" not in lines[0]


# ----------------------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    "option, value, fragments",
    [
        ("--max-memory", HUGE, ["max_memory", "too large", "400 characters"]),
        ("--out-shard-size", HUGE, ["out_shard_size", "too large"]),
        ("--max-gpu-memory", HUGE + "GB", ["max_gpu_memory", "too large"]),
        ("--max-memory", "9" * 5000, ["max_memory", "too large"]),  # past Python's 4300-digit conversion limit
        ("--max-memory", "9223372036854775808", ["max_memory", "too large"]),  # 2**63
        ("--out-shard-size", "1e400GB", ["out_shard_size", "cannot read"]),
    ],
)
@pytest.mark.parametrize("command", ["plan", "merge"])
def test_a_size_too_large_names_the_option(inputs, tmp_path, capsys, command, option, value, fragments):
    out = ["--out", "{out}"] if command == "merge" else []
    code, lines = refused(inputs, tmp_path, capsys, [command, *flags(inputs[2]), f"{option}={value}", *out])
    assert_error_line(code, lines, *fragments)


def test_sizes_are_exact_up_to_the_largest(capsys, inputs):
    from ccsmerge.sizes import MAX_SIZE, parse_size

    assert parse_size("4.35KB") == 4350  # float arithmetic gave 4349
    assert parse_size("0.5MiB") == 2**19
    assert parse_size(str(MAX_SIZE)) == MAX_SIZE == 2**63 - 1
    # The largest budget plans like any generous one.
    argv = ["plan", *flags(inputs[2]), f"--max-memory={MAX_SIZE}", f"--out-shard-size={MAX_SIZE}"]
    code, out, err = run_main(argv, capsys)
    assert code == 0, err
    assert "0 tensors merged in row blocks" in out


# ----------------------------------------------------------------------------- a closed pipe


def test_plan_into_head_exits_quietly(tmp_path):
    """`ccsmerge plan ... | head -2`: head closes the pipe after two lines; the
    plan stops without a word and exits 141 (128 + SIGPIPE), as cat and git do."""
    # Enough tensors that the plan (about 70 bytes a line) overfills the pipe.
    paths = []
    for i in range(2):
        (tmp_path / f"m{i}").mkdir()
        tensors = {f"layer{j:05d}.weight": torch.full((2,), float(i)) for j in range(4000)}
        save_file(tensors, tmp_path / f"m{i}" / "model.safetensors")
        paths.append(tmp_path / f"m{i}")
    env = dict(os.environ, PYTHONPATH=str(Path(ccsmerge.__file__).resolve().parents[1]))
    argv = [sys.executable, "-m", "ccsmerge", "plan", *map(str, flags(paths)), "--method", "average", "--device", "cpu"]
    plan = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    head = subprocess.run(["head", "-2"], stdin=plan.stdout, capture_output=True, text=True, timeout=300, check=False)
    plan.stdout.close()
    err = plan.stderr.read().decode()
    assert plan.wait(timeout=300) == 141, err
    assert err == ""  # no BrokenPipeError, no "Exception ignored"
    assert head.stdout.splitlines()[0].split() == ["tensor", "shape", "dtype", "policy", "decided", "by", "merged", "memory"]
    assert len(head.stdout.splitlines()) == 2
