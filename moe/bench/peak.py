"""``moe-bench peak``: this machine's matmul peak, measured again and kept for every run's MFU.

The best of several short square-matmul trials on the device and dtype, at the thread count
given (a busy moment lowers some trials, not the best); written to ``~/.cache/moe/peak_flops.json``
under a key naming the processor, device, dtype, threads and torch version, where
``moe-train`` reads it (``moe.training.flops.machine_peak``).  Run it on a quiet machine.
"""

from __future__ import annotations

import argparse

import torch

from moe.bench.results import machine
from moe.training.flops import machine_key, machine_peak


def add_parser(sub) -> None:
    p = sub.add_parser(
        "peak",
        help="measure this machine's matmul peak again and keep it for MFU",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads (0: torch's default, what moe-train uses without threads=)",
    )
    p.add_argument("--out", default="bench_results/peak.json")


def bench_peak(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    peak = machine_peak(device, dtype, remeasure=True)
    return {
        "benchmark": "peak",
        "key": machine_key(device, dtype),
        "peak_flops": peak.flops,
        "source": peak.source,
        "machine": machine(),
    }


def markdown_table(result: dict) -> str:
    return "\n".join(
        [
            "| what it holds for | peak GFLOP/s | where |",
            "|---|---:|---|",
            f"| {result['key']} | {result['peak_flops'] / 1e9:,.1f} | {result['source']} |",
        ]
    )
