"""The inputs' config.json compared before any weight is read: the same
architecture (`architectures`, `model_type`) and the same shapes (hidden
size, layers, heads, feed-forward width, experts; also GPT-2, BERT and T5
names, and the sub-configs of multimodal models such as text_config). A
Llama and a Mistral of the same shapes have the same tensors but are not
the same model: merging them is refused unless allowed
(`allow_config_mismatch`, then a warning). Vocabulary sizes are not compared
here: different vocabularies show in the embedding rows, where they are
reported as added tokens (ccsmerge.vocab). A field is compared where both
configs have it; an input without config.json (a bare weights file) is not
compared."""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path

from .errors import MergeError

CONFIG_FILE = "config.json"
IDENTITY_FIELDS = ("architectures", "model_type")
SHAPE_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "head_dim",
    "moe_intermediate_size",
    "num_local_experts",
    "num_experts",
    # GPT-2
    "n_embd",
    "n_layer",
    "n_head",
    "n_inner",
    # T5
    "d_model",
    "d_ff",
    "d_kv",
    "num_layers",
    "num_decoder_layers",
    "num_heads",
)
FIELDS = IDENTITY_FIELDS + SHAPE_FIELDS
OVERRIDE = "--allow-config-mismatch"


def read_config(folder: Path | None) -> dict | None:
    """A model folder's parsed config.json; None where there is none, or
    (with a warning: it is copied as it is, and refused only where the
    output must edit it) where it is not a JSON object."""
    if folder is None or not (folder / CONFIG_FILE).is_file():
        return None
    path = folder / CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        warnings.warn(f"{path}: cannot be read as JSON ({exc}): not compared with the other inputs'", stacklevel=3)
        return None
    if not isinstance(config, dict):
        warnings.warn(f"{path}: holds a JSON {type(config).__name__}, not an object: not compared", stacklevel=3)
        return None
    return config


def vocab_size_of(config: dict | None) -> int | None:
    """The vocab_size a config records (top level, else its text_config)."""
    if config is None:
        return None
    for part in (config, config.get("text_config")):
        if isinstance(part, dict) and isinstance(part.get("vocab_size"), int):
            return part["vocab_size"]
    return None


def differences(a: dict, b: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """(field, value in a, value in b) for each compared field both have and that differs."""
    found = [(prefix + f, a[f], b[f]) for f in FIELDS if f in a and f in b and a[f] != b[f]]
    for key, value in a.items():
        if key.endswith("_config") and isinstance(value, dict) and isinstance(b.get(key), dict):
            found += differences(value, b[key], f"{prefix}{key}.")
    return found


def compare_configs(inputs: Sequence[tuple[str, dict | None]], allow: bool = False) -> None:
    """Refuse (or, allowed, warn about) inputs (label, config) whose configs
    differ from the first one's that has a config."""
    have = [(label, config) for label, config in inputs if config is not None]
    if len(have) < 2:
        return
    first, reference = have[0]
    for label, config in have[1:]:
        found = differences(reference, config)
        if not found:
            continue
        field, a, b = found[0]
        more = f" (and {len(found) - 1} more fields)" if len(found) > 1 else ""
        what = f"{label}: config.json {field} is {b!r}, {a!r} in {first}{more}"
        if allow:
            warnings.warn(f"{what}; merged anyway ({OVERRIDE})", stacklevel=3)
            continue
        raise MergeError(f"{what}: not the same architecture; pass {OVERRIDE} to merge them anyway")
