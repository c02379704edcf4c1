"""``moe-bench parallel``: train-step tokens/s at 1 process and at 2 processes (DP=2 and EP=2),
weak scaling, with the share of the step spent in collectives.

Two worker processes are spawned once (gloo on 127.0.0.1, one torch thread each) and kept for
the whole run.  Every round measures, in turn: one process (rank 0 alone, no process group
used; rank 1 idles on its task queue), DP=2 (``ep_size=1``: both ranks hold all experts,
gradients all-reduced) and EP=2 (``ep_size=2``: each rank holds half the experts, tokens moved
by all-to-all).  Each rank keeps the same per-process batch (weak scaling), so 2 processes
process twice the tokens of one per step; the rounds alternate so a shared machine's drifting
speed hits all layouts alike.  A measurement is ``warmup`` untimed steps, then ``steps`` timed
calls of the real :meth:`moe.training.loop.Trainer.train_step` (forward, backward, gradient
all-reduce, clipping, AdamW), between two barriers; the step time is the slowest rank's.

- tokens/s: ``processes * batch_size * seq_len * steps / seconds`` (median over rounds);
- comm share: rank 0's ``Trainer.comm_seconds()`` over the same steps (what ``perf/comm_time_s``
  reports: all-to-all, gradient and metric all-reduces, waiting for the other rank included),
  divided by the step time;
- weak-scaling efficiency of a 2-process layout: ``tokens/s(2) / (2 x tokens/s(1))``.
"""

from __future__ import annotations

import dataclasses
import datetime
import multiprocessing
import os
import queue
import statistics
import tempfile
import time
import traceback

import torch

from moe.bench.results import machine
from moe.config import DataConfig, LoggerConfig, ModelConfig, MoEConfig, OptimConfig, ParallelConfig, TrainConfig
from moe.parallel import ParallelState, ddp
from moe.parallel.ports import free_port
from moe.parallel.reduce import count_over_world, gather_objects
from moe.training.backend import Backend
from moe.training.data import load_data
from moe.training.loop import Trainer
from moe.training.telemetry import LoadAccumulator

# name -> (processes, ep_size, bucket_mb), measured in this order every round.  bucket_mb 0:
# the gradient all-reduce waits for the end of the backward (to show what the overlap buys).
LAYOUTS = {"1 process": (1, 1, 8.0), "DP=2": (2, 1, 8.0), "EP=2": (2, 2, 8.0), "DP=2, no overlap": (2, 1, 0.0)}


def train_config(args, *, processes: int, ep_size: int, out_dir: str, bucket_mb: float = 8.0) -> TrainConfig:
    """The run a measurement trains (``args``: the ``moe-bench parallel`` options)."""
    par = (
        ParallelConfig(backend="ddp", ep_size=ep_size, timeout_s=args.timeout, bucket_mb=bucket_mb)
        if processes > 1
        else ParallelConfig()
    )
    return TrainConfig(
        model=ModelConfig(
            n_layers=args.n_layers,
            d_model=args.d_model,
            n_heads=args.n_heads,
            d_ff=args.d_ff,
            seq_len=args.seq_len,
            moe_every=1,
        ),
        moe=MoEConfig(
            name=args.moe,
            num_experts=args.experts,
            top_k=2 if args.moe == "gshard" else 1,
            dropless=args.moe in ("base", "topk"),
            aux_loss_weight=0.0 if args.moe == "base" else 0.01,
        ),
        data=DataConfig(tokenizer="byte", max_files=args.max_files, cache_dir=args.cache_dir),
        optim=OptimConfig(warmup_steps=1),
        logger=LoggerConfig(wandb=False, wandb_mode="disabled", progress=False, console=False),
        parallel=par,
        out_dir=out_dir,
        steps=10**9,  # never reached: the bench calls train_step itself
        batch_size=args.batch_size,
        eval_every=0,
        ckpt_every=0,
        peak_flops=1e12,
        threads=1,
    )


# ---------------------------------------------------------------------------------------------
# inside the workers


def _worker(rank: int, port: int, args, tasks, results) -> None:
    """One of the two ranks: join the gloo group, then measure what the task queue asks."""
    torch.set_num_threads(1)
    try:
        # what torchrun would set for this rank: the ddp backend joins the group the same way as in training
        os.environ.update(
            RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
        )
        states = {
            1: ddp.start(
                ParallelConfig(backend="ddp", ep_size=1, dist_backend="gloo", timeout_s=args.timeout), device="cpu"
            )
        }
        states[2] = ParallelState.build(2, device="cpu", timeout=datetime.timedelta(seconds=args.timeout))
        data = load_data(
            DataConfig(tokenizer="byte", max_files=args.max_files, cache_dir=args.cache_dir), progress=False
        )
        results.put((rank, True, "ready"))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
        return
    trainers: dict[str, Trainer] = {}  # built once per layout, stepped on across rounds
    with tempfile.TemporaryDirectory(prefix=f"bench-parallel-{rank}-") as tmp:
        while (task := tasks.get()) is not None:
            name = task
            try:
                processes, ep, bucket_mb = LAYOUTS[name]
                if name not in trainers:
                    cfg = train_config(
                        args,
                        processes=processes,
                        ep_size=ep,
                        out_dir=os.path.join(tmp, name.replace(" ", "_").replace(",", "")),
                        bucket_mb=bucket_mb,
                    )
                    backend = (
                        ddp.DDPBackend(cfg, states[ep], data=data) if processes > 1 else Backend(cfg, data=data)
                    )  # (rank 1 idles in "1 process")
                    trainers[name] = Trainer(cfg, backend=backend)
                t = trainers[name]
                load = LoadAccumulator()
                for _ in range(args.warmup):
                    t.train_step(load)
                sync = (lambda st=t.backend.state: count_over_world(True, st)) if processes > 1 else (lambda: None)
                sync()
                c0, t0 = t.comm_seconds(), time.perf_counter()
                for _ in range(args.steps):
                    t.train_step(load)
                sync()  # every rank done: the slowest one sets the time
                secs, comm = time.perf_counter() - t0, t.comm_seconds() - c0
                secs = max(gather_objects(secs, t.backend.state) or [secs]) if processes > 1 else secs
                results.put((rank, True, {"seconds": secs, "comm_seconds": comm}))
            except BaseException:
                results.put((rank, False, traceback.format_exc()))
    trainers = states = t = sync = backend = (
        None  # nothing holds a group once the process group goes: stop() frees them
    )
    ddp.stop()


# ---------------------------------------------------------------------------------------------
# the parent


class _Pair:
    """The two spawned ranks; every wait bounded by ``timeout`` seconds."""

    def __init__(self, args):
        ctx = multiprocessing.get_context("spawn")
        self.timeout = args.timeout
        self.results = ctx.Queue()
        self.tasks = [ctx.Queue() for _ in range(2)]
        port = free_port()
        self.procs = [
            ctx.Process(target=_worker, args=(r, port, args, self.tasks[r], self.results), daemon=True)
            for r in range(2)
        ]
        for p in self.procs:
            p.start()
        self._collect(2, "start-up")

    def _collect(self, n: int, what: str) -> dict[int, object]:
        out, deadline = {}, time.monotonic() + self.timeout
        while len(out) < n:
            try:
                rank, ok, value = self.results.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(
                    f"{what}: no answer from a worker within {self.timeout:.0f} s (raise --timeout on a busy machine)"
                ) from None
            if not ok:
                raise RuntimeError(f"{what} failed on rank {rank}:\n{value}")
            out[rank] = value
        return out

    def measure(self, name: str) -> dict:
        processes = LAYOUTS[name][0]
        for r in range(processes):
            self.tasks[r].put(name)
        return self._collect(processes, name)[0]  # rank 0's comm time, the slowest rank's step time

    def stop(self) -> None:
        for q in self.tasks:
            q.put(None)
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
                p.join(timeout=10)


def bench_parallel(args) -> dict:
    """Measure every layout ``args.repeats`` times in turn; the result as JSON-ready data."""
    load_data(
        DataConfig(tokenizer="byte", max_files=args.max_files, cache_dir=args.cache_dir), progress=False
    )  # the token cache, built once before the workers read it
    cfg = train_config(args, processes=1, ep_size=1, out_dir="")
    tokens_per_proc_step = cfg.batch_size * cfg.model.seq_len
    runs: dict[str, list[dict]] = {name: [] for name in LAYOUTS}
    load_before = os.getloadavg()[0]  # a busy machine (other jobs on the cores) shows here: read the numbers with it
    pair = _Pair(args)
    try:
        for i in range(args.repeats):
            for name in LAYOUTS:
                m = pair.measure(name)
                processes = LAYOUTS[name][0]
                m["tokens_per_s"] = processes * tokens_per_proc_step * args.steps / m["seconds"]
                runs[name].append(m)
                print(
                    f"round {i + 1}/{args.repeats} {name:>16}: {m['tokens_per_s']:>9,.0f} tokens/s, step "
                    f"{1e3 * m['seconds'] / args.steps:,.0f} ms, comm "
                    f"{1e3 * m['comm_seconds'] / args.steps:,.0f} ms",
                    flush=True,
                )
    finally:
        pair.stop()
    rows = []
    for name, (processes, ep, bucket_mb) in LAYOUTS.items():
        tps = statistics.median(m["tokens_per_s"] for m in runs[name])
        step_s = statistics.median(m["seconds"] for m in runs[name]) / args.steps
        comm_s = statistics.median(m["comm_seconds"] for m in runs[name]) / args.steps
        rows.append(
            {
                "layout": name,
                "processes": processes,
                "ep_size": ep,
                "bucket_mb": bucket_mb,
                "tokens_per_s": tps,
                "step_s": step_s,
                "comm_s": comm_s,
                "comm_share": comm_s / step_s,
            }
        )
    base = rows[0]["tokens_per_s"]
    for r in rows:
        r["efficiency"] = None if r["processes"] == 1 else r["tokens_per_s"] / (r["processes"] * base)
    return {
        "benchmark": "parallel",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "model": dataclasses.asdict(cfg.model),
        "moe": {
            "name": cfg.moe.name,
            "num_experts": cfg.moe.num_experts,
            "top_k": cfg.moe.top_k,
            "dropless": cfg.moe.dropless,
        },
        "batch_size_per_process": cfg.batch_size,
        "tokens_per_process_step": tokens_per_proc_step,
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "threads_per_process": 1,
        "dist_backend": "gloo",
        "machine": machine(),
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "rows": rows,
        "rounds": runs,
    }


def markdown_table(result: dict) -> str:
    """The parallel benchmark as the table in docs/performance.md."""
    lines = [
        "| layout | processes | ep_size | tokens/s | step ms | comm ms | comm share | weak-scaling efficiency |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        eff = "-" if r["efficiency"] is None else f"**{r['efficiency']:.2f}**"
        lines.append(
            f"| {r['layout']} | {r['processes']} | {r['ep_size']} | {r['tokens_per_s']:,.0f} | "
            f"{1e3 * r['step_s']:,.0f} | {1e3 * r['comm_s']:,.0f} | {100 * r['comm_share']:.0f}% "
            f"| {eff} |"
        )
    return "\n".join(lines)


def add_arguments(p) -> None:
    """The ``moe-bench parallel`` options (defaults: a step of ~0.2-0.3 s at one thread)."""
    p.add_argument("--moe", default="switch", choices=["switch", "gshard", "topk", "base"])
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--d-ff", type=int, default=512)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8, help="sequences per process per step (weak scaling: fixed)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before each measurement")
    p.add_argument("--repeats", type=int, default=5, help="rounds; each measures every layout in turn")
    p.add_argument("--max-files", type=int, default=40, help="corpus files (byte tokens)")
    p.add_argument("--cache-dir", default="", help="token cache (default: $XDG_CACHE_HOME/moe)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds any wait on a worker may take")
    p.add_argument("--out", default="bench_results/parallel.json")


def check_arguments(p, args) -> None:
    for name in ("experts", "n_layers", "d_model", "n_heads", "d_ff", "batch_size", "steps", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    if args.seq_len < 2:
        p.error(f"--seq-len={args.seq_len} must be >= 2")
    if args.warmup < 0:
        p.error(f"--warmup={args.warmup} must be >= 0")
    if args.experts % 2:
        p.error(f"--experts={args.experts}: EP=2 splits the experts over 2 processes; give an even number")
    if args.d_model % args.n_heads:
        p.error(f"--d-model={args.d_model} is not divisible by --n-heads={args.n_heads}")
    if args.timeout <= 0:
        p.error(f"--timeout={args.timeout} must be > 0")
