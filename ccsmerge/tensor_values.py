"""Options whose value depends on the tensor or on the model, as mergekit
recipes give them, and the one resolver that turns them into plain values
when the plan decides each tensor.

A method option's value is one of:

- a plain value (a number, a bool, a string);
- a Gradient: values spread over the layers. A tensor of layer i of a stack
  of n layers takes the value at t = i / (n - 1) (t = 1 when n = 1), linearly
  interpolated between neighbouring values (bools and strings: the value at
  index int(t * (len - 1))); a tensor outside the layers takes t = 0, as in
  mergekit 0.1.5;
- a Filtered list: (filter, value) entries, the first whose filter is a
  substring of the tensor name (or None / "*": any tensor) gives the value (a
  plain value or a Gradient); when none matches, the method's default;
- for an option a method takes per model (Param.per_model: weight, density,
  ...), a tuple of one such value per model (one value alone is every
  model's).

resolver(cfg, names, T) checks the per-model tuples against T once and
returns name -> the tensor's MergeConfig, whose options are all plain (per
model: a tuple of T plain values); TensorJob.cfg carries it, so the
treatments read plain numbers and the plan shows what each tensor got."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from .errors import MergeError
from .layers import layer_of

Plain = bool | int | float | str


@dataclass(frozen=True)
class Gradient:
    """Values spread over the layers (interpolated as mergekit does)."""

    values: tuple[Plain, ...]

    def __init__(self, values: Iterable[Plain]):
        values = tuple(values)
        if len(values) < 1:
            raise ValueError("a gradient needs at least one value")
        for v in values:
            if not isinstance(v, (bool, int, float, str)):
                raise ValueError(f"a gradient's values are numbers, bools or strings, got {v!r}")
        object.__setattr__(self, "values", values)

    def at(self, t: float) -> Plain:
        values = self.values
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if not numeric:
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(values) - 1)
        i0 = int(scaled)
        i1 = min(len(values) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * values[i0] + frac * values[i1]


@dataclass(frozen=True)
class Filtered:
    """(filter, value) entries: the first whose filter the tensor name holds wins."""

    entries: tuple[tuple[str | None, Plain | Gradient], ...]

    def __init__(self, entries: Iterable[tuple[str | None, Plain | Gradient]]):
        checked = []
        for entry in entries:
            if not (isinstance(entry, tuple) and len(entry) == 2):
                raise ValueError(f"a filter entry is (filter, value), got {entry!r}")
            pattern, value = entry
            if pattern is not None and not isinstance(pattern, str):
                raise ValueError(f"a filter is a string (a part of tensor names), got {pattern!r}")
            if isinstance(value, (list, tuple)):
                value = Gradient(value)
            if not isinstance(value, (bool, int, float, str, Gradient)):
                raise ValueError(f"a filter's value is a number, bool, string or gradient, got {value!r}")
            checked.append((pattern, value))
        object.__setattr__(self, "entries", tuple(checked))

    def pick(self, name: str) -> Plain | Gradient | None:
        for pattern, value in self.entries:
            if pattern is None or pattern == "*" or (name and pattern in name):
                return value
        return None

    @property
    def has_default(self) -> bool:
        """Whether an entry matches every tensor."""
        return any(pattern is None or pattern == "*" for pattern, _ in self.entries)

    def then(self, fallback: Setting | None) -> Filtered:
        """This list, falling back on `fallback` where no filter matches."""
        if fallback is None or self.has_default:
            return self
        if isinstance(fallback, Filtered):
            return Filtered(self.entries + fallback.entries)
        return Filtered(self.entries + ((None, fallback),))


Setting = Plain | Gradient | Filtered
PER_TENSOR = (Gradient, Filtered)


def leaves(value: Any) -> list:
    """Every plain value a setting (or a per-model tuple of them) can give."""
    if isinstance(value, Gradient):
        return list(value.values)
    if isinstance(value, Filtered):
        return [leaf for _, v in value.entries for leaf in leaves(v)]
    if isinstance(value, tuple):
        return [leaf for v in value for leaf in leaves(v)]
    return [value]


def varies(value: Any) -> bool:
    """Whether the value depends on the tensor."""
    if isinstance(value, tuple):
        return any(varies(v) for v in value)
    return isinstance(value, PER_TENSOR)


def evaluate(value: Any, name: str, t: float) -> Any:
    """The plain value of a setting for a tensor (None: no filter matched)."""
    if isinstance(value, Filtered):
        value = value.pick(name)
    if isinstance(value, Gradient):
        return value.at(t)
    return value


def layer_position(name: str, stack_sizes: dict[str, int]) -> float:
    """t of a tensor: its layer's place in its stack, 0 outside the layers."""
    where = layer_of(name)
    if where is None:
        return 0.0
    stack, index = where
    layers = stack_sizes[stack]
    return index / (layers - 1) if layers > 1 else 1.0


def stack_sizes(names: Iterable[str]) -> dict[str, int]:
    """How many layers each stack has: one more than its largest layer index."""
    sizes: dict[str, int] = {}
    for name in names:
        where = layer_of(name)
        if where is not None:
            sizes[where[0]] = max(sizes.get(where[0], 0), where[1] + 1)
    return sizes


def per_model(value: Any, T: int) -> tuple:
    """A per-model option as one plain value per model (one value: every model's)."""
    return tuple(value) if isinstance(value, tuple) else (value,) * T


def check_per_model(cfg, T: int) -> None:
    """A per-model option's tuple holds one value per model."""
    for p in cfg.spec.params:
        value = getattr(cfg, p.name)
        if p.per_model and isinstance(value, tuple) and len(value) != T:
            raise MergeError(
                f"{p.name}: {len(value)} values given, one per model is {T} "
                f"(or give one value for every model)"
            )


def resolver(cfg, names: Sequence[str], T: int, make: Callable[..., Any] | None = None) -> Callable[[str], Any]:
    """name -> the tensor's config with every option plain. make(**options)
    validates a resolved config (default: ccsmerge.merge.make_config); an
    invalid value (an int gradient between integers) names the tensor."""
    check_per_model(cfg, T)
    varying = {p.name: p for p in cfg.spec.params if varies(getattr(cfg, p.name))}
    if not varying:
        return lambda name: cfg
    if make is None:
        from .merge import make_config as make
    sizes = stack_sizes(names)
    fields = {p.name: getattr(cfg, p.name) for p in cfg.spec.params}
    common = {"method": cfg.method, "device": cfg.device, "allow_nonfinite": cfg.allow_nonfinite}

    @lru_cache(maxsize=None)
    def validated(resolved: tuple) -> Any:
        return make(**common, **{**fields, **dict(resolved)})

    def config_of(name: str):
        t = layer_position(name, sizes)
        resolved = []
        for option, p in varying.items():
            value = getattr(cfg, option)
            if p.per_model and isinstance(value, tuple):
                plain = tuple(_or_default(evaluate(v, name, t), p) for v in value)
            else:
                plain = _or_default(evaluate(value, name, t), p)
            resolved.append((option, plain))
        try:
            return validated(tuple(resolved))
        except MergeError as exc:
            raise MergeError(f"tensor '{name}': {exc}".replace("invalid merge options: ", "")) from None

    return config_of


def _or_default(value, p):
    return p.default if value is None else value
