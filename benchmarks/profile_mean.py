"""Workload for Nsight Compute: the T-way mean kernel on large inputs.

    ncu --clock-control none -k regex:mean_kernel \
        --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed \
        python benchmarks/profile_mean.py
"""

import torch

from ccsmerge import ops


def main() -> None:
    torch.manual_seed(0)
    for dtype in (torch.bfloat16, torch.float32):
        xs = [torch.randn(4096, 4096, device="cuda", dtype=dtype) for _ in range(8)]
        for _ in range(2):
            ops.mean(xs)
        torch.cuda.synchronize()
        print(f"profiled mean of 8 x 4096x4096 {dtype}")


if __name__ == "__main__":
    main()
