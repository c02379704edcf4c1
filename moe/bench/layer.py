"""``moe-bench layer``: forward+backward tokens/s of our MoE layer against the dense FFN that does
the same active FLOPs per token (dense tokens/s divided by k is the most a sparse layer can
reach), and, when DeepSpeed is installed, DeepSpeed's MoE layer in the same run, so the ratios
are measured side by side on the same (noisy, shared) machine."""

from __future__ import annotations

import copy
import os
import statistics
import sys
import time

import torch
import torch.nn as nn

from moe.bench.results import machine
from moe.config import MoEConfig
from moe.model.layers import DenseFFN, MoELayer


def _fwd_bwd_once(layer: nn.Module, x: torch.Tensor, call) -> float:
    layer.zero_grad(set_to_none=False)  # as the trainer does: gradient buffers are reused
    xi = x.detach().requires_grad_(True)
    t0 = time.perf_counter()
    call(layer, xi).float().pow(2).mean().backward()
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _time_interleaved(impls: dict, x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median seconds per forward+backward for each ``name: (layer, call)``.

    The implementations take turns (dense, ours, deepspeed, dense, ours, ...) after one
    warm-up each, so a shared machine's drifting speed hits them alike and their ratios hold.
    """
    times: dict[str, list[float]] = {name: [] for name in impls}
    for layer, call in impls.values():
        _fwd_bwd_once(layer, x, call)
    for _ in range(repeats):
        for name, (layer, call) in impls.items():
            times[name].append(_fwd_bwd_once(layer, x, call))
    return {name: statistics.median(t) for name, t in times.items()}


def _ours(layer, x):
    return layer(x)[0]


def _with_gemm(layer: MoELayer, gemm: str) -> MoELayer:
    """A copy of ``layer`` (the same weights) whose experts multiply with ``gemm``."""
    twin = copy.deepcopy(layer)
    twin.experts.gemm = gemm
    return twin


def _deepspeed_layer(d_model: int, d_ff: int, num_experts: int, k: int, capacity_factor: float, dropless: bool):
    """DeepSpeed's einsum-based MoE layer, world size 1, or None when deepspeed is missing."""
    try:
        import deepspeed  # noqa: F401
        import torch.distributed as dist
        from deepspeed.moe.layer import MoE
    except ImportError:
        return None
    if not dist.is_initialized():
        # DeepSpeed builds a shared-memory comm op on init (~50 s of compiling on CPU);
        # a one-process benchmark never uses it.
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        dist.init_process_group("gloo", rank=0, world_size=1)
        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)

    expert = nn.Sequential(nn.Linear(d_model, d_ff, bias=False), nn.GELU(), nn.Linear(d_ff, d_model, bias=False))
    return MoE(
        hidden_size=d_model,
        expert=expert,
        num_experts=num_experts,
        ep_size=1,
        k=k,
        capacity_factor=capacity_factor,
        eval_capacity_factor=capacity_factor,
        min_capacity=4,
        drop_tokens=not dropless,
        use_rts=False,
    )


def parse_fine_grained(spec: str) -> tuple[int, int, int, int]:
    """``N:m:k[+S]`` -> (num_experts, granularity, top_k, shared): N experts split m ways, m*k of
    the m*N routed per token, S shared experts of the same d_ff/m beside them."""
    head, _, shared = spec.partition("+")
    try:
        n, m, k = (int(v) for v in head.split(":"))
        s = int(shared) if shared else 0
    except ValueError:
        raise ValueError(f"--fine-grained {spec!r}: write N:m:k or N:m:k+S, e.g. 8:8:1 or 8:4:1+1") from None
    if min(n, m, k) < 1 or s < 0 or k > n:
        raise ValueError(f"--fine-grained {spec!r}: need N, m, k >= 1, k <= N and S >= 0")
    return n, m, k, s


def bench_layer(args) -> dict:
    torch.manual_seed(0)
    device = torch.device(args.device)
    D, F_, T = args.d_model, args.d_ff, args.tokens
    x = torch.randn(T, D, device=device)
    rows = []
    dense = DenseFFN(D, F_).to(device)
    dense_all = []
    print(
        f"dense FFN d={D} ffn={F_} tokens={T}: the limit, re-measured in turn with every row "
        "(dense, ours, deepspeed, dense, ...)",
        flush=True,
    )
    header = f"{'E':>4} {'k':>2} {'mode':>9} {'impl':>10} {'tokens/s':>10} {'ms':>7} {'limit':>10} {'ratio':>6}"
    print(header)
    print("-" * len(header))
    for E in args.experts:
        for k in args.k:
            for mode in args.modes:
                dropless = mode == "dropless"
                cf = 1.0
                impls = {"dense": (dense, _ours)}
                ours = MoELayer(
                    D,
                    F_,
                    MoEConfig(
                        name="topk", num_experts=E, top_k=k, dropless=dropless, capacity_factor=cf, min_capacity=4
                    ),
                ).to(device)
                ours.experts.grad_into_buffers = True  # as the trainer runs it
                impls["ours"] = (ours, _ours)
                if dropless and "grouped_mm" in args.gemm:  # torch's grouped GEMM (capacity mode: a padded bmm)
                    impls["grouped_mm"] = (_with_gemm(ours, "grouped_mm"), _ours)
                if args.deepspeed and k <= 2:
                    ds = _deepspeed_layer(D, F_, E, k, cf, dropless)
                    if ds is not None:
                        impls["deepspeed"] = (ds.to(device), lambda mod, xi: mod(xi.unsqueeze(0))[0])
                secs = _time_interleaved(impls, x, args.repeats)
                dense_all.append(T / secs["dense"])
                limit = T / secs["dense"] / k
                for impl, s in secs.items():
                    if impl == "dense":
                        continue
                    tps = T / s
                    row = {
                        "E": E,
                        "k": k,
                        "mode": mode,
                        "impl": impl,
                        "tokens_per_s": tps,
                        "ms": s * 1e3,
                        "limit_tokens_per_s": limit,
                        "ratio": tps / limit,
                    }
                    rows.append(row)
                    print(
                        f"{E:>4} {k:>2} {mode:>9} {impl:>10} {tps:>10,.0f} {s * 1e3:>7.0f} {limit:>10,.0f} "
                        f"{tps / limit:>6.2f}",
                        flush=True,
                    )
                del impls
    for spec in args.fine_grained:  # DeepSeekMoE shapes: many small experts, shared ones, dropless
        n, m, k, shared = parse_fine_grained(spec)
        cfg = MoEConfig(name="topk", num_experts=n, top_k=k, granularity=m, num_shared_experts=shared, dropless=True)
        ours = MoELayer(D, F_, cfg).to(device)
        ours.experts.grad_into_buffers = True
        impls = {"dense": (dense, _ours), "ours": (ours, _ours)}
        if "grouped_mm" in args.gemm:
            impls["grouped_mm"] = (_with_gemm(ours, "grouped_mm"), _ours)
        secs = _time_interleaved(impls, x, args.repeats)
        dense_all.append(T / secs["dense"])
        width = (m * k + shared) / m  # active FFN width in dense FFNs: (m*k routed + S shared) of d_ff/m
        limit = T / secs["dense"] / width
        label = f"{n * m}x{F_ // m}" + (f"+{shared}" if shared else "")
        for impl in [i for i in impls if i != "dense"]:
            tps = T / secs[impl]
            row = {
                "E": n * m,
                "k": k * m,
                "mode": "dropless",
                "impl": impl,
                "granularity": m,
                "shared": shared,
                "expert_d_ff": F_ // m,
                "active_width": width,
                "dense_tokens_per_s": T / secs["dense"],
                "tokens_per_s": tps,
                "ms": secs[impl] * 1e3,
                "limit_tokens_per_s": limit,
                "ratio": tps / limit,
            }
            rows.append(row)
            print(
                f"{label:>9} {k * m:>2} {'dropless':>9} {impl:>10} {tps:>10,.0f} {secs[impl] * 1e3:>7.0f} "
                f"{limit:>10,.0f} {tps / limit:>6.2f}",
                flush=True,
            )
        del ours, impls
    return {
        "benchmark": "layer",
        "d_model": D,
        "d_ff": F_,
        "tokens": T,
        "repeats": args.repeats,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "machine": machine(),
        "dense_tokens_per_s": statistics.median(dense_all),
        "rows": rows,
    }


def markdown_table(result: dict) -> str:
    """The layer benchmark as the table in docs/performance.md."""
    rows: dict[tuple, dict] = {}
    for r in result["rows"]:
        rows.setdefault((r["E"], r["k"], r["mode"]), {})[r["impl"]] = r
    fine = [r for r in result["rows"] if r.get("granularity")]
    rows = {key: d for key, d in rows.items() if not any(r.get("granularity") for r in d.values())}
    lines = [
        "| E | k | mode | ours (loop) tokens/s | ours / limit | torch `_grouped_mm` tokens/s | `_grouped_mm` / limit "
        "| DeepSpeed tokens/s | DeepSpeed / limit |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]

    def cols(r: dict | None, bold: bool = False) -> str:
        if r is None:
            return "- | -"
        ratio = f"**{r['ratio']:.2f}**" if bold else f"{r['ratio']:.2f}"
        return f"{r['tokens_per_s']:,.0f} | {ratio}"

    for (E, k, mode), d in rows.items():
        ours, torch_mm, ds = cols(d["ours"], True), cols(d.get("grouped_mm")), cols(d.get("deepspeed"))
        lines.append(f"| {E} | {k} | {mode} | {ours} | {torch_mm} | {ds} |")
    if fine:
        lines += [
            "",
            "| routed experts x d_ff | shared | k | limit (dense / active width) | ours (loop) tokens/s | ours / limit "
            "| `_grouped_mm` tokens/s | `_grouped_mm` / limit |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        by: dict[tuple, dict] = {}
        for r in fine:
            by.setdefault((r["E"], r["expert_d_ff"], r["shared"], r["k"]), {})[r["impl"]] = r
        for (E, f, shared, k), d in by.items():
            lines.append(
                f"| {E} x {f} | {shared} | {k} | {d['ours']['limit_tokens_per_s']:,.0f} | {cols(d['ours'], True)} | "
                f"{cols(d.get('grouped_mm'))} |"
            )
    return "\n".join(lines)
