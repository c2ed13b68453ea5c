"""The `ccsmerge` command line.

    ccsmerge merge --method cart --model A --model B --model C --out merged/
    ccsmerge merge recipe.yml --out merged/
    ccsmerge plan  --method cart --model A --model B --model C --max-memory 2GB
    ccsmerge search --method cart --model A --model B --model C --evaluate mymodule:score \
        --lam 1,1.5,2 --rank-ratio 0.04,0.08,0.16
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import traceback
from collections import Counter

from .cli_parser import CcsmergeParser, exit_quietly_on_broken_pipe
from .config import COMMON_PARAMS, METHOD_PARAMS, METHODS
from .errors import MergeError, Terminated
from .methods import REGISTRY
from .planning import DEVICE_RESERVE, averaging_tensors, averaging_warning
from .recipe import DTYPES, Recipe, load_recipe, recipe_arguments
from .sizes import format_size

# CART-indexing stores every task's factors; lam applies to merges only.
INDEX_PARAMS = [p for p in REGISTRY["cart"].params if p.name != "lam"] + [COMMON_PARAMS[2]]
SEARCH_GRIDS = ("lam", *{spec.search_axis for spec in REGISTRY.values() if spec.search_axis})

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a process Ctrl-C ended
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143


def _defaults(p) -> str:
    """Which methods take an option, with each one's default."""
    takers = [(spec.name, spec.param(p.name).default) for spec in REGISTRY.values() if spec.param(p.name)]
    defaults = {d for _, d in takers}
    if len(defaults) > 1:
        return "default " + ", ".join(f"{n} {d}" for n, d in takers)
    value = next(iter(defaults))
    methods = ", ".join(n for n, _ in takers)
    return methods if value in (None, (), True, False) else f"{methods}; default {value}"


def add_option_flags(parser: argparse.ArgumentParser, params, *, grid: tuple[str, ...] = ()) -> None:
    """One flag per option of the schema (dest = the option's name, None when
    not given); the options in `grid` take comma-separated lists (search)."""
    for p in params:
        help_text = f"{p.description} ({_defaults(p)})" if p.name in METHOD_PARAMS else p.description
        if p.name in grid:
            parser.add_argument(p.flag, dest=p.name, type=_floats, metavar="A,B,...", help=f"{help_text}: values to try")
        elif p.type is bool and p.default is True:
            flag = "--no-" + p.name.replace("_", "-")
            parser.add_argument(
                flag, dest=p.name, action="store_const", const=False, default=None, help="turn off: " + help_text
            )
        elif p.type is bool:
            parser.add_argument(p.flag, dest=p.name, action="store_const", const=True, default=None, help=help_text)
        elif p.type is tuple:
            parser.add_argument(p.flag, dest=p.name, action="append", metavar="REGEX", help=help_text + "; repeatable")
        elif p.choices is not None:
            parser.add_argument(p.flag, dest=p.name, choices=p.choices, help=help_text)
        elif p.per_model:
            metavar = p.name.upper().replace("_", "-")
            parser.add_argument(p.flag, dest=p.name, type=p.type, nargs="+", metavar=metavar,
                                help=help_text + "; one value, or one per model in --model order")
        else:
            metavar = p.name.upper().replace("_", "-")
            parser.add_argument(p.flag, dest=p.name, type=p.type, metavar=metavar, help=help_text)


def given_options(args: argparse.Namespace, params, grid: tuple[str, ...] = ()) -> dict:
    """The options given as flags, by name; lists of regexes and per-model
    values as tuples (the options in `grid`: lists of values to try)."""
    given = {p.name: getattr(args, p.name, None) for p in params}
    per_model = {p.name for p in params if p.per_model}
    out = {}
    for k, v in given.items():
        if v is None:
            continue
        if isinstance(v, list) and k in per_model and k not in grid:
            v = v[0] if len(v) == 1 else tuple(v)  # one value: every model's
        elif isinstance(v, list) and k.startswith("lowrank_"):
            v = tuple(v)
        out[k] = v
    return out


def _inputs(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="a YAML merge recipe (merge_method, models, ...) instead of flags")
    parser.add_argument("--method", choices=METHODS, help="merge method (default: cart)")
    parser.add_argument("--model", action="append", metavar="PATH", help="a model folder or file; repeat per model")
    parser.add_argument("--base", metavar="PATH", help="the pretrained base model (all but average and cart need it)")
    add_option_flags(parser, [*METHOD_PARAMS.values(), COMMON_PARAMS[2]])
    parser.add_argument("--dtype", choices=DTYPES, help="output dtype of floating tensors (default: the inputs')")
    parser.add_argument(
        "--input-dtype",
        choices=DTYPES,
        help="cast every floating input tensor to this dtype before merging (inputs saved in different dtypes)",
    )
    parser.add_argument(
        "--tokenizer-source",
        metavar="base|PATH",
        help="the output's tokenizer: the base model's (or the first model's) or a folder's; embedding and head "
        "rows of every input are cut or padded to its vocabulary as mergekit does (added tokens)",
    )
    parser.add_argument(
        "--allow-config-mismatch",
        action="store_const",
        const=True,
        default=None,
        help="merge models whose config.json differ in architecture or shapes (with a warning)",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--max-memory", metavar="SIZE", help="memory budget, e.g. 2GB (default: half the free RAM)")
    parser.add_argument(
        "--max-gpu-memory",
        metavar="SIZE",
        help="GPU memory budget of a merge on a GPU, e.g. 20GB (default: 80%% of the GPU's free memory)",
    )
    parser.add_argument("--out-shard-size", default="5GB", metavar="SIZE", help="largest output shard (default 5GB)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")


def build_parser() -> argparse.ArgumentParser:
    parser = CcsmergeParser(prog="ccsmerge", description="Merge fine-tuned models (CART, TIES, ...).")
    commands = parser.add_subparsers(dest="command", required=True)
    merge = commands.add_parser("merge", help="merge checkpoints into a sharded safetensors folder")
    _inputs(merge)
    merge.add_argument("--out", required=True, metavar="DIR", help="the output model folder")
    merge.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    merge.add_argument("--resume", action="store_true", help="continue an interrupted merge into --out")
    merge.add_argument("--quiet", action="store_true", help="no progress bar")
    merge.add_argument(
        "--distributed",
        action="store_true",
        help="split the merge over the processes of a torchrun job (each writes its share of the shards)",
    )
    merge.add_argument(
        "--no-overlap", dest="overlap", action="store_false", help="read, merge and write in turn (for measurements)"
    )
    merge.add_argument(
        "--output-format", choices=("safetensors", "lora"), default="safetensors",
        help="safetensors: the merged model (default); lora: a PEFT adapter of the merged update over --base",
    )
    merge.add_argument(
        "--lora-rank", type=int, metavar="R",
        help="with --output-format lora: truncate each module's update to rank R (default: exact, "
        "the update's own rank; required where the update is dense)",
    )
    plan = commands.add_parser("plan", help="show what a merge would do, without merging")
    _inputs(plan)
    index = commands.add_parser("index", help="CART-indexing: store theta_avg and every task's low-rank update")
    index.add_argument("--model", action="append", metavar="PATH", required=True, help="repeat per task model")
    index.add_argument("--out", required=True, metavar="DIR")
    add_option_flags(index, INDEX_PARAMS)
    index.add_argument("--device", default="auto")
    index.add_argument("--out-shard-size", default="5GB", metavar="SIZE")
    index.add_argument("--overwrite", action="store_true")
    index.add_argument("--debug", action="store_true", help="show tracebacks")
    export = commands.add_parser("export-task", help="write one task's model from a CART index")
    export.add_argument("index", metavar="INDEX", help="a folder written by `ccsmerge index`")
    export.add_argument("--task", type=int, required=True, help="the task's position in the index's --model list")
    export.add_argument("--out", required=True, metavar="DIR")
    export.add_argument("--device", default="auto")
    export.add_argument("--out-shard-size", default="5GB", metavar="SIZE")
    export.add_argument("--overwrite", action="store_true")
    export.add_argument("--debug", action="store_true", help="show tracebacks")
    _extract_lora_parser(commands)
    search = commands.add_parser("search", help="score a grid of merge settings with your evaluation function")
    search.add_argument("--method", choices=METHODS, default="cart")
    search.add_argument("--model", action="append", metavar="PATH", required=True, help="repeat per model")
    search.add_argument("--base", metavar="PATH")
    search.add_argument("--evaluate", required=True, metavar="MODULE:FUNCTION", help="evaluate(state_dict) -> float")
    add_option_flags(search, [*METHOD_PARAMS.values(), COMMON_PARAMS[2]], grid=SEARCH_GRIDS)
    search.add_argument("--device", default="auto")
    search.add_argument("--debug", action="store_true", help="show tracebacks")
    demo = commands.add_parser(
        "demo", help="fine-tune a small network on 8 digit tasks, merge with every method, report accuracy"
    )
    from .demo.run import add_arguments as demo_arguments

    demo_arguments(demo)
    return parser


def _extract_lora_parser(commands) -> None:
    extract = commands.add_parser("extract-lora", help="write a PEFT LoRA adapter of a fine-tune's update over its base")
    extract.add_argument("--base", required=True, metavar="PATH", help="the base model the adapter applies to")
    extract.add_argument("--model", required=True, metavar="PATH", help="the fine-tuned model")
    extract.add_argument("--rank", required=True, type=int, help="the LoRA rank of every module")
    extract.add_argument("--out", required=True, metavar="DIR", help="the adapter folder")
    extract.add_argument("--max-memory", metavar="SIZE", help="memory budget, e.g. 2GB (default: half the free RAM)")
    extract.add_argument("--seed", type=int, default=0, help="the randomized engine's seed (default 0)")
    extract.add_argument("--oversample", type=int, default=10, help="sketch columns beyond the rank (default 10)")
    extract.add_argument("--power-iters", type=int, default=2, help="power iterations (default 2)")
    extract.add_argument("--dtype", choices=DTYPES,
                         help="the adapter's dtype (default: the model's)")
    extract.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    extract.add_argument("--exclude", action="append", default=[], metavar="REGEX",
                         help="tensors saved whole (modules_to_save) instead of factored; repeatable")
    extract.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    extract.add_argument("--quiet", action="store_true", help="no per-tensor lines")
    extract.add_argument("--debug", action="store_true", help="show tracebacks")


def run_extract_lora(args: argparse.Namespace) -> None:
    from .extract_lora import extract_lora

    result = extract_lora(
        args.base, args.model, args.out, args.rank, max_memory=args.max_memory, seed=args.seed,
        oversample=args.oversample, power_iters=args.power_iters, dtype=args.dtype, device=args.device,
        overwrite=args.overwrite, exclude=args.exclude, progress=not args.quiet,
    )
    print(result.summary())
    sys.stdout.flush()


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def run_search(args: argparse.Namespace) -> None:
    import importlib
    import json

    from .checkpoint import Checkpoint
    from .search import search

    module, _, function = args.evaluate.partition(":")
    try:
        evaluate = getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError, ValueError) as exc:
        raise MergeError(f"--evaluate {args.evaluate}: cannot load it ({exc})") from None

    def load(path):
        ckpt = Checkpoint(path)
        return {name: ckpt.read(name) for name in ckpt.tensors}

    options = given_options(args, [*METHOD_PARAMS.values(), COMMON_PARAMS[2]], grid=SEARCH_GRIDS)
    result = search(
        [load(p) for p in args.model],
        evaluate,
        args.method,
        base=load(args.base) if args.base else None,
        device=args.device,
        **options,
    )
    keys = [k for k in result.table[0] if k != "score"]
    print("  ".join(f"{k:>22}" for k in keys + ["score"]))
    for row in result.table:
        print("  ".join(f"{row[k]:>22.6g}" for k in keys + ["score"]))
    print(f"best: {json.dumps(result.best)} score {result.best_score:.6g}")
    sys.stdout.flush()  # a closed pipe shows here, inside main's handler, not at exit


def merge_arguments(args: argparse.Namespace) -> dict:
    """merge_checkpoints' arguments from a recipe file and/or flags; flags win."""
    recipe: Recipe | None = load_recipe(args.config) if args.config else None
    if recipe is not None and (args.model or args.base):
        raise MergeError(f"{args.config}: give the models in the recipe or with --model/--base, not both")
    kwargs: dict = {}
    if recipe is not None:
        kwargs.update(recipe_arguments(recipe, args.config))
    else:
        if not args.model or len(args.model) < 2:
            count = len(args.model or [])
            raise MergeError(f"merging needs at least 2 models, got {count} (--model PATH, once each, or a recipe)")
        kwargs.update(models=args.model, base=args.base)
    flags = {"method": args.method, "dtype": args.dtype}
    kwargs.update({k: v for k, v in flags.items() if v is not None})
    kwargs.update(given_options(args, [*METHOD_PARAMS.values(), COMMON_PARAMS[2]]))
    kwargs.update(device=args.device, max_memory=args.max_memory, out_shard_size=args.out_shard_size)
    kwargs.update(max_gpu_memory=args.max_gpu_memory)
    return kwargs


PATH_WORDS = {
    "factors": "from LoRA factors (exact)",
    "base": "copied from the base (no adapter changes them)",
    "dense": "dense (the task vectors formed)",
}


def input_flags(args: argparse.Namespace) -> dict:
    """The flags that change what is read of the inputs, where given (they win over a recipe)."""
    given = {
        "input_dtype": args.input_dtype,
        "tokenizer_source": args.tokenizer_source,
        "allow_config_mismatch": args.allow_config_mismatch,
    }
    return {k: v for k, v in given.items() if v is not None}


def print_plan(plan) -> None:
    on_gpu = plan.gpu_budget is not None
    adapted = any(t.path != "dense" for t in plan.tensors)
    with_accuracy = any(t.accuracy is not None for t in plan.tensors)
    rows = []
    for t in plan.tensors:
        how = "whole" if t.block_rows is None else f"{t.block_rows}-row blocks, {t.passes} passes"
        dtype = str(t.dtype).replace("torch.", "")
        if t.out_dtype != t.dtype:
            dtype += "->" + str(t.out_dtype).replace("torch.", "")
        policy = f"{t.policy} k={t.rank}" if t.policy.endswith("low-rank") else t.policy
        planned = t.accuracy
        row = (t.name, "x".join(map(str, t.shape)) or "scalar", dtype, policy, t.rule, how, format_size(t.memory))
        if adapted:
            row = row[:4] + (t.path if t.update_rank is None else f"{t.path} R={t.update_rank}",) + row[4:]
        row += (planned.describe() if planned is not None else "",) if with_accuracy else ()
        rows.append(row + ((format_size(t.device_memory or 0),) if on_gpu else ()))
    header = ("tensor", "shape", "dtype", "policy") + (("path",) if adapted else ())
    header += ("decided by", "merged", "memory")
    header += (("accuracy",) if with_accuracy else ()) + (("GPU memory",) if on_gpu else ())
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    for r in [header] + rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    policies = Counter(t.policy for t in plan.tensors)
    blocked = sum(t.block_rows is not None for t in plan.tensors)
    print()
    print(f"{len(plan.tensors)} tensors: " + ", ".join(f"{n} {p}" for p, n in sorted(policies.items())))
    print(f"{plan.models} models{' and a base' if plan.has_base else ''}; {blocked} tensors merged in row blocks")
    if adapted:
        paths = Counter(t.path for t in plan.tensors)
        print("inputs read: " + ", ".join(f"{n} {PATH_WORDS[p]}" for p, n in sorted(paths.items())))
    averaged = averaging_tensors(plan)
    if averaged:
        print(averaging_warning(averaged))
    print(f"estimated peak memory {format_size(plan.peak_memory)} (budget {format_size(plan.budget)})")
    if on_gpu:
        print(
            f"on the GPU: estimated peak GPU memory {format_size(plan.peak_gpu_memory)} "
            f"(GPU budget {format_size(plan.gpu_budget)}, {format_size(DEVICE_RESERVE)} of it kept for "
            f"the libraries' workspaces); the host memory includes {format_size(plan.staging_bytes)} "
            "of pinned staging buffers"
        )
    print(f"reads {format_size(plan.read_bytes)}, writes {format_size(plan.write_bytes)} in {len(plan.shards)} shards")
    if with_accuracy:
        print(planned_accuracy_line(plan))
    sys.stdout.flush()  # a closed pipe shows here, inside main's handler, not at exit


def planned_accuracy_line(plan) -> str:
    """What the accuracy column means, once: l the sketch width, q the power iterations."""
    planned = [t.accuracy for t in plan.tensors if t.accuracy is not None]
    tolerances = {p.tolerance for p in planned if p.svd != "exact"}
    what = "accuracy: l = sketch width, q = power iterations"
    if "auto" in tolerances:
        what += (
            "; tolerance auto: per matrix a quarter of the inputs' rounding floor (estimated from the sketch's "
            "spectrum), at least 1 %; iterations stop once the estimated error is below it"
        )
    elif tolerances - {None}:
        what += "; iterations stop once the estimated error is below the target"
    return what + "; the merge records what each matrix reached in ccsmerge-accuracy.json"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    terminated: list[int] = []

    def on_sigterm(signum, frame):
        # SIGTERM (a batch scheduler's warning before a kill) stops a run as
        # Ctrl-C does: the shard being written removed, the finished ones kept.
        if not terminated:  # once: a second one must not break the cleanup
            terminated.append(signum)
            raise Terminated()

    handles_signals = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, on_sigterm) if handles_signals else None
    try:
        from .streaming import merge_checkpoints, plan_checkpoints

        if args.command == "search":
            run_search(args)
            return 0
        if args.command == "extract-lora":
            run_extract_lora(args)
            return 0
        if args.command == "demo":
            from .demo.run import run_from_arguments

            run_from_arguments(args)
            return 0
        if args.command == "index":
            from .task_index import build_index

            build_index(
                args.model,
                args.out,
                **given_options(args, INDEX_PARAMS),
                device=args.device,
                out_shard_size=args.out_shard_size,
                overwrite=args.overwrite,
            )
            return 0
        if args.command == "export-task":
            from .task_index import export_task

            export_task(
                args.index,
                args.task,
                args.out,
                device=args.device,
                out_shard_size=args.out_shard_size,
                overwrite=args.overwrite,
            )
            return 0
        kwargs = merge_arguments(args)
        kwargs.update(input_flags(args))
        if args.command == "plan":
            print_plan(plan_checkpoints(**kwargs))
            return 0
        out = merge_checkpoints(
            out=args.out,
            overwrite=args.overwrite,
            resume=args.resume,
            progress=not args.quiet,
            overlap=args.overlap,
            distributed=args.distributed,
            output_format=args.output_format,
            lora_rank=args.lora_rank,
            **kwargs,
        )
        if not args.quiet:
            print(f"merged into {out}" + (" (a LoRA adapter)" if args.output_format == "lora" else ""), file=sys.stderr)
        return 0
    except KeyboardInterrupt as exc:
        print(f"ccsmerge: {exc or 'interrupted'}", file=sys.stderr)
        return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED
    except BrokenPipeError:  # `ccsmerge plan | head`: stop quietly, as cat and git do
        return exit_quietly_on_broken_pipe()
    except Exception as exc:  # one readable line; --debug shows where
        if args.debug:
            traceback.print_exc()
        message = str(exc) if isinstance(exc, MergeError) else f"{type(exc).__name__}: {exc}"
        print(f"ccsmerge: error: {message}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        if handles_signals:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
