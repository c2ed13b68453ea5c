"""How accurate a randomized CART update needs to be, and how accurate it is.

The update Delta = sum_t LowRank_k(D_t), D_t = theta_t - theta_avg, cuts each
spectrum at sigma_k, where neighbouring singular values are often < 1 % apart.
Rounding the inputs to their storage dtype (noise of about kappa * eps * |theta|
per entry) moves the *exact* update by an amount set by those gaps; the inputs
do not define the update more precisely than that (the rounding floor).

- `rounding_floor`: a first-order perturbation estimate of that move, from the
  singular values of every D_t, computed from the top l of them (what a sketch
  of width l gives) with the tail bounded by sigma_l.
- `resolve_target`: the relative error a merge aims at: tolerance="auto" is
  AUTO_FRACTION of the floor, never below AUTO_MIN_TARGET; a float is the target.
- `ConvergenceMonitor`: an a-posteriori estimate of the randomized update's
  relative error between power iterations, from a small Gaussian probe of the
  successive updates and the contraction rate of subspace iteration."""

from __future__ import annotations

import functools
import math

import torch

# tolerance="auto" aims at this fraction of the rounding floor: an error a quarter
# of the inputs' own uncertainty adds ~3 % to it in quadrature (sqrt(1 + 1/16)).
AUTO_FRACTION = 0.25
# ...and never below this: fp32 inputs have floors of ~1e-5 (benchmarks/precision.py), far
# below any difference a merged model shows: the defaults, 0.04-0.8 % from the exact update on
# synthetic and the demo's task vectors, score as exact CART in the demo and MiniLM benchmarks.
AUTO_MIN_TARGET = 0.01
# The regularisation of the first-order gap denominators: a pair of singular values
# closer than the noise swaps rather than rotates, a change bounded by the pair's size.
_GAP_NOISE = 0.5
# Subspace iteration's contraction per power iteration is capped here: near 1 the
# estimate d / (1 - rho) is a factor 100 above the last change.
_MAX_RATE = 0.99
PROBE_COLUMNS = 16
# The computation's own rounding is counted at this multiple of the rounding floor
# of the compute dtype (float32: measured up to 12x it against a float64 reference,
# the cancellation in the centered products).
ARITHMETIC_MARGIN = 16.0
# The low-precision products (ccsmerge.fast_arithmetic: bf16 GEMMs on the CPU, TF32 on CUDA)
# are counted at this multiple of their first-order rounding floor, and are used only when
# that takes at most FAST_SHARE of the target.
FAST_MARGIN = 4.0
FAST_SHARE = 0.5
# A change between iterates within this multiple of the arithmetic's noise level says
# nothing about the contraction rate (successive iterates differ by their noise).
_NOISE_CHANGE = 2.0


OFF = "off"  # how flags and recipes write tolerance=None (fixed power iterations)


def parse_tolerance(value):
    """"auto", a relative error in (0, 1) as a float (from a number or its text), or
    None for None / "off" (fixed power iterations)."""
    if value is None or value == OFF:
        return None
    if value == "auto":
        return "auto"
    number = value
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = None
    if isinstance(number, bool) or not isinstance(number, (int, float)) or not 0 < number < 1:
        raise ValueError(f"tolerance must be 'auto', 'off' or a relative error in (0, 1), got {value!r}")
    return float(number)


def check_tolerance(tolerance) -> None:
    """None (fixed power iterations), "auto", or a relative error in (0, 1)."""
    if tolerance is not None:
        parse_tolerance(tolerance)


class Tolerance:
    """The type of the `tolerance` option: "auto", a float in (0, 1), or None ("off").
    Calling it parses a flag's text (argparse), keeping "off" as text so that a given
    flag stays given; pydantic validates with parse_tolerance."""

    def __new__(cls, value):
        parsed = parse_tolerance(value)
        return OFF if parsed is None else parsed

    @classmethod
    def __get_pydantic_core_schema__(cls, source, handler):
        from pydantic_core import core_schema

        return core_schema.no_info_plain_validator_function(parse_tolerance)


@functools.cache
def rounding_level(dtype: torch.dtype) -> float:
    """kappa: ||fl(x) - x||_F / ||x||_F for a rounding to dtype (round to nearest), measured
    once on a fixed Gaussian sample; the relative error of a rounding does not depend on
    the values' scale. 0 for float64 (nothing finer to round from)."""
    if dtype == torch.float64 or not dtype.is_floating_point:
        return 0.0
    x = torch.randn(1 << 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return float((x.to(dtype).to(torch.float64) - x).norm() / x.norm())


def rounding_noise(dtype: torch.dtype, weights_rms: float, tasks: int, centered: bool = True) -> float:
    """Per-entry standard deviation of the rounding noise in each D_t = theta_t - theta_avg
    when every theta_t (entries of RMS weights_rms) is rounded to dtype: E_t - E_avg."""
    spread = math.sqrt(1 - 1 / tasks) if centered and tasks > 1 else 1.0
    return rounding_level(dtype) * weights_rms * spread


def rounding_variance(singular_values: torch.Tensor, k: int, shape: tuple[int, int], noise: float) -> torch.Tensor:
    """E ||delta LowRank_k(D)||_F^2 per matrix when i.i.d. noise of standard deviation
    `noise` is added to D, to first order, from D's top l >= k singular values
    (singular_values: (T, l), descending).

    The truncation's change splits into the noise inside the kept row and column spaces
    (k^2 + k |m - n| entries of variance noise^2) and, for every kept i and dropped j, the
    rotation of the pair: 2 s_i^2 (s_i^2 + s_j^2) / (s_i^2 - s_j^2)^2 noise^2, with the gap
    regularised by the noise (a pair closer than the noise swaps). Dropped values beyond
    the l known ones are taken as s_l (an upper bound: the pair term grows with s_j)."""
    m, n = shape
    r = min(m, n)
    s = singular_values.to(torch.float64)
    l = s.shape[-1]
    if l < k:
        raise ValueError(f"rounding_variance: {l} singular values for rank {k}")
    kept = s[..., :k, None]

    def pairs(dropped):
        num = 2 * kept**2 * (kept**2 + dropped**2)
        return num / ((kept**2 - dropped**2) ** 2 + _GAP_NOISE * (kept + dropped) ** 2 * noise**2)

    inside = pairs(s[..., None, k:]).sum((-2, -1)) if l > k else torch.zeros(s.shape[:-1], dtype=torch.float64)
    tail = (r - l) * pairs(s[..., None, l - 1 : l]).sum((-2, -1)) if r > l else 0.0
    return noise**2 * (k * k + k * abs(m - n) + inside + tail)


def rounding_floor(
    singular_values: torch.Tensor, k: int, shape: tuple[int, int], noise: float, update_norm: float
) -> float:
    """Estimated relative change ||delta Delta|| / ||Delta|| of the exact CART update
    Delta = sum_t LowRank_k(D_t) when the inputs are rounded (noise: `rounding_noise`),
    the tasks' changes taken as independent. Validated against the brute-force
    measurement (benchmarks/precision.py, 512^2): 1.1-1.7x the measured change from the
    full spectra, 1.2-1.8x from the top 2k singular values. On real task vectors
    (benchmarks/floor_real.py: the demo's and MiniLM's fine-tunes, bf16 and fp16) it is an
    estimate of the change, not a bound: 0.84-1.33x one rounding's change, 0.94-1.25x the
    RMS of several, from the full spectra."""
    if noise == 0.0 or update_norm == 0.0:
        return 0.0
    variance = rounding_variance(singular_values, k, shape, noise).sum()
    return float(variance.sqrt()) / update_norm


def resolve_target(tolerance, floor: float) -> float:
    """The relative error a tensor's update aims at (see the module docstring)."""
    check_tolerance(tolerance)
    if tolerance == "auto":
        return max(AUTO_FRACTION * floor, AUTO_MIN_TARGET)
    return float(tolerance)


def probe_matrix(n: int, seed: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The Gaussian probe G (n x PROBE_COLUMNS): ||X G||_F^2 / g estimates ||X||_F^2."""
    generator = torch.Generator().manual_seed((seed + 0x9E3779B97F4A7C15) % 2**63)
    return torch.randn(n, PROBE_COLUMNS, generator=generator, dtype=dtype).to(device)


def probe_update(factors, probe: torch.Tensor) -> torch.Tensor:
    """sum_t U_t S_t Vh_t G in float64 (m x g): the update seen through the probe."""
    u, s, vh = factors
    return torch.einsum("tmk,tkg->mg", (u * s.unsqueeze(-2)).to(torch.float64), (vh @ probe).to(torch.float64))


class ConvergenceMonitor:
    """The relative error of the current iterate's update, estimated after each power
    iteration from the change d_q = ||Delta_q - Delta_{q-1}|| / ||Delta_q|| (through the
    probe) and the contraction rate rho: for errors shrinking by rho per iteration the
    previous iterate's error is at most d_q / (1 - rho), which bounds the current one.
    rho is the largest of the rate the sketch's own spectrum predicts, max_t (s_l / s_k)^2,
    and every ratio of successive changes observed so far: convergence near the cut is not
    geometric (a near-degenerate pair at sigma_k converges late, and the first iterations
    shrink the fast directions), so neither one step's ratio nor d_q rho / (1 - rho), the
    error were it geometric from here, is an honest bound (measured: both understated the
    true error by up to 1.5-3.7x on power-law spectra; this one by at most 1.3x)."""

    def __init__(self, probe: torch.Tensor, k: int, complete: bool = False):
        # complete: the sketch spans every column (width = min(m, n)), so it is exact
        self.probe, self.k, self.complete = probe, k, complete
        self.previous: torch.Tensor | None = None
        self.last_change: float | None = None
        self.rate = 0.0  # the largest observed ratio of successive changes
        self.estimate = math.inf
        self.update_norm = 0.0

    def observe(self, seen: torch.Tensor, spectra: torch.Tensor, noise_level: float = 0.0) -> float:
        """The estimate after one more iterate (its update seen through the probe, as
        probe_update gives it, and its sketch's l singular values). noise_level: the relative
        error the arithmetic itself leaves in every iterate; a change at that level is noise,
        and the observed ratio of changes is not taken as the rate."""
        self.update_norm = float(seen.norm()) / math.sqrt(PROBE_COLUMNS)
        previous, self.previous = self.previous, seen
        if self.complete or self.update_norm == 0.0:
            self.estimate = 0.0
            return self.estimate
        if previous is None:
            self.estimate = math.inf
            return self.estimate
        change = float((seen - previous).norm() / seen.norm())
        s = spectra.to(torch.float64)
        ratio = (s[..., -1] / s[..., self.k - 1].clamp_min(torch.finfo(torch.float64).tiny)).nan_to_num(0.0)
        if self.last_change and change > _NOISE_CHANGE * noise_level:
            self.rate = max(self.rate, change / self.last_change)
        rate = min(max(float(ratio.max()) ** 2, self.rate), _MAX_RATE)
        self.last_change = change
        self.estimate = change / (1 - rate)
        return self.estimate
