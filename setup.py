"""Builds ccsmerge._C, the C++ (and optionally CUDA) operator library.

The CPU kernels are always built. The CUDA kernels are built when the
installed torch has CUDA and CUDA_HOME is set, never by probing for a GPU, so a
build machine without one still produces a CUDA-enabled package.
CCSMERGE_FORCE_CUDA=1 / CCSMERGE_FORCE_CPU=1 override the choice.
"""

import glob
import os

from setuptools import setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError as exc:  # pragma: no cover - install-time message
    raise SystemExit(
        "ccsmerge builds against the installed torch: install torch first, then "
        "`pip install --no-build-isolation .`"
    ) from exc


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _build_cuda() -> bool:
    if _flag("CCSMERGE_FORCE_CPU"):
        return False
    if _flag("CCSMERGE_FORCE_CUDA"):
        return True
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def _nvidia_wheel_dirs(sub: str) -> list[str]:
    """Header/library folders of the nvidia-* wheels that CUDA builds of torch
    depend on (cuBLAS lives there, not under CUDA_HOME, on pip installs)."""
    try:
        import nvidia
    except ImportError:
        return []
    dirs = []
    for root in nvidia.__path__:
        dirs += glob.glob(os.path.join(root, "*", sub)) + glob.glob(os.path.join(root, "*", "*", sub))
    return sorted({d for d in dirs if os.path.isdir(d)})


def _cublas_link_args(library_dirs: list[str]) -> list[str]:
    """pip's nvidia-cublas wheels ship only the versioned libcublas.so.N (no
    unversioned link name), so name that file when it is all there is."""
    search = library_dirs + [os.path.join(cpp_extension.CUDA_HOME or "", d) for d in ("lib64", "lib")]
    if any(os.path.exists(os.path.join(d, "libcublas.so")) for d in search):
        return ["-lcublas"]
    major = (torch.version.cuda or "").split(".")[0]
    return [f"-l:libcublas.so.{major}"]


def _extension():
    here = os.path.dirname(os.path.abspath(__file__))
    rel = lambda pattern: sorted(os.path.relpath(p, here) for p in glob.glob(os.path.join(here, pattern)))
    sources = rel("csrc/*.cpp") + rel("csrc/common/*.cpp") + rel("csrc/cpu/*.cpp")
    cxx_flags = ["-O3", "-fopenmp"]  # the C++ standard is the one torch asks for
    if not _build_cuda():
        return cpp_extension.CppExtension(
            "ccsmerge._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"]
        )
    sources += rel("csrc/cuda/*.cu") + rel("csrc/cuda/*.cpp")
    library_dirs = _nvidia_wheel_dirs("lib")
    return cpp_extension.CUDAExtension(
        "ccsmerge._C",
        sources,
        include_dirs=_nvidia_wheel_dirs("include"),
        library_dirs=library_dirs,
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
        extra_link_args=["-fopenmp"] + _cublas_link_args(library_dirs),
    )


if "TORCH_CUDA_ARCH_LIST" not in os.environ and _build_cuda():
    # No GPU to detect on a build machine: target Ampere and Hopper, plus PTX.
    os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"

setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
