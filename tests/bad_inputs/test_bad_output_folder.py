"""What goes wrong around the output folder, and what ccsmerge does about it:
inputs changed before a resume, the dtype and the aux files of the output,
full disks at every step, outputs that cannot be written (the current
folder, an empty path, an input), two runs into one output, SIGTERM, and the
same rules for `index` and `export-task`. Each case goes through the command
line where the user meets it: one `ccsmerge: error:` line naming the file,
exit code 1, no partial folder left (unless it is kept for --resume), inputs
untouched, and the same command working once the cause is gone."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ccsmerge import output_folder
from ccsmerge.cli import main
from ccsmerge.shard_writer import ShardWriter
from ccsmerge.streaming import partial_folder
from checkpoints import folder_bytes, load_output, shard_files, toy_set, write_set

REPO = str(Path(__file__).resolve().parents[2])
SHARD_SIZE = "4KB"  # many shards, so that a run can be stopped between two of them
ENOSPC = "No space left on device"


def model_flags(paths, base=None) -> list[str]:
    flags = [a for p in paths for a in ("--model", str(p))]
    return flags + (["--base", str(base)] if base is not None else [])


def merge_argv(paths, out, *extra, base=None) -> list[str]:
    return ["merge", *model_flags(paths, base), "--device", "cpu", "--quiet", "--out-shard-size", SHARD_SIZE,
            "--out", str(out), *extra]


def cli(argv, capsys) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ccsmerge: error: "), err
    assert "Traceback" not in err
    return lines[0]


def leftovers(folder: Path) -> list[str]:
    """ccsmerge's hidden folders under folder (partial, private, replaced)."""
    return sorted(p.name for p in folder.iterdir() if ".ccsmerge-" in p.name)


def fresh_models(root: Path, count: int = 3, **kwargs):
    base, models = toy_set(count, width=32, vocab=48, **kwargs)
    return write_set(root, base, models)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """(root, base path, model paths, the bytes of their average): inputs no test changes."""
    root = tmp_path_factory.mktemp("toy")
    base_path, paths = fresh_models(root / "in")
    assert main(merge_argv(paths, root / "reference", "--method", "average")) == 0
    return root, base_path, paths, folder_bytes(root / "reference")


def env_with_repo() -> dict:
    return {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}


# A ccsmerge command whose shard writer pauses after every finished shard,
# and while a hold file exists: a run that is reliably still going when the
# test acts on it.
SLOW_CLI = """
import os, sys, time
from ccsmerge import shard_writer
from ccsmerge.cli import main

close = shard_writer.ShardWriter.close
pause, hold = float(sys.argv[1]), sys.argv[2]

def slow_close(self):
    close(self)
    time.sleep(pause)
    while os.path.exists(hold):
        time.sleep(0.01)

shard_writer.ShardWriter.close = slow_close
sys.exit(main(sys.argv[3:]))
"""


def start_slow(tmp_path: Path, argv, pause: float = 0.3, hold: Path | None = None) -> subprocess.Popen:
    script = tmp_path / "slow_cli.py"
    script.write_text(SLOW_CLI)
    log = open(tmp_path / "slow-stderr.txt", "wb")  # noqa: SIM115 (closed with the process)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(pause), str(hold or tmp_path / "no-hold"), *map(str, argv)],
        stdout=subprocess.DEVNULL, stderr=log, env=env_with_repo(), cwd=REPO,
    )
    log.close()
    return proc


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, "the run ended before the test could act on it"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def interrupt_after_first_shard(monkeypatch) -> None:
    """Ctrl-C as soon as the first shard is finished (raised in the writer, re-raised by the merge)."""
    close = ShardWriter.close

    def close_then_interrupt(self):
        close(self)
        raise KeyboardInterrupt

    monkeypatch.setattr(ShardWriter, "close", close_then_interrupt)


# ----------------------------------------------------------------------------- 4: resume after an input changed


@pytest.mark.parametrize("change", ["values", "header", "none"])
def test_resume_refuses_an_input_changed_at_the_same_path(tmp_path, capsys, monkeypatch, change):
    _, models = toy_set(3, width=32, vocab=48)
    paths = []
    for i, sd in enumerate(models):
        (tmp_path / f"ft{i}").mkdir()
        save_file(sd, tmp_path / f"ft{i}" / "model.safetensors", metadata={"note": "first"})
        paths.append(tmp_path / f"ft{i}")
    out = tmp_path / "out"
    assert main(merge_argv(paths, tmp_path / "reference", "--method", "average")) == 0
    capsys.readouterr()

    with monkeypatch.context() as patched:
        interrupt_after_first_shard(patched)
        code, err = cli(merge_argv(paths, out, "--method", "average"), capsys)
    assert code == 130 and "--resume" in err, err
    partial = partial_folder(out)
    assert shard_files(partial)

    changed = paths[1] / "model.safetensors"
    before = changed.stat()
    if change == "values":  # same names, shapes and size: only the modification time tells
        sd = {k: v + 1 if v.is_floating_point() else v for k, v in models[1].items()}
        save_file(sd, changed, metadata={"note": "first"})
        os.utime(changed, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    elif change == "header":  # same size and modification time, another header
        save_file(models[1], changed, metadata={"note": "other"})
        os.utime(changed, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert changed.stat().st_size == before.st_size
    kept = folder_bytes(partial)

    code, err = cli(merge_argv(paths, out, "--method", "average", "--resume"), capsys)
    if change == "none":
        assert code == 0, err
        assert folder_bytes(out) == folder_bytes(tmp_path / "reference")
        return
    line = one_error_line(err)
    assert code == 1
    assert str(changed.resolve()) in line and "changed since the interrupted merge began" in line, line
    assert ("modification time" if change == "values" else "header") in line, line
    assert folder_bytes(partial) == kept and not out.exists()  # refused: left as it was
    assert cli(merge_argv(paths, out, "--method", "average", "--overwrite"), capsys)[0] == 0
    assert not partial.exists()


def test_an_input_changed_during_the_merge_is_refused_before_publishing(tmp_path, capsys, monkeypatch):
    _, paths = fresh_models(tmp_path / "in")
    out = tmp_path / "out"
    changed = paths[2] / "model.safetensors"
    close = ShardWriter.close

    def close_then_touch(self):
        close(self)
        later = changed.stat().st_mtime_ns + 10**9
        os.utime(changed, ns=(later, later))  # rewritten in place by someone else, say

    monkeypatch.setattr(ShardWriter, "close", close_then_touch)
    code, err = cli(merge_argv(paths, out, "--method", "average"), capsys)
    line = one_error_line(err)
    assert code == 1 and str(changed.resolve()) in line and "changed while it was being read" in line, line
    assert not out.exists() and leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- 5: the output dtype in config.json


@pytest.mark.parametrize("keys", [("torch_dtype",), ("dtype",), ("torch_dtype", "dtype")])
def test_config_json_records_the_output_dtype(tmp_path, capsys, keys):
    base_path, paths = fresh_models(tmp_path / "in", dtype=torch.bfloat16)
    config = {"model_type": "toy", **{k: "bfloat16" for k in keys}, "hidden_size": 32,
              "text_config": {"hidden_size": 32, keys[0]: "bfloat16"}, "quantization_config": {"bits": 4}}
    for folder in [base_path, *paths]:
        (folder / "config.json").write_text(json.dumps(config, indent=2))
    out = tmp_path / "out"
    assert cli(merge_argv(paths, out, "--method", "average", "--dtype", "float32"), capsys)[0] == 0
    merged = load_output(out)
    assert {t.dtype for t in merged.values() if t.is_floating_point()} == {torch.float32}
    expected = json.loads(json.dumps(config))
    expected.update({k: "float32" for k in keys})
    expected["text_config"][keys[0]] = "float32"
    assert json.loads((out / "config.json").read_text()) == expected
    assert list(json.loads((out / "config.json").read_text())) == list(expected)  # the keys keep their order
    for name in ("tokenizer.json", "generation_config.json"):  # the other files: byte for byte
        assert (out / name).read_bytes() == (paths[0] / name).read_bytes()

    # Without --dtype the output keeps the inputs' dtype, and config.json its bytes.
    assert cli(merge_argv(paths, tmp_path / "same", "--method", "average"), capsys)[0] == 0
    assert (tmp_path / "same" / "config.json").read_bytes() == (paths[0] / "config.json").read_bytes()


def test_a_config_that_cannot_carry_the_dtype_is_refused_before_merging(tmp_path, capsys):
    _, paths = fresh_models(tmp_path / "in", dtype=torch.bfloat16)
    (paths[0] / "config.json").write_text('{"torch_dtype": "bfloat16",')
    out = tmp_path / "out"
    code, err = cli(merge_argv(paths, out, "--method", "average", "--dtype", "float32"), capsys)
    line = one_error_line(err)
    assert code == 1 and str(paths[0] / "config.json") in line and "float32" in line, line
    assert not out.exists() and leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- 7: each aux file from its own source


@pytest.mark.parametrize("with_base", [True, False])
def test_each_aux_file_comes_from_the_first_source_that_has_it(tmp_path, capsys, with_base):
    base_path, paths = fresh_models(tmp_path / "in")
    # base: config only; ft0: config, tokenizer_config; ft1: + tokenizer.json; ft2: everything.
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (base_path / name).unlink()
    for name in ("tokenizer.json", "generation_config.json"):
        (paths[0] / name).unlink()
    (paths[1] / "generation_config.json").unlink()
    out = tmp_path / "out"
    base = ["--base", str(base_path)] if with_base else []
    assert cli(merge_argv(paths, out, "--method", "average", *base), capsys)[0] == 0
    sources = ([base_path] if with_base else []) + paths
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        source = next(folder for folder in sources if (folder / name).is_file())
        assert (out / name).read_bytes() == (source / name).read_bytes(), name


# ----------------------------------------------------------------------------- 9: full disks, at every step


def _failing_fsync(match: str):
    fsync = os.fsync

    def failing(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(match):
            raise OSError(errno.ENOSPC, ENOSPC)  # a full disk surfaces at the sync, naming no file
        return fsync(fd)

    return failing


def _failing_lock_write():
    write = os.write

    def failing(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(output_folder.LOCK_FILE):
            raise OSError(errno.ENOSPC, ENOSPC)
        return write(fd, data)

    return failing


def _failing_mkdir():
    mkdir = os.mkdir

    def failing(path, *args, **kwargs):
        if ".ccsmerge-" in str(path):
            raise OSError(errno.ENOSPC, ENOSPC, str(path))
        return mkdir(path, *args, **kwargs)

    return failing


def _failing_copy(name: str):
    import shutil

    copy = shutil.copyfile

    def failing(src, dst, *args, **kwargs):
        if Path(dst).name == name:  # what sendfile reports: the source first, the target second
            raise OSError(errno.ENOSPC, ENOSPC, str(src), None, str(dst))
        return copy(src, dst, *args, **kwargs)

    return failing


def _failing_rename():
    rename = os.rename

    def failing(src, dst, *args, **kwargs):
        if str(src).endswith(".ccsmerge-partial"):
            raise OSError(errno.EBUSY, "Device or resource busy", str(src), None, str(dst))
        return rename(src, dst, *args, **kwargs)

    return failing


INPUTS_PART = "ccsmerge-inputs.json.part"
INDEX_PART = "model.safetensors.index.json.part"
# step: (what to patch, the fragment the message must hold, whether a partial folder had been claimed)
STEPS = {
    "creating the partial folder": (lambda: ("mkdir", _failing_mkdir()), ".out.ccsmerge-new-", False),
    "writing the lock file": (lambda: ("write", _failing_lock_write()), "ccsmerge.lock", False),
    "recording the inputs": (lambda: ("fsync", _failing_fsync(INPUTS_PART)), INPUTS_PART, False),
    "writing the recipe": (lambda: ("fsync", _failing_fsync("ccsmerge.yml.part")), "ccsmerge.yml.part", False),
    "writing a shard": (lambda: ("fsync", _failing_fsync(".safetensors.part")), ".safetensors.part", True),
    "writing the index": (lambda: ("fsync", _failing_fsync(INDEX_PART)), INDEX_PART, True),
    "copying tokenizer.json": (lambda: ("copyfile", _failing_copy("tokenizer.json")), "tokenizer.json", True),
    "writing the edited config": (lambda: ("fsync", _failing_fsync("/config.json.part")), "config.json.part", True),
    "the final rename": (lambda: ("rename", _failing_rename()), ".out.ccsmerge-partial -> ", True),
}


@pytest.mark.parametrize("step", list(STEPS))
@pytest.mark.parametrize("replacing", [False, True], ids=["new", "replacing"])
def test_a_failure_at_any_step_leaves_nothing_and_the_rerun_works(tmp_path, capsys, monkeypatch, step, replacing):
    import shutil

    _, paths = fresh_models(tmp_path / "in", dtype=torch.bfloat16)
    for p in paths:  # a dtype in config.json, which --dtype rewrites
        (p / "config.json").write_text(json.dumps({"from": p.name, "torch_dtype": "bfloat16"}))
    out = tmp_path / "out"
    argv = merge_argv(paths, out, "--method", "average", "--dtype", "float32")
    if replacing:
        argv.append("--overwrite")
        out.mkdir()
        (out / "earlier.txt").write_text("an earlier output\n")
    inputs = {p.name: folder_bytes(p) for p in paths}
    patch, fragment, claimed = STEPS[step]
    with monkeypatch.context() as patched:
        name, failing = patch()
        patched.setattr(shutil if name == "copyfile" else os, name, failing)
        code, err = cli(argv, capsys)
    line = one_error_line(err)
    assert code == 1
    assert str(tmp_path) in line and fragment in line, line
    assert ENOSPC in line or "busy" in line, line
    if claimed:
        assert f"the partial output {partial_folder(out)} was removed" in line, line
    assert leftovers(tmp_path) == []  # no partial, private or replaced folder
    assert out.exists() == replacing
    if replacing:
        assert folder_bytes(out) == {"earlier.txt": b"an earlier output\n"}  # the old output is kept
    assert {p.name: folder_bytes(p) for p in paths} == inputs

    # Space freed: the same command works (it is not refused as an interrupted merge).
    code, err = cli(argv, capsys)
    assert code == 0, err
    assert json.loads((out / "config.json").read_text()) == {"from": "ft0", "torch_dtype": "float32"}
    assert {t.dtype for t in load_output(out).values() if t.is_floating_point()} == {torch.float32}
    assert leftovers(tmp_path) == []


def _limited_file_size(limit: int):
    import resource

    def apply():  # writes past `limit` bytes fail with EFBIG, like a disk that is (almost) full
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


# Full at start: 4 bytes, the probe tempfile writes when a library asks for the temporary folder at
# import (dill does, and torch imports dill where it is installed); the lock's pid line is longer.
@pytest.mark.parametrize("limit", [4, 200_000], ids=["full-at-start", "full-while-copying-tokenizer"])
def test_a_really_full_disk(toy, tmp_path, limit):
    _, _, paths, _ = toy
    import shutil

    copies = [tmp_path / "in" / p.name for p in paths]
    for p, c in zip(paths, copies):
        shutil.copytree(p, c)
        (c / "tokenizer.json").write_text(json.dumps({"vocab": ["x" * 20] * 15_000}))  # bigger than the space left
    out = tmp_path / "out"
    command = [sys.executable, "-m", "ccsmerge", *merge_argv(copies, out, "--method", "average")]
    result = subprocess.run(command, preexec_fn=_limited_file_size(limit), capture_output=True, text=True,
                            env=env_with_repo(), cwd=REPO)
    line = one_error_line(result.stderr)
    assert result.returncode == 1
    assert "File too large" in line and str(tmp_path) in line, line
    assert ("ccsmerge.lock" if limit == 4 else "tokenizer.json") in line, line
    assert leftovers(tmp_path) == [] and not out.exists()
    result = subprocess.run(command, capture_output=True, text=True, env=env_with_repo(), cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert (out / "tokenizer.json").read_bytes() == (copies[0] / "tokenizer.json").read_bytes()


# ----------------------------------------------------------------------------- 10: outputs that cannot be written


@pytest.mark.parametrize(
    "out, fragment",
    [(".", "current folder"), ("..", "current folder"), ("CWD", "current folder"), ("sub/..", "current folder"),
     ("", "empty"), ("/", "current folder")],
    ids=["dot", "parent", "absolute-cwd", "sub-dotdot", "empty", "root"],
)
@pytest.mark.parametrize("command", ["merge", "index", "export-task"])
@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
def test_outputs_that_hold_the_current_folder_are_refused_before_reading(
    tmp_path, capsys, monkeypatch, out, fragment, command, overwrite
):
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "notes.txt").write_text("mine\n")
    monkeypatch.chdir(work)
    out = str(work) if out == "CWD" else out
    # Inputs that do not exist: an error about them would mean they were read first.
    missing = ["missing-a", "missing-b"]
    if command == "merge":
        argv = ["merge", *model_flags(missing), "--device", "cpu", "--quiet", "--out", out]
    elif command == "index":
        argv = ["index", *model_flags(missing), "--device", "cpu", "--out", out]
    else:
        argv = ["export-task", "missing-index", "--task", "0", "--out", out]
    code, err = cli(argv + (["--overwrite"] if overwrite else []), capsys)
    line = one_error_line(err)
    assert code == 1 and fragment in line and "missing" not in line, line
    assert sorted(os.listdir(work)) == ["notes.txt", "sub"] and os.listdir(tmp_path) == ["work"]


# ----------------------------------------------------------------------------- 11: two runs into one output


def test_a_second_run_into_an_output_being_written_is_refused(toy, tmp_path, capsys):
    _, _, paths, reference = toy
    out = tmp_path / "out"
    partial = partial_folder(out)
    argv = merge_argv(paths, out, "--method", "average")
    hold = tmp_path / "hold"  # the first run waits after its first shard while this exists
    hold.touch()
    first = start_slow(tmp_path, argv, pause=0, hold=hold)
    try:
        wait_for(lambda: len(shard_files(partial)) >= 1, first)
        finished = {p.name: p.stat().st_ino for p in shard_files(partial)}
        for extra in ([], ["--resume"], ["--overwrite"], ["--resume", "--overwrite"]):
            code, err = cli(argv + extra, capsys)
            line = one_error_line(err)
            assert code == 1 and f"another ccsmerge process (pid {first.pid}) is writing this output" in line, line
        # The same from a second process.
        second = subprocess.run([sys.executable, "-m", "ccsmerge", *argv, "--overwrite"], capture_output=True,
                                text=True, env=env_with_repo(), cwd=REPO)
        assert second.returncode == 1
        assert f"another ccsmerge process (pid {first.pid})" in one_error_line(second.stderr)
        assert all((partial / name).stat().st_ino == inode for name, inode in finished.items())  # not touched
    finally:
        hold.unlink()
        assert first.wait(timeout=300) == 0, (tmp_path / "slow-stderr.txt").read_text()
    assert folder_bytes(out) == reference  # the first run was not disturbed
    assert leftovers(tmp_path) == []


def hold_lock(partial: Path) -> int:
    """Take the partial folder's lock as a running ccsmerge would (the caller closes the descriptor)."""
    partial.mkdir(parents=True, exist_ok=True)
    fd = os.open(partial / output_folder.LOCK_FILE, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


@pytest.mark.parametrize("command", ["merge", "index"])
def test_a_locked_partial_folder_is_never_deleted(toy, tmp_path, command):
    _, _, paths, _ = toy
    out = tmp_path / "out"
    partial = partial_folder(out)
    fd = hold_lock(partial)
    try:
        (partial / "model-00001-of-00009.safetensors").write_bytes(b"being written by the other run")
        before = folder_bytes(partial)
        if command == "merge":
            argv = merge_argv(paths, out, "--method", "average", "--overwrite")
        else:
            argv = ["index", *model_flags(paths), "--device", "cpu", "--out", str(out), "--overwrite"]
        result = subprocess.run([sys.executable, "-m", "ccsmerge", *argv], capture_output=True, text=True,
                                env=env_with_repo(), cwd=REPO)
        assert result.returncode == 1
        assert f"another ccsmerge process (pid {os.getpid()}) is writing this output" in one_error_line(result.stderr)
        assert folder_bytes(partial) == before and not out.exists()
    finally:
        os.close(fd)


def test_a_claim_that_loses_the_race_touches_nothing(toy, tmp_path, capsys, monkeypatch):
    """Another process creates the partial folder between this one's check and
    its rename: the rename is the atomic step, so this one is refused."""
    _, _, paths, reference = toy
    out = tmp_path / "out"
    partial = partial_folder(out)
    rename = os.rename
    held = []

    def another_process_first(src, dst, *args, **kwargs):
        if str(dst) == str(partial) and not held:
            held.append(hold_lock(partial))
            (partial / "theirs.txt").write_text("theirs\n")
        return rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", another_process_first)
    try:
        code, err = cli(merge_argv(paths, out, "--method", "average"), capsys)
        assert code == 1 and f"another ccsmerge process (pid {os.getpid()})" in one_error_line(err)
        assert (partial / "theirs.txt").read_text() == "theirs\n"
        assert leftovers(tmp_path) == [partial.name]  # the private folder of the loser is gone
    finally:
        os.close(held[0])
    monkeypatch.undo()
    assert cli(merge_argv(paths, out, "--method", "average", "--overwrite"), capsys)[0] == 0  # unlocked now
    assert folder_bytes(out) == reference and leftovers(tmp_path) == []


def test_a_dead_claims_private_folder_is_swept(toy, tmp_path, capsys):
    _, _, paths, _ = toy
    out = tmp_path / "out"
    dead = tmp_path / ".out.ccsmerge-new-1-dead"
    recent = tmp_path / ".out.ccsmerge-new-2-recent"
    for folder in (dead, recent):
        folder.mkdir()
        (folder / output_folder.LOCK_FILE).write_text("1\n")
    old = time.time() - 3600
    os.utime(dead, (old, old))
    assert cli(merge_argv(paths, out, "--method", "average"), capsys)[0] == 0
    assert not dead.exists() and recent.exists()  # a recent one may belong to a live claim


# ----------------------------------------------------------------------------- 12: SIGTERM


def test_sigterm_stops_like_ctrl_c_and_resume_finishes(toy, tmp_path):
    _, _, paths, reference = toy
    out = tmp_path / "out"
    partial = partial_folder(out)
    argv = merge_argv(paths, out, "--method", "average")
    proc = start_slow(tmp_path, argv)
    wait_for(lambda: len(shard_files(partial)) >= 2, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    err = (tmp_path / "slow-stderr.txt").read_text()
    assert len(err.splitlines()) == 1 and err.startswith("ccsmerge: terminated by SIGTERM while merging tensor '"), err
    assert f"shards are finished in {partial}" in err and "--resume" in err, err
    assert not out.exists() and not list(partial.glob("*.part"))  # the shard being written was removed
    kept = {p.name: p.stat().st_ino for p in shard_files(partial)}
    assert kept

    result = subprocess.run([sys.executable, "-m", "ccsmerge", *argv, "--resume"], capture_output=True, text=True,
                            env=env_with_repo(), cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert folder_bytes(out) == reference
    assert {name: (out / name).stat().st_ino for name in kept} == kept  # kept, not rewritten
    assert leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- index and export-task


def index_argv(paths, out, *extra) -> list[str]:
    return ["index", *model_flags(paths), "--device", "cpu", "--out-shard-size", SHARD_SIZE, "--out", str(out), *extra]


def test_index_refuses_an_interrupted_partial_folder_unless_overwrite(toy, tmp_path, capsys):
    _, _, paths, _ = toy
    out = tmp_path / "index"
    partial = partial_folder(out)
    partial.mkdir()
    (partial / "model-00001-of-00003.safetensors").write_bytes(b"from an interrupted run")
    before = folder_bytes(partial)
    code, err = cli(index_argv(paths, out), capsys)
    line = one_error_line(err)
    assert code == 1 and str(partial) in line and "interrupted" in line and "--overwrite" in line, line
    assert "--resume" not in line  # an index has no resume
    assert folder_bytes(partial) == before and not out.exists()
    assert cli(index_argv(paths, out, "--overwrite"), capsys)[0] == 0
    assert not partial.exists() and (out / "ccsmerge-index.json").is_file()
    assert all(p.read_bytes() != b"from an interrupted run" for p in out.iterdir())


def test_index_interrupted_leaves_nothing(toy, tmp_path, capsys, monkeypatch):
    _, _, paths, _ = toy
    out = tmp_path / "index"
    with monkeypatch.context() as patched:
        interrupt_after_first_shard(patched)
        code, _ = cli(index_argv(paths, out), capsys)
    assert code == 130 and leftovers(tmp_path) == [] and not out.exists()
    assert cli(index_argv(paths, out), capsys)[0] == 0


@pytest.mark.parametrize("where", ["input", "inside-input"])
def test_index_and_export_refuse_to_replace_their_inputs(tmp_path, capsys, where):
    _, paths = fresh_models(tmp_path / "in")
    before = {p.name: folder_bytes(p) for p in paths}
    out = paths[1] if where == "input" else paths[1] / "index"
    code, err = cli(index_argv(paths, out, "--overwrite"), capsys)
    line = one_error_line(err)
    assert code == 1 and str(paths[1]) in line and ("replace" if where == "input" else "inside") in line, line
    assert {p.name: folder_bytes(p) for p in paths} == before

    index = tmp_path / "index"
    assert cli(index_argv(paths, index), capsys)[0] == 0
    indexed = folder_bytes(index)
    target = index if where == "input" else index / "task"
    code, err = cli(["export-task", str(index), "--task", "1", "--out", str(target), "--overwrite"], capsys)
    line = one_error_line(err)
    assert code == 1 and str(index) in line and ("replace" if where == "input" else "inside") in line, line
    assert folder_bytes(index) == indexed
    assert leftovers(tmp_path) == [] and leftovers(tmp_path / "in") == []
