"""Streaming merges on a GPU: the GPU memory budget in the plan (device
working sets, row blocks, refusals; planned without a GPU), `--max-gpu-memory`,
the staging of inputs (ccsmerge.staging: its CPU no-op and the chunked copies
through a ring of host buffers), the GPU budget's bookkeeping in the pipeline,
and, with a GPU, CUDA streaming merges against CPU ones and their peak device
memory against the budget."""

from __future__ import annotations

import re

import pytest
import torch
from checkpoints import (
    budgets_until_accepted,
    folder_bytes,
    load_output,
    smallest_budget,
    toy_set,
    write_checkpoint,
    write_set,
)
from conftest import rel_err
from safetensors.torch import load_file

import ccsmerge
from ccsmerge import MergeError, merge_checkpoints, plan_checkpoints
from ccsmerge import pipeline as pipeline_module
from ccsmerge import streaming as streaming_module
from ccsmerge.cli import build_parser, main, merge_arguments
from ccsmerge.planning import (
    DEVICE_RESERVE,
    STAGING_CHUNKS,
    STAGING_MIN_CHUNK,
    staging_bytes,
)
from ccsmerge.staging import PinnedRing, Staging, make_staging

NEEDS_BASE = ("task_arithmetic", "ties", "tsv_m", "iso_c", "iso_cts")
BIG = "100GB"  # a host budget that never binds


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """Width-64 toy models with a 512-token vocabulary (3 fine-tunes and a base)."""
    base, models = toy_set(3, width=64, vocab=512)
    base_path, paths = write_set(tmp_path_factory.mktemp("gpu-toy"), base, models)
    return base, models, base_path, paths


def base_for(method, base_path):
    return base_path if method in NEEDS_BASE else None


def gpu_plan(paths, method="cart", base=None, *, max_gpu_memory, max_memory=BIG, **options):
    """The plan of a merge on a GPU, made on whatever machine runs the tests."""
    return plan_checkpoints(
        paths, method, base=base, device="cuda", max_gpu_memory=max_gpu_memory, max_memory=max_memory, **options
    )


def smallest_gpu_budget(paths, method="cart", base=None, **options) -> int:
    """The smallest GPU budget the planner accepts (with a host budget that
    never binds), by bisection."""

    def accepted(budget: int) -> bool:
        try:
            gpu_plan(paths, method, base, max_gpu_memory=budget, **options)
            return True
        except MergeError:
            return False

    low, high = DEVICE_RESERVE + 1, DEVICE_RESERVE + (1 << 20)
    while not accepted(high):
        low, high = high, DEVICE_RESERVE + 2 * (high - DEVICE_RESERVE)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if accepted(mid) else (mid, high)
    return high


# ----------------------------------------------------------------------------- plans


def test_a_cpu_plan_has_no_device_side(toy):
    _, _, _, paths = toy
    plan = plan_checkpoints(paths, "cart", device="cpu", max_memory="1GB", max_gpu_memory="1GB")
    assert plan.device == "cpu" and plan.gpu_budget is None and plan.peak_gpu_memory is None
    assert plan.staging_bytes == 0
    assert all(t.device_memory is None for t in plan.tensors)


@pytest.mark.parametrize("method", ["average", "task_arithmetic", "ties", "cart", "tsv_m", "iso_cts"])
def test_gpu_plan_estimates_every_tensor_on_the_device(toy, method):
    _, models, base_path, paths = toy
    base = base_for(method, base_path)
    plan = gpu_plan(paths, method, base, max_gpu_memory="1GB", max_memory="1GB")
    assert plan.device == "cuda" and plan.gpu_budget == 10**9
    assert plan.staging_bytes == staging_bytes(10**9) == STAGING_CHUNKS * 16 * 2**20
    inputs = len(models) + (base is not None)
    for t in plan.tensors:
        assert t.block_rows is None, t.name
        if t.policy == "copied":  # integer buffers are compared and copied on the host
            assert t.device_memory == 0, t.name
        else:  # at least the inputs and the result
            assert t.device_memory >= (inputs + 1) * t.numel * t.dtype.itemsize, t.name
    assert plan.peak_gpu_memory == max(t.device_memory for t in plan.tensors) + DEVICE_RESERVE
    assert plan.peak_memory == max(t.memory for t in plan.tensors) + plan.staging_bytes


def test_low_rank_tensors_hold_their_factors_on_the_device(toy):
    _, _, _, paths = toy
    cart = {t.name: t for t in gpu_plan(paths, "cart", max_gpu_memory="1GB").tensors}
    average = {t.name: t for t in gpu_plan(paths, "average", max_gpu_memory="1GB").tensors}
    low_rank = [name for name, t in cart.items() if t.policy == "low-rank"]
    assert low_rank
    for name in low_rank:
        assert cart[name].device_memory > average[name].device_memory, name


@pytest.mark.parametrize("scale", [1.0, 1.3, 3.0])
def test_the_host_side_of_a_gpu_plan_is_the_cpu_plan(toy, scale):
    """The host decides alike on every device; the pinned staging buffers take
    what the budget leaves beside the neediest tensor, or nothing."""
    _, _, _, paths = toy
    budget = int(scale * smallest_budget(paths, "cart", device="cpu"))
    gpu = gpu_plan(paths, "cart", max_gpu_memory="10GB", max_memory=budget)
    cpu = plan_checkpoints(paths, "cart", device="cpu", max_memory=budget)
    assert any(t.block_rows is not None for t in cpu.tensors) == (scale < 2)
    assert [(t.name, t.memory, t.block_rows, t.passes) for t in gpu.tensors] == [
        (t.name, t.memory, t.block_rows, t.passes) for t in cpu.tensors
    ]
    room = budget - max(t.memory for t in cpu.tensors)
    assert gpu.staging_bytes <= room and gpu.peak_memory <= budget
    assert gpu.staging_bytes == staging_bytes(budget, room)
    assert (gpu.staging_bytes > 0) == (room >= STAGING_CHUNKS * STAGING_MIN_CHUNK)


def test_staging_buffers_for_a_budget():
    assert staging_bytes(10**9) == STAGING_CHUNKS * 16 * 2**20  # at most 16 MiB each
    assert staging_bytes(2**20) == STAGING_CHUNKS * 2**15  # 1/32 of the budget each
    assert staging_bytes(10**5) == STAGING_CHUNKS * STAGING_MIN_CHUNK  # at least 4 KiB each...
    assert staging_bytes(1000) == 0  # ...when they fit
    assert staging_bytes(10**9, room=5 * 2**20) == STAGING_CHUNKS * 2**21


@pytest.mark.parametrize("method", ["average", "task_arithmetic", "ties", "cart"])
def test_the_gpu_budget_forces_row_blocks(toy, method):
    _, _, base_path, paths = toy
    base = base_for(method, base_path)
    whole = gpu_plan(paths, method, base, max_gpu_memory="10GB")
    assert all(t.block_rows is None for t in whole.tensors)  # the host budget alone forces nothing
    least = smallest_gpu_budget(paths, method, base)
    plan = gpu_plan(paths, method, base, max_gpu_memory=least)
    blocked = [t for t in plan.tensors if t.block_rows is not None]
    assert blocked
    for t in plan.tensors:
        assert t.device_memory + DEVICE_RESERVE <= least, t.name
    by_name = {t.name: t for t in whole.tensors}
    for t in blocked:
        assert t.block_rows < t.shape[0] and t.device_memory < by_name[t.name].device_memory, t.name
        assert t.passes >= 1
    if method == "cart":
        assert "low-rank" in {t.policy for t in blocked}
    # One byte less, and one tensor no longer fits even in one-row blocks.
    with pytest.raises(MergeError, match=r"on the GPU needs at least .* more than the GPU memory budget") as info:
        gpu_plan(paths, method, base, max_gpu_memory=least - 1)
    assert re.search(r"tensor '[^']+' \(\d+, \d+\)", str(info.value)), info.value


def test_the_minimum_gpu_budget_named_is_enough(toy):
    """Raising the GPU budget to the minimum a refusal names lets that tensor through."""
    _, _, _, paths = toy
    refused = budgets_until_accepted(
        lambda budget: gpu_plan(paths, "cart", max_gpu_memory=budget), DEVICE_RESERVE + 1000,
        r"tensor '([^']+)' .*needs at least ([\d.]+ [KMG]?B) of GPU memory", slack=100_000,  # rounds to 0.1 MB
    )
    assert refused


def test_whole_matrix_methods_refuse_a_gpu_budget_below_the_whole_matrix(toy):
    _, _, base_path, paths = toy
    for method, options, what in [("cart", {"svd": "exact"}, "svd='exact'"), ("tsv_m", {}, "tsv_m")]:
        base = base_for(method, base_path)
        whole = gpu_plan(paths, method, base, max_gpu_memory="10GB", **options)
        biggest = max((t for t in whole.tensors if t.policy in ("low-rank", "tsv-m")), key=lambda t: t.device_memory)
        with pytest.raises(MergeError, match="needs the whole matrix") as info:
            gpu_plan(paths, method, base, max_gpu_memory=DEVICE_RESERVE + biggest.device_memory - 1, **options)
        message = str(info.value)
        assert what in message and "GPU memory budget" in message, message


def test_gpu_budget_errors(toy):
    _, _, _, paths = toy
    with pytest.raises(MergeError, match="max_gpu_memory: cannot read 'lots'"):
        gpu_plan(paths, max_gpu_memory="lots")
    with pytest.raises(MergeError, match="max_gpu_memory: .*must be positive"):
        gpu_plan(paths, max_gpu_memory=0)
    with pytest.raises(MergeError, match="max_gpu_memory: .* kept for the GPU libraries' workspaces"):
        gpu_plan(paths, max_gpu_memory=DEVICE_RESERVE)
    with pytest.raises(MergeError, match="max_gpu_memory: cannot read"):  # checked on the CPU too
        plan_checkpoints(paths, device="cpu", max_gpu_memory="lots")


def test_cuda_without_a_gpu_needs_a_gpu_budget_to_plan(toy):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: its free memory gives the default budget")
    _, _, _, paths = toy
    with pytest.raises(MergeError, match="no CUDA device is available.*max_gpu_memory"):
        plan_checkpoints(paths, device="cuda")


def test_default_gpu_budget_is_a_share_of_the_free_memory(toy):
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    _, _, _, paths = toy
    free, _ = torch.cuda.mem_get_info()
    plan = plan_checkpoints(paths, device="cuda")
    assert 0 < plan.gpu_budget <= free


# ----------------------------------------------------------------------------- the command line


def run(argv, capsys):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def model_flags(paths):
    return [a for p in paths for a in ("--model", str(p))]


def assert_one_error_line(code, err, *fragments):
    assert code != 0
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ccsmerge: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_cli_plan_shows_gpu_memory_per_tensor(toy, capsys):
    _, _, _, paths = toy
    least = smallest_gpu_budget(paths)
    code, out, err = run(["plan", *model_flags(paths), "--device", "cuda", "--max-gpu-memory", least], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split()[-2:] == ["GPU", "memory"]
    plan = gpu_plan(paths, max_gpu_memory=least, max_memory=None)
    rows = {line.split()[0]: line for line in lines[1 : 1 + len(plan.tensors)]}
    for t in plan.tensors:
        assert rows[t.name].endswith(ccsmerge.sizes.format_size(t.device_memory)), rows[t.name]
        if t.block_rows is not None:
            assert f"{t.block_rows}-row blocks" in rows[t.name]
    gpu_line = next(line for line in lines if line.startswith("on the GPU: estimated peak GPU memory"))
    assert f"GPU budget {ccsmerge.sizes.format_size(least)}" in gpu_line and "pinned staging buffers" in gpu_line


def test_cli_plan_on_the_cpu_has_no_gpu_column(toy, capsys):
    _, _, _, paths = toy
    code, out, err = run(["plan", *model_flags(paths), "--device", "cpu", "--max-gpu-memory", "1GB"], capsys)
    assert code == 0, err
    assert "GPU" not in out


def test_cli_gpu_budget_errors_are_one_line(toy, capsys, tmp_path):
    _, _, _, paths = toy
    least = smallest_gpu_budget(paths)
    code, _, err = run(["plan", *model_flags(paths), "--device", "cuda", "--max-gpu-memory", least - 1], capsys)
    assert_one_error_line(code, err, "GPU memory budget", "needs at least")
    code, _, err = run(["plan", *model_flags(paths), "--device", "cuda", "--max-gpu-memory", "lots"], capsys)
    assert_one_error_line(code, err, "max_gpu_memory")
    out = tmp_path / "out"
    code, _, err = run(
        ["merge", *model_flags(paths), "--device", "cuda", "--max-gpu-memory", least - 1, "--out", out], capsys
    )
    assert_one_error_line(code, err, "GPU memory budget")
    assert not out.exists() and not (tmp_path / ".out.ccsmerge-partial").exists()


def test_cli_passes_the_gpu_budget_on(toy):
    _, _, _, paths = toy
    args = build_parser().parse_args(["merge", *model_flags(paths), "--out", "x", "--max-gpu-memory", "2GB"])
    assert merge_arguments(args)["max_gpu_memory"] == "2GB"
    args = build_parser().parse_args(["plan", *model_flags(paths)])
    assert merge_arguments(args)["max_gpu_memory"] is None


def test_cli_merge_on_cuda_without_a_gpu_is_one_error_line(toy, capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    _, _, _, paths = toy
    out = tmp_path / "out"
    code, _, err = run(["merge", *model_flags(paths), "--device", "cuda", "--max-gpu-memory", "1GB", "--out", out],
                       capsys)
    assert_one_error_line(code, err, "no CUDA device")
    assert not out.exists()


# ----------------------------------------------------------------------------- staging


DTYPES = (torch.float32, torch.bfloat16, torch.float64, torch.float16, torch.int64, torch.bool)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ring_copies_every_byte_across_chunk_boundaries(dtype):
    ring = PinnedRing(4096, 3, pin=False)
    g = torch.Generator().manual_seed(0)
    for numel in (0, 1, 4095, 4096, 4097, 3 * 4096 + 5, 20_000):
        raw = torch.randint(0, 256, (numel * dtype.itemsize,), generator=g, dtype=torch.uint8)
        src = raw.view(dtype)
        dst = torch.empty_like(src)
        ring.copy(dst, src)
        assert torch.equal(dst.view(torch.uint8), raw), numel
    # A 2-D source that is not contiguous is copied as its values.
    src = torch.arange(60 * 70, dtype=torch.float32).reshape(60, 70).t()
    dst = torch.empty(src.shape, dtype=src.dtype)
    ring.copy(dst, src)
    assert torch.equal(dst, src)
    ring.wait()
    assert ring.nbytes == 3 * 4096


def test_cpu_staging_leaves_the_inputs_as_they_are():
    staging = make_staging(torch.device("cpu"), 8192)
    assert type(staging) is Staging and staging.pinned_bytes == 0
    xs = [torch.randn(10, 3) for _ in range(3)]
    base = torch.randn(10, 3)
    staged = staging.stage(xs, base)
    used, used_base = staging.use(staged)
    assert all(a is b for a, b in zip(used, xs)) and used_base is base
    staging.done(staged)
    staging.close()


class CopyingStaging(Staging):
    """Stages every floating tensor as a copy made through a ring of host
    buffers (as CudaStaging does towards the device), and records the calls."""

    def __init__(self):
        self.ring = PinnedRing(4096, 2, pin=False)
        self.staged: list = []  # every Staged object, kept alive so that identities stay distinct
        self.calls: list[list[str]] = []

    def stage(self, xs, base):
        staged = super().stage(xs, base)
        if xs[0].is_floating_point():
            copies = []
            for x in xs + ([base] if base is not None else []):
                target = torch.empty(x.shape, dtype=x.dtype)
                self.ring.copy(target, x)
                copies.append(target)
            staged.xs, staged.base = copies[: len(xs)], copies[len(xs)] if base is not None else None
        self.staged.append(staged)
        self.calls.append(["stage"])
        return staged

    def record(self, staged, what: str) -> None:
        (index,) = [i for i, s in enumerate(self.staged) if s is staged]
        self.calls[index].append(what)

    def use(self, staged):
        self.record(staged, "use")
        return super().use(staged)

    def done(self, staged):
        self.record(staged, "done")
        super().done(staged)


@pytest.mark.parametrize("method", ["ties", "cart"])
def test_staged_inputs_give_the_same_bytes(tmp_path, toy, monkeypatch, method):
    """The pipeline with a staging that copies every input (through the ring)
    writes the bytes of the plain pipeline; each staged tensor is used, then
    done with, once."""
    _, _, base_path, paths = toy
    plain = merge_checkpoints(paths, tmp_path / "plain", method, base=base_path, device="cpu", overlap=False)
    stagings = []

    def copying(device, pinned_bytes):
        stagings.append(CopyingStaging())
        return stagings[-1]

    monkeypatch.setattr(pipeline_module, "make_staging", copying)
    staged = merge_checkpoints(paths, tmp_path / "staged", method, base=base_path, device="cpu")
    assert folder_bytes(staged) == folder_bytes(plain)
    (staging,) = stagings
    assert len(staging.calls) == len(plan_checkpoints(paths, method, base=base_path, device="cpu").tensors)
    assert all(calls == ["stage", "use", "done"] for calls in staging.calls), staging.calls


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "sequential"])
def test_the_gpu_budget_bookkeeping(tmp_path, toy, monkeypatch, overlap):
    """A merge planned for a GPU, run on the CPU: the device bytes held never
    exceed the GPU budget (less the workspace reserve) and all come back, as
    do the host's; the result is the in-memory merge."""
    base, models, base_path, paths = toy
    whole = gpu_plan(paths, "ties", base_path, max_gpu_memory="10GB")
    budget = DEVICE_RESERVE + max(t.device_memory for t in whole.tensors) // 2
    prepared = streaming_module.prepare_merge(
        paths, "ties", base_path, device="cuda", max_gpu_memory=budget, max_memory=BIG
    )
    assert any(t.block_rows is not None for t in prepared.plan.tensors)
    pipelines = []

    class Recorded(pipeline_module._Pipeline):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            pipelines.append(self)

    monkeypatch.setattr(pipeline_module, "_Pipeline", Recorded)
    folder = tmp_path / "out"
    folder.mkdir()
    pipeline_module._stream(prepared, torch.device("cpu"), folder, set(), False, overlap)
    (pipeline,) = pipelines
    assert pipeline.gpu.total == budget - DEVICE_RESERVE
    assert 0 < pipeline.gpu.peak <= pipeline.gpu.total and pipeline.gpu.used == 0
    assert pipeline.budget.used == 0
    (shard,) = folder.glob("*.safetensors")
    got = load_file(shard)
    expected = ccsmerge.merge(models, "ties", base=base, device="cpu")
    assert got.keys() == expected.keys()
    for name, ref in expected.items():
        assert torch.equal(got[name], ref), name


# ----------------------------------------------------------------------------- on a GPU


def assert_close_to_cpu(got: dict, ref: dict, models, method: str) -> None:
    for name, r in ref.items():
        g = got[name]
        assert g.dtype == r.dtype and g.shape == r.shape, name
        if not r.is_floating_point():
            assert torch.equal(g, r), name
        elif method == "cart":
            avg = torch.stack([sd[name].double() for sd in models]).mean(0)
            update = (r.double() - avg).norm()
            bound = 1e-3 * float(update) + 1e-6 * float(avg.norm())
            assert float((g.double() - r.double()).norm()) <= bound, name
        else:
            assert rel_err(g, r) <= 1e-5, name


@pytest.mark.cuda
@pytest.mark.parametrize("method", ["average", "task_arithmetic", "ties", "cart"])
def test_cuda_streaming_matches_the_cpu(tmp_path, toy, cuda_device, method):
    """The same merge streamed on the GPU (inputs staged while the previous
    tensor merges, or copied in the merge) and on the CPU, whole and in row
    blocks forced by the GPU budget."""
    _, models, base_path, paths = toy
    base = base_for(method, base_path)
    cpu = load_output(merge_checkpoints(paths, tmp_path / "cpu", method, base=base, device="cpu"))
    staged = merge_checkpoints(paths, tmp_path / "staged", method, base=base, device=cuda_device)
    sequential = merge_checkpoints(paths, tmp_path / "seq", method, base=base, device=cuda_device, overlap=False)
    assert folder_bytes(staged) == folder_bytes(sequential)
    assert_close_to_cpu(load_output(staged), cpu, models, method)
    least = smallest_gpu_budget(paths, method, base)
    blocked = merge_checkpoints(
        paths, tmp_path / "blocked", method, base=base, device=cuda_device, max_gpu_memory=least
    )
    assert_close_to_cpu(load_output(blocked), cpu, models, method)


def medium_set(root, dtype):
    """3 fine-tunes with matrices of a few MB, so that device working sets
    weigh against the budget beside the libraries' reserve."""
    g = torch.Generator().manual_seed(5)
    shapes = {
        "model.embed_tokens.weight": (4096, 256),
        "model.layers.0.self_attn.q_proj.weight": (1024, 1024),
        "model.layers.0.mlp.up_proj.weight": (2048, 512),
        "model.layers.0.mlp.down_proj.weight": (512, 2048),
        "model.layers.0.input_layernorm.weight": (1024,),
        "model.layers.1.self_attn.q_proj.weight": (1024, 1024),
    }
    base = {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
    models = [{k: (v + 0.002 * torch.randn(v.shape, generator=g)).to(dtype) for k, v in base.items()} for _ in range(3)]
    paths = [write_checkpoint(sd, root / f"m{i}") for i, sd in enumerate(models)]
    return models, paths


@pytest.mark.cuda
@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "sequential"])
@pytest.mark.parametrize("method", ["average", "cart"])
def test_cuda_streaming_stays_within_the_gpu_budget(tmp_path, cuda_device, method, overlap):
    models, paths = medium_set(tmp_path, torch.float32)
    whole = gpu_plan(paths, method, max_gpu_memory="10GB")
    biggest = max(t.device_memory for t in whole.tensors)
    # Halfway between the least budget the planner accepts and the largest
    # working set: the largest tensors are merged in row blocks, the smaller
    # ones whole, their inputs staged while the previous tensor merges.
    budget = (smallest_gpu_budget(paths, method) + DEVICE_RESERVE + biggest) // 2
    plan = gpu_plan(paths, method, max_gpu_memory=budget)
    assert any(t.block_rows is not None for t in plan.tensors)
    assert any(t.block_rows is None and t.device_memory for t in plan.tensors)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = merge_checkpoints(
        paths, tmp_path / "out", method, device=cuda_device, max_gpu_memory=budget, max_memory="2GB", overlap=overlap
    )
    peak = torch.cuda.max_memory_allocated() - before
    assert peak <= budget, f"peak {peak / 1e6:.1f} MB over the GPU budget of {budget / 1e6:.1f} MB"
    cpu = load_output(merge_checkpoints(paths, tmp_path / "cpu", method, device="cpu", max_memory="2GB"))
    assert_close_to_cpu(load_output(out), cpu, models, method)


class FakeStream:
    """A CUDA stream stand-in that records what is asked of it."""

    def __init__(self, name: str, log: list):
        self.name, self.log = name, log

    def wait_event(self, event):
        self.log.append(("wait", self.name, event))

    def synchronize(self):
        self.log.append(("synchronize", self.name))


class FakeEvent:
    def __init__(self, log: list):
        self.log, self.stream = log, None

    def record(self, stream):
        self.stream = stream
        self.log.append(("record", stream.name, self))

    def synchronize(self):
        self.log.append(("event-synchronize", self))


@pytest.fixture
def fake_cuda(monkeypatch):
    """CudaStaging's CUDA calls replaced by CPU stand-ins that record them:
    its copies, events and stream bookkeeping then run on any machine."""
    import contextlib

    import ccsmerge.staging as staging_module

    log: list = []
    merge_stream = FakeStream("merge", log)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: FakeStream("copy", log))
    monkeypatch.setattr(torch.cuda, "Event", lambda: FakeEvent(log))
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: merge_stream)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, stream: log.append(("record_stream", stream.name)))

    class HostRing(PinnedRing):
        def __init__(self, chunk_bytes, chunks=STAGING_CHUNKS, *, pin=True):
            super().__init__(chunk_bytes, chunks, pin=False)

    monkeypatch.setattr(staging_module, "PinnedRing", HostRing)
    return log


@pytest.mark.parametrize("pinned", [0, 2 * 4096], ids=["pageable", "ring"])
def test_cuda_staging_logic_with_stand_ins(tmp_path, toy, fake_cuda, monkeypatch, pinned):
    """The CUDA staging's own logic, run on the CPU: the outputs are the plain
    pipeline's bytes; for every floating tensor the merge's stream waits on
    the event recorded after the copies, marks the inputs as its own, and is
    synchronised before their bytes go back."""
    from ccsmerge.staging import CudaStaging

    log = fake_cuda
    _, _, base_path, paths = toy
    plain = merge_checkpoints(paths, tmp_path / "plain", "ties", base=base_path, device="cpu", overlap=False)
    monkeypatch.setattr(pipeline_module, "make_staging", lambda device, _: CudaStaging(device, pinned))
    staged = merge_checkpoints(paths, tmp_path / "staged", "ties", base=base_path, device="cpu")
    assert folder_bytes(staged) == folder_bytes(plain)

    plan = plan_checkpoints(paths, "ties", base=base_path, device="cpu")
    floating = [t for t in plan.tensors if t.dtype.is_floating_point]
    inputs = len(paths) + 1
    ready = [e for e in log if e[0] == "record" and e[1] == "copy" and any(w[2] is e[2] for w in log if w[0] == "wait")]
    assert len(ready) == len(floating)
    waits = [i for i, e in enumerate(log) if e[0] == "wait"]
    assert len(waits) == len(floating) and all(log[i][1] == "merge" for i in waits)
    for i in waits:  # then the inputs are marked as used by the merge's stream, and it is synchronised once done
        assert [e[0] for e in log[i + 1 : i + 1 + inputs]] == ["record_stream"] * inputs
        assert ("synchronize", "merge") in log[i + 1 + inputs :]
    assert log[-1] == ("synchronize", "copy")  # close
    chunk_events = [e for e in log if e[0] == "record" and e not in ready]
    if pinned:
        assert chunk_events  # one per chunk copied through the ring
    else:
        assert not chunk_events
