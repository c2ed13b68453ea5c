"""DARE (Yu et al. 2024, "Language Models are Super Mario"), per tensor: drop
each task-vector entry with probability 1 - density and rescale the kept ones
by 1/density (a density per model, as mergekit allows), then mergekit's
generalized task arithmetic (elementwise.combine: per-model weights; TIES'
sign election for `dare_ties`). As in mergekit, the combined task vectors
are summed unless `normalize` (divided by the sum of the weights).
Unlike mergekit, which rescales the kept entries to the task vector's L1
norm, the kept entries are divided by density, as in the paper.

The drop mask is a counter-based draw: entry i of task t is kept when a
SplitMix64 hash of (seed, tensor name, t, i) falls below density. It depends
on nothing else (not on the order tensors are merged in, nor on row blocks),
so a tensor merged whole and in row blocks gets the same mask, bit for bit."""

from __future__ import annotations

import math

import torch

from ..numerics import tensor_seed
from ..tensor_values import per_model
from .elementwise import _inputs, combine
from .params import DENSITY, LAM, NORMALIZE, SEED, WEIGHT
from .spec import Cost, Decision, MethodSpec, Treatment
from .ties import sign_agreement, task_vectors

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15  # SplitMix64's increment
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
_UNIFORM_BITS = 53


def _signed(value: int) -> int:
    """A 64-bit pattern as the int64 that holds it."""
    value &= _MASK64
    return value - (1 << 64) if value >> 63 else value


def _mix_int(z: int) -> int:
    """SplitMix64's finaliser on a Python int (exact, modulo 2**64)."""
    z &= _MASK64
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
    return z ^ (z >> 31)


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    # int64 >> is arithmetic: masking the sign-filled top bits makes it logical.
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def stream_key(seed: int, name: str, task: int) -> int:
    """The key of task `task`'s draws in tensor `name`."""
    return _mix_int(_mix_int(tensor_seed(seed, name)) + (task + 1) * _GOLDEN)


def uniform_bits(key: int, start: int, count: int, device) -> torch.Tensor:
    """The top 53 bits (int64, in [0, 2**53)) of SplitMix64 draw i of the
    stream `key`, for i = start .. start + count - 1: mix(key + (i + 1) * golden),
    in wrapping int64 arithmetic."""
    z = torch.arange(start + 1, start + 1 + count, dtype=torch.int64, device=device)
    z.mul_(_signed(_GOLDEN)).add_(_signed(key))
    z ^= _shift_right(z, 30)
    z.mul_(_signed(_MIX1))
    z ^= _shift_right(z, 27)
    z.mul_(_signed(_MIX2))
    z ^= _shift_right(z, 31)
    return _shift_right(z, 64 - _UNIFORM_BITS)


def keep_below(density: float) -> int:
    """Draws below this are kept: u = bits / 2**53 < density, exactly."""
    return math.ceil(density * (1 << _UNIFORM_BITS))


def dropped_and_rescaled(job, taus: torch.Tensor, start: int) -> torch.Tensor:
    """DARE on (T, N) task vectors whose first entry is flat element `start`
    of the tensor: each entry of task t kept with probability density_t, the
    kept ones divided by it (in place)."""
    for t, density in enumerate(per_model(job.cfg.density, job.tasks)):
        if density >= 1:
            continue
        kept = uniform_bits(stream_key(job.cfg.seed, job.name, t), start, taus.shape[1], taus.device) < keep_below(density)
        taus[t] = torch.where(kept, taus[t] / density, 0)
    return taus


def _dare_linear(job, taus, b):
    return combine(job, taus, b)


def _dare_ties(job, taus, b):
    return combine(job, taus, b, sign_agreement)


def _treatment(name: str, combination) -> Treatment:
    def merge(job, xs, base, start):
        taus, b = task_vectors(xs, base)
        merged = combination(job, dropped_and_rescaled(job, taus, start), b)
        return merged.reshape(b.shape).to(job.out_dtype)

    def whole(job, xs, base):
        if math.prod(job.shape) == 0:
            return base.to(job.out_dtype, copy=True)
        return merge(job, xs, base, 0)

    def blocks(job, rows, spans, device):
        row_numel = math.prod(job.shape[1:])
        for start, stop in spans:
            xs, base = rows(start, stop)
            yield merge(job, xs, base, start * row_numel)

    return Treatment(name, whole, blocks, DARE_COST)


# Task vectors in the compute dtype (a list and its stack while they are
# made, the weighted stack), the base, the rescaled task and the result in
# it, the TIES masks, and for the task being masked two int64 words and the
# mask per element.
DARE_COST = Cost(
    host=lambda T, has_base, in_b, work, out_b: _inputs(T, has_base, in_b) + (3 * T + 4) * work + T + 17 + in_b + out_b,
    device=lambda T, has_base, in_b, work: _inputs(T, has_base, in_b) + (3 * T + 4) * work + T + 17 + in_b,
)

DARE_LINEAR = _treatment("dare-linear", _dare_linear)
DARE_TIES = _treatment("dare-ties", _dare_ties)

# mergekit's defaults: density 1 (nothing dropped) unless given, lambda 1, no normalize.
DARE_DENSITY = DENSITY.with_default(1.0)


def _everywhere(treatment: str):
    return lambda name, shape, dtype, cfg, T: Decision(treatment, None, "elementwise")


METHODS = (
    MethodSpec(
        name="dare_linear",
        title="DARE (Yu et al. 2024)",
        summary="drop task-vector entries with probability 1 - density, rescale by 1/density; base + lam * sum_t",
        reference="https://arxiv.org/abs/2311.03099",
        params=(LAM.with_default(1.0), DARE_DENSITY, WEIGHT, SEED, NORMALIZE),
        needs_base=True,
        rule=_everywhere("dare-linear"),
        treatments={"dare-linear": DARE_LINEAR},
        search_axis="density",
    ),
    MethodSpec(
        name="dare_ties",
        title="DARE-TIES (Yu et al. 2024)",
        summary="DARE's random drop and rescale, then TIES' sign election; base + lam * the agreeing values' sum",
        reference="https://arxiv.org/abs/2311.03099",
        params=(LAM.with_default(1.0), DARE_DENSITY, WEIGHT, SEED, NORMALIZE),
        needs_base=True,
        rule=_everywhere("dare-ties"),
        treatments={"dare-ties": DARE_TIES},
        search_axis="density",
    ),
)
