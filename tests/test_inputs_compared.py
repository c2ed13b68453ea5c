"""What is compared and changed of the inputs before a merge (ccsmerge.inputs):
config.json compared (refusals name both models, the field and both values;
allow_config_mismatch lets them through with a warning), added tokens
reported as such, inputs of different dtypes refused or cast
(input_dtype), layers selected (layer_range) and vocabularies aligned to a
tokenizer (tokenizer_source). References are plain PyTorch in float64,
written here; tokenizers and configs are JSON written by the test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import ccsmerge
from ccsmerge import MergeError
from ccsmerge.synthetic import toy_transformer
from tests.checkpoints import load_output, smallest_budget

LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 16,
    "num_hidden_layers": 4,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "intermediate_size": 64,
    "vocab_size": 6,
    "torch_dtype": "float32",
    "layer_types": ["full_attention", "sliding_attention", "full_attention", "sliding_attention"],
}
MISTRAL = {**LLAMA, "architectures": ["MistralForCausalLM"], "model_type": "mistral"}
WORDS = ["<unk>", "the", "cat", "sat", "on", "mat"]


def tokenizer_json(tokens: list[str]) -> dict:
    """A WordLevel tokenizer.json with these tokens at ids 0..n-1."""
    return {
        "version": "1.0",
        "added_tokens": [{"id": 0, "content": "<unk>", "special": True}],
        "model": {"type": "WordLevel", "vocab": {t: i for i, t in enumerate(tokens)}, "unk_token": "<unk>"},
    }


def save(folder: Path, sd: dict, config: dict | None = None, tokens: list[str] | None = None) -> Path:
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, folder / "model.safetensors")
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    if tokens is not None:
        (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json(tokens)))
        (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    return folder


def toy(seed: int, *, layers: int = 4, vocab: int = 6, dtype=torch.float32) -> dict[str, torch.Tensor]:
    sd = toy_transformer(layers, 16, vocab, seed=seed)
    return {k: v.to(dtype) for k, v in sd.items()}


def average(sds: list[dict]) -> dict[str, torch.Tensor]:
    return {k: sum(sd[k].double() for sd in sds) / len(sds) for k in sds[0]}


def assert_close_in(dtype: torch.dtype, got: dict, want: dict, scale: dict | None = None) -> None:
    """Equal to the float64 reference within the output dtype's rounding:
    one ulp of the result, or (scale: the sum of the magnitudes of the terms)
    a few ulps of the terms, where a difference of terms cancels digits."""
    assert got.keys() == want.keys()
    eps = torch.finfo(dtype).eps
    for name, ref in want.items():
        assert got[name].dtype == dtype, name
        tol = eps * ref.abs() + torch.finfo(dtype).tiny if scale is None else 4 * eps * scale[name]
        assert ((got[name].double() - ref).abs() <= tol).all(), name


# ----------------------------------------------------------------------------- configs compared


def test_same_shapes_other_architecture_is_refused_naming_both(tmp_path):
    a = save(tmp_path / "llama", toy(0), LLAMA)
    b = save(tmp_path / "mistral", toy(1), MISTRAL)
    with pytest.raises(MergeError) as err:
        ccsmerge.plan_checkpoints([a, b], "average")
    message = str(err.value)
    for part in (str(a), str(b), "architectures", "MistralForCausalLM", "LlamaForCausalLM", "--allow-config-mismatch"):
        assert part in message


@pytest.mark.parametrize(
    "field,change",
    [
        ("num_key_value_heads", {"num_key_value_heads": 1}),
        ("text_config.hidden_size", {"text_config": {"hidden_size": 32}}),
        ("n_embd", {"n_embd": 32}),
    ],
)
def test_a_shape_field_that_differs_is_named(tmp_path, field, change):
    first = {**LLAMA, "text_config": {"hidden_size": 16}, "n_embd": 16}
    a = save(tmp_path / "a", toy(0), first)
    b = save(tmp_path / "b", toy(1), {**first, **change})
    with pytest.raises(MergeError, match=rf"{b}: config.json {field} is .* in {a}"):
        ccsmerge.plan_checkpoints([a, b], "average")


def test_the_base_config_is_compared_too(tmp_path):
    a = save(tmp_path / "a", toy(0), LLAMA)
    b = save(tmp_path / "b", toy(1), LLAMA)
    base = save(tmp_path / "base", toy(2), {**LLAMA, "intermediate_size": 128})
    with pytest.raises(MergeError, match=r"\(base\): config.json intermediate_size is 128, 64"):
        ccsmerge.plan_checkpoints([a, b], "task_arithmetic", base=base)


def test_the_override_merges_with_a_warning(tmp_path):
    sds = [toy(0), toy(1)]
    a, b = save(tmp_path / "a", sds[0], LLAMA), save(tmp_path / "b", sds[1], MISTRAL)
    with pytest.warns(UserWarning, match="architectures.*--allow-config-mismatch"):
        ccsmerge.merge_checkpoints([a, b], tmp_path / "out", "average", allow_config_mismatch=True, device="cpu")
    assert_close_in(torch.float32, load_output(tmp_path / "out"), average(sds))


def test_different_vocab_sizes_alone_are_not_a_config_mismatch(tmp_path):
    a = save(tmp_path / "a", toy(0), LLAMA)
    b = save(tmp_path / "b", toy(1), {**LLAMA, "vocab_size": 7})
    ccsmerge.plan_checkpoints([a, b], "average")  # the tensors agree: merged as they are


# ----------------------------------------------------------------------------- added tokens, dtypes


def test_added_tokens_are_reported_as_such(tmp_path):
    a = save(tmp_path / "a", toy(0, vocab=96))
    b = save(tmp_path / "b", {**toy(1, vocab=104)})
    with pytest.raises(MergeError) as err:
        ccsmerge.plan_checkpoints([a, b], "average")
    message = str(err.value)
    assert f"{b} has 8 more vocabulary rows than {a} (104 vs 96" in message
    assert "added tokens; --tokenizer-source base|PATH merges them" in message
    with pytest.raises(MergeError, match=f"{a} has 8 fewer vocabulary rows than {b}"):
        ccsmerge.plan_checkpoints([b, a], "average")


def test_other_shape_mismatches_stay_shape_mismatches(tmp_path):
    first = toy(0)
    other = {**toy(1), "layers.0.mlp.up_proj.weight": torch.zeros(60, 16)}
    a, b = save(tmp_path / "a", first), save(tmp_path / "b", other)
    with pytest.raises(MergeError, match=r"tensor 'layers.0.mlp.up_proj.weight' has shape \(60, 16\), \(64, 16\)"):
        ccsmerge.plan_checkpoints([a, b], "average")


def test_different_dtypes_are_refused_with_the_way_through(tmp_path):
    a = save(tmp_path / "a", toy(0, dtype=torch.bfloat16))
    b = save(tmp_path / "b", toy(1))
    with pytest.raises(MergeError) as err:
        ccsmerge.plan_checkpoints([a, b], "average")
    message = str(err.value)
    for part in (str(a), str(b), "dtype float32, bfloat16", "--input-dtype bfloat16|float16|float32"):
        assert part in message


@pytest.mark.parametrize("input_dtype", ["float32", "bfloat16"])
def test_input_dtype_casts_then_merges(tmp_path, input_dtype):
    """bf16 and fp32 fine-tunes with a fp32 base: task arithmetic of the cast
    inputs, against float64 of the cast inputs; whole and in row blocks."""
    dtype = getattr(torch, input_dtype)
    base, sds = toy(9), [toy(0, dtype=torch.bfloat16), toy(1), toy(2, dtype=torch.bfloat16)]
    paths = [save(tmp_path / f"ft{i}", sd, LLAMA) for i, sd in enumerate(sds)]
    base_path = save(tmp_path / "base", base, LLAMA)
    cast = [{k: v.to(dtype).double() for k, v in sd.items()} for sd in sds]
    b = {k: v.to(dtype).double() for k, v in base.items()}
    want = {k: b[k] + 0.7 * sum(sd[k] - b[k] for sd in cast) for k in b}
    scale = {k: 4 * b[k].abs() + sum(sd[k].abs() for sd in cast) for k in b}  # of the terms rounded on the way
    options = dict(method="task_arithmetic", base=base_path, lam=0.7, input_dtype=input_dtype, device="cpu")
    ccsmerge.merge_checkpoints(paths, tmp_path / "whole", **options)
    budget = smallest_budget(paths, **options)
    plan = ccsmerge.plan_checkpoints(paths, max_memory=budget, **options)
    assert any(t.block_rows is not None for t in plan.tensors)
    assert {t.dtype for t in plan.tensors} == {dtype}
    ccsmerge.merge_checkpoints(paths, tmp_path / "blocks", max_memory=budget, **options)
    for out in ("whole", "blocks"):
        got = load_output(tmp_path / out)
        # float32: a few roundings of the terms; bf16: computed in float32, rounded once at the end.
        for name, ref in want.items():
            assert got[name].dtype == dtype
            eps = torch.finfo(dtype).eps
            bound = 4 * eps * scale[name] if dtype == torch.float32 else eps * ref.abs() + 1e-6 * scale[name]
            assert ((got[name].double() - ref).abs() <= bound).all(), (out, name)
    assert json.loads((tmp_path / "whole" / "config.json").read_text())["torch_dtype"] == input_dtype


def test_the_plan_counts_the_cast_copy(tmp_path):
    """A cast input is a copy beside the file's bytes: more memory than the
    same tensors saved in the cast dtype."""
    saved_cast = [save(tmp_path / f"f{i}", toy(i)) for i in range(2)]
    mixed = [save(tmp_path / "m0", toy(0, dtype=torch.bfloat16)), save(tmp_path / "m1", toy(1))]
    plain = ccsmerge.plan_checkpoints(saved_cast, "average")
    cast = ccsmerge.plan_checkpoints(mixed, "average", input_dtype="float32")
    by_name = {t.name: t for t in plain.tensors}
    assert all(t.memory > by_name[t.name].memory for t in cast.tensors)


# ----------------------------------------------------------------------------- layer_range


def test_layer_range_keeps_those_layers_renumbered(tmp_path):
    sds = [toy(0, layers=4), toy(1, layers=4)]
    paths = [save(tmp_path / f"ft{i}", sd, LLAMA) for i, sd in enumerate(sds)]
    ccsmerge.merge_checkpoints(paths, tmp_path / "out", "average", layer_range=(1, 3), device="cpu")
    want = {}
    for name, value in average(sds).items():
        if not name.startswith("layers."):
            want[name] = value
        elif 1 <= int(name.split(".")[1]) < 3:
            index = int(name.split(".")[1])
            want[name.replace(f"layers.{index}.", f"layers.{index - 1}.", 1)] = value
    assert {n.split(".")[1] for n in want if n.startswith("layers.")} == {"0", "1"}
    assert_close_in(torch.float32, load_output(tmp_path / "out"), want)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == 2
    assert config["layer_types"] == LLAMA["layer_types"][1:3]


def test_layer_range_beyond_the_layers_is_refused(tmp_path):
    paths = [save(tmp_path / f"ft{i}", toy(i, layers=4)) for i in range(2)]
    with pytest.raises(MergeError, match=r"layer_range \[2, 6\]: the model has 4 layers"):
        ccsmerge.plan_checkpoints(paths, "average", layer_range=(2, 6))
    with pytest.raises(MergeError, match=r"layer_range: \[3, 3\] selects no layers"):
        ccsmerge.plan_checkpoints(paths, "average", layer_range=(3, 3))


def test_layer_range_of_a_model_with_two_stacks_is_refused(tmp_path):
    def two_stacks(seed):
        sd = toy(seed, layers=2)
        return {("encoder." if k.startswith("layers.") else "") + k: v for k, v in sd.items()} | {
            "decoder.block.0.w.weight": torch.randn(4, 4),
        }

    paths = [save(tmp_path / f"ft{i}", two_stacks(i)) for i in range(2)]
    with pytest.raises(MergeError, match=r"more than one stack \(decoder.block, encoder.layers\)"):
        ccsmerge.plan_checkpoints(paths, "average", layer_range=(0, 1))


# ----------------------------------------------------------------------------- tokenizer_source


def reference_rows(tokens: list[str], inputs: list[tuple[list[str], torch.Tensor]], base: int | None):
    """mergekit 0.1.5's rule, written out per token: each input's rows in the
    output vocabulary `tokens` (inputs: (its tokens, its rows); base: its
    position among inputs)."""
    result = [torch.zeros(len(tokens), rows.shape[1], dtype=rows.dtype) for _, rows in inputs]
    for out_id, token in enumerate(tokens):
        have = [i for i, (vocab, _) in enumerate(inputs) if token in vocab]
        if len(have) == 0:
            fill = torch.zeros(inputs[0][1].shape[1], dtype=inputs[0][1].dtype)
        elif len(have) == 1:
            fill = inputs[have[0]][1][inputs[have[0]][0].index(token)]
        elif base is not None and base in have:
            fill = inputs[base][1][inputs[base][0].index(token)]
        else:
            fill = sum(inputs[i][1][inputs[i][0].index(token)] for i in have) / len(have)
        for i, (vocab, rows) in enumerate(inputs):
            result[i][out_id] = rows[vocab.index(token)] if token in vocab else fill
    return result


VOCABS = {
    "base": WORDS,
    "ft0": WORDS + ["<a>", "<b>"],  # added tokens
    "ft1": WORDS + ["<b>", "<c>"],  # other added tokens, one shared with ft0
    "ft2": ["<unk>", "<b>", "on", "sat", "cat", "the"],  # other ids, no "mat" (the base's row), "<b>" (averaged)
    "outside": WORDS + ["<b>", "<z>"],  # a tokenizer alone; "<z>" in no model (zeros)
}


@pytest.mark.parametrize("source", ["base", "ft0", "ft1", "ft2", "outside"])
def test_tokenizer_source_aligns_the_vocabulary_rows(tmp_path, source):
    names = ["ft0", "ft1", "ft2"]
    sds = {n: toy(i, vocab=len(VOCABS[n]), layers=1) for i, n in enumerate(["base", *names])}
    folders = {n: save(tmp_path / n, sds[n], {**LLAMA, "vocab_size": len(VOCABS[n])}, VOCABS[n]) for n in sds}
    folders["outside"] = tmp_path / "outside"
    folders["outside"].mkdir()
    (folders["outside"] / "tokenizer.json").write_text(json.dumps(tokenizer_json(VOCABS["outside"])))
    given = "base" if source == "base" else str(folders[source])
    options = dict(method="task_arithmetic", base=folders["base"], lam=0.5, tokenizer_source=given, device="cpu")
    paths = [folders[n] for n in names]
    ccsmerge.merge_checkpoints(paths, tmp_path / "out", **options)
    budget = smallest_budget(paths, **options)
    ccsmerge.merge_checkpoints(paths, tmp_path / "blocks", max_memory=budget, **options)

    tokens = VOCABS[source]
    order = [*names, "base"]
    aligned = {}
    for name in ("embed_tokens.weight", "lm_head.weight"):
        rows = reference_rows(tokens, [(VOCABS[n], sds[n][name].double()) for n in order], base=3)
        aligned[name] = dict(zip(order, rows))
    want, scale = {}, {}
    for name in sds["base"]:
        get = (lambda n: aligned[name][n]) if name in aligned else (lambda n: sds[n][name].double())
        want[name] = get("base") + 0.5 * sum(get(n) - get("base") for n in names)
        scale[name] = 4 * get("base").abs() + sum(get(n).abs() for n in names)
    for out in ("out", "blocks"):
        assert_close_in(torch.float32, load_output(tmp_path / out), want, scale)
    out = tmp_path / "out"
    assert (out / "tokenizer.json").read_bytes() == (folders[source] / "tokenizer.json").read_bytes()
    assert json.loads((out / "config.json").read_text())["vocab_size"] == len(tokens)


def test_an_input_without_a_tokenizer_is_taken_to_have_the_bases(tmp_path):
    sds = [toy(0), toy(1), toy(2)]
    base = save(tmp_path / "base", sds[0], LLAMA, WORDS)
    a = save(tmp_path / "a", sds[1], LLAMA, WORDS)
    bare = save(tmp_path / "bare", sds[2], LLAMA)
    with pytest.warns(UserWarning, match=f"{bare}: no tokenizer to read its vocabulary from: taken to be {base}"):
        ccsmerge.merge_checkpoints([a, bare], tmp_path / "out", "average", base=base, tokenizer_source="base")
    assert_close_in(torch.float32, load_output(tmp_path / "out"), average(sds[1:]))


def test_tokenizer_source_union_is_refused(tmp_path):
    paths = [save(tmp_path / f"ft{i}", toy(i), LLAMA, WORDS) for i in range(2)]
    with pytest.raises(MergeError, match="'union'.*not supported"):
        ccsmerge.plan_checkpoints(paths, "average", tokenizer_source="union")


def test_same_vocabularies_pass_through(tmp_path):
    """tokenizer_source with every input on the source's vocabulary: the
    rows as they are, read as views (no copy in the plan's memory)."""
    sds = [toy(0), toy(1)]
    paths = [save(tmp_path / f"ft{i}", sd, LLAMA, WORDS) for i, sd in enumerate(sds)]
    with_source = ccsmerge.plan_checkpoints(paths, "average", tokenizer_source="base")
    without = ccsmerge.plan_checkpoints(paths, "average")
    assert [(t.name, t.shape, t.memory) for t in with_source.tensors] == [
        (t.name, t.shape, t.memory) for t in without.tensors
    ]


def test_aligned_rows_read_in_blocks_are_the_whole_tensors_rows(tmp_path):
    """Row blocks of a reordered vocabulary (what a merge under a small budget reads) are the rows of the whole."""
    folders = []
    for i, n in enumerate(["base", "ft0", "ft1", "ft2"]):
        config = {**LLAMA, "vocab_size": len(VOCABS[n])}
        folders.append(save(tmp_path / n, toy(i, vocab=len(VOCABS[n]), layers=1), config, VOCABS[n]))
    from ccsmerge.streaming import prepare_merge

    prepared = prepare_merge(folders[1:], "task_arithmetic", folders[0], tokenizer_source=str(folders[1]))
    for view in [*prepared.models, prepared.base]:
        for name in ("embed_tokens.weight", "lm_head.weight"):
            whole = view.read(name)
            assert whole.shape[0] == len(VOCABS["ft0"])
            for start in range(whole.shape[0]):
                for stop in range(start + 1, whole.shape[0] + 1):
                    assert torch.equal(view.read_rows(name, start, stop), whole[start:stop])


# ----------------------------------------------------------------------------- the command line


def test_the_flags_reach_the_merge(tmp_path, capsys):
    from ccsmerge.cli import main

    sds = [toy(0, dtype=torch.bfloat16), toy(1)]
    a, b = save(tmp_path / "a", sds[0], LLAMA, WORDS), save(tmp_path / "b", sds[1], {**MISTRAL, "vocab_size": 7}, WORDS + ["<a>"])
    b_rows = {**sds[1], "embed_tokens.weight": torch.randn(7, 16), "lm_head.weight": torch.randn(7, 16)}
    save_file(b_rows, b / "model.safetensors")
    command = ["merge", "--method", "average", "--model", str(a), "--model", str(b), "--device", "cpu", "--quiet"]
    assert main([*command, "--out", str(tmp_path / "refused")]) == 1
    assert "--allow-config-mismatch" in capsys.readouterr().err
    command += ["--allow-config-mismatch"]
    with pytest.warns(UserWarning, match="architectures"):
        assert main([*command, "--out", str(tmp_path / "refused")]) == 1
    assert "--tokenizer-source" in capsys.readouterr().err  # the vocabularies: "b has 1 more vocabulary rows"
    command += ["--tokenizer-source", str(b)]
    with pytest.warns(UserWarning, match="architectures"):
        assert main([*command, "--out", str(tmp_path / "refused")]) == 1
    assert "--input-dtype" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="architectures"):
        assert main([*command, "--input-dtype", "float32", "--out", str(tmp_path / "out")]) == 0
    out = load_output(tmp_path / "out")
    assert out["embed_tokens.weight"].shape == (7, 16) and out["lm_head.weight"].dtype == torch.float32
    # the token only b has: its row for both inputs
    assert torch.equal(out["embed_tokens.weight"][6], b_rows["embed_tokens.weight"][6])
    plan = ["plan", *(c for c in command[1:] if c != "--quiet"), "--input-dtype", "bfloat16"]
    with pytest.warns(UserWarning, match="architectures"):
        assert main(plan) == 0
    assert "bfloat16" in capsys.readouterr().out


def test_the_recorded_recipe_makes_the_same_merge_again(tmp_path):
    """ccsmerge.yml records input_dtype, tokenizer_source and layer_range:
    merging from it gives the same bytes, and it says what was asked."""
    import subprocess
    import sys

    import yaml

    sds = [toy(0, dtype=torch.bfloat16), toy(1), toy(2)]
    vocabs = [WORDS, WORDS + ["<a>"], WORDS]
    for i, v in enumerate(vocabs):
        if len(v) != 6:
            sds[i] = {**sds[i], "embed_tokens.weight": torch.randn(len(v), 16), "lm_head.weight": torch.randn(len(v), 16)}
    paths = [save(tmp_path / f"m{i}", sd, {**LLAMA, "vocab_size": len(v)}, v) for i, (sd, v) in enumerate(zip(sds, vocabs))]
    first = tmp_path / "first"
    ccsmerge.merge_checkpoints(paths, first, "cart", input_dtype="float32", tokenizer_source=str(paths[1]),
                               layer_range=(1, 3), device="cpu", lam=1.5)
    recorded = yaml.safe_load((first / "ccsmerge.yml").read_text())
    assert recorded["dtype"] == "float32" and recorded["tokenizer_source"] == str(paths[1].resolve())
    assert [s["layer_range"] for s in recorded["slices"][0]["sources"]] == [[1, 3]] * 3
    again = tmp_path / "again"
    result = subprocess.run([sys.executable, "-m", "ccsmerge", "merge", str(first / "ccsmerge.yml"), "--out", str(again),
                             "--device", "cpu", "--quiet"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    a, b = load_output(first), load_output(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["embed_tokens.weight"].shape == (7, 16)
    assert {k.split(".")[1] for k in a if k.startswith("layers.")} == {"0", "1"}
