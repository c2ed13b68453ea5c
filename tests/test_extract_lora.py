"""ccsmerge.extract_lora / `ccsmerge extract-lora` on small safetensors
checkpoints: the adapter's B @ A * scaling against the truncated SVD of
M - B (torch.linalg.svd in float64), the reported errors against the true
ones, the row-block path against the whole one, and the refusals."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import reference as R
from ccsmerge import extract_lora
from ccsmerge.cli import main
from ccsmerge.errors import MergeError
from ccsmerge.lora_files import ADAPTER_WEIGHTS, REPORT_FILE, module_scaling

F64 = torch.float64
PREFIX = "base_model.model."


def _gapped(m, n, rank, seed, scale=0.05):
    """An update of `rank` leading singular values a factor 10^4 above the rest
    (a randomized sketch then finds the optimal subspace to float rounding)."""
    gen = R.generator(seed)
    u = R.random_orthonormal(m, min(m, n), gen)
    v = R.random_orthonormal(n, min(m, n), gen)
    s = torch.cat([torch.linspace(1.0, 0.5, rank), 1e-4 * torch.rand(min(m, n) - rank, generator=gen)])
    return scale * (u * s.to(F64)) @ v.T


def _pair(tmp_path, *, dtype=torch.float32):
    """A base and a fine-tune: q and the embedding updated by gapped rank-6 updates,
    up by a power-law one, k identical, the norm changed, q's bias identical,
    and a module whose bias changed along with its weight."""
    gen = R.generator(0)
    base = {
        "model.embed_tokens.weight": torch.randn(40, 16, generator=gen),
        "model.layers.0.q.weight": torch.randn(24, 16, generator=gen),
        "model.layers.0.q.bias": torch.randn(24, generator=gen),
        "model.layers.0.k.weight": torch.randn(8, 16, generator=gen),
        "model.layers.0.up.weight": torch.randn(32, 16, generator=gen),
        "model.layers.0.o.weight": torch.randn(16, 16, generator=gen),
        "model.layers.0.o.bias": torch.randn(16, generator=gen),
        "model.norm.weight": torch.ones(16),
    }
    model = dict(base)
    model["model.embed_tokens.weight"] = base["model.embed_tokens.weight"] + _gapped(40, 16, 6, 1).float()
    model["model.layers.0.q.weight"] = base["model.layers.0.q.weight"] + _gapped(24, 16, 6, 2).float()
    up = 0.05 * R.decaying_matrix(32, 16, seed=3).float()
    model["model.layers.0.up.weight"] = base["model.layers.0.up.weight"] + up
    model["model.layers.0.o.weight"] = base["model.layers.0.o.weight"] + 0.01
    model["model.layers.0.o.bias"] = base["model.layers.0.o.bias"] + 0.01
    model["model.norm.weight"] = base["model.norm.weight"] + 0.1 * torch.randn(16, generator=gen)
    paths = []
    for label, state in (("base", base), ("model", model)):
        folder = tmp_path / label
        folder.mkdir()
        save_file({k: v.to(dtype).contiguous() for k, v in state.items()}, folder / "model.safetensors")
        paths.append(folder)
    return paths[0], paths[1], base, model


def _adapter(folder):
    with safe_open(folder / ADAPTER_WEIGHTS, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    config = json.loads((folder / "adapter_config.json").read_text())
    report = json.loads((folder / REPORT_FILE).read_text())
    return tensors, config, report


def _update(tensors, config, module):
    """The weight update PEFT applies for a module: scaling * B @ A (embeddings: its transpose)."""
    scaling = module_scaling(config, module)
    key = PREFIX + module
    if f"{key}.lora_A.weight" in tensors:
        return scaling * tensors[f"{key}.lora_B.weight"].double() @ tensors[f"{key}.lora_A.weight"].double()
    return scaling * (tensors[f"{key}.lora_embedding_B"].double() @ tensors[f"{key}.lora_embedding_A"].double()).mT


def _truncated(update, k):
    u, s, vh = torch.linalg.svd(update.double(), full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


def test_extracted_adapter_is_the_truncated_update(tmp_path):
    base, model, b, m = _pair(tmp_path)
    result = extract_lora(base, model, tmp_path / "adapter", 6, device="cpu")
    tensors, config, report = _adapter(tmp_path / "adapter")
    assert config["target_modules"] == ["model.embed_tokens", "model.layers.0.q", "model.layers.0.up"]
    # k is identical (left out); o's bias changed, so o is saved whole with both tensors.
    assert set(config["modules_to_save"]) == {"model.layers.0.o", "model.norm"}
    assert report["modules_to_save"]["model.layers.0.o"] == ["model.layers.0.o.bias", "model.layers.0.o.weight"]
    for name in ("model.layers.0.o.bias", "model.layers.0.o.weight", "model.norm.weight"):
        assert torch.equal(tensors[PREFIX + name], m[name])
    assert not any("layers.0.k" in key or "q.bias" in key for key in tensors)
    assert result.identical == 2
    for module in ("model.embed_tokens", "model.layers.0.q"):  # gapped rank 6: the optimal truncation
        name = module + ".weight"
        delta = m[name].double() - b[name].double()
        got = _update(tensors, config, module)
        torch.testing.assert_close(got, _truncated(delta, 6), rtol=0, atol=1e-5 * float(delta.norm()))
    for module, entry in report["modules"].items():
        name = module + ".weight"
        delta = m[name].double() - b[name].double()
        true = float((delta - _update(tensors, config, module)).norm() / delta.norm())
        assert entry["relative_error"] == pytest.approx(true, rel=1e-4, abs=1e-7)
        assert entry["rank"] == 6
        optimal = R.ref_truncation_error(delta, 6) / float(delta.norm())
        assert true <= 1.02 * optimal + 1e-6
    assert result.errors == {k: e["relative_error"] for k, e in report["modules"].items()}
    assert report["relative_error"]["worst"] == max(result.errors.values())
    assert report["relative_error"]["median"] == pytest.approx(sorted(result.errors.values())[1])
    assert report["rank"] == 6 and report["dtype"] == "float32"


def test_small_matrices_take_their_full_rank(tmp_path):
    base, model, b, m = _pair(tmp_path)
    extract_lora(base, model, tmp_path / "adapter", 20, device="cpu")
    tensors, config, report = _adapter(tmp_path / "adapter")
    # min(m, n) = 16 < 20 everywhere: every module's rank is 16, exactly its update.
    assert config["r"] == 16 and all(e["rank"] == 16 for e in report["modules"].values())
    for module in config["target_modules"]:
        name = module + ".weight"
        delta = m[name].double() - b[name].double()
        torch.testing.assert_close(_update(tensors, config, module), delta, rtol=0, atol=1e-6)
        assert report["modules"][module]["relative_error"] < 1e-6


def test_mixed_ranks_go_to_rank_pattern(tmp_path):
    base, model, b, m = _pair(tmp_path)
    gen = R.generator(9)
    extra_b = torch.randn(4, 30, generator=gen)
    for folder, state in ((base, b), (model, m)):
        tensor = extra_b if folder == base else extra_b + 0.1 * torch.randn(4, 30, generator=gen)
        save_file({**state, "model.layers.0.gate.weight": tensor}, folder / "model.safetensors")
    extract_lora(base, model, tmp_path / "adapter", 6, device="cpu")
    tensors, config, report = _adapter(tmp_path / "adapter")
    assert config["r"] == 6 and report["modules"]["model.layers.0.gate"]["rank"] == 4
    assert module_scaling(config, "model.layers.0.gate") == 1.0
    assert tensors[PREFIX + "model.layers.0.gate.lora_A.weight"].shape == (4, 30)


def test_row_block_path_gives_the_same_adapter(tmp_path):
    base, model, b, m = _pair(tmp_path)
    extract_lora(base, model, tmp_path / "whole", 6, device="cpu", seed=3)
    # 40 kB: the 40 x 16 embedding is read in row blocks.
    extract_lora(base, model, tmp_path / "blocks", 6, device="cpu", seed=3, max_memory="40kB")
    whole, config, whole_report = _adapter(tmp_path / "whole")
    blocks, _, block_report = _adapter(tmp_path / "blocks")
    assert "block_rows" not in whole_report["modules"]["model.embed_tokens"]
    assert block_report["modules"]["model.embed_tokens"]["block_rows"] < 40
    assert whole.keys() == blocks.keys()
    for module in config["target_modules"]:
        torch.testing.assert_close(_update(blocks, config, module), _update(whole, config, module), rtol=0, atol=1e-5)
        assert block_report["modules"][module]["relative_error"] == pytest.approx(
            whole_report["modules"][module]["relative_error"], rel=1e-4, abs=1e-7)
    with pytest.raises(MergeError, match="'model.embed_tokens.weight'.*needs at least"):
        extract_lora(base, model, tmp_path / "tiny", 6, device="cpu", max_memory="20kB")
    assert not (tmp_path / "tiny").exists() and not list(tmp_path.glob(".tiny*"))


def test_bfloat16_inputs_and_exclude(tmp_path):
    base, model, b, m = _pair(tmp_path, dtype=torch.bfloat16)
    result = extract_lora(base, model, tmp_path / "adapter", 6, device="cpu", exclude=[r"embed_tokens"])
    tensors, config, report = _adapter(tmp_path / "adapter")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert "model.embed_tokens" in config["modules_to_save"]
    assert torch.equal(tensors[PREFIX + "model.embed_tokens.weight"], m["model.embed_tokens.weight"].bfloat16())
    for module, entry in report["modules"].items():  # the error of the bf16 factors against the bf16 inputs' update
        name = module + ".weight"
        delta = m[name].bfloat16().double() - b[name].bfloat16().double()
        true = float((delta - _update(tensors, config, module)).norm() / delta.norm())
        assert entry["relative_error"] == pytest.approx(true, rel=1e-3)
    assert result.summary().count("relative error worst") == 1


def test_cli_prints_the_summary(tmp_path, capsys):
    base, model, _, _ = _pair(tmp_path)
    out = tmp_path / "adapter"
    code = main(["extract-lora", "--base", str(base), "--model", str(model), "--rank", "6", "--out", str(out),
                 "--device", "cpu", "--dtype", "bfloat16", "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    tensors, config, report = _adapter(out)
    worst = report["relative_error"]
    assert f"worst {worst['worst']:.3%} ({worst['worst_module']}), median {worst['median']:.3%}" in printed
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    # An existing output is refused, with one line.
    code = main(["extract-lora", "--base", str(base), "--model", str(model), "--rank", "6", "--out", str(out)])
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exists and is not empty" in err[0]


def _resave(folder, state):
    save_file(state, folder / "model.safetensors")


def test_bad_inputs_are_refused_naming_file_and_tensor(tmp_path):
    base, model, b, m = _pair(tmp_path)
    out = tmp_path / "adapter"
    q, norm = "model.layers.0.q.weight", "model.norm.weight"
    in_model, in_base = r"model/model\.safetensors: tensor", r"base/model\.safetensors: tensor"
    cases = [
        ({**m, q: torch.zeros(24, 15)}, rf"{in_model} '{q}' has shape \[24, 15\], but in the base"),
        ({**m, "model.extra.weight": torch.zeros(2, 2)}, rf"{in_model} 'model.extra.weight' is not in the base"),
        ({k: v for k, v in m.items() if k != norm}, rf"{in_base} '{norm}' is not in the model"),
        ({**m, q: m[q] * float("nan")}, rf"{in_model} '{q}' has NaN"),
        ({**m, norm: m[norm] * float("inf")}, rf"{in_model} '{norm}' has NaN or Inf"),
        (b, r"no weight matrix differs from the base"),
    ]
    for state, message in cases:
        _resave(model, state)
        with pytest.raises(MergeError, match=message):
            extract_lora(base, model, out, 4, device="cpu")
        assert not out.exists() and not list(tmp_path.glob(".adapter*")), message
    _resave(model, m)
    for bad, message in ((0, "rank"), (2.5, "rank")):
        with pytest.raises(MergeError, match=message):
            extract_lora(base, model, out, bad)
    with pytest.raises(MergeError, match="exclude"):
        extract_lora(base, model, out, 4, exclude=["("])
    assert math.isfinite(extract_lora(base, model, out, 4, device="cpu").median)
