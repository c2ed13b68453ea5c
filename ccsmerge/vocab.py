"""Vocabularies: inputs whose embedding and head rows differ (a fine-tune
with added tokens), reported as such, and merged through one tokenizer's
vocabulary (`tokenizer_source`), with mergekit 0.1.5's rule for the rows.

The output has one row per token of the chosen tokenizer. Each input gives,
for a token of that vocabulary, its own row for the token (found by the
token's text in the input's own tokenizer, below the input's vocab_size);
an input that lacks the token gives, as mergekit does:
- the row of the one input that has it, if only one has it;
- the base model's row, if the base has it;
- else the average of the rows of the inputs that have it (summed in the
  merge's dtype in input order, base last, then divided);
- zeros if no input has it.
An input without a readable vocabulary (no tokenizer.json, vocab.json or
vocab.txt) is taken to have the base's (or the first model's), with a
warning, as mergekit does. The output's tokenizer files are the chosen
tokenizer's, copied; `union` (mergekit's merged vocabulary) is refused."""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import MergeError

# Tensors with one row per token (vocabulary axis 0): input embeddings and output heads.
VOCAB_TENSORS = re.compile(
    r"(^|\.)(embed_tokens|embed_in|embed_out|tok_embeddings|wte|word_embeddings|lm_head|shared)\.weight$"
    r"|(^|\.)cls\.predictions\.(bias|decoder\.weight|decoder\.bias)$"
)
ADVICE = "--tokenizer-source base|PATH merges them"

# How an input lacking a token fills its row.
DONOR, BASE, AVERAGE, ZERO = "donor", "base", "average", "zero"

RowReader = Callable[[int, str, int, int], torch.Tensor]  # (input, tensor, start, stop) -> rows, in the merge dtype


def is_vocab_tensor(name: str) -> bool:
    return VOCAB_TENSORS.search(name) is not None


def vocab_mismatch(name: str, a: str, rows_a: int, b: str, rows_b: int) -> str:
    """The refusal of a vocabulary tensor whose rows differ between inputs a and b."""
    more = "more" if rows_b > rows_a else "fewer"
    return (
        f"{b} has {abs(rows_b - rows_a)} {more} vocabulary rows than {a} ({rows_b} vs {rows_a} in '{name}'): "
        f"added tokens; {ADVICE}"
    )


def read_vocabulary(folder: Path | None) -> dict[str, int] | None:
    """token -> id of the tokenizer in a model folder (what a fast
    tokenizer's get_vocab() gives, added tokens included); None if it has
    none ccsmerge can read."""
    if folder is None:
        return None
    try:
        if (folder / "tokenizer.json").is_file():
            data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
            model = data.get("model") or {}
            vocab = model.get("vocab")
            if isinstance(vocab, dict):  # BPE, WordPiece, WordLevel
                found = {str(k): int(v) for k, v in vocab.items()}
            elif isinstance(vocab, list):  # Unigram: [[piece, score], ...]
                found = {str(entry[0]): i for i, entry in enumerate(vocab)}
            else:
                raise MergeError(f"{folder / 'tokenizer.json'}: no vocabulary in its model ({model.get('type')})")
            found.update({str(t["content"]): int(t["id"]) for t in data.get("added_tokens") or []})
            return found
        if (folder / "vocab.json").is_file():
            found = {str(k): int(v) for k, v in json.loads((folder / "vocab.json").read_text(encoding="utf-8")).items()}
        elif (folder / "vocab.txt").is_file():
            lines = (folder / "vocab.txt").read_text(encoding="utf-8").splitlines()
            found = {token: i for i, token in enumerate(lines)}
        else:
            return None
        if (folder / "added_tokens.json").is_file():
            added = json.loads((folder / "added_tokens.json").read_text(encoding="utf-8"))
            found.update({str(k): int(v) for k, v in added.items()})
        return found
    except MergeError:
        raise
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        raise MergeError(f"{folder}: cannot read its tokenizer's vocabulary: {exc}") from None


def tokenizer_folder(source: str, base: Path | None, first: Path | None) -> Path:
    """The folder whose tokenizer the output takes: `base` (the base model,
    or the first model without one) or a folder path."""
    if source == "union":
        raise MergeError(
            "tokenizer_source: 'union' (mergekit's vocabulary of every input) is not supported; "
            "give 'base' or the folder of the tokenizer to use"
        )
    if source == "base":
        folder = base if base is not None else first
        if folder is None:
            raise MergeError("tokenizer_source: 'base': the base model (or first model) is a bare file, with no tokenizer")
        return folder
    folder = Path(source)
    if not folder.is_dir():
        raise MergeError(f"tokenizer_source: {source}: not a folder (give 'base' or the folder of a tokenizer)")
    return folder


@dataclass
class VocabularyAlignment:
    """Rows of every input's vocabulary tensors in the output vocabulary.
    own[i][r]: input i's row for output token r (-1: it lacks the token);
    fill[r]: how a lacking input fills row r ((kind, [(input, row), ...]))."""

    rows: int
    own: list[torch.Tensor]
    fill: dict[int, tuple[str, list[tuple[int, int]]]]

    def passes_through(self, i: int, rows_in: int) -> bool:
        """Whether input i's rows are the output's as they are (no copy)."""
        return rows_in == self.rows and not self.fill and torch.equal(self.own[i], torch.arange(self.rows))

    def check_rows(self, i: int, name: str, rows_in: int, label: str) -> None:
        present = self.own[i][self.own[i] >= 0]
        if present.numel() and int(present.max()) >= rows_in:
            raise MergeError(
                f"{label}: tensor '{name}' has {rows_in} rows, but its tokenizer puts tokens at rows up to "
                f"{int(present.max())}"
            )

    def read_rows(self, i: int, name: str, start: int, stop: int, read: RowReader, like: torch.Tensor) -> torch.Tensor:
        """Rows start:stop of input i's tensor `name` in the output
        vocabulary. read(j, name, a, b): rows a:b of input j, in the merge's
        dtype; like: an empty tensor of that dtype and trailing shape."""
        own = self.own[i][start:stop].tolist()
        out = like.new_empty((stop - start, *like.shape[1:]))
        r = 0
        while r < len(own):  # runs of consecutive own rows: one read each
            if own[r] < 0:
                out[r] = self._filled(start + r, name, read, like)
                r += 1
                continue
            end = r + 1
            while end < len(own) and own[end] == own[end - 1] + 1:
                end += 1
            out[r:end] = read(i, name, own[r], own[r] + end - r)
            r = end
        return out

    def _filled(self, r: int, name: str, read: RowReader, like: torch.Tensor) -> torch.Tensor:
        kind, donors = self.fill[r]
        if kind == ZERO:
            return like.new_zeros(like.shape[1:])
        if kind in (DONOR, BASE):
            j, row = donors[0]
            return read(j, name, row, row + 1)[0]
        total = like.new_zeros(like.shape[1:])  # mergekit's order: a running sum in the merge dtype
        for j, row in donors:
            total = total + read(j, name, row, row + 1)[0]
        total /= len(donors)
        return total


def align(
    source: Path,
    inputs: Sequence[tuple[str, Path | None, int | None]],
    base_index: int | None,
    rows_of: Sequence[int],
) -> VocabularyAlignment:
    """The alignment of inputs (label, folder, config vocab_size; the base
    last, at base_index) to the tokenizer in `source`. rows_of: each input's
    vocabulary rows (its embedding's first dimension)."""
    out_vocab = read_vocabulary(source)
    if out_vocab is None:
        raise MergeError(f"tokenizer_source: {source}: no tokenizer.json (or vocab.json / vocab.txt) to read")
    reference = base_index if base_index is not None else 0
    vocabs: list[dict[str, int]] = []
    for i, (label, folder, _) in enumerate(inputs):
        vocab = out_vocab if folder is not None and Path(folder).resolve() == source.resolve() else read_vocabulary(folder)
        vocabs.append(vocab)
    if vocabs[reference] is None:
        raise MergeError(f"{inputs[reference][0]}: no tokenizer.json (or vocab.json / vocab.txt) to read its vocabulary")
    for i, (label, _, _) in enumerate(inputs):
        if vocabs[i] is None:
            warnings.warn(
                f"{label}: no tokenizer to read its vocabulary from: taken to be {inputs[reference][0]}'s",
                stacklevel=3,
            )
            vocabs[i] = vocabs[reference]
    limits = [min(size, rows) if size is not None else rows for (_, _, size), rows in zip(inputs, rows_of)]
    if source.resolve() == Path(inputs[reference][1] or "").resolve() and inputs[reference][1] is not None:
        beyond = sorted(t for t, i in out_vocab.items() if i >= limits[reference])
        if beyond:
            raise MergeError(
                f"tokenizer_source: {source}: its tokenizer has {len(beyond)} tokens at ids beyond the model's "
                f"{limits[reference]} vocabulary rows (such as {beyond[0]!r}); ccsmerge copies the tokenizer as "
                "it is, so it would name rows the output lacks"
            )
    ids = sorted(out_vocab.values())
    if ids != list(range(len(ids))):
        raise MergeError(f"tokenizer_source: {source}: the token ids are not 0 to {len(ids) - 1} without gaps")
    rows = len(ids)
    by_id = sorted(out_vocab, key=out_vocab.__getitem__)
    own = []
    for (label, _, _), vocab, limit in zip(inputs, vocabs, limits):
        found = [vocab.get(token, -1) for token in by_id]
        beyond = [token for token, i in zip(by_id, found) if i >= limit]
        if beyond:  # mergekit: "padding?"; the row is filled as for a missing token
            warnings.warn(
                f"{label}: {len(beyond)} tokens of its tokenizer (such as {beyond[0]!r}) are at ids beyond its "
                f"{limit} vocabulary rows (vocab_size): they are taken as missing from it",
                stacklevel=3,
            )
        own.append(torch.tensor([i if 0 <= i < limit else -1 for i in found], dtype=torch.long))
    present = torch.stack([o >= 0 for o in own])  # (inputs, rows)
    fill: dict[int, tuple[str, list[tuple[int, int]]]] = {}
    for r in torch.nonzero(~present.all(dim=0)).flatten().tolist():
        donors = [(i, int(own[i][r])) for i in range(len(own)) if present[i, r]]
        if not donors:
            fill[r] = (ZERO, [])
        elif len(donors) == 1:
            fill[r] = (DONOR, donors)
        elif base_index is not None and present[base_index, r]:
            fill[r] = (BASE, [(base_index, int(own[base_index][r]))])
        else:
            fill[r] = (AVERAGE, donors)
    return VocabularyAlignment(rows, own, fill)


def edit_config_vocab(config: dict, rows: int) -> bool:
    """Set a parsed config.json's vocab_size (and its text_config's) to rows."""
    changed = False
    for part in [config, *(v for k, v in config.items() if k == "text_config" and isinstance(v, dict))]:
        if isinstance(part.get("vocab_size"), int) and part["vocab_size"] != rows:
            part["vocab_size"] = rows
            changed = True
    return changed
