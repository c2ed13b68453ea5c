"""The ccsmerge operators, public: the compiled kernels' wrappers
(ccsmerge.kernels: mean, centered_matmul, orthonormalize, lowrank_update)
and the truncated SVDs built on them (ccsmerge.lowrank)."""

from .kernels import centered_matmul, lowrank_update, mean, orthonormalize
from .lowrank import centered_exact_svd, centered_randomized_svd, randomized_svd

__all__ = [
    "mean",
    "centered_matmul",
    "orthonormalize",
    "lowrank_update",
    "randomized_svd",
    "centered_randomized_svd",
    "centered_exact_svd",
]
