"""ccsmerge's methods inside mergekit (https://github.com/arcee-ai/mergekit).

Importing this module registers `cart`, `tsv_m`, `iso_c` and `iso_cts` as
mergekit merge methods, through mergekit's public method-definition API
(`mergekit.merge_methods.easy_define.merge_method` and the registry); each
tensor is merged by ccsmerge's engine. A mergekit YAML then says, e.g.:

    merge_method: cart
    models:
      - model: org/finetune-a
      - model: org/finetune-b
      - model: org/finetune-c
    parameters: {rank_ratio: 0.12, lam: 2.0}
    dtype: bfloat16

and `ccsmerge-mergekit CONFIG.yml OUT_DIR [mergekit-yaml options]` runs it
with mergekit's own pipeline. Written against mergekit 0.1.5."""

from __future__ import annotations

import sys

import torch
from mergekit.merge_methods import registry
from mergekit.merge_methods.base import BasePolicy, InputContract, TensorGroup
from mergekit.merge_methods.easy_define import merge_method

from ..execute import merge_whole
from ..merge import full_precision_matmuls, make_config
from ..methods import REGISTRY, decide

DEFAULT_LAM = {name: spec.param("lam").default for name, spec in REGISTRY.items() if spec.param("lam")}

REFERENCES = {
    "cart": ("CART (ccsmerge)", "https://arxiv.org/abs/2412.12153"),
    "tsv_m": ("TSV-M (ccsmerge)", "https://arxiv.org/abs/2412.00081"),
    "iso_c": ("Iso-C (ccsmerge)", "https://arxiv.org/abs/2502.04959"),
    "iso_cts": ("Iso-CTS (ccsmerge)", "https://arxiv.org/abs/2502.04959"),
}


def _merge(group: TensorGroup, method: str, **options) -> torch.Tensor:
    """One tensor through ccsmerge: the non-base inputs are the models."""
    xs = [entry.tensor for entry in group.entries if not entry.is_base]
    base = group.base.tensor if group.base is not None else None
    if not xs[0].is_floating_point():
        return xs[0]
    cfg = make_config(method=method, device=str(xs[0].device), **options)
    job = decide(group.metadata.name or "", tuple(xs[0].shape), xs[0].dtype, cfg, len(xs))
    with full_precision_matmuls():
        return merge_whole(job, xs, base, xs[0].device)


@merge_method(
    name="cart",
    pretty_name=REFERENCES["cart"][0],
    reference_url=REFERENCES["cart"][1],
    contract=InputContract(base=BasePolicy.OPTIONAL, min_non_base=2),
)
def cart(
    group: TensorGroup,
    rank_ratio: float = 0.12,
    lam: float = DEFAULT_LAM["cart"],
    svd: str = "randomized",
    seed: int = 0,
) -> torch.Tensor:
    return _merge(group, "cart", rank_ratio=rank_ratio, lam=lam, svd=svd, seed=seed)


@merge_method(
    name="tsv_m",
    pretty_name=REFERENCES["tsv_m"][0],
    reference_url=REFERENCES["tsv_m"][1],
    contract=InputContract(base=BasePolicy.REQUIRED, min_non_base=2),
)
def tsv_m(
    group: TensorGroup, lam: float = DEFAULT_LAM["tsv_m"], svd: str = "randomized", seed: int = 0
) -> torch.Tensor:
    return _merge(group, "tsv_m", lam=lam, svd=svd, seed=seed)


@merge_method(
    name="iso_c",
    pretty_name=REFERENCES["iso_c"][0],
    reference_url=REFERENCES["iso_c"][1],
    contract=InputContract(base=BasePolicy.REQUIRED, min_non_base=2),
)
def iso_c(group: TensorGroup, lam: float = DEFAULT_LAM["iso_c"]) -> torch.Tensor:
    return _merge(group, "iso_c", lam=lam)


@merge_method(
    name="iso_cts",
    pretty_name=REFERENCES["iso_cts"][0],
    reference_url=REFERENCES["iso_cts"][1],
    contract=InputContract(base=BasePolicy.REQUIRED, min_non_base=2),
)
def iso_cts(
    group: TensorGroup, lam: float = DEFAULT_LAM["iso_cts"], common_space_fraction: float = 0.8
) -> torch.Tensor:
    return _merge(group, "iso_cts", lam=lam, common_space_fraction=common_space_fraction)


_registered = {method.spec.name for method in registry.registered_methods()}
for _method in (cart, tsv_m, iso_c, iso_cts):
    if _method.spec.name not in _registered:  # importing twice registers once
        registry.register(_method)


def main(argv: list[str] | None = None) -> None:
    """`ccsmerge-mergekit CONFIG.yml OUT_DIR [options]`: mergekit-yaml with ccsmerge's methods registered."""
    from mergekit.scripts.run_yaml import main as mergekit_yaml

    mergekit_yaml(args=sys.argv[1:] if argv is None else argv, prog_name="ccsmerge-mergekit")


if __name__ == "__main__":
    main()
