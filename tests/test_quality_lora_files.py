"""The LoRA quality benchmark's adapter folders: ccsmerge reads them as the
fine-tunes W0 + (alpha/r) B A they stand for (average and CART from the
folders against float64 references with torch.linalg.svd)."""

from __future__ import annotations

import torch

from benchmarks.quality.lora import TARGETS, init_factors, merged_state, with_lora, write_adapter, write_base

MODULES = [f"encoder.layer.1.{t}" for t in TARGETS]
SHAPES = {"intermediate.dense": (24, 8), "output.dense": (8, 24)}


def _base(g):
    base = {}
    for mod in MODULES:
        m, n = SHAPES.get(mod.split(".", 3)[3], (8, 8))  # BERT's shapes, hidden 8, intermediate 24
        base[mod + ".weight"] = torch.randn(m, n, generator=g)
        base[mod + ".bias"] = torch.randn(m, generator=g)
    return base


def _adapters(tmp_path, base, T, r, g):
    folders, states = [], []
    for t in range(T):
        factors = init_factors(base, MODULES, r, g)
        factors = {mod: (a.detach(), torch.randn(b.shape, generator=g)) for mod, (a, b) in factors.items()}
        write_adapter(tmp_path / f"a{t}", factors, r, 2.0 * r, [1])
        folders.append(tmp_path / f"a{t}")
        states.append(with_lora(base, factors, 2.0))
    write_base(tmp_path / "base", base)
    return folders, states


def test_initial_adapter_is_the_base():
    g = torch.Generator().manual_seed(0)
    base = _base(g)
    factors = init_factors(base, MODULES, 4, g)
    for mod, (a, b) in factors.items():
        n = base[mod + ".weight"].shape[1]
        assert a.abs().max() <= 1.0 / n ** 0.5 and a.abs().max() > 0.5 / n ** 0.5
        assert torch.equal(b, torch.zeros_like(b))
    assert all(torch.equal(v, base[k]) for k, v in with_lora(base, factors, 2.0).items())


def test_average_from_folders_equals_the_fine_tunes_mean(tmp_path):
    g = torch.Generator().manual_seed(1)
    base = _base(g)
    folders, states = _adapters(tmp_path, base, 3, 2, g)
    merged = merged_state(folders, tmp_path / "base", tmp_path, "average")
    assert set(merged) == set(base)
    for k in base:
        want = sum(s[k].double() for s in states) / 3
        torch.testing.assert_close(merged[k].double(), want, rtol=0, atol=1e-5)


def test_cart_at_rank_k_from_folders_equals_dense_reference(tmp_path):
    g = torch.Generator().manual_seed(2)
    base = _base(g)
    T, r, k, lam = 3, 2, 2, 2.5
    folders, states = _adapters(tmp_path, base, T, r, g)
    merged = merged_state(folders, tmp_path / "base", tmp_path, "cart", rank=k, lam=lam)
    for mod in MODULES:
        name = mod + ".weight"
        thetas = [s[name].double() for s in states]
        avg = sum(thetas) / T
        update = torch.zeros_like(avg)
        for theta in thetas:
            u, s, vh = torch.linalg.svd(theta - avg, full_matrices=False)
            update += (u[:, :k] * s[:k]) @ vh[:k]
        torch.testing.assert_close(merged[name].double(), avg + lam * update, rtol=0, atol=1e-5)
    # k reaching R = T r keeps every centered update whole: the average.
    whole = merged_state(folders, tmp_path / "base", tmp_path, "cart", rank=T * r, lam=lam)
    for mod in MODULES:
        name = mod + ".weight"
        torch.testing.assert_close(whole[name].double(), sum(s[name].double() for s in states) / T, rtol=0, atol=1e-5)
