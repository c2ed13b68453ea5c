"""Merge options: one validated, immutable model shared by the Python API
(and, later, the CLI and YAML configs)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

METHODS = ("average", "task_arithmetic", "ties", "cart", "tsv_m", "iso_c", "iso_cts")
NEEDS_BASE = ("task_arithmetic", "ties", "tsv_m", "iso_c", "iso_cts")
# Methods that take every 2-D weight's singular vectors from an SVD of task vectors.
SVD_FAMILY = ("tsv_m", "iso_c", "iso_cts")

# Method defaults for lam, from the papers' configurations.
DEFAULT_LAM = {
    "cart": 2.0,
    "task_arithmetic": 0.3,
    "ties": 1.0,
    "average": 1.0,
    "tsv_m": 1.0,
    "iso_c": 1.0,
    "iso_cts": 1.0,
}

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


class MergeConfig(BaseModel):
    """Every option of a merge. Unknown keys are rejected with the list of valid ones."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: Literal[METHODS] = "cart"  # type: ignore[valid-type]
    rank_ratio: float = Field(0.12, gt=0.0, le=1.0, description="CART: k = max(1, int(rank_ratio * min(m, n)))")
    lam: float | None = Field(None, description="scale of the update; None = the method's default")
    density: float = Field(0.2, gt=0.0, le=1.0, description="TIES: fraction of each task vector kept")
    common_space_fraction: float = Field(
        0.8, ge=0.0, le=1.0, description="Iso-CTS: share of the rank given to the common subspace"
    )
    svd: Literal["randomized", "exact"] = "randomized"
    oversample: int | None = Field(None, ge=0, description="None = max(10, k)")
    power_iters: int | None = Field(None, ge=0, description="None = 4")
    seed: int = Field(0, ge=0)
    device: str = "auto"
    lowrank_include: tuple[str, ...] = ()
    lowrank_exclude: tuple[str, ...] = DEFAULT_LOWRANK_EXCLUDE
    allow_nonfinite: bool = Field(False, description="merge NaN/Inf inputs instead of refusing them")

    @model_validator(mode="after")
    def _finite_lam(self):
        if self.lam is not None and not (abs(self.lam) < float("inf")):
            raise ValueError("lam must be finite")
        return self

    @property
    def scale(self) -> float:
        return DEFAULT_LAM[self.method] if self.lam is None else self.lam

    def oversample_for(self, k: int) -> int:
        return max(10, k) if self.oversample is None else self.oversample

    def power_iters_for(self) -> int:
        return 4 if self.power_iters is None else self.power_iters
