"""``moe-bench swarm``: forward+backward tokens/s of the ``hivemind`` expert layer (``SwarmMoE``)
over loopback, against the same experts run in this process, and with 25% of the experts failing.

One swarm serves every size: 4 expert-server processes on 127.0.0.1 (``ServerProcess``, one
torch thread each), server ``r`` holding row ``r`` of a ``[4, G]`` grid.  Three arms per size,
all with the same routers and the same expert weights (``SwarmExpert`` / ``GroupedExperts``):

- ``local``: ``LocalGridMoE``, the layer's function with the experts in this process: the
  same product-key scores, the exact top-k of the grid, the same softmax over the chosen k,
  the experts as one ``GroupedExperts`` (dropless grouped matmuls), one torch thread by
  default (``--threads``), as each server has;
- ``swarm``: ``SwarmMoE`` over the 4 live servers (the live experts read from the DHT, one
  request per chosen expert, forward and backward over loopback);
- ``swarm, 25% failed``: ``SwarmMoE`` over a copy of the grid whose last row (25% of the
  experts) was served by a fifth server, SIGKILLed after it declared them: the records stay
  on the DHT (they outlive the run), the layer keeps choosing those experts, their calls fail
  and are masked out (``aux.failed``) as in a swarm whose peers vanished;
- ``swarm, emulated network`` (unless ``--network none``): ``SwarmMoE`` over a third copy of
  the grid on 4 more servers, each behind its own link of the user-space relay
  (``moe.swarm.netem``, default 50 ms round trip and 100 Mbit/s each way): every request and
  reply crosses a wide-area link.

Every round measures every (size, arm) in turn, so a shared machine's drifting speed hits the
arms alike; tokens/s is ``tokens / median seconds``.  Before timing, the swarm output is
checked against the local one on the same input (``max_abs_diff`` in the JSON): the same
function, so the comparison is of the same work.  The experts are not stepped (no optimizer
on either side): every round computes the same function.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import math
import os
import statistics
import time

import torch
import torch.nn as nn

from moe.bench import swarm_train
from moe.bench.results import machine, write_and_print
from moe.model.experts import GroupedExperts

ARMS = ("local", "swarm", "swarm, 25% failed")
NET_ARM = "swarm, emulated network"


class LocalGridMoE(nn.Module):
    """``SwarmMoE``'s function with its experts in this process (the benchmark's baseline).

    Args:
        routers: one ``moe.model.layers.Router`` per grid dimension (e.g. a ``SwarmMoE``'s ``routers``).
        experts: ``GroupedExperts`` holding the grid's experts, row-major.
        grid_size: the grid, e.g. [4, 4].
        k: experts per token (``k_best``).

    Shape suffixes: T tokens, K choices, D model dim, E grid experts.
    """

    def __init__(self, routers: nn.ModuleList, experts, grid_size, k: int):
        super().__init__()
        self.routers, self.experts, self.grid_size, self.k = routers, experts, list(grid_size), k

    def forward(self, x: torch.Tensor):
        shape = x.shape
        x_TD = x.reshape(-1, shape[-1])
        T = x_TD.shape[0]
        scores_TE = None
        for r in self.routers:  # product keys: expert (i, j) scores s0[i] + s1[j], row-major
            s = r(x_TD)
            scores_TE = s if scores_TE is None else (scores_TE[:, :, None] + s[:, None, :]).reshape(T, -1)
        logits_TK, idx_TK = scores_TE.topk(self.k, dim=1)
        w_TK = torch.softmax(logits_TK, dim=1)
        order = idx_TK.reshape(-1).argsort(stable=True)  # (T*K,) assignments sorted by expert
        counts = torch.bincount(idx_TK.reshape(-1), minlength=math.prod(self.grid_size)).tolist()
        rows = order // self.k
        y_ND = self.experts.forward_grouped(x_TD[rows], counts)
        out_TD = torch.zeros_like(x_TD).index_add(0, rows, y_ND * w_TK.reshape(-1)[order, None].to(y_ND.dtype))
        return out_TD.view(shape), None


def _fwd_bwd(layer: nn.Module, x: torch.Tensor):
    """Seconds of one forward+backward, and the layer's aux (None for the local arm)."""
    layer.zero_grad(set_to_none=False)
    xi = x.detach().requires_grad_(True)
    t0 = time.perf_counter()
    y, aux = layer(xi)
    y.float().pow(2).mean().backward()
    return time.perf_counter() - t0, aux


def parse_size(s: str) -> tuple[int, int, int]:
    """``"256x1024x512"`` -> (d_model 256, d_ff 1024, tokens 512)."""
    try:
        D, F_, T = (int(v) for v in s.lower().split("x"))
    except ValueError:
        raise ValueError(f"--sizes {s!r}: write D x F x T, e.g. 256x1024x512 (d_model, expert d_ff, tokens)") from None
    if min(D, F_, T) < 1:
        raise ValueError(f"--sizes {s!r}: every number must be >= 1")
    return D, F_, T


def bench_swarm(args) -> dict:
    """Start the swarm, measure every (size, arm) ``args.repeats`` times in turn, stop it all."""
    # the swarm's rooms import hivemind (an optional extra): only when this benchmark runs
    from moe.swarm.dht import shutdown_dht, start_dht
    from moe.swarm.expert import SwarmExpert
    from moe.swarm.layer import SwarmMoE
    from moe.swarm.peer import free_uids
    from moe.swarm.server import ServerProcess
    from moe.swarm.uids import grid_uids

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    sizes = [parse_size(s) for s in args.sizes]
    grid, k = list(args.grid), args.k
    rows_total = grid[0]
    failing_rows = range(rows_total - rows_total // 4, rows_total)  # the last quarter of the rows
    E = math.prod(grid)
    per_row = E // rows_total
    layer_kw = dict(
        grid_size=grid,
        k_best=k,
        k_min=args.k_min,
        forward_timeout=args.forward_timeout,
        timeout_after_k_min=args.timeout_after_k_min,
        backward_timeout=args.forward_timeout,
    )

    # the experts of every size: the same weights for the servers and for the local arm
    experts = []  # per size: list of E SwarmExperts, row-major
    for D, F_, _ in sizes:
        experts.append([SwarmExpert(D, F_) for _ in range(E)])
    by_row: list[dict] = [{} for _ in range(rows_total)]
    net_by_row: list[dict] = [{} for _ in range(rows_total)]
    doomed: dict = {}
    emulate = args.network != "none"
    for i in range(len(sizes)):
        for name in (f"full{i}", f"fail{i}", *([f"net{i}"] if emulate else [])):
            for e, uid in enumerate(grid_uids(name, grid)):
                r = e // per_row
                target = doomed if (name.startswith("fail") and r in failing_rows) else by_row[r]
                target = net_by_row[r] if name.startswith("net") else target
                target[uid] = copy.deepcopy(experts[i][e])
    load_before = os.getloadavg()[0]
    servers: list = []
    client = None
    net = None
    t_start = time.monotonic()
    try:
        for group in by_row:
            servers.append(
                _start_server(ServerProcess, group, args, initial_peers=servers[0].maddrs if servers else [])
            )
        if emulate:  # 4 more servers, each behind a link: the client dials the link's port
            from moe.parallel.ports import free_port
            from moe.swarm.netem import LinkSpec, NetemProcess

            net, link_spec = NetemProcess(), LinkSpec.parse(args.network)
            for r, group in enumerate(net_by_row):
                port = free_port()
                link = net.add_link(("127.0.0.1", port), dataclasses.replace(link_spec, seed=r))
                servers.append(
                    _start_server(
                        ServerProcess,
                        group,
                        args,
                        initial_peers=servers[0].maddrs,
                        host_maddrs=[f"/ip4/127.0.0.1/tcp/{port}"],
                        announce_maddrs=[f"/ip4/127.0.0.1/tcp/{link}"],
                    )
                )
        # the fifth server: declares the failing arm's last row for longer than the run, then dies
        dying = _start_server(ServerProcess, doomed, args, initial_peers=servers[0].maddrs, expiration=24 * 3600.0)
        servers.append(dying)  # stopped at the end if anything fails before it dies (kill is idempotent)
        client = start_dht(servers[0].maddrs)
        # hivemind declares from a thread of its own, after the server says it is ready: killed at
        # once, it could die before its records reached the other peers, and the failing arm would
        # not fail; so it dies once they are visible (and a moment more, for every replica)
        deadline = time.monotonic() + args.start_timeout
        while free_uids(client, list(doomed), len(doomed), args.start_timeout) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)
        dying.kill()
        if free_uids(client, list(doomed), len(doomed), args.start_timeout):
            raise RuntimeError(
                "the failing arm's server died before its experts' records reached the other peers; run again"
            )
        started = time.monotonic() - t_start

        arms: dict[tuple, dict[str, nn.Module]] = {}
        checks: dict[tuple, float] = {}
        for i, (D, F_, T) in enumerate(sizes):
            swarm = SwarmMoE(D, dht=client, uid_prefix=f"full{i}", **layer_kw)
            failing = SwarmMoE(D, dht=client, uid_prefix=f"fail{i}", **layer_kw)
            failing.routers.load_state_dict(swarm.routers.state_dict())
            local_experts = GroupedExperts(E, D, F_)
            for e, ex in enumerate(experts[i]):
                ex.copy_into(local_experts, e)
            local_experts.grad_into_buffers = True  # as the trainer runs it (gradients zeroed in place)
            local = LocalGridMoE(copy.deepcopy(swarm.routers), local_experts, grid, k)
            arms[(D, F_, T)] = {"local": local, "swarm": swarm, "swarm, 25% failed": failing}
            if emulate:
                remote = SwarmMoE(D, dht=client, uid_prefix=f"net{i}", **layer_kw)
                remote.routers.load_state_dict(swarm.routers.state_dict())
                arms[(D, F_, T)][NET_ARM] = remote
            x = torch.randn(T, D)
            with torch.no_grad():
                y_l, _ = local(x)
                for name in ("swarm", NET_ARM) if emulate else ("swarm",):
                    layer = arms[(D, F_, T)][name]
                    layer.timeout_after_k_min = args.forward_timeout  # the check waits for every reply
                    y_s, aux = layer(x)
                    layer.timeout_after_k_min = args.timeout_after_k_min
                    if aux.failed:
                        raise RuntimeError(f"the live swarm ({name}) failed experts before timing: {aux.failed}")
                    checks[(D, F_, T, name)] = (y_s - y_l).abs().max().item()

        inputs = {size: torch.randn(size[2], size[0]) for size in sizes}
        for size, layers in arms.items():
            for _ in range(args.warmup):
                for layer in layers.values():
                    _fwd_bwd(layer, inputs[size])
        arm_names = (*ARMS, NET_ARM) if emulate else ARMS
        runs: dict[str, list[dict]] = {_key(size, arm): [] for size in sizes for arm in arm_names}
        for rnd in range(args.repeats):
            for size, layers in arms.items():
                line = []
                for arm, layer in layers.items():
                    secs, aux = _fwd_bwd(layer, inputs[size])
                    m = {"seconds": secs}
                    if aux is not None:
                        m.update(
                            failed_experts=len(set(aux.failed) | set(aux.backward_failed)),
                            dropped_frac=(aux.num_dropped / aux.num_routed.clamp_min(1)).item(),
                            unserved_frac=aux.num_unserved / size[2],
                        )
                    runs[_key(size, arm)].append(m)
                    line.append(f"{arm} {size[2] / secs:,.0f}")
                print(
                    f"round {rnd + 1}/{args.repeats} d_model {size[0]} d_ff {size[1]} tokens {size[2]}: "
                    + ", ".join(line)
                    + " tokens/s",
                    flush=True,
                )
    finally:
        if client is not None:
            shutdown_dht(client)
        for sp in servers:
            sp.shutdown()
        if net is not None:
            net.close()

    rows = []
    for D, F_, T in sizes:
        local_tps = None
        for arm in arm_names:
            ms = runs[_key((D, F_, T), arm)]
            secs = statistics.median(m["seconds"] for m in ms)
            tps = T / secs
            local_tps = tps if arm == "local" else local_tps
            row = {
                "d_model": D,
                "d_ff": F_,
                "tokens": T,
                "arm": arm,
                "tokens_per_s": tps,
                "ms": 1e3 * secs,
                "vs_local": tps / local_tps,
            }
            if arm != "local":
                row.update(
                    {
                        k_: statistics.mean(m[k_] for m in ms)
                        for k_ in ("failed_experts", "dropped_frac", "unserved_frac")
                    }
                )
            else:
                row.update(failed_experts=0.0, dropped_frac=0.0, unserved_frac=0.0)
            rows.append(row)
    return {
        "benchmark": "swarm",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "grid": grid,
        "num_experts": E,
        "k_best": k,
        "k_min": args.k_min,
        "forward_timeout": args.forward_timeout,
        "timeout_after_k_min": args.timeout_after_k_min,
        "servers": rows_total,
        "failed_fraction": len(failing_rows) / rows_total,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "threads": torch.get_num_threads(),
        "server_threads": 1,
        "start_seconds": started,
        "network": args.network,
        "max_abs_diff_swarm_vs_local": {f"{D}x{F_}x{T} {arm}": v for (D, F_, T, arm), v in checks.items()},
        "machine": machine(),
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "rows": rows,
        "rounds": runs,
    }


def _key(size, arm: str) -> str:
    return f"{size[0]}x{size[1]}x{size[2]} {arm}"


def _start_server(ServerProcess, experts: dict, args, **kwargs):
    """A server process for ``experts`` (of any widths), up to 3 tries of ``--start-timeout`` s."""
    widths = {uid: m.d_model for uid, m in experts.items()}
    for attempt in (1, 2, 3):
        try:
            return ServerProcess(experts, widths, start_timeout=args.start_timeout, **kwargs)
        except TimeoutError:
            if attempt == 3:
                raise


def markdown_table(result: dict) -> str:
    """The swarm benchmark as the table in docs/performance.md."""
    lines = [
        "| d_model | d_ff | tokens | arm | tokens/s | ms | vs local | failed experts / step "
        "| assignments lost | tokens unserved |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['d_model']} | {r['d_ff']} | {r['tokens']} | {r['arm']} | "
            f"{r['tokens_per_s']:,.0f} | {r['ms']:,.0f} | **{r['vs_local']:.2f}** | "
            f"{r['failed_experts']:.1f} | {100 * r['dropped_frac']:.0f}% | "
            f"{100 * r['unserved_frac']:.1f}% |"
        )
    return "\n".join(lines)


def add_parser(sub) -> None:
    """The ``moe-bench swarm`` subcommand on ``moe-bench``'s subparsers."""
    p = sub.add_parser(
        "swarm",
        help="SwarmMoE over loopback vs the same experts local, and with 25%% of the experts failing",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--sizes",
        nargs="+",
        default=["256x1024x1024", "512x2048x1024", "1024x4096x1024"],
        metavar="DxFxT",
        help="d_model x expert d_ff x tokens per forward",
    )
    p.add_argument(
        "--grid",
        type=int,
        nargs=2,
        default=[4, 4],
        metavar="G",
        help="expert grid; its first dimension is the number of servers, a multiple of 4 (default 4 4)",
    )
    p.add_argument("--k", type=int, default=4, help="k_best, experts per token (default 4, as Learning@home)")
    p.add_argument("--k-min", type=int, default=1)
    p.add_argument(
        "--forward-timeout", type=float, default=30.0, help="forward and backward timeout of the layer, seconds"
    )
    p.add_argument("--timeout-after-k-min", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=5, help="rounds; each measures every size and arm in turn")
    p.add_argument("--warmup", type=int, default=1, help="untimed forward+backward per arm before the rounds")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads in this process, the local arm's (default 1, as each server; 0: torch's default)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--network",
        default="rtt=50ms,rate=100mbit",
        help="the emulated link (moe.swarm.netem): of the fourth arm's servers; with --train, of every peer in the "
        "emulated arms (default rtt=50ms,rate=100mbit; none: no emulated arm)",
    )
    p.add_argument("--start-timeout", type=float, default=90.0, help="seconds a server start may take (3 tries)")
    p.add_argument("--out", default=None, help="default bench_results/swarm.json (--train: swarm_train.json)")
    t = p.add_argument_group("collaborative training (--train): every-step averaging against DiLoCo")
    t.add_argument("--train", action="store_true", help="run the training comparison instead of the layer's")
    t.add_argument("--peers", type=int, default=2, help="trainer peers per arm (2-4; default 2)")
    t.add_argument("--steps", type=int, default=200, help="local steps of every peer in every arm (default 200)")
    t.add_argument("--inner-steps", type=int, default=50, help="DiLoCo's H, local steps a round (default 50)")
    t.add_argument("--outer-lr", type=float, default=0.7, help="DiLoCo's outer Nesterov rate (default 0.7)")
    t.add_argument("--outer-momentum", type=float, default=0.9, help="DiLoCo's outer momentum (default 0.9)")
    t.add_argument("--arms", nargs="+", default=list(swarm_train.ARMS), choices=list(swarm_train.ARMS))
    t.add_argument("--networks", nargs="+", default=list(swarm_train.NETWORKS), choices=list(swarm_train.NETWORKS))
    t.add_argument("--no-kill", dest="kill", action="store_false", help="skip the arm that SIGKILLs a peer")
    t.add_argument("--matchmaking-time", type=float, default=5.0, help="seconds to gather an averaging round")
    t.add_argument("--averaging-timeout", type=float, default=60.0, help="seconds an all-reduce may take")
    t.add_argument(
        "--config",
        nargs="*",
        default=list(swarm_train.DEFAULT_CONFIG),
        metavar="KEY=VALUE",
        help="the model and data, as moe-train's overrides (default: %(default)s)",
    )
    p.set_defaults(swarm_parser=p)


def run(args) -> int:
    """Check the options, run, write the JSON and print the table (``moe-bench swarm``)."""
    p = args.swarm_parser
    if args.network != "none":
        try:
            from moe.swarm.netem import LinkSpec

            LinkSpec.parse(args.network)
        except ValueError as e:
            p.error(str(e))
    if args.train:
        if not 2 <= args.peers <= 4:
            p.error(f"--peers {args.peers}: 2 to 4 trainer peers")
        if args.inner_steps < 1 or args.steps < args.inner_steps or args.steps % args.inner_steps:
            p.error(f"--steps {args.steps} must be a multiple of --inner-steps {args.inner_steps} (whole rounds)")
        if args.network == "none":
            args.networks = [n for n in args.networks if n != "emulated"]
            args.kill = False  # the killed arm runs on the emulated network
        del args.swarm_parser
        return write_and_print(
            swarm_train.bench_train(args), swarm_train.markdown_table, args.out or "bench_results/swarm_train.json"
        )
    args.out = args.out or "bench_results/swarm.json"
    try:
        for s in args.sizes:
            parse_size(s)
    except ValueError as e:
        p.error(str(e))
    if len({parse_size(s) for s in args.sizes}) != len(args.sizes):
        p.error(f"--sizes {' '.join(args.sizes)}: a size is given twice")
    if args.grid[0] < 4 or args.grid[0] % 4 or args.grid[1] < 1:
        p.error(
            f"--grid {args.grid[0]} {args.grid[1]}: the first dimension (servers, one grid row "
            "each) must be a multiple of 4, so that 25% of the experts fail"
        )
    if not 1 <= args.k <= math.prod(args.grid) or not 1 <= args.k_min <= args.k:
        p.error(f"--k {args.k} --k-min {args.k_min}: need 1 <= k-min <= k <= {math.prod(args.grid)}")
    if (
        args.repeats < 1
        or args.warmup < 0
        or args.forward_timeout <= 0
        or args.timeout_after_k_min < 0
        or args.start_timeout <= 0
    ):
        p.error(
            "--repeats >= 1, --warmup >= 0, --forward-timeout > 0, --timeout-after-k-min >= 0 and --start-timeout > 0"
        )
    del args.swarm_parser
    return write_and_print(bench_swarm(args), markdown_table, args.out)
