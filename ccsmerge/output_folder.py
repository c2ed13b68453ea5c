"""The output folder of a merge, an index or an exported task: one lifecycle
from the first check to the final rename.

An output is built in a hidden partial folder beside the target
(`.NAME.ccsmerge-partial`) and renamed into place when complete, so the
target never holds an incomplete output:

1. check(), before any input is read: refuse an empty path, the current
   folder or one that holds it, an input or a folder inside one, a non-empty
   folder without overwrite, an interrupted partial folder without resume or
   overwrite, and a partial folder that another process is writing.
2. claim(): take the partial folder under an exclusive lock (fcntl.flock on
   LOCK_FILE inside it), held until the end. A new one is made under a
   private name, locked, given its recipe and the fingerprints of its inputs,
   and only then renamed into place: that rename is the atomic step, so no
   process finds a partial folder unlocked while its owner runs. An
   interrupted one is resumed (its recipe and input fingerprints must match)
   or emptied (overwrite) under the lock.
3. The caller writes its shards and index into `partial`.
4. publish(): the aux files (config, tokenizer, ...: each from the first
   source that has it, the tokenizer's from tokenizer_source where given,
   config.json's dtype, vocab_size and layer count set to the output's), a last check
   that no input changed meanwhile, and the rename into place (an old output
   is replaced only now).

cleanup() covers every step from claim() to publish(): a failure removes the
partial folder (an interruption keeps a resumable one for `resume`), the lock
is released, and an OS error becomes one MergeError line naming its file."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import fnmatch
import glob
import hashlib
import json
import os
import secrets
import shutil
import struct
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch

from .checkpoint import SAFETENSORS_INDEX, TOKENIZER_PATTERNS, TORCH_INDEX, Checkpoint, folder_files
from .errors import MergeError
from .shard_writer import OutputTensor, shard_filename, shard_header, shard_size, write_atomically

RECIPE_FILE = "ccsmerge.yml"
LOCK_FILE = "ccsmerge.lock"  # holds the writer's pid; flock-ed for the writer's lifetime
INPUTS_FILE = "ccsmerge-inputs.json"  # the inputs' fingerprints: resume and publish check them
CONFIG_FILE = "config.json"
DTYPE_KEYS = ("torch_dtype", "dtype")  # where Hugging Face configs record the weights' dtype
_LOCK_TRIES = 5  # a check() elsewhere holds the lock shared for microseconds: retry before refusing
_CLAIM_TRIES = 5  # a claim racing with another one looks again this many times
_STALE_AFTER = 600  # seconds after which an unlocked private folder of a dead claim is removed


def partial_folder(out: Path) -> Path:
    return out.parent / f".{out.name}.ccsmerge-partial"


def output_path(out: str | Path) -> Path:
    """The output folder as a Path ('' would silently mean the current folder)."""
    if isinstance(out, str) and out == "":
        raise MergeError("output folder: the path is empty (''); give the folder to write")
    return Path(out)


# ----------------------------------------------------------------------------- inputs' fingerprints


def fingerprints(checkpoints: Sequence[Checkpoint]) -> dict[str, dict]:
    """Size, modification time and (safetensors) header hash of every input
    file, by absolute path: what shows that an input changed at its path."""
    found: dict[str, dict] = {}
    for ckpt in checkpoints:
        for file in _input_files(ckpt):
            found[str(file.resolve())] = _fingerprint(file)
    return found


def record_inputs(folder: Path, checkpoints: Sequence[Checkpoint]) -> None:
    """Write the inputs' fingerprints into a partial folder (INPUTS_FILE)."""
    write_atomically(folder / INPUTS_FILE, _inputs_json(fingerprints(checkpoints)))


def _inputs_json(found: dict[str, dict]) -> bytes:
    return (json.dumps({"files": found}, indent=2, sort_keys=True) + "\n").encode()


def _input_files(ckpt: Checkpoint) -> list[Path]:
    files = list(ckpt.files)
    if ckpt.path.name.endswith(".index.json"):
        files.append(ckpt.path)
    elif ckpt.path.is_dir():
        files += [ckpt.path / name for name in (SAFETENSORS_INDEX, TORCH_INDEX) if (ckpt.path / name).is_file()]
    return files


def _fingerprint(file: Path) -> dict:
    try:
        st = os.stat(file)
        found: dict = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
        if file.suffix == ".safetensors":
            with open(file, "rb") as f:
                (length,) = struct.unpack("<Q", f.read(8).ljust(8, b"\0"))
                found["header_sha256"] = hashlib.sha256(f.read(min(length, st.st_size))).hexdigest()
        return found
    except OSError as exc:
        raise MergeError(f"{file}: cannot read: {exc.strerror or exc}") from None


def _first_change(before: dict[str, dict], now: dict[str, dict]) -> tuple[str, str] | None:
    """(file, what changed) for the first input file whose fingerprint differs."""
    for path in sorted(before.keys() | now.keys()):
        was, new = before.get(path), now.get(path)
        if was == new:
            continue
        if was is None:
            return path, "it is a new input file"
        if new is None:
            return path, "it is no longer one of the input files"
        if was.get("size") != new.get("size"):
            return path, f"its size went from {was.get('size')} to {new.get('size')} bytes"
        if was.get("header_sha256") != new.get("header_sha256"):
            return path, "its safetensors header changed"
        return path, f"its modification time went from {_when(was.get('mtime_ns'))} to {_when(new.get('mtime_ns'))}"
    return None


def _when(mtime_ns) -> str:
    try:
        return datetime.fromtimestamp(mtime_ns / 1e9).isoformat(sep=" ", timespec="milliseconds")
    except (TypeError, ValueError, OverflowError, OSError):
        return repr(mtime_ns)


# ----------------------------------------------------------------------------- aux files


@dataclass
class AuxFiles:
    """The files that travel with the weights: name -> the file copied byte
    for byte, and name -> the content written instead (config.json edited)."""

    copies: dict[str, Path] = field(default_factory=dict)
    written: dict[str, bytes] = field(default_factory=dict)


def aux_files(
    sources: Sequence[Checkpoint],
    out_dtype: torch.dtype | None = None,
    *,
    tokenizer: Path | None = None,
    edit_config: Callable[[dict], bool] | None = None,
) -> AuxFiles:
    """Each aux file (config, tokenizer, ...) from the first source that has
    that file: pass the base first. tokenizer: a folder whose tokenizer files
    the output takes instead of the sources' (tokenizer_source). out_dtype:
    the output's dtype where it differs from the inputs'; the copied
    config.json then says it. edit_config: brings the parsed config.json to
    the output (vocab_size, layers); returns whether it changed it. Reads
    only config.json, and only then: a config that cannot carry the edits is
    refused now, before anything is merged."""
    aux = AuxFiles()
    for ckpt in sources:
        for path in ckpt.aux_files():
            if tokenizer is None or not _is_tokenizer_file(path.name):
                aux.copies.setdefault(path.name, path)
    if tokenizer is not None:
        found = folder_files(tokenizer, TOKENIZER_PATTERNS)
        if not found:
            raise MergeError(f"tokenizer_source: {tokenizer}: holds no tokenizer files ({', '.join(TOKENIZER_PATTERNS)})")
        aux.copies.update({path.name: path for path in found})
    config = aux.copies.get(CONFIG_FILE)
    if (out_dtype is not None or edit_config is not None) and config is not None:
        edited = _edited_config(config, out_dtype, edit_config)
        if edited is not None:
            aux.written[CONFIG_FILE] = edited
            del aux.copies[CONFIG_FILE]
    return aux


def _is_tokenizer_file(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in TOKENIZER_PATTERNS)


def _edited_config(path: Path, dtype: torch.dtype | None, edit: Callable[[dict], bool] | None) -> bytes | None:
    """config.json with its dtype keys (top level and sub-configs) set to
    dtype and edit applied; None when nothing changes."""
    what = f"the output dtype {str(dtype).removeprefix('torch.')}" if dtype is not None else "the output's shapes"
    try:
        config = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise MergeError(f"{path}: cannot be read as JSON ({exc}), so {what} cannot be written in it") from None
    if not isinstance(config, dict):
        raise MergeError(f"{path}: holds a JSON {type(config).__name__}, not an object, so {what} cannot be written")
    changed = False
    if dtype is not None:
        name = str(dtype).removeprefix("torch.")
        changed = _set_dtype(config, name)
        for key, value in config.items():
            if key.endswith("_config") and isinstance(value, dict):  # text_config, vision_config, ...
                changed = _set_dtype(value, name) or changed
    if edit is not None:
        changed = edit(config) or changed
    return (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode() if changed else None


def _set_dtype(config: dict, name: str) -> bool:
    keys = [k for k in DTYPE_KEYS if config.get(k) is not None and config[k] != name]
    for key in keys:
        config[key] = name
    return bool(keys)


# ----------------------------------------------------------------------------- the lifecycle


class OutputFolder:
    """The output folder `out` of a run reading `inputs` (paths): see the module's docstring.
    resumable=False: an interrupted partial folder can only be discarded (overwrite)."""

    def __init__(
        self,
        out: str | Path,
        inputs: Sequence[str | Path],
        *,
        overwrite: bool = False,
        resume: bool = False,
        resumable: bool = True,
    ):
        self.out = output_path(out)
        self.partial = partial_folder(self.out)
        self.inputs = [Path(p) for p in inputs]
        self.overwrite = overwrite
        self.resume = resume and resumable
        self.resumable = resumable
        self.resumed = False  # claim() took over an interrupted partial folder to finish it
        self.published = False
        self._lock: int | None = None  # the locked LOCK_FILE's descriptor, once claimed
        self._checkpoints: list[Checkpoint] = []
        self._fingerprints: dict[str, dict] = {}

    # --- 1. refuse what cannot be written, reading no input

    def check(self) -> None:
        out = self.out
        target = out.resolve()
        cwd = Path.cwd()
        if target == cwd or target in cwd.parents:
            raise MergeError(
                f"{out}: is the current folder or holds it, and publishing the output replaces that folder; "
                "give a new folder beside it (e.g. ../merged)"
            )
        if out.name in ("", ".", ".."):
            raise MergeError(f"{out}: not a folder name to write to; give the output folder by name (e.g. ../merged)")
        for given in self.inputs:
            try:
                where = Path(given).resolve()
            except (RuntimeError, OSError):  # a symlink loop: the reader refuses the input by name
                continue
            if target == where or target in where.parents:
                raise MergeError(f"{out}: the output would replace the input {given}")
            if where in target.parents:
                raise MergeError(f"{out}: the output would be written inside the input {given}")
        if out.exists() and not self.overwrite and (not out.is_dir() or any(out.iterdir())):
            raise MergeError(f"{out}: exists and is not empty (pass --overwrite to replace it)")
        if os.path.lexists(self.partial):
            if self.partial.is_symlink() or not self.partial.is_dir():
                raise MergeError(f"{self.partial}: is in the way of the partial output (not a folder); remove it")
            if self._held_elsewhere():
                raise MergeError(self._busy())
            if not (self.resume or self.overwrite):
                raise MergeError(self._interrupted())

    def _interrupted(self) -> str:
        what = "--resume to finish it or --overwrite to start again" if self.resumable else "--overwrite to start again"
        return f"{self.partial}: an interrupted run into this output is there; pass {what}"

    def _busy(self) -> str:
        try:
            pid = (self.partial / LOCK_FILE).read_text().strip() or "unknown"
        except OSError:
            pid = "unknown"
        return f"{self.out}: another ccsmerge process (pid {pid}) is writing this output (into {self.partial})"

    def _held_elsewhere(self) -> bool:
        """Whether another process holds the partial folder's lock (probed with a shared lock, let go at once)."""
        try:
            fd = os.open(self.partial / LOCK_FILE, os.O_RDONLY)
        except OSError:
            return False  # no lock file: an interrupted run of an older ccsmerge, or one being removed
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # releases the probe

    # --- 2. take the partial folder

    def claim(self, record: tuple[str, bytes], checkpoints: Sequence[Checkpoint]) -> None:
        """Take the partial folder under the lock, with record (file name,
        content: the recipe) written in it; self.resumed says whether it holds
        an interrupted run's work to finish. checkpoints: the opened inputs."""
        self.check()
        self._checkpoints = list(checkpoints)
        self._fingerprints = fingerprints(self._checkpoints)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._sweep()
        for _ in range(_CLAIM_TRIES):  # between two steps a concurrent claim can take the folder: look again
            if not os.path.lexists(self.partial):
                if self._create(record):
                    return
            elif self._take_over(record):
                return
        raise MergeError(f"{self.partial}: other processes kept claiming this output at the same time; try again")

    def _create(self, record: tuple[str, bytes]) -> bool:
        """A new partial folder, made whole under a private name and renamed into place."""
        private = self.out.parent / f".{self.out.name}.ccsmerge-new-{os.getpid()}-{secrets.token_hex(4)}"
        os.mkdir(private)
        fd = None
        try:
            fd = os.open(private / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: no one else has it
            _write_pid(fd, private / LOCK_FILE)
            write_atomically(private / INPUTS_FILE, _inputs_json(self._fingerprints))
            write_atomically(private / record[0], record[1])
            try:
                os.rename(private, self.partial)
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                shutil.rmtree(private, ignore_errors=True)  # another claim came first
                os.close(fd)
                return False
        except BaseException:
            shutil.rmtree(private, ignore_errors=True)
            if fd is not None:
                os.close(fd)
            raise
        self._lock = fd
        return True

    def _take_over(self, record: tuple[str, bytes]) -> bool:
        """An interrupted partial folder: resumed or emptied, under its lock."""
        lock = self.partial / LOCK_FILE
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            created = True
        except FileExistsError:
            created = False
            try:
                fd = os.open(lock, os.O_RDWR)
            except FileNotFoundError:
                return False  # removed meanwhile: look again
        except (FileNotFoundError, NotADirectoryError):
            return False  # the folder went away (published or removed): look again
        try:
            if not _try_lock(fd):
                raise MergeError(self._busy())
            if not _same_file(fd, lock):
                raise _LookAgain()  # renamed or removed between the open and the lock
            if not (self.resume or self.overwrite):
                raise MergeError(self._interrupted())
            if self.resume:
                self._check_resumable(record)
        except BaseException as exc:
            if created:
                lock.unlink(missing_ok=True)  # a refused folder is left as it was
            os.close(fd)
            if isinstance(exc, _LookAgain):
                return False
            raise
        self._lock = fd  # from here on a failure removes the folder
        if self.resume:
            self.resumed = True
        else:
            for entry in self.partial.iterdir():
                if entry.name != LOCK_FILE:
                    _remove(entry)
            write_atomically(self.partial / INPUTS_FILE, _inputs_json(self._fingerprints))
            write_atomically(self.partial / record[0], record[1])
        _write_pid(fd, lock)
        return True

    def _check_resumable(self, record: tuple[str, bytes]) -> None:
        name, content = record
        again = "it cannot be resumed (pass --overwrite to start again)"
        recorded = self.partial / name
        if not recorded.is_file():
            raise MergeError(f"{recorded}: missing: the interrupted run stopped before recording its recipe; {again}")
        if recorded.read_bytes() != content:
            raise MergeError(f"{recorded}: the interrupted merge used other inputs or options; {again}")
        inputs = self.partial / INPUTS_FILE
        try:
            before = json.loads(inputs.read_text())["files"]
            if not isinstance(before, dict):
                raise TypeError("not an object")
        except FileNotFoundError:
            raise MergeError(
                f"{inputs}: missing: the interrupted run recorded no fingerprints of its inputs (an older ccsmerge?), "
                f"so a changed input could not be told; {again}"
            ) from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise MergeError(f"{inputs}: unreadable ({exc}); {again}") from None
        change = _first_change(before, self._fingerprints)
        if change is not None:
            raise MergeError(f"{change[0]}: changed since the interrupted merge began ({change[1]}); {again}")

    def _sweep(self) -> None:
        """Remove private folders of claims that died before renaming theirs into place."""
        for private in self.out.parent.glob(f".{glob.escape(self.out.name)}.ccsmerge-new-*"):
            try:
                if time.time() - private.stat().st_mtime < _STALE_AFTER:
                    continue  # perhaps a live claim between its mkdir and its lock
                fd = os.open(private / LOCK_FILE, os.O_RDONLY)
            except FileNotFoundError:
                shutil.rmtree(private, ignore_errors=True)
                continue
            except OSError:
                continue
            try:
                if _try_lock(fd, tries=1):
                    shutil.rmtree(private, ignore_errors=True)
            finally:
                os.close(fd)

    # --- 3. what an interrupted run finished

    def finished_shards(self, shards: list[list[OutputTensor]], metadata: dict[str, str]) -> set[int]:
        """Indices of the shards a resumed run already finished (whole, with the
        planned header); every other shard file is removed."""
        done = set()
        planned = {shard_filename(i, len(shards)) for i in range(len(shards))}
        for stale in self.partial.glob("model-*.safetensors*"):  # from a plan with another shard size
            if stale.name not in planned:
                stale.unlink()
        for i, shard in enumerate(shards):
            path = self.partial / shard_filename(i, len(shards))
            path.with_name(path.name + ".part").unlink(missing_ok=True)
            if path.is_file() and path.stat().st_size == shard_size(shard, metadata):
                header = shard_header(shard, metadata)
                with open(path, "rb") as f:
                    if f.read(len(header)) == header:
                        done.add(i)
                        continue
            path.unlink(missing_ok=True)
        return done

    # --- 4. publish

    def publish(self, aux: AuxFiles) -> None:
        """Add the aux files, check the inputs once more and rename the folder into place."""
        for name, source in aux.copies.items():
            _copy(source, self.partial / name)
        for name, content in aux.written.items():
            write_atomically(self.partial / name, content)
        change = _first_change(self._fingerprints, fingerprints(self._checkpoints))
        if change is not None:
            raise MergeError(f"{change[0]}: changed while it was being read ({change[1]}); the output would mix both")
        (self.partial / INPUTS_FILE).unlink(missing_ok=True)
        self._rename_into_place()
        # The lock file goes last: removed earlier, a new process could lock a new one in the folder.
        with contextlib.suppress(OSError):
            (self.out / LOCK_FILE).unlink()

    def _rename_into_place(self) -> None:
        out = self.out
        if not os.path.lexists(out):
            os.rename(self.partial, out)
            self.published = True
            return
        previous = out.parent / f".{out.name}.ccsmerge-replaced"
        _remove(previous)
        os.rename(out, previous)
        try:
            os.rename(self.partial, out)
        except BaseException:
            os.rename(previous, out)  # the old output back in place
            raise
        self.published = True
        try:
            _remove(previous)
        except OSError as exc:
            warnings.warn(f"{previous}: the replaced output could not be removed ({exc.strerror or exc})", stacklevel=2)

    # --- the one cleanup

    @contextlib.contextmanager
    def cleanup(self, coordinator=None) -> Iterator[None]:
        """Around every step from claim() to publish(): on a failure, remove the
        partial folder this process claimed (an interruption keeps a resumable
        one), let its lock go, and turn an OS error into one line naming the
        file. coordinator: of a distributed run, whose rank 0 owns the folder."""
        owner = coordinator is None or coordinator.rank == 0
        try:
            yield
        except BaseException as exc:
            interrupted = isinstance(exc, KeyboardInterrupt)
            # Ranks other than 0 fail only after rank 0 claimed the folder; it removes it.
            removed = self._abandon(keep=interrupted and self.resumable) if owner else not interrupted
            if coordinator is not None and not interrupted:
                coordinator.barrier()  # no rank exits (and has the launcher stop the others) before the removal
            if isinstance(exc, OSError):
                tail = f"; the partial output {self.partial} was removed" if removed else ""
                raise MergeError(describe_os_error(exc, self.out) + tail) from None
            raise
        finally:
            if owner:
                self._release()

    def discard(self) -> None:
        """Remove the claimed partial folder and let its lock go (a writer whose
        lifetime spans calls, outside cleanup(), gives up with this)."""
        self._abandon(keep=False)
        self._release()

    def _abandon(self, keep: bool) -> bool:
        if self._lock is None or self.published or keep:
            return False
        shutil.rmtree(self.partial, ignore_errors=True)
        return True

    def _release(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None


class _LookAgain(Exception):
    pass


def describe_os_error(exc: OSError, fallback: Path) -> str:
    where = str(exc.filename) if exc.filename is not None else str(fallback)
    if exc.filename2 is not None:
        where += f" -> {exc.filename2}"
    return f"{where}: {exc.strerror or exc}"


def _try_lock(fd: int, tries: int = _LOCK_TRIES) -> bool:
    for attempt in range(tries):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if attempt + 1 < tries:
                time.sleep(0.01)
    return False


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    held = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino)


def _write_pid(fd: int, path: Path) -> None:
    try:
        os.ftruncate(fd, 0)
        data = f"{os.getpid()}\n".encode()
        while data:  # a write cut short (the disk filling) is followed by one that says why
            data = data[os.write(fd, data):]
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(path)) from None


def _copy(source: Path, target: Path) -> None:
    try:
        shutil.copyfile(source, target)
    except OSError as exc:  # name the file written first: the error may carry the source's name only
        raise OSError(exc.errno, f"{exc.strerror or exc} (copying {source})", str(target)) from None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
