"""PEFT LoRA adapters on disk (ccsmerge.lora_files): the names, the exact
truncation of a low-rank product against torch.linalg.svd of the dense update
in float64, the randomized truncation against the optimal rank-r error, and
the writer's files and atomicity."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import reference as R
from ccsmerge.errors import MergeError
from ccsmerge.lora_files import (
    ADAPTER_WEIGHTS,
    REPORT_FILE,
    AdapterWriter,
    adapter_config,
    exact_truncation,
    lora_embedding_names,
    lora_names,
    module_name,
    module_of,
    module_scaling,
    pattern_value,
    randomized_truncation,
    saved_key,
    saved_module_name,
    weight_of,
)

F64 = torch.float64


def _read(folder) -> dict[str, torch.Tensor]:
    with safe_open(folder / ADAPTER_WEIGHTS, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _optimal(u: torch.Tensor, k: int) -> tuple[torch.Tensor, float]:
    """The rank-k truncated SVD of u and its relative error, from torch.linalg.svd in float64."""
    uu, s, vh = torch.linalg.svd(u.to(F64), full_matrices=False)
    k = min(k, s.numel())
    return (uu[:, :k] * s[:k]) @ vh[:k], float(s[k:].square().sum().sqrt() / s.square().sum().sqrt())


# ----------------------------------------------------------------------------- names


def test_names_round_trip():
    weight = "model.layers.3.self_attn.q_proj.weight"
    a_key, b_key = lora_names(weight)
    assert (a_key, b_key) == (
        "base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight",
        "base_model.model.model.layers.3.self_attn.q_proj.lora_B.weight",
    )
    assert module_of(a_key) == ("model.layers.3.self_attn.q_proj", "A")
    assert module_of(b_key) == ("model.layers.3.self_attn.q_proj", "B")
    ea, eb = lora_embedding_names("model.embed_tokens.weight")
    assert (ea, eb) == ("base_model.model.model.embed_tokens.lora_embedding_A",
                        "base_model.model.model.embed_tokens.lora_embedding_B")
    assert module_of(ea) == ("model.embed_tokens", "embedding_A") and module_of(eb)[1] == "embedding_B"
    for key in (a_key, b_key):
        assert weight_of(key) == weight
    assert weight_of(ea) == "model.embed_tokens.weight"
    assert saved_module_name("model.norm.weight") == "model.norm"
    assert saved_key("model.norm.weight") == "base_model.model.model.norm.weight"
    assert weight_of(saved_key("model.layers.0.input_layernorm.weight")) == "model.layers.0.input_layernorm.weight"
    assert module_name("lm_head.weight") == "lm_head"


def test_names_refused():
    with pytest.raises(MergeError, match="'model.layers.0.q_proj.bias'"):
        module_name("model.layers.0.q_proj.bias")
    with pytest.raises(MergeError, match="'logit_scale'"):
        saved_module_name("logit_scale")
    with pytest.raises(ValueError):
        module_of("base_model.model.model.norm.weight")
    with pytest.raises(ValueError):
        weight_of("model.norm.weight")


# ----------------------------------------------------------------------------- exact truncation


@pytest.mark.parametrize("m,n,big_r", [(70, 50, 12), (40, 90, 9), (30, 30, 40), (8, 200, 5)])
def test_exact_truncation_is_the_truncated_svd(m, n, big_r):
    gen = R.generator(m + n)
    left = torch.randn(m, big_r, generator=gen, dtype=F64)
    right = torch.randn(big_r, n, generator=gen, dtype=F64)
    u = left @ right
    s_true = torch.linalg.svdvals(u)
    for rank in sorted({1, 3, big_r // 2, big_r, big_r + 5}):
        b, a, error = exact_truncation(left, right, rank)
        want, want_error = _optimal(u, rank)
        k = min(rank, big_r, m, n)
        assert b.shape == (m, k) and a.shape == (k, n) and b.dtype == F64
        torch.testing.assert_close(b @ a, want, rtol=0, atol=1e-11 * float(u.norm()))
        assert error == pytest.approx(want_error, abs=1e-12)
        # Balanced: the i-th column of B and row of A both have norm sqrt(sigma_i).
        torch.testing.assert_close(b.norm(dim=0), s_true[:k].sqrt(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(a.norm(dim=1), s_true[:k].sqrt(), rtol=1e-10, atol=1e-12)
    assert exact_truncation(left, right, big_r)[2] == pytest.approx(0.0, abs=1e-7)


def test_exact_truncation_float32_and_zero():
    gen = R.generator(1)
    left, right = torch.randn(60, 6, generator=gen), torch.randn(6, 40, generator=gen)
    b, a, error = exact_truncation(left, right, 4)
    want, want_error = _optimal(left.double() @ right.double(), 4)
    assert b.dtype == torch.float32
    torch.testing.assert_close((b @ a).double(), want, rtol=0, atol=1e-5 * float(want.norm()))
    assert error == pytest.approx(want_error, rel=1e-5)
    b, a, error = exact_truncation(torch.zeros(5, 2), torch.zeros(2, 7), 2)
    assert error == 0.0 and float((b @ a).abs().max()) == 0.0
    with pytest.raises(ValueError):
        exact_truncation(left, right.mT, 2)


# ----------------------------------------------------------------------------- randomized truncation


@pytest.mark.parametrize("m,n", [(200, 120), (120, 260)])
@pytest.mark.parametrize("decay", [0.5, 1.0])
def test_randomized_truncation_near_optimal(m, n, decay):
    """Within ops.randomized_svd's stated accuracy (1.02x the optimal rank-r
    error, p = 10, q = 2), and the returned error is the true one."""
    u64 = R.decaying_matrix(m, n, decay=decay, seed=m + n)
    for rank in (4, 16, 40):
        b, a, error = randomized_truncation(u64.float(), rank, seed=rank)
        assert b.shape == (m, rank) and a.shape == (rank, n)
        true = float((u64 - b.double() @ a.double()).norm() / u64.norm())
        assert error == pytest.approx(true, rel=1e-5)
        assert true <= 1.02 * R.ref_truncation_error(u64, rank) / float(u64.norm())


def test_randomized_truncation_over_row_blocks_equals_whole():
    u64 = R.decaying_matrix(150, 90, decay=1.0, seed=3)
    whole = randomized_truncation(u64.float(), 12, seed=5)
    reads = []

    def rows(start, stop):
        reads.append((start, stop))
        return u64[start:stop].float()

    blocks = [(0, 40), (40, 80), (80, 120), (120, 150)]
    blocked = randomized_truncation(rows, 12, shape=(150, 90), blocks=blocks, seed=5)
    assert set(reads) == set(blocks)
    torch.testing.assert_close(blocked[0] @ blocked[1], whole[0] @ whole[1], rtol=0, atol=1e-5)
    assert blocked[2] == pytest.approx(whole[2], rel=1e-5)


def test_randomized_truncation_full_rank_and_store_dtype():
    u64 = R.decaying_matrix(30, 50, decay=1.0, seed=4)
    for shape_u in (u64, u64.mT):
        b, a, error = randomized_truncation(shape_u.float(), 64)
        torch.testing.assert_close((b @ a).double(), shape_u, rtol=0, atol=1e-6)
        assert error < 1e-6
    b, a, error = randomized_truncation(u64.float(), 8, store_dtype=torch.bfloat16)
    assert b.dtype == a.dtype == torch.bfloat16
    true = float((u64 - b.double() @ a.double()).norm() / u64.norm())
    assert error == pytest.approx(true, rel=1e-4)


# ----------------------------------------------------------------------------- adapter_config.json


def test_adapter_config_scaling_one_per_module():
    ranks = {"model.layers.1.q": 8, "model.layers.11.q": 8, "model.layers.1.k": 4, "model.embed": 2}
    config = adapter_config(ranks, ["model.norm"], base_model_name_or_path="/b")
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["lora_alpha"] == 8
    assert config["target_modules"] == list(ranks) and config["modules_to_save"] == ["model.norm"]
    for module, rank in ranks.items():
        assert pattern_value(config["rank_pattern"], module, config["r"]) == rank
        assert module_scaling(config, module) == 1.0
    # A pattern matches its module alone, not one whose path ends like it.
    assert pattern_value(config["rank_pattern"], "model.layers.21.k", 8) == 8
    assert pattern_value(config["rank_pattern"], "xmodel.layers.1.k", 8) == 8
    json.dumps(config)
    with pytest.raises(MergeError, match="at least one LoRA module"):
        adapter_config({})


# ----------------------------------------------------------------------------- the writer


def _factors(m, n, r, seed):
    gen = R.generator(seed)
    return torch.randn(m, r, generator=gen), torch.randn(r, n, generator=gen)


def test_writer_writes_peft_layout(tmp_path):
    out = tmp_path / "adapter"
    b, a = _factors(12, 10, 3, 0)
    eb, ea = _factors(20, 6, 2, 1)  # an embedding's update, vocab 20 x dim 6
    norm = torch.randn(6)
    with AdapterWriter(out) as writer:
        writer.add("model.layers.0.q.weight", b, a, relative_error=0.25)
        writer.add("model.embed.weight", eb, ea, embedding=True, relative_error=0.5)
        writer.add_full("model.norm.weight", norm)
        writer.set_report({"kind": "test"})
        assert writer.finish() == out
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", ADAPTER_WEIGHTS, REPORT_FILE]
    assert not list(tmp_path.glob(".adapter*"))
    tensors = _read(out)
    a_key, b_key = lora_names("model.layers.0.q.weight")
    ea_key, eb_key = lora_embedding_names("model.embed.weight")
    assert set(tensors) == {a_key, b_key, ea_key, eb_key, saved_key("model.norm.weight")}
    assert torch.equal(tensors[a_key], a) and torch.equal(tensors[b_key], b)
    # PEFT's embedding update is (lora_embedding_B @ lora_embedding_A)^T.
    assert tensors[ea_key].shape == (2, 20) and tensors[eb_key].shape == (6, 2)
    torch.testing.assert_close((tensors[eb_key] @ tensors[ea_key]).mT, eb @ ea)
    assert torch.equal(tensors[saved_key("model.norm.weight")], norm)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_modules"] == ["model.layers.0.q", "model.embed"]
    assert config["r"] == 3 and config["rank_pattern"] == {"model\\.embed": 2}
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["kind"] == "test"
    assert report["modules"]["model.layers.0.q"]["rank"] == 3
    assert report["modules"]["model.embed"]["relative_error"] == 0.5
    assert report["modules_to_save"] == {"model.norm": ["model.norm.weight"]}


def test_writer_dtype(tmp_path):
    b, a = _factors(8, 8, 2, 2)
    with AdapterWriter(tmp_path / "a", dtype=torch.bfloat16) as writer:
        writer.add("m.q.weight", b, a)
        writer.finish()
    tensors = _read(tmp_path / "a")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert torch.equal(tensors[lora_names("m.q.weight")[1]], b.bfloat16())


def _nothing_left(tmp_path, name="adapter"):
    return not (tmp_path / name).exists() and not list(tmp_path.glob(f".{name}.*"))


def test_writer_failure_leaves_nothing(tmp_path):
    out = tmp_path / "adapter"
    b, a = _factors(6, 5, 2, 3)
    with pytest.raises(MergeError, match="'m.k.weight'.*NaN"):
        with AdapterWriter(out) as writer:
            writer.add("m.q.weight", b, a)
            writer.add("m.k.weight", b, a * float("nan"))
    assert _nothing_left(tmp_path)
    # A bad call without the context manager aborts the writer itself.
    writer = AdapterWriter(out)
    writer.add("m.q.weight", b, a)
    with pytest.raises(MergeError, match="already in the adapter"):
        writer.add("m.q.weight", b, a)
    assert _nothing_left(tmp_path)
    # A config that does not match what was added: refused, nothing published.
    writer = AdapterWriter(out)
    writer.add("m.q.weight", b, a)
    with pytest.raises(MergeError, match="target_modules"):
        writer.finish(adapter_config({"m.other": 2}))
    assert _nothing_left(tmp_path)
    # A module saved whole that holds a LoRA module: PEFT cannot load both.
    writer = AdapterWriter(out)
    writer.add("m.q.weight", b, a)
    writer.add_full("m.scale", torch.ones(3))
    with pytest.raises(MergeError, match="saved whole and holds the LoRA module"):
        writer.finish()
    assert _nothing_left(tmp_path)
    # abort() by hand.
    writer = AdapterWriter(out)
    writer.add("m.q.weight", b, a)
    writer.abort()
    assert _nothing_left(tmp_path)


def test_writer_refuses_existing_output(tmp_path):
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(MergeError, match="exists and is not empty"):
        AdapterWriter(out)
    b, a = _factors(6, 5, 2, 4)
    # A failure with overwrite leaves the old folder as it was.
    writer = AdapterWriter(out, overwrite=True)
    writer.add("m.q.weight", b, a)
    writer.abort()
    assert (out / "keep.txt").read_text() == "mine"
    with AdapterWriter(out, overwrite=True) as writer:
        writer.add("m.q.weight", b, a)
        writer.finish()
    assert not (out / "keep.txt").exists() and (out / ADAPTER_WEIGHTS).is_file()
    with pytest.raises(MergeError, match="would replace the input"):
        AdapterWriter(tmp_path / "in", inputs=[tmp_path / "in"])


def test_writer_rank_mismatch_is_refused(tmp_path):
    b, a = _factors(6, 5, 2, 5)
    with pytest.raises(MergeError, match=r"B \(m, r\) and A \(r, n\)"):
        with AdapterWriter(tmp_path / "adapter") as writer:
            writer.add("m.q.weight", b, a[:1])
    assert _nothing_left(tmp_path)
