"""ccsmerge's tokenizer_source and layer_range against mergekit 0.1.5's
`tokenizer_source` and single-range `slices` on the same tiny Llama
checkpoints (saved by transformers, with WordLevel tokenizers built with the
`tokenizers` library): the same tensor names and shapes, the same values
within float32 rounding (the merges sum in different orders), the same
vocab_size and num_hidden_layers in config.json, and the output loads with
from_pretrained."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

mergekit = pytest.importorskip("mergekit")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from safetensors.torch import save_file  # noqa: E402
from tiny_llamas import tensors  # noqa: E402

import ccsmerge  # noqa: E402

VOCAB = 96
ADDED = {"ft0": [f"<x{i}>" for i in range(8)], "ft1": [], "ft2": ["<x0>", "<x1>", "<y0>", "<y1>"]}
LAYERS = 4


def tokenizer(added: list[str]):
    words = ["<unk>"] + [f"w{i}" for i in range(VOCAB - 1)]
    model = tokenizers.models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>")
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    fast.add_tokens(added)
    return fast


@pytest.fixture(scope="module")
def llamas(tmp_path_factory) -> tuple[Path, list[Path]]:
    """A tiny Llama with a 96-token tokenizer and three fine-tunes: one with
    8 added tokens, one without, one with 4 (2 of them also the first's)."""
    root = tmp_path_factory.mktemp("llamas")
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config)
    base.save_pretrained(root / "base")
    tokenizer([]).save_pretrained(root / "base")
    paths = []
    for name, added in ADDED.items():
        tuned = transformers.LlamaForCausalLM(copy.deepcopy(config))  # resizing changes its config
        tuned.load_state_dict(base.state_dict())
        if added:
            tuned.resize_token_embeddings(VOCAB + len(added), mean_resizing=False)
        with torch.no_grad():
            for p in tuned.parameters():
                p.add_(0.02 * torch.randn_like(p))
        tuned.save_pretrained(root / name)
        tokenizer(added).save_pretrained(root / name)
        paths.append(root / name)
    return root / "base", paths


def run_mergekit(config: dict, out: Path) -> dict[str, torch.Tensor]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    options = MergeOptions(copy_tokenizer=True, write_model_card=False, quiet=True, device="cpu")
    run_merge(MergeConfiguration.model_validate(config), str(out), options)
    return tensors(out)


def assert_same(theirs: dict, ours: dict, scale: dict) -> None:
    """The same names, shapes and dtypes; values within a few float32 ulps of the terms."""
    assert theirs.keys() == ours.keys()
    for name in theirs:
        assert theirs[name].shape == ours[name].shape, name
        assert theirs[name].dtype == ours[name].dtype == torch.float32, name
        diff = (theirs[name].double() - ours[name].double()).abs()
        assert (diff <= 8 * torch.finfo(torch.float32).eps * scale[name]).all(), name


def magnitudes(folders: list[Path]) -> dict[str, torch.Tensor]:
    """Per tensor, the largest magnitude in any input: the scale of the sums' rounding."""
    found: dict[str, float] = {}
    for folder in folders:
        for name, t in tensors(folder).items():
            found[name] = max(found.get(name, 0.0), float(t.abs().max()) * len(folders))
    return {name: torch.tensor(v, dtype=torch.float64) for name, v in found.items()}


def scale_by_role(names, found: dict) -> dict:
    """Layer names of the output are renumbered: scale every tensor by its kind's largest input magnitude."""
    kind = lambda n: n.split(".", 3)[-1] if n.startswith("model.layers.") else n  # noqa: E731
    by_kind: dict[str, torch.Tensor] = {}
    for name, value in found.items():
        by_kind[kind(name)] = torch.maximum(by_kind.get(kind(name), value), value)
    return {name: by_kind[kind(name)] for name in names}


@pytest.mark.parametrize("source", ["base", "ft0", "ft2"])
def test_tokenizer_source_equals_mergekit(llamas, tmp_path, source):
    base, paths = llamas
    given = "base" if source == "base" else str(base.parent / source)
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in paths],
        "parameters": {"lambda": 0.6},
        "tokenizer_source": given,
        "dtype": "float32",
    }
    theirs = run_mergekit(recipe, tmp_path / "mergekit")
    out = tmp_path / "ccsmerge"
    ccsmerge.merge_checkpoints(
        paths, out, "task_arithmetic", base=base, lam=0.6, tokenizer_source=given, device="cpu"
    )
    ours = tensors(out)
    assert_same(theirs, ours, scale_by_role(theirs, magnitudes([base, *paths])))
    rows = VOCAB + len(ADDED.get(source, []))
    assert ours["model.embed_tokens.weight"].shape[0] == rows
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == json.loads((tmp_path / "mergekit" / "config.json").read_text())["vocab_size"] == rows
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert len(tok.get_vocab()) == rows
    model, info = transformers.LlamaForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_single_range_slices_equal_mergekit(llamas, tmp_path):
    base, paths = llamas
    # Two fine-tunes with the base's vocabulary: ft1 and a perturbed copy of it.
    first = base.parent / "ft1"
    second = tmp_path / "ft1b"
    second.mkdir()
    generator = torch.Generator().manual_seed(5)
    perturbed = {k: v + 0.01 * torch.randn(v.shape, generator=generator) for k, v in tensors(first).items()}
    save_file(perturbed, second / "model.safetensors")
    for aux in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (second / aux).write_bytes((first / aux).read_bytes())
    models = [first, second]
    start, stop = 1, 3
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "slices": [
            {
                "sources": [
                    {"model": str(p), "layer_range": [start, stop], "parameters": {"weight": 1.0}}
                    for p in [*models, base]
                ]
            }
        ],
        "parameters": {"lambda": 0.8},
        "dtype": "float32",
    }
    theirs = run_mergekit(recipe, tmp_path / "mergekit")
    out = tmp_path / "ccsmerge"
    ccsmerge.merge_checkpoints(models, out, "task_arithmetic", base=base, lam=0.8, layer_range=(start, stop), device="cpu")
    ours = tensors(out)
    assert {n.split(".")[2] for n in ours if n.startswith("model.layers.")} == {"0", "1"}
    assert_same(theirs, ours, scale_by_role(theirs, magnitudes([base, *models])))
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == stop - start
    assert json.loads((tmp_path / "mergekit" / "config.json").read_text())["num_hidden_layers"] == stop - start
    model, info = transformers.LlamaForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_input_dtype_equals_mergekit_dtype(llamas, tmp_path):
    """A fine-tune saved in bfloat16 beside float32 ones: mergekit's `dtype:
    float32` (inputs cast, merged in float32) and ccsmerge's input_dtype."""
    base, paths = llamas
    first = base.parent / "ft1"
    half = tmp_path / "ft1-bf16"
    half.mkdir()
    generator = torch.Generator().manual_seed(7)
    save_file(
        {k: (v + 0.01 * torch.randn(v.shape, generator=generator)).to(torch.bfloat16) for k, v in tensors(first).items()},
        half / "model.safetensors",
    )
    config = json.loads((first / "config.json").read_text())
    (half / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    models = [first, half]
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in models],
        "parameters": {"lambda": 0.9},
        "dtype": "float32",
    }
    theirs = run_mergekit(recipe, tmp_path / "mergekit")
    with pytest.raises(ccsmerge.MergeError, match="--input-dtype"):
        ccsmerge.plan_checkpoints(models, "task_arithmetic", base=base)
    out = tmp_path / "ccsmerge"
    ccsmerge.merge_checkpoints(models, out, "task_arithmetic", base=base, lam=0.9, input_dtype="float32", device="cpu")
    assert_same(theirs, tensors(out), scale_by_role(theirs, magnitudes([base, *models])))
