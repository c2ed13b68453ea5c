"""The `ccsmerge` command line: `merge` from flags or a YAML recipe (the two
give the same bytes, and an output's ccsmerge.yml makes it again), recipe
validation, `plan`, and errors as one `ccsmerge: error:` line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import ccsmerge
from ccsmerge.cli import main
from checkpoints import INT_BUFFER, folder_bytes, load_output, shard_files, toy_set, write_set


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    base, models = toy_set(3, width=32, vocab=48)
    root = tmp_path_factory.mktemp("cli")
    base_path, paths = write_set(root, base, models)
    return base, models, base_path, paths


def model_flags(paths, base=None):
    flags = [a for p in paths for a in ("--model", str(p))]
    return flags + (["--base", str(base)] if base is not None else [])


def run(argv, capsys):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_error_line(code, err, *fragments):
    assert code != 0
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ccsmerge: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ----------------------------------------------------------------------------- merge with flags


def test_merge_with_flags(tmp_path, small, capsys):
    base, models, base_path, paths = small
    out = tmp_path / "out"
    argv = ["merge", *model_flags(paths, base_path), *"--method ties --device cpu --density 0.3 --out".split(), out]
    code, stdout, err = run(argv, capsys)
    assert code == 0, err
    expected = ccsmerge.merge(models, "ties", base=base, density=0.3, device="cpu")
    got = load_output(out)
    assert all(torch.equal(got[n], t) for n, t in expected.items())
    assert "merging" in err and f"merged into {out}" in err  # the progress bar and the result
    assert stdout == ""


def test_quiet_prints_nothing(tmp_path, small, capsys):
    _, _, _, paths = small
    code, stdout, err = run(["merge", *model_flags(paths), "--quiet", "--out", tmp_path / "out"], capsys)
    assert code == 0
    assert stdout == "" and err == ""
    assert shard_files(tmp_path / "out")


def test_cli_equals_the_python_api(tmp_path, small, capsys):
    _, _, base_path, paths = small
    flags = "--rank-ratio 0.25 --lam 1.5 --dtype bfloat16 --out-shard-size 10KB --quiet --out".split()
    code, _, err = run(["merge", *model_flags(paths, base_path), *flags, tmp_path / "cli"], capsys)
    assert code == 0, err
    api = ccsmerge.merge_checkpoints(
        paths, tmp_path / "api", base=base_path, rank_ratio=0.25, lam=1.5, dtype="bfloat16", out_shard_size="10KB"
    )
    assert folder_bytes(tmp_path / "cli") == folder_bytes(api)


# ----------------------------------------------------------------------------- recipes


def write_recipe(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.parametrize("method", ["cart", "ties"])
def test_recipe_equals_flags_and_reproduces_itself(tmp_path, small, capsys, method):
    _, _, base_path, paths = small
    # Paths relative to the recipe's folder.
    recipe = write_recipe(
        tmp_path / "cfg.yml",
        {
            "merge_method": method,
            "base_model": os.path.relpath(base_path, tmp_path),
            "models": [{"model": os.path.relpath(p, tmp_path)} for p in paths],
            "parameters": {"lambda": 0.8, **({"rank_ratio": 0.25} if method == "cart" else {"density": 0.4})},
            "out_dtype": "float16",
        },
    )
    common = ["--quiet", "--out-shard-size", "20KB"]
    assert run(["merge", recipe, *common, "--out", tmp_path / "A"], capsys)[0] == 0
    flags = [*model_flags(paths, base_path), "--method", method]
    flags += f"--lam 0.8 {'--rank-ratio 0.25' if method == 'cart' else '--density 0.4'} --dtype float16".split()
    assert run(["merge", *flags, *common, "--out", tmp_path / "B"], capsys)[0] == 0
    a = folder_bytes(tmp_path / "A")
    assert len(shard_files(tmp_path / "A")) > 1
    assert a == folder_bytes(tmp_path / "B")
    assert load_output(tmp_path / "A")["lm_head.weight"].dtype == torch.float16

    # The recipe the output records makes the same output again.
    assert run(["merge", tmp_path / "A" / "ccsmerge.yml", *common, "--out", tmp_path / "C"], capsys)[0] == 0
    assert folder_bytes(tmp_path / "C") == a


def test_flags_override_the_recipe(tmp_path, small, capsys):
    _, _, _, paths = small
    recipe = write_recipe(
        tmp_path / "cfg.yml",
        {"merge_method": "cart", "models": [{"model": str(p)} for p in paths], "parameters": {"lambda": 2.0}},
    )
    assert run(["merge", recipe, "--lam", "0.5", "--quiet", "--out", tmp_path / "A"], capsys)[0] == 0
    assert run(["merge", *model_flags(paths), "--lam", "0.5", "--quiet", "--out", tmp_path / "B"], capsys)[0] == 0
    assert folder_bytes(tmp_path / "A") == folder_bytes(tmp_path / "B")
    assert yaml.safe_load((tmp_path / "A" / "ccsmerge.yml").read_text())["parameters"]["lambda"] == 0.5


def test_recipe_and_model_flags_together_are_refused(tmp_path, small, capsys):
    _, _, _, paths = small
    recipe = write_recipe(tmp_path / "cfg.yml", {"merge_method": "cart", "models": [{"model": str(p)} for p in paths]})
    code, _, err = run(["merge", recipe, *model_flags(paths[:1]), "--out", tmp_path / "out"], capsys)
    assert_one_error_line(code, err, str(recipe))
    assert not (tmp_path / "out").exists()


def _valid(paths) -> dict:
    return {"merge_method": "cart", "models": [{"model": str(p)} for p in paths]}


RECIPE_ERRORS = {
    # name: (edit of a valid recipe, fragments the error line must hold)
    "unknown-key": (
        lambda d: d.update(merge_methods="cart"),
        ["merge_methods", "unknown key", "merge_method", "models", "base_model"],
    ),
    "unknown-parameter": (
        lambda d: d.update(parameters={"lamda": 1.0}),
        ["parameters.lamda", "unknown key", "lambda", "rank_ratio", "density"],
    ),
    "unknown-method": (
        lambda d: d.update(merge_method="slerp"),
        ["merge_method", "'average'", "'task_arithmetic'", "'ties'", "'cart'"],
    ),
    "bad-value": (lambda d: d.update(parameters={"rank_ratio": "high"}), ["parameters.rank_ratio", "number"]),
    "bad-dtype": (lambda d: d.update(dtype="float64"), ["dtype", "bfloat16"]),
    "one-model": (lambda d: d.update(models=d["models"][:1]), ["models", "2"]),
    "model-typo": (lambda d: d["models"].__setitem__(0, {"modle": "x"}), ["models.0.modle", "unknown key"]),
}


@pytest.mark.parametrize("case", list(RECIPE_ERRORS))
def test_recipe_validation_errors(tmp_path, small, capsys, case):
    _, _, _, paths = small
    edit, fragments = RECIPE_ERRORS[case]
    data = _valid(paths)
    edit(data)
    recipe = write_recipe(tmp_path / "cfg.yml", data)
    code, _, err = run(["merge", recipe, "--out", tmp_path / "out"], capsys)
    assert_one_error_line(code, err, str(recipe), *fragments)
    assert listing(tmp_path) == ["cfg.yml"]


def test_out_of_range_parameter_in_recipe(tmp_path, small, capsys):
    _, _, _, paths = small
    data = _valid(paths)
    data["parameters"] = {"density": 1.5}
    code, _, err = run(["merge", write_recipe(tmp_path / "cfg.yml", data), "--out", tmp_path / "out"], capsys)
    assert_one_error_line(code, err, "density")


@pytest.mark.parametrize("text", ["merge_method: [cart\n", "- just\n- a list\n"], ids=["bad-yaml", "not-a-mapping"])
def test_unreadable_recipe(tmp_path, capsys, text):
    recipe = tmp_path / "cfg.yml"
    recipe.write_text(text)
    code, _, err = run(["merge", recipe, "--out", tmp_path / "out"], capsys)
    assert_one_error_line(code, err, str(recipe))


# ----------------------------------------------------------------------------- errors


def test_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, small, capsys):
    _, _, _, paths = small
    missing = tmp_path / "nowhere"
    argv = ["merge", *model_flags([paths[0], missing]), "--out", tmp_path / "out"]
    code, stdout, err = run(argv, capsys)
    assert_one_error_line(code, err, str(missing))
    assert stdout == ""
    code, _, err = run([*argv, "--debug"], capsys)
    assert code != 0
    assert "Traceback (most recent call last)" in err and "MergeError" in err
    assert err.splitlines()[-1].startswith("ccsmerge: error: ")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "extra,fragments",
    [
        (["--method", "ties"], ["ties", "base"]),
        (["--max-memory", "lots"], ["lots"]),
        (["--out-shard-size", "0"], ["positive"]),
        (["--device", "cuda:banana"], ["device"]),
    ],
    ids=["ties-without-base", "bad-size", "zero-shard-size", "bad-device"],
)
def test_bad_options(tmp_path, small, capsys, extra, fragments):
    _, _, _, paths = small
    code, _, err = run(["merge", *model_flags(paths), *extra, "--out", tmp_path / "out"], capsys)
    assert_one_error_line(code, err, *fragments)
    assert listing(tmp_path) == []


def test_one_model_is_refused(tmp_path, small, capsys):
    _, _, _, paths = small
    code, _, err = run(["merge", *model_flags(paths[:1]), "--out", tmp_path / "out"], capsys)
    assert_one_error_line(code, err, "at least 2 models, got 1")


def test_error_midway_is_one_line(tmp_path, capsys):
    base, models = toy_set(3, width=32, vocab=48)
    models[2]["layers.0.norm.weight"][3] = float("inf")
    _, paths = write_set(tmp_path, base, models)
    code, _, err = run(["merge", *model_flags(paths), "--quiet", "--out", tmp_path / "out"], capsys)
    assert_one_error_line(code, err, "'layers.0.norm.weight'", str(paths[2]))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["merge", "plan"])
def test_impossible_budget_is_a_clean_error(tmp_path, small, capsys, command):
    _, _, _, paths = small
    before = listing(tmp_path)
    out = ["--out", tmp_path / "out"] if command == "merge" else []
    code, _, err = run([command, *model_flags(paths), "--max-memory", "1KB", *out], capsys)
    assert_one_error_line(code, err, "memory budget", "1.0 KB")
    assert listing(tmp_path) == before


# ----------------------------------------------------------------------------- plan


def test_plan_prints_the_tensor_table_and_summary(tmp_path, small, capsys):
    _, models, base_path, paths = small
    before = listing(tmp_path), listing(base_path.parent)
    code, stdout, err = run(["plan", *model_flags(paths, base_path), "--max-memory", "250KB"], capsys)
    assert code == 0, err
    rows = {line.split()[0]: line.split("  ") for line in stdout.splitlines() if line.split()}
    sd = models[0]
    counts = {"average": 0, "copied": 0, "low-rank": 0}
    for name, t in sd.items():
        cells = [c.strip() for c in rows[name] if c.strip()]
        assert cells[1] == ("x".join(map(str, t.shape))), name
        assert cells[2] == str(t.dtype).removeprefix("torch."), name
        if not t.is_floating_point():
            policy = "copied"
        elif t.dim() == 2 and not any(key in name for key in ("embed", "lm_head")):
            policy = f"low-rank k={max(1, int(0.12 * min(t.shape)))}"
        else:
            policy = "average"
        assert cells[3] == policy, name
        counts[policy.split()[0]] += 1
    assert any("row blocks" in line for line in stdout.splitlines())
    lines = stdout.splitlines()
    summary = f"{len(sd)} tensors: " + ", ".join(f"{n} {p}" for p, n in sorted(counts.items()))
    assert summary in lines
    assert any(line.startswith("3 models and a base") for line in lines)
    assert any(line.startswith("estimated peak memory") and "(budget 250.0 KB)" in line for line in lines)
    assert any(line.startswith("reads ") and "writes" in line and "shard" in line for line in lines)
    assert (listing(tmp_path), listing(base_path.parent)) == before  # plans write nothing


def test_plan_from_a_recipe_equals_plan_from_flags(tmp_path, small, capsys):
    _, _, base_path, paths = small
    recipe = write_recipe(
        tmp_path / "cfg.yml",
        {
            "merge_method": "cart",
            "base_model": str(base_path),
            "models": [{"model": str(p)} for p in paths],
            "parameters": {"rank_ratio": 0.5, "lowrank_exclude": ["mlp"]},
        },
    )
    code, from_recipe, _ = run(["plan", recipe, "--max-memory", "250KB"], capsys)
    assert code == 0
    flags = [*model_flags(paths, base_path), *"--method cart --rank-ratio 0.5 --lowrank-exclude mlp".split()]
    code, from_flags, _ = run(["plan", *flags, "--max-memory", "250KB"], capsys)
    assert code == 0
    assert from_recipe == from_flags and "low-rank" in from_recipe and "exclude 'mlp'" in from_recipe


def test_lowrank_exclude_flag(small, capsys):
    _, _, _, paths = small
    code, stdout, _ = run(["plan", *model_flags(paths), "--lowrank-exclude", "mlp"], capsys)
    assert code == 0
    policies = {line.split()[0]: line for line in stdout.splitlines() if line.startswith("layers.")}
    assert "low-rank" in policies["layers.0.attn.q_proj.weight"]
    mlp = policies["layers.0.mlp.up_proj.weight"]
    assert "average" in mlp and "low-rank" not in mlp


def test_plan_shows_output_dtype(tmp_path, small, capsys):
    _, _, _, paths = small
    code, stdout, _ = run(["plan", *model_flags(paths), "--dtype", "bfloat16"], capsys)
    assert code == 0
    assert "float32->bfloat16" in stdout
    assert any(line.startswith(INT_BUFFER) and "int64" in line and "->" not in line for line in stdout.splitlines())


# ----------------------------------------------------------------------------- subprocesses


def cli_process(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ccsmerge", *argv], capture_output=True, text=True, timeout=300, check=False
    )


def test_python_dash_m_ccsmerge(tmp_path, small):
    _, models, _, paths = small
    out = tmp_path / "out"
    done = cli_process("merge", *model_flags(paths), "--method", "average", "--quiet", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == ""
    got = load_output(out)
    assert all(torch.equal(got[n], t) for n, t in ccsmerge.merge(models, "average", device="cpu").items())

    bad = cli_process("merge", *model_flags(paths), "--out", str(out))
    assert_one_error_line(bad.returncode, bad.stderr, "--overwrite")
    assert folder_bytes(out)  # left alone


def test_console_script_plan(small):
    _, _, _, paths = small
    script = Path(sys.executable).with_name("ccsmerge")
    if not script.exists():
        pytest.skip("the ccsmerge console script is not installed beside this Python")
    argv = [script, "plan", *model_flags(paths)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert "estimated peak memory" in done.stdout


def test_plan_names_the_rule_that_decided_each_tensor(small, capsys):
    _, _, _, paths = small
    code, stdout, _ = run(["plan", *model_flags(paths), "--lowrank-exclude", "up_proj"], capsys)
    assert code == 0
    rows = {line.split()[0]: line for line in stdout.splitlines()[1:] if line and not line[0].isdigit()}
    assert "decided by" in stdout.splitlines()[0]
    assert "exclude 'up_proj'" in rows["layers.0.mlp.up_proj.weight"]  # the user's pattern
    assert "default exclude 'lm_head'" in rows["lm_head.weight"]  # a default exclude, kept beside it
    assert "2-D weight" in rows["layers.0.attn.q_proj.weight"] and "low-rank" in rows["layers.0.attn.q_proj.weight"]
    assert "1-D" in rows["layers.0.norm.weight"]
