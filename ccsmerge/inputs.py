"""What a streaming merge reads of each input: its checkpoint seen through
the options that change the tensors before the merge (in this order, as
mergekit applies them):

- layer selection (`layer_range`, ccsmerge.layers): fewer tensors, renamed;
- the input dtype (`input_dtype`): floating tensors cast as they are read;
- the vocabulary (`tokenizer_source`, ccsmerge.vocab): embedding and head
  rows cut, padded or reordered to the output tokenizer's vocabulary.

An InputView answers as a Checkpoint does (tensors, read, read_rows, files,
aux_files), with the names, shapes and dtypes the merge sees: the planner
plans them, the reader reads them row block by row block under the budget.
held_itemsize tells the planner what an element costs while it is read: the
file's bytes for a view of a memory-mapped file, the file's and the copy's
where the reader makes a copy (a cast or a reordered vocabulary)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .adapters import AdapterView, LoraAdapter
from .checkpoint import Checkpoint, TensorInfo
from .errors import MergeError
from .layers import count_layers, edit_config_layers, select_layers
from .model_configs import compare_configs, read_config, vocab_size_of
from .numerics import compute_dtype
from .vocab import VocabularyAlignment, align, edit_config_vocab, is_vocab_tensor, tokenizer_folder


@dataclass(frozen=True)
class InputOptions:
    """The options that change what is read (None: as in the files)."""

    input_dtype: torch.dtype | None = None
    tokenizer_source: str | None = None
    layer_range: tuple[int, int] | None = None

    def record(self) -> dict:
        """The options given, for the output's metadata."""
        found = {}
        if self.input_dtype is not None:
            found["input_dtype"] = str(self.input_dtype).removeprefix("torch.")
        if self.tokenizer_source is not None:
            found["tokenizer_source"] = self.tokenizer_source
        if self.layer_range is not None:
            found["layer_range"] = list(self.layer_range)
        return found


class InputView:
    """Input `index` of a merge (the base last) as the merge reads it."""

    def __init__(
        self,
        ckpt: Checkpoint,
        index: int,
        names: dict[str, str] | None = None,
        dtype: torch.dtype | None = None,
        casts: dict[str, torch.dtype] | None = None,
    ):
        self.ckpt = ckpt
        self.casts = casts or {}  # merged name -> the dtype it is read in (tensors an adapter changes)
        self.index = index
        self.names = names if names is not None else {n: n for n in ckpt.tensors}  # merged name -> name in the file
        self.dtype = dtype
        self.alignment: VocabularyAlignment | None = None
        self.peers: Sequence[InputView] = ()  # every input, for the rows a lacking input borrows
        self.tensors: dict[str, TensorInfo] = {}
        for name, source in self.names.items():
            info = ckpt.tensors[source]
            self.tensors[name] = TensorInfo(name, info.shape, self._dtype_for(name, info.dtype), info.file)

    def __repr__(self) -> str:
        return f"InputView({self.ckpt!r})"

    @property
    def path(self):
        return self.ckpt.path

    @property
    def folder(self):
        return self.ckpt.folder

    @property
    def files(self):
        return self.ckpt.files

    def aux_files(self):
        return self.ckpt.aux_files()

    def _dtype_of(self, dtype: torch.dtype) -> torch.dtype:
        return self.dtype if self.dtype is not None and dtype.is_floating_point else dtype

    def _dtype_for(self, name: str, dtype: torch.dtype) -> torch.dtype:
        return self.casts[name] if name in self.casts and dtype.is_floating_point else self._dtype_of(dtype)

    def aligned(self, name: str) -> bool:
        return self.alignment is not None and is_vocab_tensor(name)

    def set_alignment(self, alignment: VocabularyAlignment, peers: Sequence[InputView]) -> None:
        """Read the vocabulary tensors through alignment (every input's rows in the output vocabulary)."""
        self.alignment = alignment
        self.peers = peers
        for name, info in list(self.tensors.items()):
            if is_vocab_tensor(name) and info.shape:
                alignment.check_rows(self.index, name, info.shape[0], str(self.path))
                self.tensors[name] = TensorInfo(name, (alignment.rows, *info.shape[1:]), info.dtype, info.file)

    def _copies(self, name: str) -> bool:
        source = self.ckpt.tensors[self.names[name]]
        if self._dtype_for(name, source.dtype) != source.dtype:
            return True
        return self.aligned(name) and not self.alignment.passes_through(self.index, source.shape[0])

    def held_itemsize(self, name: str) -> int:
        """Bytes an element of `name` holds while it is read (see the module's docstring)."""
        source = self.ckpt.tensors[self.names[name]]
        held = source.dtype.itemsize
        return held + self.tensors[name].dtype.itemsize if self._copies(name) else held

    def info(self, name: str) -> TensorInfo:
        return self.tensors[name] if name in self.tensors else self.ckpt.info(name)

    def read(self, name: str) -> torch.Tensor:
        info = self.info(name)
        if not info.shape:
            return self._cast(self.ckpt.read(self.names[name]), name)
        return self.read_rows(name, 0, info.shape[0])

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows start:stop (along dim 0) of a tensor with at least one dimension."""
        info = self.info(name)
        source = self.names[name]
        if not self.aligned(name) or self.alignment.passes_through(self.index, self.ckpt.tensors[source].shape[0]):
            if start == 0 and stop == info.shape[0]:
                return self._cast(self.ckpt.read(source), name)
            return self._cast(self.ckpt.read_rows(source, start, stop), name)
        like = torch.empty((0, *info.shape[1:]), dtype=info.dtype)
        return self.alignment.read_rows(self.index, source, start, stop, self._peer_rows, like)

    def _peer_rows(self, j: int, source: str, start: int, stop: int) -> torch.Tensor:
        peer = self.peers[j]
        return peer._cast(peer.ckpt.read_rows(source, start, stop))

    def _cast(self, tensor: torch.Tensor, name: str | None = None) -> torch.Tensor:
        return tensor.to(self._dtype_for(name, tensor.dtype) if name is not None else self._dtype_of(tensor.dtype))


@dataclass
class Inputs:
    """The views of a merge's inputs, and what the output's files need from them."""

    models: list[InputView | AdapterView]
    base: InputView | None
    # Where an adapter changes a tensor, every input reads it in the compute dtype;
    # the output keeps the base's dtype there unless told otherwise.
    out_dtypes: dict[str, torch.dtype] | None = None
    tokenizer: Path | None = None  # the folder whose tokenizer files the output takes
    vocab_rows: int | None = None  # the output's vocabulary size, where tokenizer_source sets it
    layers_before: int | None = None

    def edit_config(self, config: dict, layer_range: tuple[int, int] | None) -> bool:
        """Bring a parsed config.json to the output's vocabulary and layers; whether it changed."""
        changed = False
        if self.vocab_rows is not None:
            changed = edit_config_vocab(config, self.vocab_rows) or changed
        if layer_range is not None:
            changed = edit_config_layers(config, layer_range, self.layers_before) or changed
        return changed


def open_inputs(
    models: Sequence[Checkpoint | LoraAdapter],
    base: Checkpoint | None,
    options: InputOptions,
    *,
    allow_config_mismatch: bool = False,
) -> Inputs:
    """Compare the inputs' configs (before any weight is read), then view
    every input through the options. LoRA adapters are viewed as the models
    they make of the base."""
    if any(isinstance(m, LoraAdapter) for m in models):
        return _open_with_adapters(models, base, options, allow_config_mismatch)
    sources = [*models, *([base] if base is not None else [])]
    labels = [str(c.path) for c in models] + ([f"{base.path} (base)"] if base is not None else [])
    configs = [read_config(c.folder) for c in sources]
    compare_configs(list(zip(labels, configs)), allow=allow_config_mismatch)
    layers_before = None
    names: list[dict[str, str] | None] = [None] * len(sources)
    if options.layer_range is not None:
        names = [select_layers(c.tensors, options.layer_range, label) for c, label in zip(sources, labels)]
        layers_before = count_layers(sources[0].tensors)
    views = [InputView(c, i, n, options.input_dtype) for i, (c, n) in enumerate(zip(sources, names))]
    inputs = Inputs(views[: len(models)], views[len(models)] if base is not None else None, layers_before=layers_before)
    if options.tokenizer_source is not None:
        folder = tokenizer_folder(options.tokenizer_source, base.folder if base else None, models[0].folder)
        vocab_names = [n for n, info in views[0].tensors.items() if is_vocab_tensor(n) and info.shape]
        if not vocab_names:
            raise MergeError(
                f"tokenizer_source: {models[0].path} has no embedding or head tensor (embed_tokens, wte, "
                "word_embeddings, lm_head, ...) whose rows follow the vocabulary"
            )
        rows_of = []
        for view in views:
            present = [n for n in vocab_names if n in view.tensors and view.tensors[n].shape]
            rows_of.append(view.tensors[present[0]].shape[0] if present else 0)
        described = [(label, c.folder, vocab_size_of(cfg)) for label, c, cfg in zip(labels, sources, configs)]
        alignment = align(folder, described, len(models) if base is not None else None, rows_of)
        for view in views:
            view.set_alignment(alignment, views)
        inputs.tokenizer = folder
        inputs.vocab_rows = alignment.rows
    return inputs


def _open_with_adapters(models, base, options: InputOptions, allow_config_mismatch: bool) -> Inputs:
    first = next(m for m in models if isinstance(m, LoraAdapter))
    if base is None:
        raise MergeError(
            f"{first.path}: a LoRA adapter is merged as the model it makes of its base: give the base model (--base)"
        )
    for option, value in (("layer_range", options.layer_range), ("tokenizer_source", options.tokenizer_source)):
        if value is not None:
            raise MergeError(f"{option}: not supported when the inputs include LoRA adapters ({first.path})")
    full = [m for m in models if not isinstance(m, LoraAdapter)]
    labels = [str(c.path) for c in full] + [f"{base.path} (base)"]
    compare_configs(list(zip(labels, [read_config(c.folder) for c in [*full, base]])), allow=allow_config_mismatch)
    for adapter in models:
        if isinstance(adapter, LoraAdapter):
            adapter.check_against(base)
    changed = set().union(*(m.names for m in models if isinstance(m, LoraAdapter)))
    floating = [name for name in changed if base.tensors[name].dtype.is_floating_point]
    read_as = {name: options.input_dtype or base.tensors[name].dtype for name in floating}
    casts = {name: compute_dtype(dtype) for name, dtype in read_as.items()}
    base_view = InputView(base, len(models), None, options.input_dtype, casts)
    views = [
        AdapterView(m, i, base_view) if isinstance(m, LoraAdapter) else InputView(m, i, None, options.input_dtype, casts)
        for i, m in enumerate(models)
    ]
    return Inputs(views, base_view, out_dtypes=read_as)
