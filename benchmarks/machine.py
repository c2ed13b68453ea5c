"""What the benchmarks ran on (machine, load, checkout), and how ccsmerge is imported."""

from __future__ import annotations

import importlib
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent


def load_ccsmerge():
    """The installed ccsmerge, or the one in this checkout when none is
    installed (or only a namespace stub of it, e.g. a stale editable install)."""
    try:
        module = importlib.import_module("ccsmerge")
        if hasattr(module, "merge"):
            return module
    except ImportError:
        pass
    for name in [m for m in sys.modules if m == "ccsmerge" or m.startswith("ccsmerge.")]:
        del sys.modules[name]
    sys.path.insert(0, str(REPO_ROOT))
    return importlib.import_module("ccsmerge")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def nvidia_smi() -> list[dict] | None:
    """name, driver and memory of each GPU, from nvidia-smi; None without it."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    keys = ("name", "driver", "memory_total")
    return [dict(zip(keys, (f.strip() for f in line.split(",")))) for line in out.strip().splitlines()]


def gpu_info() -> dict | None:
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    info = {
        "name": torch.cuda.get_device_name(0),
        "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
        "memory_gib": round(props.total_memory / 2**30, 1),
        "multiprocessors": props.multi_processor_count,
        "device_count": torch.cuda.device_count(),
    }
    smi = nvidia_smi()
    if smi:
        info["driver"] = smi[0]["driver"]
        info["nvidia_smi"] = smi
    else:
        info["driver"] = "unknown (no nvidia-smi)"
    return info


def machine_info(ccsmerge) -> dict:
    """Everything a result file needs to say where it came from."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    return {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu_info(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "ccsmerge_path": str(Path(ccsmerge.__file__).parent) if ccsmerge.__file__ else None,
        "ccsmerge_build": ccsmerge.build_info(),
    }


def describe(info: dict) -> str:
    """One line for the console and the markdown header."""
    gpu = info["gpu"]
    gpu_text = f"{gpu['name']} (driver {gpu['driver']})" if gpu else "no GPU"
    build = info["ccsmerge_build"]
    return (
        f"{info['cpu_model']}, {info['cpu_affinity']} cores ({info['torch_threads']} torch threads); "
        f"{gpu_text}; torch {info['torch']}, CUDA {info['cuda']}; ccsmerge {build['version']} "
        f"(cpu_ext={build['cpu_ext']}, cuda_ext={build['cuda_ext']})"
    )


def load_average() -> list[float] | None:
    """1/5/15-minute load averages: other work on the machine skews CPU timings."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def check_load(cores: int | None) -> str | None:
    load = load_average()
    if load and cores and load[0] > max(0.75, 0.25 * cores):
        return (f"WARNING: load average {load[0]:.2f} on {cores} cores before the start: other processes "
                f"are running, CPU timings (LAPACK's SVD especially) will be slowed and noisy")
    return None


def check_extension(info: dict, device: str) -> str | None:
    """A warning when the compiled kernels for device are not loaded (the
    benchmark would then time the PyTorch fallback)."""
    build = info["ccsmerge_build"]
    key = "cuda_ext" if device.startswith("cuda") else "cpu_ext"
    if not build[key]:
        return (f"WARNING: ccsmerge has no compiled {device} kernels "
                f"({build['extension_error'] or 'built without them'}): timing the PyTorch fallback")
    return None


def startup_warnings(info: dict, device: str, load: bool = True) -> list[str]:
    """What a timing run warns about before it starts: no compiled kernels for device,
    and (with load) other work already running on the CPU."""
    found = [check_extension(info, device)] + ([check_load(info["cpu_affinity"])] if load else [])
    return [w for w in found if w]


def git_state(folder: Path | None = None) -> str | None:
    """The commit of the checkout holding folder (default: these benchmarks), with "+changes"
    when its work tree differs from it; None outside a git checkout."""
    here = folder or Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                              check=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, check=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+changes" if dirty else "")
