"""Merge recipes: the mergekit YAML that `ccsmerge merge CONFIG.yml` reads,
with mergekit 0.1.5's meaning, and that every merge writes beside its output
(ccsmerge.yml) and into its safetensors metadata, so that an output records
how it was made and can be made again.

    merge_method: ties              # any method of the registry (see the README's method table)
    base_model: path/to/base        # optional for cart and average; linear takes none
    models:
      - model: path/to/finetune-a
        parameters: {weight: 0.7, density: [{filter: self_attn, value: 0.5}, {value: 0.3}]}
      - model: path/to/finetune-b
        parameters: {weight: 0.3}
    parameters: {lambda: [0.5, 1.0], normalize: true}   # a list: a gradient over the layers
    dtype: float32                  # optional: inputs are cast to it (and the output, unless out_dtype)
    out_dtype: bfloat16             # optional: the output dtype
    tokenizer_source: base          # optional: base or a model path

or, for a range of layers, `slices: [{sources: [{model: A, layer_range: [0, 8]}, ...]}]`
instead of `models`. Relative paths are relative to the YAML file's folder.

A parameter given per model (a models entry's `parameters`) overrides the
slice's and the top-level one for that model; a filter list with no match
falls through to the next of those, then to the method's default (mergekit's
default, where it differs from ccsmerge's: `spec.recipe_defaults`). What
mergekit has and ccsmerge does not honour is refused by name, never dropped."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ._version import __version__
from .accuracy import OFF
from .checkpoint import hub_id_hint, regular_file_problem
from .config import COMMON_PARAMS, METHOD_PARAMS, METHODS, options_of, plain_validator
from .errors import MergeError
from .methods import REGISTRY, MethodSpec, Param
from .tensor_values import Filtered, Gradient, Setting

DTYPES = ("bfloat16", "float16", "float32")
MAX_RECIPE_BYTES = 16 * 2**20  # a recipe is a few lines per model
MAX_RECIPE_DEPTH = 32  # of nested lists and mappings; a recipe has 6

ALLOW_NONFINITE = COMMON_PARAMS[2]
# Every parameter key a recipe may give, by its recipe name (lam as `lambda` too).
PARAMETER_KEYS: dict[str, Param] = {
    **{name: p for p in METHOD_PARAMS.values() for name in ([p.name, p.alias] if p.alias else [p.name])},
    ALLOW_NONFINITE.name: ALLOW_NONFINITE,
}
# mergekit parameters that change nothing in ccsmerge's result: accepted, checked, not passed.
NO_EFFECT = {"int8_mask": "mergekit's int8 sign masks (ccsmerge's masks are boolean; the result is the same)"}
# mergekit parameters ccsmerge does not honour, with why.
NOT_HONOURED = {
    "rescale": "mergekit's L1 rescaling of sparsified task vectors is not implemented "
               "(ccsmerge's DARE divides the kept entries by density; TIES and Breadcrumbs do not rescale)",
    "epsilon": "DELLA's magnitude window: ccsmerge has no DELLA",
}
REFUSED_TOP = {
    "modules": "per-module merges (mergekit's `modules`) are not supported; give `models` or one slice",
    "tokenizer": "mergekit's tokenizer configuration (added tokens, pad_to_multiple_of) is not supported; "
                 "give tokenizer_source: base or a model path",
    "chat_template": "setting a chat template is not supported; the tokenizer source's files are copied as they are",
}


def _refuse_keys(data: Any, refused: dict[str, str]) -> Any:
    if isinstance(data, dict):
        for key, why in refused.items():
            if key in data:
                raise ValueError(f"{key}: {why}")
    return data


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    parameters: dict[str, Any] | None = None


class SliceSource(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, Any] | None = None


class Slice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sources: list[SliceSource] = Field(min_length=1)
    base_model: str | None = None
    parameters: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _refused(cls, data):
        return _refuse_keys(data, {"residual_weight": "not supported (ccsmerge adds no residual of the base)"})


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    merge_method: Literal[METHODS]  # type: ignore[valid-type]
    base_model: str | None = None
    models: list[ModelEntry] | None = Field(None, min_length=2)
    slices: list[Slice] | None = Field(None, min_length=1)
    parameters: dict[str, Any] | None = None
    dtype: Literal[DTYPES] | None = None  # type: ignore[valid-type]
    out_dtype: Literal[DTYPES] | None = None  # type: ignore[valid-type]
    tokenizer_source: str | None = None
    ccsmerge_version: str | None = Field(None, description="informational: the version that wrote it")

    @model_validator(mode="before")
    @classmethod
    def _refused(cls, data):
        return _refuse_keys(data, REFUSED_TOP)

    @model_validator(mode="after")
    def _inputs(self):
        if (self.models is None) == (self.slices is None):
            raise ValueError("give the models under `models` or under `slices`, one of the two")
        if self.tokenizer_source == "union":
            raise ValueError(
                "tokenizer_source: union (a vocabulary merged from every model's) is not supported; "
                "give base or a model path"
            )
        return self


# ----------------------------------------------------------------------------- reading parameters


class _Bad(Exception):
    """A recipe error at a place (models.0.parameters.weight)."""

    def __init__(self, where: str, message: str):
        super().__init__(f"{where}: {message}")


def _check_plain(p: Param, value: Any, where: str) -> None:
    try:
        plain_validator(p).validate_python(value)
    except pydantic.ValidationError as exc:
        raise _Bad(where, exc.errors()[0]["msg"]) from None


def _is_plain(value: Any) -> bool:
    return isinstance(value, (bool, int, float, str))


def _setting(p: Param, value: Any, where: str) -> Setting | tuple:
    """A recipe value as an option value: plain, a gradient (a list), a filter
    list (mappings of filter and value); regex lists stay lists of regexes."""
    if p.type is tuple:
        regexes = [value] if isinstance(value, str) else value
        if not isinstance(regexes, list) or not all(isinstance(r, str) for r in regexes):
            raise _Bad(where, "expected a regex or a list of regexes")
        return tuple(regexes)
    if isinstance(value, dict):
        value = [value]
    if _is_plain(value):
        _check_plain(p, value, where)
        return value
    if not isinstance(value, list) or not value:
        raise _Bad(where, "expected a value, a list of values (a gradient over the layers) or a list of "
                          "{filter, value} entries")
    if all(_is_plain(v) for v in value):
        for i, v in enumerate(value):
            _check_plain(p, v, f"{where}.{i}")
        return Gradient(value)
    entries = []
    for i, entry in enumerate(value):
        at = f"{where}.{i}"
        if not isinstance(entry, dict):
            raise _Bad(at, "a filter list holds {filter, value} entries only")
        unknown = [k for k in entry if k not in ("filter", "value")]
        if unknown:
            raise _Bad(f"{at}.{unknown[0]}", "unknown key; valid keys: filter, value")
        if "value" not in entry:
            raise _Bad(at, "a filter entry needs a value")
        pattern = entry.get("filter")
        if pattern is not None and not isinstance(pattern, str):
            raise _Bad(f"{at}.filter", "expected a part of tensor names (a string)")
        inner = entry["value"]
        if isinstance(inner, list) and inner and all(_is_plain(v) for v in inner):
            for j, v in enumerate(inner):
                _check_plain(p, v, f"{at}.value.{j}")
            entries.append((pattern, Gradient(inner)))
        elif _is_plain(inner):
            _check_plain(p, inner, f"{at}.value")
            entries.append((pattern, inner))
        else:
            raise _Bad(f"{at}.value", "expected a value or a list of values (a gradient)")
    return Filtered(entries)


def _parameters(spec: MethodSpec, given: dict | None, where: str, *, per_model: bool) -> dict[str, Any]:
    """One place's parameters as option values, by option name."""
    if not given:
        return {}
    if not isinstance(given, dict):
        raise _Bad(where, "expected a mapping of parameter names to values")
    found: dict[str, Any] = {}
    origin: dict[str, str] = {}
    takes = [p.name for p in spec.params if p.per_model]
    for key, value in given.items():
        at = f"{where}.{key}"
        if value is None and key in PARAMETER_KEYS:
            continue  # null: the default, as recorded recipes write it
        if per_model:
            p = spec.param(key) if isinstance(key, str) else None
            if p is None and key == "lambda":
                p = spec.param("lam")
            if not takes:
                raise _Bad(where, f"method '{spec.name}' takes no per-model parameters (got {key})")
            if p is None or not p.per_model:
                known = key in PARAMETER_KEYS or key in NO_EFFECT or key in NOT_HONOURED
                if not known:
                    raise _Bad(at, f"unknown key; valid keys (per-model parameters of {spec.name}): {', '.join(takes)}")
                raise _Bad(at, f"not a per-model parameter of {spec.name} (its per-model ones: {', '.join(takes)}); "
                               "give it under the top-level parameters")
        else:
            if key in NOT_HONOURED:
                raise _Bad(at, f"not supported: {NOT_HONOURED[key]}")
            if key in NO_EFFECT:
                if not isinstance(value, bool):
                    raise _Bad(at, "expected true or false")
                continue
            p = PARAMETER_KEYS.get(key) if isinstance(key, str) else None
            if p is None:
                raise _Bad(at, f"unknown key; valid keys: {', '.join(PARAMETER_KEYS)}")
            if p is ALLOW_NONFINITE:
                _check_plain_common(p, value, at)
                found[p.name] = value
                continue
        if p.name in found:
            raise _Bad(where, f"give one of {origin[p.name]} and {key}, not both")
        found[p.name] = _setting(p, value, at)
        origin[p.name] = str(key)
    return found


def _check_plain_common(p: Param, value: Any, where: str) -> None:
    if not isinstance(value, bool):
        raise _Bad(where, "expected true or false")


def _fall_through(high: Any, low: Any) -> Any:
    """A higher-precedence setting, falling through to a lower one where no filter matches."""
    if high is None:
        return low
    if isinstance(high, Filtered):
        return high.then(low)
    return high


def _default_of(spec: MethodSpec, name: str) -> Any:
    return spec.recipe_defaults.get(name, spec.param(name).default)


def recipe_arguments(recipe: Recipe, source: str = "recipe") -> dict:
    """merge_checkpoints' arguments from a recipe: models, method, base, the
    output dtype (`dtype`), input_dtype, tokenizer_source and layer_range
    (only where the recipe gives them), and the method's options."""
    try:
        return _arguments(recipe)
    except _Bad as exc:
        raise MergeError(f"{source}: {exc}") from None


def _arguments(recipe: Recipe) -> dict:
    spec = REGISTRY[recipe.merge_method]
    layer_range = None
    base = recipe.base_model
    slice_parameters: dict = {}
    if recipe.slices is not None:
        if len(recipe.slices) > 1:
            raise _Bad("slices", f"{len(recipe.slices)} slices stack layer ranges (a frankenmerge), which ccsmerge "
                                 "does not do; give one slice, whose sources all take the same layer_range")
        part = recipe.slices[0]
        ranges = [tuple(s.layer_range) for s in part.sources]
        for i, r in enumerate(ranges):
            if r != ranges[0]:
                raise _Bad(f"slices.0.sources.{i}.layer_range",
                           f"{list(r)} differs from {list(ranges[0])} (sources.0): ccsmerge selects one layer range "
                           "for every model; stacking different ranges (a frankenmerge) is not supported")
        start, stop = ranges[0]
        if start < 0 or stop <= start:
            raise _Bad("slices.0.sources.0.layer_range", f"{list(ranges[0])} is not a range [start, stop) of layers")
        layer_range = (start, stop)
        base = part.base_model or base
        slice_parameters = _parameters(spec, part.parameters, "slices.0.parameters", per_model=False)
        entries = [(f"slices.0.sources.{i}", s.model, s.parameters) for i, s in enumerate(part.sources)]
    else:
        entries = [(f"models.{i}", m.model, m.parameters) for i, m in enumerate(recipe.models)]
    top = _parameters(spec, recipe.parameters, "parameters", per_model=False)
    shared = {**top}
    for name, value in slice_parameters.items():  # the slice's parameters come before the top-level ones
        shared[name] = _fall_through(value, top.get(name))

    # The base listed among the models is the base only (mergekit's inputs);
    # linear, which takes no base, averages it as one of the models.
    models, own = [], []
    for where, path, given in entries:
        if base is not None and path == base:
            if spec.param("weight") is not None and not spec.needs_base:
                pass  # linear: the base is one of the averaged models
            else:
                if given:
                    raise _Bad(f"{where}.parameters", "the base model's entry takes no parameters "
                                                      f"({spec.name} merges the other models' task vectors)")
                continue
        models.append(path)
        own.append(_parameters(spec, given, f"{where}.parameters", per_model=True))
    if base is not None and spec.param("weight") is not None and not spec.needs_base:
        if base not in models:
            raise _Bad("base_model", f"{spec.name} takes no base: mergekit averages base_model in as one more "
                                     "model; list it under models (with its weight) instead")
        base = None
    if len(models) < 2:
        raise _Bad("models" if recipe.slices is None else "slices.0.sources",
                   f"merging needs at least 2 models besides the base, got {len(models)}")

    options: dict[str, Any] = {}
    for name, value in shared.items():
        if name in spec.recipe_defaults and isinstance(value, Filtered):
            value = value.then(spec.recipe_defaults[name])
        options[name] = value
    for p in spec.params:
        if p.name not in options and p.name in spec.recipe_defaults:
            options[p.name] = spec.recipe_defaults[p.name]
        if p.per_model and any(p.name in o for o in own):
            fallback = options.get(p.name, _default_of(spec, p.name))
            per = tuple(_fall_through(o.get(p.name), fallback) for o in own)
            if p.name in spec.recipe_defaults:
                per = tuple(v.then(spec.recipe_defaults[p.name]) if isinstance(v, Filtered) else v for v in per)
            options[p.name] = per

    kwargs: dict[str, Any] = dict(models=models, method=recipe.merge_method, base=base, **options)
    output = recipe.out_dtype
    if recipe.dtype is not None:
        if recipe.out_dtype is None and recipe.ccsmerge_version is not None:
            output = recipe.dtype  # recorded by an older ccsmerge, whose `dtype` was the output's
        else:
            kwargs["input_dtype"] = recipe.dtype
            output = recipe.out_dtype or recipe.dtype
    kwargs["dtype"] = output
    if recipe.tokenizer_source is not None:
        kwargs["tokenizer_source"] = recipe.tokenizer_source
    if layer_range is not None:
        kwargs["layer_range"] = layer_range
    return kwargs


# ----------------------------------------------------------------------------- writing recipes


def _recorded(value: Any) -> Any:
    """An option value as a recipe writes it."""
    if isinstance(value, Gradient):
        return list(value.values)
    if isinstance(value, Filtered):
        entries = []
        for pattern, v in value.entries:
            entry = {"filter": pattern} if pattern is not None else {}
            entries.append({**entry, "value": _recorded(v)})
        return entries
    if isinstance(value, tuple):
        return list(value)
    return value


def recipe_of(
    cfg,
    models,
    base,
    dtype: str | None,
    *,
    input_dtype: str | None = None,
    tokenizer_source: str | None = None,
    layer_range: tuple[int, int] | None = None,
) -> Recipe:
    """The recipe that records a merge: every parameter of its method,
    resolved (per-model values in the models' entries), the dtypes, the
    tokenizer source and the layer range. dtype is the output's, input_dtype
    what the inputs were cast to; reading the recipe back makes the same merge."""
    spec = cfg.spec
    shared: dict[str, Any] = {}
    own: list[dict[str, Any]] = [{} for _ in models]
    for name, value in options_of(cfg).items():
        p = spec.param(name)
        key = p.alias or name
        if p.per_model and isinstance(value, tuple) and p.type is not tuple:
            for entry, v in zip(own, value):
                entry[key] = _recorded(v)
        elif value is None and p.none_is_value:
            shared[key] = OFF  # a recipe drops nulls: the value that means None is written
        else:
            shared[key] = _recorded(value)
    if cfg.allow_nonfinite:
        shared["allow_nonfinite"] = True
    paths = [str(Path(p).resolve()) for p in models]
    base_path = str(Path(base).resolve()) if base is not None else None
    fields: dict[str, Any] = {}
    if layer_range is None:
        fields["models"] = [ModelEntry(model=m, parameters=o or None) for m, o in zip(paths, own)]
    else:
        sources = [SliceSource(model=m, layer_range=tuple(layer_range), parameters=o or None) for m, o in zip(paths, own)]
        fields["slices"] = [Slice(sources=sources)]
    if tokenizer_source is not None:
        fields["tokenizer_source"] = tokenizer_source if tokenizer_source == "base" else str(Path(tokenizer_source).resolve())
    return Recipe(
        merge_method=cfg.method,
        base_model=base_path,
        parameters=shared,
        dtype=input_dtype,
        out_dtype=dtype or input_dtype,
        ccsmerge_version=__version__,
        **fields,
    )


# ----------------------------------------------------------------------------- reading files


def _valid_keys(model: type[BaseModel]) -> str:
    return ", ".join(model.model_fields)


_PLACES = {"models": ModelEntry, "slices": Slice, "sources": SliceSource}


def _explain(exc: pydantic.ValidationError, source: str) -> MergeError:
    lines = []
    for err in exc.errors():
        loc = err["loc"]
        where = ".".join(str(p) for p in loc) or "config"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            names = [p for p in loc[:-1] if isinstance(p, str)]
            parent = _PLACES.get(names[-1], Recipe) if names else Recipe
            msg = f"unknown key; valid keys: {_valid_keys(parent)}"
            if loc[-1] == "normalize" and parent is Recipe:
                msg += " (normalize is a parameter: parameters: {normalize: ...})"
        lines.append(f"{where}: {msg}" if loc else msg)
    return MergeError(f"{source}: " + "; ".join(lines))


def parse_recipe(data: object, source: str) -> Recipe:
    try:
        recipe = Recipe.model_validate(data)
    except pydantic.ValidationError as exc:
        raise _explain(exc, source) from None
    recipe_arguments(recipe, source)  # every parameter checked now, before anything is read
    return recipe


def load_recipe(path: str | Path) -> Recipe:
    """A validated recipe from a YAML file, with model paths made absolute."""
    path = Path(path)
    problem = regular_file_problem(path)
    if problem is not None:  # never opened: a FIFO would block, a device never end
        raise MergeError(f"{path}: cannot read: {problem}")
    size = path.stat().st_size
    if size > MAX_RECIPE_BYTES:
        raise MergeError(f"{path}: {size} bytes is too large for a merge recipe (the most is {MAX_RECIPE_BYTES})")
    try:
        text = path.read_text()
        # Depth first, from the parser's events (no recursion, and it stops at
        # the limit): composing a deep document recurses, and slowly.
        depth = 0
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            depth += isinstance(event, yaml.CollectionStartEvent) - isinstance(event, yaml.CollectionEndEvent)
            if depth > MAX_RECIPE_DEPTH:
                raise RecursionError
        data = yaml.safe_load(text)
    except OSError as exc:
        raise MergeError(f"{path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise MergeError(f"{path}: not valid YAML{where}: {problem}") from None
    except (RecursionError, UnicodeDecodeError) as exc:
        deep = f"nested more than {MAX_RECIPE_DEPTH} levels deep: not a merge recipe"
        why = deep if isinstance(exc, RecursionError) else "not UTF-8 text"
        raise MergeError(f"{path}: {why}") from None
    if not isinstance(data, dict):
        raise MergeError(f"{path}: expected a mapping with merge_method and models")
    try:
        recipe = Recipe.model_validate(data)
    except pydantic.ValidationError as exc:
        raise _explain(exc, str(path)) from None
    folder = path.resolve().parent

    def absolute(p: str, what: str = "model") -> str:
        found = folder / Path(p).expanduser()
        if not os.path.lexists(found):
            hint = hub_id_hint(p)
            if hint:  # a Hub id, as mergekit recipes give them
                raise MergeError(f"{path}: {what} {p} is not a folder beside the recipe{hint}")
            if "+" in p:
                raise MergeError(f"{path}: {what} {p}: no such folder; mergekit's `model+lora` (a LoRA applied "
                                 "to a model) is not supported: merge the adapter into the model first")
        return str(found.resolve())

    update: dict[str, Any] = {"base_model": absolute(recipe.base_model) if recipe.base_model else None}
    if recipe.models is not None:
        update["models"] = [m.model_copy(update={"model": absolute(m.model)}) for m in recipe.models]
    if recipe.slices is not None:
        update["slices"] = [
            s.model_copy(update={
                "sources": [src.model_copy(update={"model": absolute(src.model)}) for src in s.sources],
                "base_model": absolute(s.base_model) if s.base_model else None,
            })
            for s in recipe.slices
        ]
    if recipe.tokenizer_source not in (None, "base"):
        update["tokenizer_source"] = absolute(recipe.tokenizer_source, "tokenizer_source")
    recipe = recipe.model_copy(update=update)
    recipe_arguments(recipe, str(path))  # every parameter checked now, before anything is read
    return recipe


def dump_recipe(recipe: Recipe) -> str:
    data = recipe.model_dump(mode="json", by_alias=True, exclude_none=True)
    return yaml.safe_dump(data, sort_keys=False)
