"""ccsmerge's methods inside mergekit, end to end: a mergekit YAML run by
`ccsmerge-mergekit` gives the bytes of `ccsmerge merge` on the same
checkpoints. Runs where mergekit is installed (the `mergekit` extra)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

mergekit = pytest.importorskip("mergekit")
transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


@pytest.fixture(scope="module")
def llamas(tmp_path_factory) -> tuple[Path, list[Path]]:
    """A tiny Llama and three fine-tunes of it, saved by transformers."""
    root = tmp_path_factory.mktemp("llamas")
    config = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=48,
        intermediate_size=112,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config)
    base.save_pretrained(root / "base")
    paths = []
    for t in range(3):
        tuned = transformers.LlamaForCausalLM(config)
        tuned.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in tuned.parameters():
                p.add_(0.02 * torch.randn_like(p))
        tuned.save_pretrained(root / f"ft{t}")
        paths.append(root / f"ft{t}")
    return root / "base", paths


@pytest.mark.parametrize(
    "method,parameters,flags",
    [
        ("cart", "{rank_ratio: 0.25, lam: 2.0, seed: 3}", ["--rank-ratio", "0.25", "--lam", "2", "--seed", "3"]),
        ("tsv_m", "{lam: 0.8, svd: exact}", ["--lam", "0.8", "--svd", "exact"]),
        ("iso_cts", "{lam: 1.2, common_space_fraction: 0.5}", ["--lam", "1.2", "--common-space-fraction", "0.5"]),
    ],
)
def test_mergekit_yaml_equals_ccsmerge_merge(llamas, tmp_path, method, parameters, flags):
    base, paths = llamas
    needs_base = method != "cart"
    config = tmp_path / "merge.yml"
    lines = [f"merge_method: {method}"]
    lines += [f"base_model: {base}"] if needs_base else []
    lines += ["models:"] + [f"  - model: {p}" for p in paths]
    lines += [f"parameters: {parameters}", "dtype: float32"]
    config.write_text("\n".join(lines) + "\n")
    via_mergekit = tmp_path / "mergekit-out"
    subprocess.run(
        [sys.executable, "-m", "ccsmerge.integrations.mergekit", str(config), str(via_mergekit)],
        check=True,
        capture_output=True,
    )
    via_ccsmerge = tmp_path / "ccsmerge-out"
    command = [sys.executable, "-m", "ccsmerge", "merge", "--method", method, "--device", "cpu", "--quiet", *flags]
    command += ["--base", str(base)] if needs_base else []
    command += [a for p in paths for a in ("--model", str(p))] + ["--out", str(via_ccsmerge)]
    subprocess.run(command, check=True)
    a, b = tensors(via_mergekit), tensors(via_ccsmerge)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_methods_are_registered_once():
    import importlib

    from mergekit.merge_methods import registry

    import ccsmerge.integrations.mergekit as integration

    importlib.reload(integration)  # a second import must not register twice
    names = [m.spec.name for m in registry.registered_methods()]
    for method in ("cart", "tsv_m", "iso_c", "iso_cts"):
        assert names.count(method) == 1
