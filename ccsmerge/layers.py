"""Layer selection: keep layers start..stop-1 of every input, renumbered from
0, with the tensors outside the layer stack (embeddings, final norm, head).
It gives the tensors of mergekit's `slices` when every source takes the same
`layer_range`.

A tensor belongs to layer N when its name has a layer stack's prefix
followed by N: `model.layers.N.`, `transformer.h.N.`, `encoder.layer.N.`,
`block.N.`, `layers.N.`. A model with more than one stack (T5's encoder and
decoder, a multimodal model's vision tower beside its language model) is
refused: one range cannot say which stack it selects."""

from __future__ import annotations

import re

from .errors import MergeError

# The first `<stack>.<N>.` in a name: the stack's prefix and the layer index.
_LAYER = re.compile(r"^(?P<prefix>(?:.*?\.)?(?:layers|layer|h|block|blocks))\.(?P<index>\d+)\.")
# Where Hugging Face configs keep the number of layers (first present wins).
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
# Per-layer lists of a config, cut to the selected layers.
PER_LAYER_KEYS = ("layer_types",)


def layer_of(name: str) -> tuple[str, int] | None:
    """(stack prefix, layer index) of a tensor name, or None outside any layer."""
    found = _LAYER.match(name)
    return (found["prefix"], int(found["index"])) if found else None


def check_layer_range(value) -> tuple[int, int]:
    """(start, stop) from a pair of non-negative integers with start < stop."""
    try:
        start, stop = value
    except (TypeError, ValueError):
        raise MergeError(f"layer_range: expected [start, stop], got {value!r}") from None
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (start, stop)):
        raise MergeError(f"layer_range: expected two integers [start, stop], got {value!r}")
    if start < 0 or stop <= start:
        raise MergeError(f"layer_range: [{start}, {stop}] selects no layers (0 <= start < stop)")
    return start, stop


def select_layers(names, layer_range: tuple[int, int], source: str) -> dict[str, str]:
    """Output name -> input name: the layers in layer_range renumbered from
    0, and every tensor outside the layers. source names the model."""
    start, stop = layer_range
    found = {name: layer_of(name) for name in names}
    prefixes = sorted({where[0] for where in found.values() if where is not None})
    if not prefixes:
        raise MergeError(f"{source}: layer_range: no tensor name has a layer index (such as model.layers.N.)")
    if len(prefixes) > 1:
        raise MergeError(
            f"{source}: layer_range: the model has layers in more than one stack ({', '.join(prefixes)}); "
            "one range cannot say which to select (merge the whole models instead)"
        )
    count = 1 + max(where[1] for where in found.values() if where is not None)
    if stop > count:
        raise MergeError(f"{source}: layer_range [{start}, {stop}]: the model has {count} layers (0 to {count - 1})")
    selected = {}
    for name, where in found.items():
        if where is None:
            selected[name] = name
        elif start <= where[1] < stop:
            prefix = where[0]
            rest = name[len(prefix) + 1 + len(str(where[1])) :]
            selected[f"{prefix}.{where[1] - start}{rest}"] = name
    return selected


def count_layers(names) -> int | None:
    indices = [where[1] for where in map(layer_of, names) if where is not None]
    return 1 + max(indices) if indices else None


def edit_config_layers(config: dict, layer_range: tuple[int, int], layers_before: int | None) -> bool:
    """Set the number of layers of a parsed config.json to the selection's
    (and cut its per-layer lists); whether anything changed. Sub-configs
    (text_config) are edited where they hold the layer count."""
    start, stop = layer_range
    changed = False
    for part in [config, *(v for k, v in config.items() if k.endswith("_config") and isinstance(v, dict))]:
        key = next((k for k in LAYER_COUNT_KEYS if isinstance(part.get(k), int)), None)
        if key is None:
            continue
        before = part[key]
        if layers_before is not None and before != layers_before:
            continue  # another stack's count (a vision tower's)
        part[key] = stop - start
        changed = True
        for per_layer in PER_LAYER_KEYS:
            value = part.get(per_layer)
            if isinstance(value, list) and len(value) == before:
                part[per_layer] = value[start:stop]
    return changed
