"""Synthetic checkpoints on disk for the streaming benchmarks: T bf16 models, each a
sharded Hugging Face folder (model.safetensors.index.json + shards, a config.json),
shaped like a Llama layer stack (q/k/v/o d x d, gate/up d_ff x d, down d x d_ff,
1-D norms) after one embedding (vocab x d), cut at a total size in GB (10^9 bytes).

`generate` builds every requested size at once under a cache folder: the sizes share
their shard files (hard links: a smaller size's models are the first shards of the
largest size's), and an existing build of the same layout and sizes is reused.
Every folder it made or reused is in INPUT_FOLDERS; `remove_generated` deletes them."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from harness import GB, log

INPUT_FOLDERS: list[Path] = []  # what generate() made or reused in this run


@dataclass(frozen=True)
class Layout:
    """T models of a Llama-like layer stack, in bf16."""

    models: int = 8
    d_model: int = 4096
    d_ff: int = 11008
    vocab: int = 16000
    shard_bytes: int = 200 * 10**6  # input shards (tensors are not split)
    seed: int = 0

    @property
    def name(self) -> str:
        return f"T{self.models}-d{self.d_model}-ff{self.d_ff}-v{self.vocab}"

    def tensors(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        d, ff = self.d_model, self.d_ff
        yield "model.embed_tokens.weight", (self.vocab, d)
        layer = 0
        while True:
            p = f"model.layers.{layer}."
            yield p + "input_layernorm.weight", (d,)
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                yield p + f"self_attn.{proj}.weight", (d, d)
            yield p + "post_attention_layernorm.weight", (d,)
            yield p + "mlp.gate_proj.weight", (ff, d)
            yield p + "mlp.up_proj.weight", (ff, d)
            yield p + "mlp.down_proj.weight", (d, ff)
            layer += 1

    def prefix(self, total_bytes: float) -> list[tuple[str, tuple[int, ...]]]:
        """The first tensors of the stack whose T copies come closest to total_bytes."""
        target = total_bytes / self.models
        chosen: list[tuple[str, tuple[int, ...]]] = []
        size = 0
        for name, shape in self.tensors():
            nbytes = numel(shape) * 2
            if chosen and size + nbytes > target and (size + nbytes - target) >= (target - size):
                return chosen
            chosen.append((name, shape))
            size += nbytes
            if size >= target:
                return chosen
        raise AssertionError("unreachable")


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def size_label(size_gb: float) -> str:
    return f"{size_gb:g}GB"


def _model_tensor(torch, base, pool, t: int, shape) -> object:
    """Model t's tensor: the shared base plus a window of the shared noise pool (cheap, different per model)."""
    n = base.numel()
    offset = 7919 * t
    return torch.add(base, pool[offset : offset + n], alpha=1.0).view(shape).contiguous()


def generate(layout: Layout, sizes: list[float], root: Path) -> dict:
    """Build (or reuse) the inputs of every size; returns the manifest."""
    key = hashlib.sha1(json.dumps([asdict(layout), sorted(sizes)]).encode()).hexdigest()[:10]
    folder = root / f"{layout.name}-{key}"
    INPUT_FOLDERS.append(folder)
    manifest_path = folder / "manifest.json"
    if manifest_path.is_file():
        log(f"inputs: reusing {folder}")
        return json.loads(manifest_path.read_text())
    import torch
    from safetensors.torch import save_file

    shutil.rmtree(folder, ignore_errors=True)
    prefixes = {s: layout.prefix(s * GB) for s in sizes}
    full = prefixes[max(sizes)]
    cuts = {len(p) for p in prefixes.values()}
    shards: list[list[tuple[str, tuple[int, ...]]]] = []
    current: list = []
    current_bytes = 0
    for i, (name, shape) in enumerate(full):
        nbytes = numel(shape) * 2
        if current and current_bytes + nbytes > layout.shard_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append((name, shape))
        current_bytes += nbytes
        if i + 1 in cuts:  # a size ends here: its models are exactly the shards so far
            shards.append(current)
            current, current_bytes = [], 0
    total = sum(numel(s) * 2 for _, s in full) * layout.models
    log(f"inputs: generating {total / GB:.2f} GB ({layout.models} models x {len(shards)} shards) in {folder}")
    t0 = time.perf_counter()
    data = folder / "data"
    for t in range(layout.models):
        (data / f"m{t}").mkdir(parents=True, exist_ok=True)
    for j, shard in enumerate(shards):
        bases, pools = {}, {}
        for name, shape in shard:
            g = torch.Generator().manual_seed(layout.seed * 1_000_003 + zlib.crc32(name.encode()))
            n = numel(shape)
            if len(shape) == 1:  # a norm: around 1
                bases[name] = torch.ones(n, dtype=torch.bfloat16)
            else:
                bases[name] = torch.randn(n, generator=g, dtype=torch.bfloat16).mul_(0.02)
            pools[name] = torch.randn(n + 7919 * layout.models, generator=g, dtype=torch.bfloat16).mul_(0.002)
        for t in range(layout.models):
            tensors = {name: _model_tensor(torch, bases[name], pools[name], t, shape) for name, shape in shard}
            save_file(tensors, str(data / f"m{t}" / f"part-{j:05d}.safetensors"), metadata={"format": "pt"})
            del tensors
        del bases, pools
    sets = {}
    for s in sorted(sizes):
        names = {name for name, _ in prefixes[s]}
        count = 0
        covered = set()
        while covered != names:
            covered |= {name for name, _ in shards[count]}
            count += 1
        sets[size_label(s)] = _make_size_set(layout, folder / size_label(s), shards[:count], data, s)
    manifest = {"layout": asdict(layout), "folder": str(folder), "sizes": sets,
                "generate_s": time.perf_counter() - t0}
    manifest_path.write_text(json.dumps(manifest, indent=1))
    log(f"inputs: generated in {manifest['generate_s']:.0f} s")
    return manifest


def _make_size_set(layout: Layout, folder: Path, shards: list, data: Path, size_gb: float) -> dict:
    """Model folders for one size: hard links to the first shards, an index and a config."""
    models, files = [], []
    count = len(shards)
    for t in range(layout.models):
        model = folder / f"model-{t}"
        model.mkdir(parents=True, exist_ok=True)
        weight_map = {}
        for j, shard in enumerate(shards):
            filename = f"model-{j + 1:05d}-of-{count:05d}.safetensors"
            os.link(data / f"m{t}" / f"part-{j:05d}.safetensors", model / filename)
            files.append(str(model / filename))
            weight_map.update({name: filename for name, _ in shard})
        total = sum(numel(shape) * 2 for shard in shards for _, shape in shard)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (model / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        config = {"model_type": "llama", "hidden_size": layout.d_model, "intermediate_size": layout.d_ff,
                  "vocab_size": layout.vocab, "torch_dtype": "bfloat16"}
        (model / "config.json").write_text(json.dumps(config, indent=2))
        models.append(str(model))
    tensors = [(name, list(shape)) for shard in shards for name, shape in shard]
    return {"size_gb": size_gb, "models": models, "files": files, "tensors": len(tensors),
            "matrices": sum(len(s) == 2 for _, s in tensors),
            "input_bytes": sum(os.path.getsize(f) for f in files),
            "tensor_bytes": layout.models * sum(numel(s) * 2 for _, s in tensors)}


def remove_generated() -> None:
    """Delete every input folder generate() made or reused in this run."""
    for folder in INPUT_FOLDERS:
        shutil.rmtree(folder, ignore_errors=True)
