"""The option schema: one validated, immutable model (MergeConfig) of every
merge option, built from the method registry. The Python API, the CLI flags,
recipe parameters and the mergekit plugin all derive from it; an option that
the chosen method does not take is refused, never ignored."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, InstanceOf, TypeAdapter, ValidationError, create_model
from pydantic import field_validator, model_validator

from .methods import METHOD_NAMES, REGISTRY, Param
from .methods.params import DEFAULT_LOWRANK_EXCLUDE
from .tensor_values import PER_TENSOR, Filtered, Gradient, leaves

__all__ = ["MergeConfig", "COMMON_PARAMS", "METHOD_PARAMS", "METHODS", "DEFAULT_LOWRANK_EXCLUDE", "options_of"]

METHODS = METHOD_NAMES

# Options every method takes.
COMMON_PARAMS = (
    Param("method", str, "cart", "merge method", choices=METHOD_NAMES),
    Param("device", str, "auto", "auto, cpu, cuda or cuda:N"),
    Param("allow_nonfinite", bool, False, "merge NaN/Inf inputs instead of refusing them"),
)


def _union() -> dict[str, Param]:
    """Every method parameter by name; methods that share a name share its type and range."""
    params: dict[str, Param] = {}
    for spec in REGISTRY.values():
        for p in spec.params:
            known = params.setdefault(p.name, p)
            if (known.type, known.gt, known.ge, known.le, known.choices, known.per_model) != (
                p.type, p.gt, p.ge, p.le, p.choices, p.per_model):
                raise TypeError(f"parameter '{p.name}' is declared differently by two methods")
    return params


METHOD_PARAMS: dict[str, Param] = _union()


def _annotation(p: Param):
    """A plain value of the option."""
    if p.choices is not None:
        base: Any = Literal[p.choices]  # type: ignore[valid-type]
    elif p.type is tuple:
        base = tuple[str, ...]
    else:
        base = p.type
    constraints = {k: v for k, v in (("gt", p.gt), ("ge", p.ge), ("le", p.le)) if v is not None}
    if p.type is float:
        constraints["allow_inf_nan"] = False
    return Annotated[base, Field(**constraints)] if constraints else base


def _setting_annotation(p: Param):
    """A plain value, a per-tensor value (filters, a gradient) and, for a
    per-model option, a tuple of them, one per model."""
    if p.type is tuple:
        return _annotation(p)
    one = Union[_annotation(p), InstanceOf[Gradient], InstanceOf[Filtered]]
    return Union[one, tuple[one, ...]] if p.per_model else one


_PLAIN: dict = {}  # name -> a validator of the option's plain values


def plain_validator(p: Param) -> TypeAdapter:
    if p.name not in _PLAIN:
        _PLAIN[p.name] = TypeAdapter(_annotation(p))
    return _PLAIN[p.name]


class _Schema(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _method_options(cls, data: Any) -> Any:
        """Refuse the options the method does not take; fill in its defaults."""
        if not isinstance(data, dict):
            return data
        method = data.get("method", "cart")
        spec = REGISTRY.get(method) if isinstance(method, str) else None
        if spec is None:
            return data  # the method field reports it
        data = {k: v for k, v in data.items() if not (k in METHOD_PARAMS and v is None and not _none_kept(k, spec))}
        foreign = [k for k in data if k in METHOD_PARAMS and k not in spec.param_names]
        if foreign:
            takes = ", ".join(spec.param_names) or "none besides " + ", ".join(p.name for p in COMMON_PARAMS)
            raise ValueError(f"method '{method}' does not take {', '.join(foreign)} (its options: {takes})")
        for p in spec.params:
            data.setdefault(p.name, p.default)
            value = data[p.name]
            if p.type is not tuple and isinstance(value, (list, tuple)):
                if not p.per_model:
                    per_model = ", ".join(q.name for q in spec.params if q.per_model) or "none"
                    raise ValueError(
                        f"{p.name} takes one value for every model, not one per model "
                        f"({method}'s per-model options: {per_model})"
                    )
                data[p.name] = tuple(value)
        return data

    @field_validator("*")
    @classmethod
    def _per_tensor_values(cls, value, info):
        """Every value a filter list or gradient can give is a valid value of the option."""
        p = METHOD_PARAMS.get(info.field_name)
        if p is None or p.type is tuple or not any(isinstance(v, PER_TENSOR) for v in _parts(value)):
            return value
        for leaf in leaves(value):
            try:
                plain_validator(p).validate_python(leaf)
            except ValidationError as exc:
                raise ValueError(f"{leaf!r}: {exc.errors()[0]['msg']}") from None
        return value

    @field_validator("lowrank_include", "lowrank_exclude", "lowrank_stacked", check_fields=False)
    @classmethod
    def _regexes(cls, patterns):
        for pattern in patterns or ():
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{pattern!r} is not a valid regular expression ({exc})") from None
        return patterns

    @model_validator(mode="after")
    def _cross_checks(self):
        spec = REGISTRY[self.method]
        if spec.extra_checks is not None:
            spec.extra_checks(self)
        return self

    @property
    def spec(self):
        return REGISTRY[self.method]


def _none_kept(name: str, spec) -> bool:
    p = spec.param(name)
    return p is not None and p.none_is_value


def _fields() -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for p in COMMON_PARAMS:
        fields[p.name] = (_annotation(p), Field(p.default, description=p.description))
    for p in METHOD_PARAMS.values():
        fields[p.name] = (Optional[_setting_annotation(p)], Field(None, description=p.description))
    return fields


def _parts(value) -> tuple:
    return value if isinstance(value, tuple) else (value,)


MergeConfig = create_model("MergeConfig", __base__=_Schema, **_fields())
MergeConfig.__doc__ = (
    "Every option of a merge: the common ones and the chosen method's parameters "
    "(other methods' parameters are None). Unknown options are refused with the valid ones."
)


def options_of(cfg) -> dict[str, Any]:
    """The method's parameters of a config, by name (what a recipe records)."""
    return {p.name: getattr(cfg, p.name) for p in cfg.spec.params}


def valid_options(method: str) -> list[str]:
    spec = REGISTRY.get(method)
    names = [p.name for p in COMMON_PARAMS]
    return names + list(spec.param_names if spec is not None else METHOD_PARAMS)


