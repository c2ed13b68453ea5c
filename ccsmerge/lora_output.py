"""`output_format="lora"`: a merge written as a PEFT adapter of the merged
update over the base, loadable by PeftModel.from_pretrained(base, out).

Per tensor, from the plan:
- "factors": the merged update is left @ right with at most R = Σ r_t columns;
  its SVD comes from a QR of each factor (lora_files.exact_truncation), kept
  whole when its rank fits lora_rank (None: always), else truncated, the
  dropped energy reported;
- "dense" weight matrices: the merged tensor minus the base, truncated to
  lora_rank by the randomized engine, its true relative error reported
  (lora_rank is then required: a dense update has no small exact rank);
- tensors of no LoRA module (norms, biases, embeddings that adapters saved
  whole, modules_to_save) that the merge changes are saved whole, and so is
  the weight of a module with such a tensor (PEFT adapts a module or saves it
  whole, not both); "base" tensors (no input changes them) are left out.

Tensors are merged one at a time, in the plan's order, within its memory
estimate; a dense tensor the plan merges in row blocks is refused (its
update would have to be formed whole)."""

from __future__ import annotations

import re
import statistics
import sys
from pathlib import Path

import torch

from .adapters import AdapterView
from .errors import MergeError
from .execute import adapted_deltas, merge_adapted, merge_whole, merged_update
from .extract_lora import EMBEDDING_MODULES
from .lora_files import AdapterWriter, exact_truncation, module_name, randomized_truncation, saved_module_name
from .merge import full_precision_matmuls, resolve_device
from .numerics import compute_dtype, tensor_seed


def _is_embedding(name: str, models) -> bool:
    """An nn.Embedding module: adapted as one by an input, or named as one (extract_lora's rule)."""
    for m in models:
        if isinstance(m, AdapterView) and name in m.adapter.factors:
            return m.adapter.factors[name].embedding
    return bool(re.search(EMBEDDING_MODULES, module_name(name)))


def _lora_able(t, models) -> bool:
    """A weight matrix PEFT can adapt: a 2-D `.weight` that no input saved whole
    and no input adapted transposed as a Conv1D (fan_in_fan_out; the output's
    config has none)."""
    if len(t.shape) != 2 or not t.name.endswith(".weight") or not t.dtype.is_floating_point:
        return False
    for m in models:
        if isinstance(m, AdapterView) and m.kind(t.name) == "full":
            return False  # an input saved it whole (modules_to_save): so is the merge's
        if isinstance(m, AdapterView) and t.name in m.adapter.factors:
            f = m.adapter.factors[t.name]
            if f.transposed and not f.embedding:
                return False
    return True


def merge_to_adapter(prepared, out: Path, *, lora_rank: int | None, overwrite: bool, progress: bool,
                     inputs: list, dtype: str | None = None) -> Path:
    """dtype: what every tensor is saved in; by default the factors stay in the
    compute dtype (float32: the update as computed) and whole tensors in the
    merge's output dtype."""
    plan, models, base = prepared.plan, prepared.models, prepared.base
    if base is None:
        raise MergeError("output_format='lora': an adapter is an update over a base: give the base model (--base)")
    if lora_rank is not None and (isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 1):
        raise MergeError(f"lora_rank: expected a positive integer, got {lora_rank!r}")
    changed = [t for t in plan.tensors if t.path != "base"]
    # Modules with a changed tensor that is not their LoRA weight are saved whole.
    whole_modules = {saved_module_name(t.name) for t in changed if not _lora_able(t, models)}
    lora = [t for t in changed if _lora_able(t, models) and saved_module_name(t.name) not in whole_modules]
    dense = [t for t in lora if t.path == "dense"]
    if dense and lora_rank is None:
        raise MergeError(
            f"output_format='lora': '{dense[0].name}' and {len(dense) - 1} more weights are merged from dense task "
            f"vectors ({plan.tensors[0].job.cfg.method} on full models or a method without a factored form), "
            "whose update has no small exact rank: give lora_rank (--lora-rank) to truncate them"
        )
    blocked = [t for t in changed if t.path == "dense" and t.block_rows is not None]
    if blocked:
        raise MergeError(
            f"output_format='lora': tensor '{blocked[0].name}' is merged in row blocks under the memory budget, "
            "and its dense update would have to be held whole; raise max_memory"
        )
    device = resolve_device(prepared.cfg.device)
    out_dtype = getattr(torch, dtype) if dtype else None
    writer = AdapterWriter(out, overwrite=overwrite, inputs=inputs, dtype=out_dtype)
    lora_names = {t.name for t in lora}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(changed), unit="tensor", desc="merging", dynamic_ncols=True)
    try:
        sources = ([base] if base else []) + list(models)
        writer.begin(sources)
        with full_precision_matmuls():
            for t in changed:
                if t.name in lora_names:
                    _add_lora(writer, t, models, base, device, lora_rank)
                else:
                    merged = _merged(t, models, base, device)
                    writer.add_full(t.name, merged)
                if bar is not None:
                    bar.update(1)
        entries = writer.modules.values()
        dropped = [e.get("relative_error", 0.0) for e in entries]
        writer.set_report({
            "method": prepared.cfg.method,
            "lora_rank": lora_rank,
            "base": str(base.path),
            "models": [str(m.path) for m in models],
            "worst_relative_error": max(dropped, default=0.0),
            "median_relative_error": statistics.median(dropped) if dropped else 0.0,
        })
        task_type = next((m.adapter.config.get("task_type") for m in models if isinstance(m, AdapterView)), None)
        config = writer.config(base_model_name_or_path=str(base.path), task_type=task_type)
        result = writer.finish(config)
    except BaseException:
        writer.abort()
        raise
    finally:
        if bar is not None:
            bar.close()
    _summary(writer, lora_rank)
    return result


def _merged(t, models, base, device) -> torch.Tensor:
    """The merged tensor, whole (a tensor saved whole in the adapter)."""
    if t.path == "dense":
        xs = [m.read(t.name) for m in models]
        return merge_whole(t.job, xs, base.read(t.name), device).cpu()
    whole = base.read(t.name)
    spans = [(0, t.shape[0])] if t.shape else [(0, 1)]
    deltas = adapted_deltas(t.path, t.name, models)

    def base_rows(start, stop):
        return whole[start:stop] if t.shape else whole

    return next(merge_adapted(t.job, t.path, deltas, base_rows, spans, device, t.job.cfg.allow_nonfinite))


def _add_lora(writer, t, models, base, device, lora_rank) -> None:
    embedding = _is_embedding(t.name, models)
    if t.path == "factors":
        deltas = adapted_deltas(t.path, t.name, models)
        left, right, base_scale = merged_update(t.job, deltas, device, t.job.cfg.allow_nonfinite)
        if base_scale != 1.0:  # (s - 1) W0 is not low-rank: the update is formed densely
            update = (base_scale - 1.0) * base.read(t.name).to(device, torch.float64) + left @ right
            _add_dense(writer, t, update, lora_rank, embedding)
            return
        if left.shape[1] == 0:
            return  # the merge leaves it as the base's
        rank = left.shape[1] if lora_rank is None else lora_rank
        b, a, dropped = exact_truncation(left, right, rank, dtype=torch.float64)
        work = compute_dtype(t.job.dtype)
        writer.add(t.name, b.to(work).cpu(), a.to(work).cpu(), embedding=embedding,
                   update_rank=int(left.shape[1]), relative_error=dropped, exact=dropped == 0.0)
        return
    w0 = base.read(t.name)
    merged = merge_whole(t.job, [m.read(t.name) for m in models], w0, device)
    work = compute_dtype(t.job.dtype)
    update = merged.to(work) - w0.to(device, work)
    _add_dense(writer, t, update, lora_rank, embedding)


def _add_dense(writer, t, update, lora_rank, embedding) -> None:
    rank = lora_rank if lora_rank is not None else min(update.shape)
    seed = tensor_seed(getattr(t.job.cfg, "seed", 0), t.name)  # the merge's seed where the method has one
    b, a, error = randomized_truncation(update.to(torch.float32), rank, seed=seed)
    writer.add(t.name, b.cpu(), a.cpu(), embedding=embedding, relative_error=error, exact=False)


def _summary(writer, lora_rank) -> None:
    entries = list(writer.modules.values())
    if not entries:
        return
    truncated = [e for e in entries if not e.get("exact")]
    worst = max(entries, key=lambda e: e.get("relative_error", 0.0))
    print(
        f"LoRA adapter: {len(entries)} modules ({len(entries) - len(truncated)} exact), "
        f"{sum(len(v) for v in writer.saved.values())} tensors saved whole; "
        + (f"worst relative error {worst['relative_error']:.3g} ('{worst['tensor']}') at rank {lora_rank}"
           if truncated else "no update truncated"),
        file=sys.stderr,
    )
