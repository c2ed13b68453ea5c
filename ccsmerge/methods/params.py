"""Parameters shared by several methods, and the low-rank selection rule
(which tensors a low-rank method treats as weight matrices, and which
tensors of more than two dimensions as stacks of them)."""

from __future__ import annotations

import math
import re

import torch

from ..accuracy import Tolerance
from .spec import Param

LAM = Param("lam", float, 1.0, "scale of the update (recipe key: lambda)", alias="lambda")
RANK_RATIO = Param("rank_ratio", float, 0.12, "k = max(1, int(R * min(m, n)))", gt=0.0, le=1.0)
RANK = Param(
    "rank", int, None,
    "absolute k, instead of rank_ratio (LoRA inputs: the updates' rank is the adapters' sum of ranks)", ge=1,
)
ADAPTER_RANK_RATIO = Param(
    "adapter_rank_ratio", float, 0.3,
    "on modules merged from LoRA factors: k = max(1, int(R * the sum of the adapters' ranks))", gt=0.0, le=1.0,
)
DENSITY = Param("density", float, 0.2, "fraction of each task vector kept", gt=0.0, le=1.0, per_model=True)
WEIGHT = Param("weight", float, 1.0, "the model's weight (one value, or one per model)", per_model=True)
NORMALIZE = Param(
    "normalize", bool, False,
    "divide the combined task vectors by the sum of their weights (TIES-style: of the agreeing ones)",
)
SVD = Param("svd", str, "randomized", "truncated SVD: the randomized engine or torch.linalg.svd",
            choices=("randomized", "exact"))
OVERSAMPLE = Param("oversample", int, None, "randomized SVD oversampling (default max(10, k))", ge=0)
POWER_ITERS = Param("power_iters", int, None, "randomized SVD power iterations (the cap with a tolerance; default 8, else 4)", ge=0)
TOLERANCE = Param(
    "tolerance", Tolerance, "auto",
    "target relative error of the randomized update, per matrix: 'auto' (a quarter of the inputs' rounding "
    "floor, at least 0.01; svd='exact' ignores it), a number in (0, 1), or 'off' (None in the API: fixed "
    "power_iters, default 4); power iterations adapt until the estimate is below it, power_iters caps them (default 8)",
    none_is_value=True,
)
SEED = Param("seed", int, 0, "seed of the randomized steps", ge=0)
LOWRANK_INCLUDE = Param("lowrank_include", tuple, (), "regexes of tensors given the low-rank step (override excludes)")
LOWRANK_EXCLUDE = Param("lowrank_exclude", tuple, (), "regexes of tensors kept out of it, added to the default excludes")
# Names of >2-D tensors that are stacks of weight matrices by default: the
# experts of mixture-of-experts layers stored as one (E, m, n) tensor
# (GPT-OSS and Llama4 `experts.gate_up_proj`/`experts.down_proj`, and the
# fused experts of Mixtral, Qwen-MoE, DeepSeek and others in transformers 5).
DEFAULT_LOWRANK_STACKED = (r"experts\.",)
LOWRANK_STACKED = Param(
    "lowrank_stacked", tuple, DEFAULT_LOWRANK_STACKED,
    "regexes of >2-D tensors that are stacks of weight matrices (experts stored as E x m x n), "
    "given the low-rank step per m x n slice; replaces the defaults",
)
DEFAULT_EXCLUDES = Param(
    "default_excludes", bool, True,
    "keep embeddings, heads and other tables out of the low-rank step (false: only lowrank_exclude applies)",
)

SVD_ENGINE = (SVD, OVERSAMPLE, POWER_ITERS, SEED)
LOWRANK_SELECTION = (LOWRANK_INCLUDE, LOWRANK_EXCLUDE, LOWRANK_STACKED, DEFAULT_EXCLUDES)

# Names of tensors kept out of the low-rank step by default: 2-D tensors that
# are tables or stacks of vectors rather than a linear map. Embeddings (token,
# position, token-type), output heads (rows per token or class), T5/BART's
# shared embedding, relative-position bias tables (T5, Swin, BEiT, SAM's
# rel_pos, the Conformer's per-head pos_bias_u/v), rotary caches that older
# checkpoints saved.
DEFAULT_LOWRANK_EXCLUDE = (
    r"embed",
    r"(^|\.)wte\.",
    r"(^|\.)wpe\.",
    r"pos_emb",
    r"lm_head",
    r"(^|\.)(classifier|score|head|heads)(\.|$)",
    r"(^|\.)predictions\.decoder\.",
    r"(^|\.)shared\.weight$",
    r"relative_\w*bias",
    r"(^|[._])rel_pos",
    r"(^|[._])pos_bias_[uv]$",
    r"(^|[._])(cos|sin)_cached$",
)
# A 2-D tensor whose name ends in "bias" is a stack of bias vectors (one per
# expert, E x n; Transformer-XL's r_w_bias per head), averaged whatever the
# excludes; only an include pattern gives it the low-rank step.
BIAS_STACK = re.compile(r"bias$")


def lowrank_rule(name: str, shape: tuple[int, ...], dtype: torch.dtype, cfg) -> tuple[bool, str]:
    """(whether the tensor gets the low-rank step, the rule that decided it).
    A floating 2-D tensor is a weight matrix unless its name matches an
    exclude pattern; a >2-D one is a stack of weight matrices (its trailing
    two dimensions; the step runs per slice) when its name matches a
    lowrank_stacked pattern and no exclude. An include pattern overrides the
    excludes, and makes a >2-D tensor a stack. A 2-D tensor named "...bias"
    is a stack of bias vectors: never a weight matrix unless included."""
    if not dtype.is_floating_point:
        return False, "not floating"
    if len(shape) < 2:
        return False, f"{len(shape)}-D"
    if min(shape) == 0:
        return False, "empty"
    slices = "" if len(shape) == 2 else f": {math.prod(shape[:-2])} slices of {shape[-2]} x {shape[-1]}"
    for pattern in cfg.lowrank_include:
        if re.search(pattern, name):
            return True, f"include {pattern!r}{slices}"
    if BIAS_STACK.search(name):
        return False, "bias stack" if len(shape) == 2 else f"{len(shape)}-D bias"
    for pattern in cfg.lowrank_exclude:
        if re.search(pattern, name):
            return False, f"exclude {pattern!r}"
    if cfg.default_excludes:
        for pattern in DEFAULT_LOWRANK_EXCLUDE:
            if re.search(pattern, name):
                return False, f"default exclude {pattern!r}"
    if len(shape) == 2:
        return True, "2-D weight"
    for pattern in cfg.lowrank_stacked:
        if re.search(pattern, name):
            return True, f"stacked {pattern!r}{slices}"
    return False, f"{len(shape)}-D"


def lowrank_rank(shape: tuple[int, ...], rank_ratio: float, rank: int | None = None) -> int:
    """k of a weight matrix, or of each slice of a stack (its trailing two dimensions):
    `rank` where given (at most min(m, n)), else max(1, int(rank_ratio * min(m, n)))."""
    if rank is not None:
        return min(rank, min(shape[-2:]))
    return max(1, int(rank_ratio * min(shape[-2:])))
