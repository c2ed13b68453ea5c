"""Parameters shared by several methods, and the low-rank selection rule
(which tensors a low-rank method treats as weight matrices)."""

from __future__ import annotations

import re

import torch

from ..accuracy import Tolerance
from .spec import Param

LAM = Param("lam", float, 1.0, "scale of the update (recipe key: lambda)", alias="lambda")
RANK_RATIO = Param("rank_ratio", float, 0.12, "k = max(1, int(R * min(m, n)))", gt=0.0, le=1.0)
DENSITY = Param("density", float, 0.2, "fraction of each task vector kept", gt=0.0, le=1.0)
SVD = Param("svd", str, "randomized", "truncated SVD: the randomized engine or torch.linalg.svd",
            choices=("randomized", "exact"))
OVERSAMPLE = Param("oversample", int, None, "randomized SVD oversampling (default max(10, k))", ge=0)
POWER_ITERS = Param("power_iters", int, None, "randomized SVD power iterations (default 4)", ge=0)
TOLERANCE = Param(
    "tolerance", Tolerance, None,
    "target relative error of the randomized update: 'auto' (a quarter of the inputs' rounding floor, "
    "at least 0.01) or a number in (0, 1); power iterations then adapt, power_iters caps them (default 8)",
)
SEED = Param("seed", int, 0, "seed of the randomized steps", ge=0)
LOWRANK_INCLUDE = Param("lowrank_include", tuple, (), "regexes of tensors given the low-rank step (override excludes)")
LOWRANK_EXCLUDE = Param("lowrank_exclude", tuple, (), "regexes of tensors kept out of it, added to the default excludes")
DEFAULT_EXCLUDES = Param(
    "default_excludes", bool, True,
    "keep embeddings and heads out of the low-rank step (false: only lowrank_exclude applies)",
)

SVD_ENGINE = (SVD, OVERSAMPLE, POWER_ITERS, SEED)
LOWRANK_SELECTION = (LOWRANK_INCLUDE, LOWRANK_EXCLUDE, DEFAULT_EXCLUDES)

# Names of tensors kept out of the low-rank step by default: embeddings and
# output heads, whose rows are per-token/per-class rather than a linear map.
DEFAULT_LOWRANK_EXCLUDE = (
    r"embed",
    r"(^|\.)wte\.",
    r"(^|\.)wpe\.",
    r"pos_emb",
    r"lm_head",
    r"(^|\.)(classifier|score|head|heads)(\.|$)",
)


def lowrank_rule(name: str, shape: tuple[int, ...], dtype: torch.dtype, cfg) -> tuple[bool, str]:
    """(whether the tensor is a weight matrix for the low-rank step, the rule
    that decided it). A floating 2-D tensor is one unless its name matches an
    exclude pattern; an include pattern overrides the excludes."""
    if not dtype.is_floating_point:
        return False, "not floating"
    if len(shape) != 2:
        return False, f"{len(shape)}-D"
    if min(shape) == 0:
        return False, "empty"
    for pattern in cfg.lowrank_include:
        if re.search(pattern, name):
            return True, f"include {pattern!r}"
    for pattern in cfg.lowrank_exclude:
        if re.search(pattern, name):
            return False, f"exclude {pattern!r}"
    if cfg.default_excludes:
        for pattern in DEFAULT_LOWRANK_EXCLUDE:
            if re.search(pattern, name):
                return False, f"default exclude {pattern!r}"
    return True, "2-D weight"


def lowrank_rank(shape: tuple[int, ...], rank_ratio: float) -> int:
    return max(1, int(rank_ratio * min(shape)))
