"""Merge recipes: the mergekit-style YAML that `ccsmerge merge CONFIG.yml`
reads, and that every merge writes beside its output (ccsmerge.yml) and into
its safetensors metadata, so that an output records how it was made and can
be made again.

    merge_method: cart              # any method of the registry (see the README's method table)
    base_model: path/to/base        # optional for cart and average
    models:
      - model: path/to/finetune-a
      - model: path/to/finetune-b
    parameters: {rank_ratio: 0.12, lambda: 2.0}
    dtype: bfloat16                 # optional: the output dtype

Relative model paths are relative to the YAML file's folder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field, create_model

from ._version import __version__
from .checkpoint import hub_id_hint, regular_file_problem
from .config import COMMON_PARAMS, METHOD_PARAMS, METHODS, MergeConfig, options_of
from .errors import MergeError

DTYPES = ("bfloat16", "float16", "float32")
MAX_RECIPE_BYTES = 16 * 2**20  # a recipe is a few lines per model
MAX_RECIPE_DEPTH = 32  # of nested lists and mappings; a recipe has 4


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str


def _parameter_fields() -> dict:
    """One optional field per option a method can take (and allow_nonfinite),
    from the option schema; lam is written `lambda`, as mergekit users do."""
    fields = {}
    for name, p in {**METHOD_PARAMS, "allow_nonfinite": COMMON_PARAMS[2]}.items():
        annotation = list[str] if p.type is tuple else MergeConfig.model_fields[name].annotation
        fields[name] = (annotation | None, Field(None, alias=p.alias, description=p.description))
    return fields


class _ParametersBase(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    def options(self) -> dict:
        """The parameters that were given, as merge options."""
        given = self.model_dump(exclude_none=True)
        return {k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}


Parameters = create_model("Parameters", __base__=_ParametersBase, **_parameter_fields())
Parameters.__doc__ = "Method parameters; absent ones take the method's defaults."


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    merge_method: Literal[METHODS]  # type: ignore[valid-type]
    base_model: str | None = None
    models: list[ModelEntry] = Field(min_length=2)
    parameters: Parameters = Field(default_factory=Parameters)
    dtype: Literal[DTYPES] | None = None  # type: ignore[valid-type]
    ccsmerge_version: str | None = Field(None, description="informational: the version that wrote it")


def recipe_of(cfg, models, base, dtype: str | None) -> Recipe:
    """The recipe that records a merge: every parameter of its method, resolved."""
    params = {k: list(v) if isinstance(v, tuple) else v for k, v in options_of(cfg).items()}
    if cfg.allow_nonfinite:
        params["allow_nonfinite"] = True
    return Recipe(
        merge_method=cfg.method,
        base_model=str(Path(base).resolve()) if base is not None else None,
        models=[ModelEntry(model=str(Path(p).resolve())) for p in models],
        parameters=Parameters(**params),
        dtype=dtype,
        ccsmerge_version=__version__,
    )


def _explain(exc: pydantic.ValidationError, source: str) -> MergeError:
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "config"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            parent = Parameters if err["loc"][:1] == ("parameters",) else Recipe
            valid = [f.alias or n for n, f in parent.model_fields.items()]
            msg = f"unknown key; valid keys: {', '.join(valid)}"
        lines.append(f"{where}: {msg}")
    return MergeError(f"{source}: " + "; ".join(lines))


def parse_recipe(data: object, source: str) -> Recipe:
    try:
        return Recipe.model_validate(data)
    except pydantic.ValidationError as exc:
        raise _explain(exc, source) from None


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
    recipe = parse_recipe(data, str(path))
    folder = path.resolve().parent

    def absolute(p: str) -> str:
        found = folder / Path(p).expanduser()
        hint = hub_id_hint(p)
        if hint and not os.path.lexists(found):  # a Hub id, as mergekit recipes give them
            raise MergeError(f"{path}: model {p} is not a folder beside the recipe{hint}")
        return str(found.resolve())

    return recipe.model_copy(
        update={
            "models": [ModelEntry(model=absolute(m.model)) for m in recipe.models],
            "base_model": absolute(recipe.base_model) if recipe.base_model else None,
        }
    )


def dump_recipe(recipe: Recipe) -> str:
    data = recipe.model_dump(by_alias=True, exclude_none=True)
    return yaml.safe_dump(data, sort_keys=False)
