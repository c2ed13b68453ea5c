"""PEFT LoRA adapters as merge inputs.

An adapter folder (adapter_config.json + adapter_model.safetensors or
adapter_model.bin) holds, per adapted module, factors B (m x r) and A (r x n)
with theta = W0 + s * B @ A, s = lora_alpha / r (lora_alpha / sqrt(r) with
use_rslora); embeddings and fan_in_fan_out (GPT-2's Conv1D) weights take the
transpose, s * A^T @ B^T. Every other tensor it holds (modules_to_save, a
saved base_layer, trained biases) replaces the base's tensor of that name.

`LoraAdapter` reads and checks one folder (headers only until a tensor is
asked for); `AdapterView` answers as an InputView does, with the base's
names and shapes: a tensor's value is the fine-tune's, W0 + s B A, formed
one tensor (or row block) at a time, and `factors(name)` gives the update as
the pair (s B, A) for the merges that work from factors."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import ADAPTER_CONFIG, Checkpoint, TensorInfo
from .errors import MergeError
from .lora_files import ADAPTER_WEIGHTS, PEFT_PREFIX, module_of, module_scaling, pattern_value

ADAPTER_FILES = (ADAPTER_WEIGHTS, "adapter_model.bin")
# Options that change what the adapter computes beyond W0 + s B A: refused by name.
_REFUSED = {
    "use_dora": "DoRA (weight-decomposed LoRA: a magnitude vector rescales every column)",
    "lora_bias": "a trained bias on lora_B",
    "layer_replication": "layer replication (layers the base does not have)",
    "target_parameters": "LoRA on parameters (nn.Parameter targets, e.g. fused experts)",
    "trainable_token_indices": "trainable tokens (a sparse embedding update)",
    "use_qalora": "QA-LoRA (quantization-aware pooling of the input)",
    "alora_invocation_tokens": "activated LoRA (applied only after invocation tokens)",
    "arrow_config": "Arrow routing between adapters",
    "kasa_config": "KaSA (singular-value adaptation of the base)",
    "monteclora_config": "MonteCLoRA (sampled factors)",
    "use_bdlora": "block-diagonal LoRA",
    "velora_config": "VeLoRA",
    "megatron_config": "Megatron-parallel LoRA layers",
}
# Options that only shape training or initialisation: the saved factors are what counts.
_INERT = {
    "alpha_pattern", "auto_mapping", "base_model_name_or_path", "bias", "corda_config", "ensure_weight_tying",
    "eva_config", "exclude_modules", "fan_in_fan_out", "inference_mode", "init_lora_weights", "layers_pattern",
    "layers_to_transform", "loftq_config", "lora_alpha", "lora_dropout", "lora_ga_config", "megatron_core",
    "modules_to_save", "peft_type", "peft_version", "qalora_group_size", "r", "rank_pattern", "revision",
    "target_modules", "task_type", "use_rslora",
}

def is_adapter(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / ADAPTER_CONFIG).is_file()


@dataclass(frozen=True)
class Factor:
    """One adapted weight: its factor keys, rank, scaling, and whether the update is transposed."""

    a: str
    b: str
    rank: int
    scale: float
    transposed: bool  # embeddings and fan_in_fan_out: delta = s * (B @ A)^T
    embedding: bool = False  # lora_embedding_A / lora_embedding_B (an nn.Embedding)


class LoraAdapter:
    """One PEFT LoRA adapter folder: its config checked, its tensors' headers read."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.folder = self.path
        config_file = self.path / ADAPTER_CONFIG
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise MergeError(f"{config_file}: not a readable adapter config ({exc})") from None
        if not isinstance(config, dict):
            raise MergeError(f"{config_file}: holds a JSON {type(config).__name__}, not an adapter config")
        self.config = config
        self.config_file = config_file
        self._check_config()
        weights = [self.path / name for name in ADAPTER_FILES if (self.path / name).exists()]
        if not weights:
            raise MergeError(f"{self.path}: an adapter folder without its weights ({' or '.join(ADAPTER_FILES)})")
        self.file = weights[0]
        self.ckpt = Checkpoint(self.file, lora_factors=True)
        self.files = [self.file, config_file]
        self.factors: dict[str, Factor] = {}  # base weight name -> factor
        self.full: dict[str, str] = {}  # base tensor name -> key of the tensor replacing it
        self._parse()

    def __repr__(self) -> str:
        return f"LoraAdapter({str(self.path)!r}, {len(self.factors)} adapted, {len(self.full)} replaced)"

    @property
    def names(self) -> set[str]:
        """The base tensors this adapter changes."""
        return set(self.factors) | set(self.full)

    @property
    def base_model_name(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    def _check_config(self) -> None:
        where = str(self.config_file)
        kind = self.config.get("peft_type", "LORA")
        if str(kind).upper() != "LORA":
            raise MergeError(f"{where}: a {kind} adapter; ccsmerge merges LoRA adapters (peft_type LORA) only")
        for key, what in _REFUSED.items():
            if self.config.get(key) not in (None, False, {}, []):
                raise MergeError(f"{where}: {key} is set: {what} is not a plain LoRA update and is not supported")
        unknown = sorted(
            k for k, v in self.config.items() if k not in _INERT and k not in _REFUSED and v not in (None, False, {}, [])
        )
        if unknown:
            raise MergeError(
                f"{where}: option {unknown[0]}={self.config[unknown[0]]!r} is not known to ccsmerge "
                "(it may change what the adapter computes); not merged"
            )
        for key in ("r", "lora_alpha"):
            value = self.config.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                raise MergeError(f"{where}: {key} must be a positive number, got {value!r}")
        for key in ("rank_pattern", "alpha_pattern"):
            if not isinstance(self.config.get(key) or {}, dict):
                raise MergeError(f"{where}: {key} must be an object (module pattern -> value)")

    def _parse(self) -> None:
        pairs: dict[str, dict[str, str]] = {}
        for key in self.ckpt.tensors:
            if not key.startswith(PEFT_PREFIX):
                raise MergeError(f"{self.file}: tensor '{key}' is not under '{PEFT_PREFIX}', as PEFT saves adapters")
            try:
                module, factor = module_of(key)
            except ValueError:
                inner = key[len(PEFT_PREFIX):]
                if "lora_" in inner:
                    raise MergeError(
                        f"{self.file}: tensor '{key}' is not a LoRA factor ccsmerge knows (lora_A/lora_B)"
                    ) from None
                self.full[inner.replace(".base_layer.", ".")] = key
                continue
            pairs.setdefault(module, {})[factor] = key
        fan_in_fan_out = bool(self.config.get("fan_in_fan_out"))
        for module, kinds in pairs.items():
            embedding = "embedding_A" in kinds or "embedding_B" in kinds
            a = kinds.get("embedding_A" if embedding else "A")
            b = kinds.get("embedding_B" if embedding else "B")
            if a is None or b is None:
                raise MergeError(f"{self.file}: module '{module}' has {'B' if a is None else 'A'} without its other factor")
            sa, sb = self.ckpt.tensors[a].shape, self.ckpt.tensors[b].shape
            if len(sa) != 2 or len(sb) != 2:
                raise MergeError(
                    f"{self.file}: module '{module}': factors of shapes {sa} and {sb}; LoRA on convolutions "
                    "is not supported (only linear and embedding layers)"
                )
            rank = sa[0]
            if sb[1] != rank:
                raise MergeError(f"{self.file}: module '{module}': A is {sa} and B is {sb}: their ranks differ")
            expected = pattern_value(self.config.get("rank_pattern") or {}, module, self.config.get("r", rank))
            if expected != rank:
                raise MergeError(
                    f"{self.file}: module '{module}' has rank {rank}, but {self.config_file.name} says r = {expected}"
                )
            # r and lora_alpha default to the factors' rank where the config leaves them out.
            scale = module_scaling({"r": rank, "lora_alpha": rank, **self.config}, module)
            self.factors[module + ".weight"] = Factor(a, b, rank, float(scale), embedding or fan_in_fan_out, embedding)

    def update_shape(self, name: str) -> tuple[int, int]:
        f = self.factors[name]
        (_, n), (m, _) = self.ckpt.tensors[f.a].shape, self.ckpt.tensors[f.b].shape
        return (n, m) if f.transposed else (m, n)

    def check_against(self, base) -> None:
        """Every tensor this adapter changes exists in the base with its shape."""
        for name in sorted(self.names):
            if name not in base.tensors:
                key = self.factors[name].a if name in self.factors else self.full[name]
                raise MergeError(
                    f"{self.file}: tensor '{key}' adapts '{name}', which the base {base.path} does not have "
                    "(is this adapter for another model?)"
                )
            want = base.tensors[name].shape
            if name in self.factors:
                shape = self.update_shape(name)
                if tuple(want) != shape:
                    raise MergeError(
                        f"{self.file}: module '{name.removesuffix('.weight')}' has a {shape[0]} x {shape[1]} update, "
                        f"but '{name}' in the base {base.path} has shape {tuple(want)}"
                    )
            if name in self.full:
                shape = self.ckpt.tensors[self.full[name]].shape
                if tuple(shape) != tuple(want):
                    raise MergeError(
                        f"{self.file}: tensor '{self.full[name]}' has shape {tuple(shape)}, '{name}' in the base "
                        f"{base.path} has {tuple(want)}"
                    )
        self._drop_unchanged_base_layers(base)
        if self.base_model_name and base.folder is not None:
            named = _model_name(base.folder)
            if named and Path(self.base_model_name).name != Path(named).name and Path(self.base_model_name).name != base.folder.name:
                warnings.warn(
                    f"{self.config_file}: made for base '{self.base_model_name}'; the base given is {base.path} "
                    f"('{named}'): the shapes agree, merged anyway"
                )

    def _drop_unchanged_base_layers(self, base) -> None:
        """PEFT saves an adapted embedding's base layer whole (save_embedding_layers):
        where it equals the base's, the module is its factors alone (merged from them)."""
        for name, key in list(self.full.items()):
            if ".base_layer." not in key or name not in self.factors:
                continue
            info = self.ckpt.tensors[key]
            if info.dtype != base.tensors[name].dtype or not info.shape:
                continue
            step = max(1, 2**24 // max(1, info.numel // info.shape[0]))
            if all(
                torch.equal(self.ckpt.read_rows(key, start, min(start + step, info.shape[0])),
                            base.read_rows(name, start, min(start + step, info.shape[0])))
                for start in range(0, info.shape[0], step)
            ):
                del self.full[name]

    def read_factors(self, name: str, dtype: torch.dtype, rows: tuple[int, int] | None = None):
        """(left, right) with left @ right the update of `name`, in dtype (left's rows start:stop if given)."""
        f = self.factors[name]
        a = self.ckpt.read(f.a).to(dtype)
        b = self.ckpt.read(f.b).to(dtype)
        left, right = (a.mT, b.mT) if f.transposed else (b, a)
        if rows is not None:
            left = left[rows[0]:rows[1]]
        return left * f.scale, right.contiguous()

    def read_full(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        key = self.full[name]
        return self.ckpt.read(key) if rows is None else self.ckpt.read_rows(key, *rows)


def _model_name(folder: Path) -> str | None:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        return config.get("_name_or_path") or None
    except (OSError, ValueError, AttributeError):
        return None


class AdapterView:
    """Input `index` of a merge: an adapter seen as the fine-tuned model it
    makes of the base (names, shapes and, for the tensors it changes, the
    compute dtype the base view reads them in)."""

    def __init__(self, adapter: LoraAdapter, index: int, base):
        self.adapter = adapter
        self.index = index
        self.base = base
        self.tensors = {
            name: TensorInfo(name, info.shape, info.dtype, adapter.file) for name, info in base.tensors.items()
        }

    def __repr__(self) -> str:
        return f"AdapterView({self.adapter!r})"

    @property
    def path(self):
        return self.adapter.path

    @property
    def folder(self):
        return self.adapter.folder

    @property
    def files(self):
        return self.adapter.files

    def aux_files(self):
        return []  # config and tokenizer come from the base

    def info(self, name: str) -> TensorInfo:
        return self.tensors[name]

    def kind(self, name: str) -> str | None:
        """"factors" (only a low-rank update), "full" (a tensor replaces the base's) or None (unchanged)."""
        if name in self.adapter.full:
            return "full"
        return "factors" if name in self.adapter.factors else None

    def held_itemsize(self, name: str) -> int:
        held = self.base.held_itemsize(name)
        return held + self.tensors[name].dtype.itemsize if self.kind(name) else held

    def factors(self, name: str):
        """(left, right): the update as s B (m x r) and A (r x n) in the tensor's dtype; None if unchanged."""
        if name not in self.adapter.factors:
            return None
        return self.adapter.read_factors(name, self.tensors[name].dtype)

    def read(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        return self.read_rows(name, 0, info.shape[0]) if info.shape else self._value(name, None)

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._value(name, (start, stop))

    def _value(self, name: str, rows: tuple[int, int] | None) -> torch.Tensor:
        dtype = self.tensors[name].dtype
        if name in self.adapter.full:
            value = self.adapter.read_full(name, rows).to(dtype)
        elif rows is None:
            value = self.base.read(name)
        else:
            value = self.base.read_rows(name, *rows)
        if name in self.adapter.factors:
            left, right = self.adapter.read_factors(name, dtype, rows)
            value = torch.addmm(value.to(dtype), left, right)
        return value
