"""``moe-bench``: benchmarks that print a table and write JSON, and the quality comparison.

- ``moe-bench layer`` (``moe.bench.layer``): the MoE layer against the dense limit and DeepSpeed's layer;
- ``moe-bench parallel`` (``moe.bench.parallel``): train-step tokens/s at 1 and 2 processes;
- ``moe-bench swarm`` (``moe.bench.swarm``): the hivemind layer over loopback against local experts;
- ``moe-bench peak`` (``moe.bench.peak``): this machine's matmul peak, measured again and kept for MFU;
- ``moe-bench quality`` (``moe.bench.quality``): dense against every MoE arm at equal compute.
"""

from __future__ import annotations

import argparse
import sys

import torch

from moe.bench import parallel as bench_parallel
from moe.bench import peak as bench_peak
from moe.bench import swarm as bench_swarm
from moe.bench.layer import bench_layer, markdown_table, parse_fine_grained
from moe.bench.quality.run import run_quality
from moe.bench.results import write_and_print


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="moe-bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="what", required=True)
    lay = sub.add_parser("layer", help="MoE layer fwd+bwd tokens/s vs the dense FFN limit (and DeepSpeed's layer)")
    lay.add_argument("--d-model", type=int, default=512)
    lay.add_argument("--d-ff", type=int, default=2048)
    lay.add_argument("--tokens", type=int, default=8192)
    lay.add_argument("--experts", type=int, nargs="+", default=[8, 32, 64, 128])
    lay.add_argument("--k", type=int, nargs="+", default=[1, 2])
    lay.add_argument("--modes", nargs="+", default=["dropless", "capacity"], choices=["dropless", "capacity"])
    lay.add_argument("--repeats", type=int, default=5)
    lay.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    lay.add_argument("--no-deepspeed", dest="deepspeed", action="store_false", help="skip DeepSpeed's layer")
    lay.add_argument(
        "--gemm",
        nargs="+",
        default=["loop", "grouped_mm"] if hasattr(torch, "_grouped_mm") else ["loop"],
        choices=["loop", "grouped_mm"],
        help="the experts' matmuls to time (dropless rows): ours (loop) and torch._grouped_mm, each its own column",
    )
    lay.add_argument(
        "--fine-grained",
        nargs="*",
        default=["8:8:1", "8:4:1+1"],
        metavar="N:m:k[+S]",
        help="fine-grained rows: N experts split m ways, m*k routed, S shared (default: 64 experts of d_ff/8 "
        "top-8; 32 of d_ff/4 top-4 + 1 shared); DeepSpeed's layer (top-1/2, no shared experts) has no such rows",
    )
    lay.add_argument("--out", default="bench_results/layer.json")
    q = sub.add_parser(
        "quality", help="dense vs switch vs gshard vs base at equal compute: train every arm, write docs/results.md"
    )
    q.add_argument(
        "--arms",
        default="",
        help="comma-separated, e.g. dense,switch-8,gshard-8,base-8,deepseek-8; <arm>@S begins from the "
        "dense run of S steps: dense@500,upcycle-8@500 (default: dense and switch/gshard/base at 8 and 16 experts)",
    )
    q.add_argument("--jobs", type=int, default=2, help="arms trained at once")
    q.add_argument("--threads", type=int, default=0, help="torch threads per arm (0: cpu count / jobs)")
    q.add_argument(
        "--runs-dir",
        default="runs",
        help="each arm trains in RUNS_DIR/quality-<moe>-e<E> (finished arms are not re-trained)",
    )
    q.add_argument("--log-dir", default="", help="moe-train logs (default RUNS_DIR/logs)")
    q.add_argument("--out", default="docs/results.md")
    q.add_argument("--smoke", action="store_true", help="tiny shapes and a dozen steps: checks the pipeline in seconds")
    q.add_argument("--report-only", action="store_true", help="train nothing; report on the runs already in RUNS_DIR")
    q.add_argument("--no-plots", action="store_true")
    q.add_argument(
        "--final-eval",
        type=int,
        default=None,
        metavar="N",
        help="evaluate every finished arm's final checkpoint on N val batches, paired with dense "
        "(default 256, 4 with --smoke; 0: skip)",
    )
    q.add_argument("overrides", nargs="*", help="moe-train overrides for every arm, e.g. steps=3000 optim.lr=1e-3")
    par = sub.add_parser(
        "parallel",
        help="train-step tokens/s at 1 vs 2 processes (DP=2, EP=2), comm share, weak-scaling efficiency",
        description=bench_parallel.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench_parallel.add_arguments(par)
    bench_swarm.add_parser(sub)
    bench_peak.add_parser(sub)
    args, unknown = p.parse_known_args(argv)
    if args.what == "quality":
        # Overrides may come between options (`--arms switch-8 steps=3000 --jobs 1 seed=2`):
        # argparse leaves a positional list after the first option unclaimed, so gather them here.
        args.overrides += [u for u in unknown if not u.startswith("-")]
        unknown = [u for u in unknown if u.startswith("-")]
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.what == "swarm":
        return bench_swarm.run(args)
    if args.what == "peak":
        if args.threads < 0:
            p.error(f"--threads {args.threads}: must be >= 0 (0: torch's default)")
        return write_and_print(bench_peak.bench_peak(args), bench_peak.markdown_table, args.out)
    if args.what == "parallel":
        bench_parallel.check_arguments(par, args)
        return write_and_print(bench_parallel.bench_parallel(args), bench_parallel.markdown_table, args.out)
    if args.what == "quality":
        args.argv = list(sys.argv[2:] if argv is None else argv[1:])
        try:
            return run_quality(args)
        except ValueError as e:
            print(f"moe-bench quality: error: {e}", file=sys.stderr)
            return 2
    for n in getattr(args, "experts", []):
        if n < 1:
            p.error(f"--experts: {n} must be >= 1")
    for k in getattr(args, "k", []):
        if k < 1 or k > min(args.experts):
            p.error(f"--k {k}: must be in [1, smallest --experts]")
    for spec in args.fine_grained:
        try:
            n, m, _, _ = parse_fine_grained(spec)
        except ValueError as e:
            p.error(str(e))
        if args.d_ff % m:
            p.error(f"--fine-grained {spec}: --d-ff {args.d_ff} is not divisible by m={m}")
    return write_and_print(bench_layer(args), markdown_table, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
