"""Where a CART merge of one matrix spends its GPU time, stage by stage
(torch.profiler): mean, centered products, orthonormalisation, small SVD,
reconstruction.

    python benchmarks/profile_cart.py [--size 4096] [--models 8] [--rank-ratio 0.08]
"""

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import ccsmerge
from ccsmerge.synthetic import decaying_matrix


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--models", type=int, default=8)
    parser.add_argument("--rank-ratio", type=float, default=0.08)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    base = torch.randn(args.size, args.size, generator=g) / args.size**0.5
    scale = 0.05 * base.norm().item()
    models = [
        {"w": (base + decaying_matrix(args.size, args.size, scale=scale, generator=g)).cuda()}
        for _ in range(args.models)
    ]
    for _ in range(2):  # warm-up: handles, kernels, allocator
        ccsmerge.merge(models, rank_ratio=args.rank_ratio, device="cuda")
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        ccsmerge.merge(models, rank_ratio=args.rank_ratio, device="cuda")
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="device_time_total", row_limit=25))


if __name__ == "__main__":
    main()
