"""ccsmerge: fast, memory-bounded model merging (CART, TIES, task arithmetic, averaging)."""

import torch

from . import _extension, ops
from ._version import __version__
from .config import MergeConfig
from .errors import MergeError
from .extract_lora import extract_lora
from .merge import merge
from .search import SearchResult, search
from .streaming import merge_checkpoints, plan_checkpoints
from .task_index import build_index, export_task
from .tensor_values import Filtered, Gradient


def build_info() -> dict:
    """What this installation runs on: whether the compiled CPU/CUDA kernels
    are loaded, and the torch/CUDA versions."""
    return {
        "version": __version__,
        "cpu_ext": _extension.has_kernel("mean", "cpu"),
        "cuda_ext": _extension.has_kernel("mean", "cuda"),
        "extension_error": _extension.load_error,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
    }


__all__ = [
    "merge",
    "merge_checkpoints",
    "extract_lora",
    "plan_checkpoints",
    "search",
    "SearchResult",
    "build_index",
    "export_task",
    "MergeConfig",
    "MergeError",
    "Filtered",
    "Gradient",
    "build_info",
    "ops",
    "__version__",
]
