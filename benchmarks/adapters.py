"""Merging LoRA adapters: ccsmerge's factor path against merge_and_unload + a
dense merge and against peft's add_weighted_adapter, side by side in one run.

T rank-r adapters (PEFT's file layout, written here with safetensors + json;
the layout is checked against an adapter that peft itself saves) on q/k/v/o/
gate/up/down of a Llama-shaped base (a safetensors folder with a config.json,
random weights). Compared:

(a) `ccsmerge merge --method cart --base B --model A1 ... --model AT`: the
    factor path at CART's defaults (k = int(rank_ratio * R), R = T * r);
(b) what users do today: every adapter merged into the base (W0 + s B A,
    peft's merge_and_unload) and saved as a full model, then a dense
    `ccsmerge merge --method cart` of the T models with the same k
    (randomized unless --svd exact);
(c) peft's add_weighted_adapter(..., combination_type="svd") on a model
    holding the T adapters (a different merge: the weighted sum of the
    updates, truncated by a full torch.linalg.svd per module). Its time is
    measured on layer 0's q_proj and down_proj (the two SVD shapes of the
    seven projections) and extrapolated to every module, as the table says.

Each in a fresh process: wall time and peak RSS. Agreement: on layer 0's
q_proj and down_proj, (a) and (b) against exact dense CART in float64
(the dense centered matrices' truncated SVD from a sketch wider than their
rank, which is exact; its residual is reported), and over every tensor (a)
against (b). Both merges write float32 so that the comparison is not the
output's bfloat16 rounding.

    python benchmarks/adapters.py                  # hidden 4096, intermediate 11008, 4 layers, 8 rank-16 adapters
    python benchmarks/adapters.py --layers 2 --threads 1
    python benchmarks/adapters.py --quick          # tiny, a CI sanity check
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from harness import log, table, time_command_rss, write_results  # noqa: E402
from machine import describe, git_state, load_average, load_ccsmerge, machine_info, startup_warnings  # noqa: E402
from merge_process import child_command, run_child  # noqa: E402

RESULTS = HERE / "results" / "cpu-2core" / "adapters"
GROUPS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
          "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
CHECKED = ("q_proj", "down_proj")  # one of each SVD shape: (h, h) and (h, intermediate) or its transpose
LAM = 2.0  # CART's default
RANK_RATIO = 0.3  # CART's adapter_rank_ratio default: k as a share of R on adapter modules


# --------------------------------------------------------------------------- the model and its adapters


def shape_of(module: str, hidden: int, intermediate: int) -> tuple[int, int]:
    """(out, in) of a projection."""
    if module in ("gate_proj", "up_proj"):
        return intermediate, hidden
    if module == "down_proj":
        return hidden, intermediate
    return hidden, hidden


def weight_name(layer: int, module: str) -> str:
    return f"model.layers.{layer}.{GROUPS[module]}.{module}.weight"


def generator(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def config_json(args) -> dict:
    heads = max(1, args.hidden // 128)
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": args.hidden,
        "intermediate_size": args.intermediate, "num_hidden_layers": args.layers, "num_attention_heads": heads,
        "num_key_value_heads": heads, "vocab_size": args.vocab, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5, "hidden_act": "silu", "rope_theta": 10000.0, "tie_word_embeddings": False,
        "torch_dtype": args.dtype, "bos_token_id": 1, "eos_token_id": 2,
    }


def write_base(folder: Path, args) -> None:
    """Random weights (N(0, 0.02^2), norms 1), one shard per layer plus the embeddings' and the head's."""
    dtype = getattr(torch, args.dtype)
    folder.mkdir(parents=True)
    shards = [{"model.embed_tokens.weight": (args.vocab, args.hidden)}]
    for i in range(args.layers):
        layer = {weight_name(i, m): shape_of(m, args.hidden, args.intermediate) for m in GROUPS}
        layer[f"model.layers.{i}.input_layernorm.weight"] = (args.hidden,)
        layer[f"model.layers.{i}.post_attention_layernorm.weight"] = (args.hidden,)
        shards.append(layer)
    shards.append({"model.norm.weight": (args.hidden,), "lm_head.weight": (args.vocab, args.hidden)})
    weight_map, total = {}, 0
    for s, shard in enumerate(shards):
        file = f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shape in shard.items():
            if len(shape) == 1:
                tensors[name] = torch.ones(shape, dtype=dtype)
            else:
                tensors[name] = (0.02 * torch.randn(shape, generator=generator("base", name))).to(dtype)
            weight_map[name] = file
            total += tensors[name].numel() * tensors[name].element_size()
        save_file(tensors, folder / file, {"format": "pt"})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                      "weight_map": weight_map}, indent=1))
    (folder / "config.json").write_text(json.dumps(config_json(args), indent=1))


def factors(t: int, layer: int, module: str, rank: int, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(A: r x in, B: out x r) of adapter t, float32, the same whatever else is written."""
    g = generator("adapter", t, layer, module)
    a = torch.randn(rank, shape[1], generator=g) / math.sqrt(shape[1])
    b = 0.01 * torch.randn(shape[0], rank, generator=g)
    return a, b


def adapter_config(rank: int, alpha: float, modules, base: Path) -> dict:
    """The fields of PEFT's adapter_config.json that describe a plain LoRA."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base), "r": rank,
        "lora_alpha": alpha, "target_modules": sorted(modules), "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "modules_to_save": None,
        "init_lora_weights": True, "inference_mode": True, "rank_pattern": {}, "alpha_pattern": {},
        "layers_to_transform": None, "layers_pattern": None, "revision": None,
    }


def write_adapter(folder: Path, t: int, args, base: Path, layers=None, modules=None) -> None:
    """Adapter t in PEFT's layout: adapter_config.json and adapter_model.safetensors with
    base_model.model.<module>.lora_A.weight (r x in) and .lora_B.weight (out x r)."""
    folder.mkdir(parents=True)
    modules = tuple(modules or GROUPS)
    tensors = {}
    for i in range(args.layers) if layers is None else layers:
        for m in modules:
            a, b = factors(t, i, m, args.rank, shape_of(m, args.hidden, args.intermediate))
            prefix = "base_model.model." + weight_name(i, m).removesuffix(".weight")
            tensors[f"{prefix}.lora_A.weight"] = a
            tensors[f"{prefix}.lora_B.weight"] = b
    save_file(tensors, folder / "adapter_model.safetensors", {"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps(adapter_config(args.rank, args.alpha, modules, base),
                                                           indent=1))


def check_layout(work: Path) -> dict:
    """The layout written here against one peft saves, on a tiny Llama made
    by transformers: the same tensor names and shapes, the same values of the
    config's fields, and peft loads ours to W0 + (alpha / r) B A."""
    import peft
    import transformers

    tiny = argparse.Namespace(hidden=64, intermediate=96, layers=2, vocab=100, rank=4, alpha=8.0, dtype="float32")
    config = transformers.LlamaConfig(**{k: v for k, v in config_json(tiny).items()
                                         if k not in ("architectures", "torch_dtype")})
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(work / "tiny-base")
    theirs = peft.get_peft_model(model, peft.LoraConfig(r=tiny.rank, lora_alpha=tiny.alpha,
                                                        target_modules=list(GROUPS), task_type="CAUSAL_LM"))
    theirs.save_pretrained(work / "tiny-peft")
    write_adapter(work / "tiny-ours", 0, tiny, work / "tiny-base")
    a = load_file(work / "tiny-peft" / "adapter_model.safetensors")
    b = load_file(work / "tiny-ours" / "adapter_model.safetensors")
    problems = []
    if {k: tuple(v.shape) for k, v in a.items()} != {k: tuple(v.shape) for k, v in b.items()}:
        problems.append(f"tensors differ: {sorted(set(a) ^ set(b))[:4]}")
    peft_config = json.loads((work / "tiny-peft" / "adapter_config.json").read_text())
    ours = json.loads((work / "tiny-ours" / "adapter_config.json").read_text())
    for key, value in ours.items():
        theirs_value = peft_config.get(key)
        if key == "target_modules":
            value, theirs_value = sorted(value), sorted(theirs_value)
        if key != "base_model_name_or_path" and theirs_value != value:
            problems.append(f"{key}: peft writes {theirs_value!r}, ours {value!r}")
    loaded = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(work / "tiny-base"),
                                            work / "tiny-ours").merge_and_unload()
    name = weight_name(1, "down_proj")
    a1, b1 = factors(0, 1, "down_proj", tiny.rank, shape_of("down_proj", tiny.hidden, tiny.intermediate))
    w0 = next(load_file(f)[name] for f in (work / "tiny-base").glob("*.safetensors") if name in load_file(f))
    expected = w0 + tiny.alpha / tiny.rank * b1 @ a1
    error = float((loaded.state_dict()[name] - expected).abs().max())
    if error > 1e-6:
        problems.append(f"peft's merge_and_unload of ours differs from W0 + s B A by {error:.1e}")
    return {"ok": not problems, "problems": problems, "peft_version": peft.__version__}


# --------------------------------------------------------------------------- (b): the dense fine-tunes


def write_dense(base: Path, adapters: list[Path], outs: list[Path]) -> None:
    """Each adapter merged into the base, W0 + (alpha / r) B A in float32
    rounded once to the base's dtype, saved as a full model (shard by shard)."""
    files = sorted(base.glob("*.safetensors"))
    for adapter, out in zip(adapters, outs):
        out.mkdir(parents=True)
        for extra in ("config.json", "model.safetensors.index.json"):
            shutil.copy(base / extra, out / extra)
        config = json.loads((adapter / "adapter_config.json").read_text())
        scale = config["lora_alpha"] / config["r"]
        lora = load_file(adapter / "adapter_model.safetensors")
        for file in files:
            shard = load_file(file)
            for name, w in shard.items():
                prefix = "base_model.model." + name.removesuffix(".weight")
                if f"{prefix}.lora_A.weight" in lora:
                    update = lora[f"{prefix}.lora_B.weight"] @ lora[f"{prefix}.lora_A.weight"]
                    shard[name] = (w.float() + scale * update).to(w.dtype)
            save_file(shard, out / file.name, {"format": "pt"})


def cpu_seconds() -> float:
    """User + system CPU time of this process (on a loaded machine, wall time also counts the waits)."""
    t = os.times()
    return t.user + t.system


# --------------------------------------------------------------------------- (c): peft's add_weighted_adapter


def peft_child(spec: dict) -> dict:
    """Load the adapters into an (uninitialised) one-layer model of the base's
    shapes, time add_weighted_adapter(svd), save the merged update of the module."""
    import peft
    import transformers

    config = json.loads(Path(spec["base"], "config.json").read_text())
    config = transformers.LlamaConfig(**{**{k: v for k, v in config.items() if k not in ("architectures", "torch_dtype")},
                                         "num_hidden_layers": 1})
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").to(getattr(torch, spec["dtype"]))
    t0 = time.perf_counter()
    names = [f"a{t}" for t in range(len(spec["adapters"]))]
    wrapped = peft.PeftModel.from_pretrained(model, spec["adapters"][0], adapter_name=names[0])
    for name, path in zip(names[1:], spec["adapters"][1:]):
        wrapped.load_adapter(path, adapter_name=name)
    load_s = time.perf_counter() - t0
    t0, cpu0 = time.perf_counter(), cpu_seconds()
    wrapped.add_weighted_adapter(names, [1.0 / len(names)] * len(names), "merged", combination_type="svd")
    combine_s, cpu_s = time.perf_counter() - t0, cpu_seconds() - cpu0
    module = wrapped.base_model.model.get_submodule(weight_name(0, spec["module"]).removesuffix(".weight"))
    save_file({"delta": module.get_delta_weight("merged").float().contiguous()}, spec["delta"])
    return {"load_s": load_s, "combine_s": combine_s, "cpu_s": cpu_s}


# --------------------------------------------------------------------------- agreement


def exact_cart(thetas: list[torch.Tensor], k: int, rank_bound: int, lam: float = LAM):
    """CART in float64 on dense matrices: theta_avg + lam * sum_t LowRank_k(theta_t - theta_avg).
    The centered matrices have rank <= rank_bound, so a randomized sketch of
    rank_bound + 8 columns spans them and their truncated SVD is exact; the
    worst relative residual of that factorisation is returned with it."""
    avg = torch.stack(thetas).mean(0)
    update = torch.zeros_like(avg)
    worst = 0.0
    torch.manual_seed(0)
    for theta in thetas:
        d = theta - avg
        q = min(rank_bound + 8, min(d.shape))
        u, s, v = torch.svd_lowrank(d, q=q, niter=2)
        worst = max(worst, float((d - (u * s) @ v.T).norm() / d.norm()))
        update += (u[:, :k] * s[:k]) @ v[:, :k].T
    return avg, lam * update, worst


def relative(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref).norm() / ref.norm().clamp_min(1e-300))


def folder_tensor(folder: Path, name: str) -> torch.Tensor:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        file = folder / json.loads(index.read_text())["weight_map"][name]
    else:
        file = next(f for f in sorted(folder.glob("*.safetensors")) if name in load_file(f))
    return load_file(file)[name]


def largest_difference(a: Path, b: Path) -> float:
    """Largest ||x - y|| / ||y|| over the tensors of two output folders, shard by shard."""
    from outputs import max_relative_difference

    return max_relative_difference(a, b)


# --------------------------------------------------------------------------- the run


def measured(argv: list[str], args, timeout: float) -> dict:
    """`ccsmerge <argv>` in a measuring child (merge_process.py)."""
    env = None if not args.threads else {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    return run_child(child_command(argv), timeout, env=env)


def run(args, work: Path) -> dict:
    ccsmerge = load_ccsmerge()
    info = machine_info(ccsmerge)
    for warning in startup_warnings(info, "cpu"):
        log(warning)
    log(describe(info))
    result: dict = {"machine": info, "commit": git_state(), "load_average": {"start": load_average()},
                    "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    layout = check_layout(work / "layout")
    result["layout_check"] = layout
    log(f"adapter layout against peft {layout['peft_version']}: {'same' if layout['ok'] else layout['problems']}")
    if not layout["ok"]:
        raise SystemExit("the adapters written here do not have peft's layout: " + "; ".join(layout["problems"]))

    base = work / "base"
    t0 = time.perf_counter()
    write_base(base, args)
    adapters = [work / f"adapter{t}" for t in range(args.adapters)]
    for t, folder in enumerate(adapters):
        write_adapter(folder, t, args, base)
    R = args.adapters * args.rank
    k = max(1, int(RANK_RATIO * R))
    base_gb = sum(f.stat().st_size for f in base.glob("*.safetensors")) / 1e9
    adapter_gb = sum((a / "adapter_model.safetensors").stat().st_size for a in adapters) / 1e9
    log(f"base {base_gb:.2f} GB, {args.adapters} adapters {adapter_gb:.3f} GB, written in "
        f"{time.perf_counter() - t0:.0f} s; CART k = int({RANK_RATIO} * {R}) = {k}")
    result.update(base_gb=base_gb, adapter_gb=adapter_gb, R=R, k=k)
    models = [a for p in adapters for a in ("--model", str(p))]
    common = ["--device", "cpu", "--quiet", "--dtype", "float32"]
    rows = {}

    # (a) the factor path
    out_a = work / "out-factors"
    log("(a) factor path ...")
    rows["a"] = measured(["merge", "--method", "cart", "--base", str(base), *models, "--out", str(out_a), *common],
                         args, args.timeout)
    log(f"    {rows['a']}")
    out_lora = work / "out-lora"
    log("(a') factor path, written as a LoRA adapter ...")
    rows["a_lora"] = measured(["merge", "--method", "cart", "--base", str(base), *models, "--out", str(out_lora),
                               "--output-format", "lora", *common], args, args.timeout)
    log(f"    {rows['a_lora']}")

    # (b) merge_and_unload, then a dense merge with the same k
    dense = [work / f"dense{t}" for t in range(args.adapters)]
    log("(b) writing the dense fine-tunes ...")
    spec = work / "dense.json"
    spec.write_text(json.dumps({"base": str(base), "adapters": [str(a) for a in adapters],
                                "outs": [str(d) for d in dense], "report": str(work / "dense.out")}))
    process_s, write_rss = time_command_rss([sys.executable, str(Path(__file__).resolve()), "--child-dense", str(spec)])
    write_s = json.loads((work / "dense.out").read_text())["write_s"]
    dense_gb = sum(f.stat().st_size for d in dense for f in d.glob("*.safetensors")) / 1e9
    rows["b_write"] = {"process_s": process_s, "write_s": write_s, "peak_rss": write_rss * 1e9}
    log(f"    {dense_gb:.2f} GB in {write_s:.1f} s")
    out_b = work / "out-dense"
    ratio = (k + 0.5) / args.hidden  # k = int(ratio * min(m, n)) on every projection (min(m, n) = hidden)
    log("(b) dense CART ...")
    rows["b_merge"] = measured(["merge", "--method", "cart", "--rank-ratio", repr(ratio), "--svd", args.svd,
                                *[a for d in dense for a in ("--model", str(d))], "--out", str(out_b), *common],
                               args, args.timeout)
    log(f"    {rows['b_merge']}")
    if not args.keep:
        for d in dense:
            shutil.rmtree(d)

    # (c) peft's add_weighted_adapter(svd), per checked module on layer 0
    peft_rows = {}
    for module in CHECKED if not args.skip_peft else ():
        few = [work / f"peft-{module}-{t}" for t in range(args.adapters)]
        for t, folder in enumerate(few):
            write_adapter(folder, t, args, base, layers=[0], modules=[module])
        delta = work / f"peft-{module}-delta.safetensors"
        spec = work / f"peft-{module}.json"
        spec.write_text(json.dumps({"base": str(base), "adapters": [str(f) for f in few], "module": module,
                                    "delta": str(delta), "dtype": args.dtype, "report": str(work / f"peft-{module}.out")}))
        log(f"(c) peft add_weighted_adapter(svd) on layer 0's {module} ...")
        seconds, rss = time_command_rss([sys.executable, str(Path(__file__).resolve()), "--child-peft", str(spec)])
        child = json.loads((work / f"peft-{module}.out").read_text())
        peft_rows[module] = {"process_s": seconds, "peak_rss": rss * 1e9, **child, "delta": str(delta)}
        log(f"    {peft_rows[module]}")
    rows["c"] = peft_rows

    # agreement on the checked modules, against exact dense CART in float64
    agreement = {}
    for module in CHECKED:
        name = weight_name(0, module)
        shape = shape_of(module, args.hidden, args.intermediate)
        w0 = folder_tensor(base, name).double()
        thetas, updates = [], []
        for t in range(args.adapters):
            a, b = factors(t, 0, module, args.rank, shape)
            updates.append(args.alpha / args.rank * (b.double() @ a.double()))
            thetas.append(w0 + updates[-1])
        avg, update, residual = exact_cart(thetas, k, R)
        entry = {"reference_residual": residual}
        for key, out in (("a", out_a), ("b", out_b)):
            if (out / "config.json").exists():
                got = folder_tensor(out, name).double()
                entry[key] = {"tensor": relative(got, avg + update), "update": relative(got - avg, update)}
        if (out_lora / "adapter_config.json").exists():
            # ccsmerge's adapters give every module the scaling 1: the update is B @ A
            lora = load_file(out_lora / "adapter_model.safetensors")
            prefix = "base_model.model." + name.removesuffix(".weight")
            got = w0 + lora[f"{prefix}.lora_B.weight"].double() @ lora[f"{prefix}.lora_A.weight"].double()
            entry["a_lora"] = {"tensor": relative(got, avg + update), "update": relative(got - avg, update)}
        if module in peft_rows:
            got = load_file(peft_rows[module]["delta"])["delta"].double()
            mean_update = sum(updates) / len(updates)
            entry["c_vs_mean_update"] = relative(got, mean_update)
        agreement[module] = entry
        log(f"agreement on {name}: {entry}")
    result["agreement"] = agreement
    if (out_a / "config.json").exists() and (out_b / "config.json").exists():
        result["a_vs_b_largest"] = largest_difference(out_a, out_b)
    result["rows"] = rows
    result["dense_gb"] = dense_gb
    result["load_average"]["end"] = load_average()
    return result


def fmt(x, unit=""):
    return "-" if x is None else f"{x:.2f}{unit}"


def markdown(result: dict, args) -> str:
    rows, L = result["rows"], args.layers
    a, bw, bm = rows["a"], rows["b_write"], rows["b_merge"]
    a_s = a.get("merge_s") if "error" not in a else None
    b_s = bm.get("merge_s") if "error" not in bm else None
    modules = 7 * L
    c = rows["c"]
    c_total = None
    if set(c) == set(CHECKED):
        per_layer = 4 * c["q_proj"]["combine_s"] + 3 * c["down_proj"]["combine_s"]
        c_total = L * per_layer
    lines = [
        f"# Merging {args.adapters} rank-{args.rank} LoRA adapters: the factor path, merge_and_unload + dense CART, peft",
        "",
        f"Machine: {describe(result['machine'])}; commit {result['commit']}; load average "
        f"{result['load_average']['start']} at the start, {result['load_average']['end']} at the end"
        + (f"; OMP/MKL threads {args.threads}" if args.threads else "") + ".",
        "",
        f"Base: Llama-shaped, hidden {args.hidden}, intermediate {args.intermediate}, {L} layers, vocab {args.vocab}, "
        f"{args.dtype}, {result['base_gb']:.2f} GB. {args.adapters} adapters of rank {args.rank} (alpha {args.alpha:g}) "
        f"on q/k/v/o/gate/up/down ({modules} modules), {result['adapter_gb'] * 1e3:.0f} MB in all; their layout "
        f"matches an adapter saved by peft {result['layout_check']['peft_version']}. CART at its defaults "
        f"(rank_ratio {RANK_RATIO}, lam {LAM:g}): k = int({RANK_RATIO} · {result['R']}) = {result['k']}, given to the "
        f"dense merge as the same k. Outputs in float32. Each step in a fresh process; time = wall time after the "
        f"imports (merge_process.py for the merges; for peft, add_weighted_adapter alone, the adapters loaded); peak "
        f"RSS of the whole process.",
        "",
    ]
    def cpu(row):
        return row.get("cpu_s")

    def ratio(x, y, digits=1):
        return f"{x / y:.{digits}f}×" if x is not None and y else "-"

    a_cpu = cpu(a)
    b_cpu = (cpu(bm) or 0) + (cpu(bw) or 0) if cpu(bm) is not None and cpu(bw) is not None else None
    b_all = (b_s or 0) + bw["write_s"] if b_s else None
    cells = [
        ["(a) ccsmerge, factor path", fmt(a_s, " s"), fmt(a_cpu, " s"), fmt(a.get("peak_rss", 0) / 1e9), "1.00×",
         "1.00×"],
    ]
    if "a_lora" in rows and "error" not in rows["a_lora"]:
        al = rows["a_lora"]
        cells.append(["(a') ccsmerge, factor path, `--output-format lora` (exact)", fmt(al["merge_s"], " s"),
                      fmt(cpu(al), " s"), fmt(al.get("peak_rss", 0) / 1e9), ratio(al["merge_s"], a_s, 2),
                      ratio(cpu(al), a_cpu, 2)])
    cells += [
        ["(b) merge_and_unload: write the dense fine-tunes", fmt(bw["write_s"], " s"), fmt(cpu(bw), " s"),
         fmt(bw["peak_rss"] / 1e9), ratio(bw["write_s"], a_s), ratio(cpu(bw), a_cpu)],
        [f"(b) dense `ccsmerge merge --method cart` ({args.svd} SVD)", fmt(b_s, " s"), fmt(cpu(bm), " s"),
         fmt(bm.get("peak_rss", 0) / 1e9), ratio(b_s, a_s), ratio(cpu(bm), a_cpu)],
        ["(b) in all", fmt(b_all, " s"), fmt(b_cpu, " s"), "", ratio(b_all, a_s), ratio(b_cpu, a_cpu)],
    ]
    for module, row in c.items():
        cells.append([f"(c) peft add_weighted_adapter(svd), layer 0 {module} only", fmt(row["combine_s"], " s"),
                      fmt(cpu(row), " s"), fmt(row["peak_rss"] / 1e9), ratio(row["combine_s"], a_s),
                      ratio(cpu(row), a_cpu)])
    if c_total is not None:
        c_cpu = (L * (4 * cpu(c["q_proj"]) + 3 * cpu(c["down_proj"]))
                 if cpu(c["q_proj"]) is not None and cpu(c["down_proj"]) is not None else None)
        cells.append([f"(c) extrapolated to the {modules} modules (4 × q_proj + 3 × down_proj per layer)",
                      fmt(c_total, " s"), fmt(c_cpu, " s"), "", ratio(c_total, a_s, 0), ratio(c_cpu, a_cpu, 0)])
    lines += [table(["", "wall", "CPU", "peak RSS GB", "wall / (a)", "CPU / (a)"], cells, "lrrrrr"), ""]
    errors = [f"{key}: {rows[key]['error']}" for key in ("a", "a_lora", "b_merge") if "error" in rows.get(key, {})]
    if errors:
        lines += ["Failed: " + "; ".join(errors), ""]
    agree = []
    for module, entry in result["agreement"].items():
        agree.append([f"layer 0 {module}",
                      *(f"{entry[k]['update']:.1e} ({entry[k]['tensor']:.1e})" if k in entry else "-"
                        for k in ("a", "a_lora", "b")),
                      f"{entry['c_vs_mean_update']:.1e}" if "c_vs_mean_update" in entry else "-",
                      f"{entry['reference_residual']:.0e}"])
    lines += [
        "Agreement with exact dense CART (float64; relative Frobenius difference of the update "
        "lam · Σ_t LowRank_k(θ_t − θ_avg), and of the whole tensor in parentheses); (c) computes another merge "
        "(the mean of the updates truncated to rank "
        f"{args.rank}): its difference from the untruncated mean update.",
        "",
        table(["module", "(a) factor path", "(a') as a LoRA adapter", "(b) dense CART",
               "(c) peft svd vs the mean update", "reference residual"], agree, "lrrrrr"),
        "",
    ]
    if "a_vs_b_largest" in result:
        lines += [f"(a) against (b) over every tensor: the largest relative difference {result['a_vs_b_largest']:.1e} "
                  f"((b) reads bf16 fine-tunes and is {args.svd}).", ""]
    if a_s and b_s:
        total = b_s + bw["write_s"]
        exact = all(e.get("a", {}).get("update", 1) <= 1e-4 for e in result["agreement"].values())
        lines += [f"Goal: the factor path ≥ 50× faster than the dense CART path, and exact: "
                  f"{total / a_s:.1f}× in wall time (merge_and_unload + dense merge), {b_s / a_s:.1f}× (the dense "
                  f"merge alone)" + (f", {b_cpu / a_cpu:.1f}× in CPU time" if b_cpu and a_cpu else "") + "; "
                  f"{'exact' if exact else 'not exact'} — "
                  f"**{'met' if total / a_s >= 50 and exact else 'not met'}**.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--quick", action="store_true", help="a tiny model (hidden 256, 2 layers): a sanity check")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--svd", choices=("randomized", "exact"), default="randomized", help="(b)'s SVD")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS / MKL_NUM_THREADS of the children")
    parser.add_argument("--skip-peft", action="store_true")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--work", type=Path, help="folder for the models (default: a temporary one, removed)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--render", type=Path, metavar="JSON", help="rewrite the markdown of a result file")
    parser.add_argument("--child-dense", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-peft", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_dense:
        spec = json.loads(args.child_dense.read_text())
        t0, cpu0 = time.perf_counter(), cpu_seconds()
        write_dense(Path(spec["base"]), [Path(a) for a in spec["adapters"]], [Path(o) for o in spec["outs"]])
        Path(spec["report"]).write_text(json.dumps({"write_s": time.perf_counter() - t0, "cpu_s": cpu_seconds() - cpu0}))
        return
    if args.child_peft:
        spec = json.loads(args.child_peft.read_text())
        Path(spec["report"]).write_text(json.dumps(peft_child(spec)))
        return
    if args.render:
        result = json.loads(args.render.read_text())
        vars(args).update({k: v for k, v in result["config"].items() if k not in ("out", "work", "render")})
        args.render.with_suffix(".md").write_text(markdown(result, args) + "\n")
        return
    if args.quick:
        args.hidden, args.intermediate, args.vocab = 256, 688, 1000
        args.layers = args.layers or 2
    args.layers = args.layers or 4
    work = args.work or Path(tempfile.mkdtemp(prefix="ccsmerge-adapters-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        result = run(args, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    stem = "adapters-quick" if args.quick else f"adapters-{args.layers}layers"
    write_results(args.out, stem, result, markdown(result, args), echo=True)


if __name__ == "__main__":
    main()
