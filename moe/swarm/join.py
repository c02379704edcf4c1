"""``moe-join``: connect this machine to a swarm, or start one, and serve experts in it.

    moe-join                                        # the first peer: prints the line others run
    moe-join --initial-peers /ip4/.../p2p/Qm... --serve 8 --grid 8 8 --d-model 256 --d-ff 1024

With ``--serve N`` the peer hosts N experts (``moe.swarm.expert.SwarmExpert``, trained on
this machine by its own Adam on every backward request) under the run's grid prefix, on
the uids of the grid nobody declares yet (or from ``--first``), declared on the DHT, signed
by default (``moe.swarm.records``).  Without it the peer is a DHT node only (e.g. the
swarm's root).  A status line (experts served, expert calls/s, peers seen) every
``--status-every`` seconds; Ctrl-C (SIGINT) or SIGTERM leaves cleanly: the experts stop
being declared (their records expire after ``--expiration`` s), the other peers go on.

Safe defaults: listen on 127.0.0.1 only unless ``--host``/``--announce`` is given; NAT
port mapping and auto-NAT off unless ``--nat``.  Bad input ends with one line
``moe-join: error: ...`` and exit code 2, before anything starts.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import threading
import time

from moe.config import check_multiaddr

EPILOG = (
    "Roles: a DHT peer (always) and an expert server (--serve N).  Training as a collaborative "
    "peer (hivemind.Optimizer, DeDLOC) is not implemented yet; train against the swarm with "
    "`moe-train moe=hivemind moe.initial_peers=[ADDR]`."
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + message
        _fail(message)


def _fail(msg: str, code: int = 2) -> None:
    print(f"moe-join: error: {msg}", file=sys.stderr, flush=True)
    sys.exit(code)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="moe-join", description="Join a swarm of expert servers (hivemind DHT), or start one.", epilog=EPILOG)
    p.add_argument("--initial-peers", nargs="+", default=[], metavar="MULTIADDR", help="addresses of running peers (as printed by the first peer); none: start a new swarm")
    p.add_argument("--serve", type=int, default=0, metavar="N", help="serve N experts of the grid (default 0: a DHT peer only)")
    p.add_argument("--prefix", default="ffn", help="the run's grid prefix, moe.uid_prefix (default ffn)")
    p.add_argument("--grid", type=int, nargs="+", default=[8, 8], metavar="G", help="the run's grid, moe.grid (default 8 8)")
    p.add_argument("--first", type=int, default=None, metavar="I", help="serve grid uids I..I+N-1 (row-major); default: the first N nobody declares")
    p.add_argument("--d-model", type=int, default=256, help="model.d_model of the run (default 256, model=small)")
    p.add_argument("--d-ff", type=int, default=1024, help="each expert's hidden size (default 1024)")
    p.add_argument("--activation", default="gelu", choices=["gelu", "relu", "silu"])
    p.add_argument("--lr", type=float, default=1e-3, help="the experts' Adam learning rate (default 1e-3)")
    p.add_argument("--seed", type=int, default=None, help="seed of the experts' initial weights")
    p.add_argument("--host", default="127.0.0.1", help="IPv4 address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: all interfaces)")
    p.add_argument("--port", type=int, default=0, help="TCP port (default 0: any free port)")
    p.add_argument("--announce", nargs="+", default=[], metavar="MULTIADDR", help="addresses other peers should dial, e.g. /ip4/PUBLIC_IP/tcp/PORT")
    p.add_argument("--nat", action="store_true", help="turn on hivemind's NAT port mapping (UPnP) and auto-NAT (off by default: both send traffic off the machine)")
    p.add_argument("--unsigned", action="store_true", help="do not sign expert declarations (trainers with moe.require_signed=true will not use them)")
    p.add_argument("--update-period", type=float, default=15.0, help="seconds between re-declarations of the experts (default 15)")
    p.add_argument("--expiration", type=float, default=30.0, help="seconds a declaration lives after this peer stops (default 30)")
    p.add_argument("--status-every", type=float, default=10.0, help="seconds between status lines (default 10)")
    p.add_argument("--start-timeout", type=float, default=120.0, help="seconds to wait for the DHT and the server to come up (default 120)")
    return p


def check_args(a: argparse.Namespace) -> None:
    """Every bad input as one ``_fail`` line, before anything starts."""
    for i, addr in enumerate(a.initial_peers):
        why = check_multiaddr(addr)
        if why is not None:
            _fail(f"--initial-peers {addr!r}: {why}")
    for addr in a.announce:
        why = check_multiaddr(addr, need_peer=False)
        if why is not None or "/p2p/" in addr:
            _fail(f"--announce {addr!r}: give the address others dial without /p2p/, e.g. /ip4/203.0.113.5/tcp/31337")
    if not a.grid or min(a.grid) < 1:
        _fail(f"--grid {' '.join(map(str, a.grid))}: every grid dimension must be >= 1, e.g. --grid 8 8")
    E = math.prod(a.grid)
    if a.serve < 0:
        _fail(f"--serve {a.serve}: the number of experts must be >= 0")
    first = a.first or 0
    if a.first is not None and not 0 <= a.first < E:
        _fail(f"--first {a.first}: must be in [0, {E}) for --grid {' '.join(map(str, a.grid))}")
    if a.serve > E - first:
        _fail(f"--serve {a.serve}: the grid {'x'.join(map(str, a.grid))} has {E} experts" + (f" ({E - first} from --first {first})" if first else "") + "; serve fewer or use a larger --grid")
    from moe.swarm.server import check_prefix  # noqa: PLC0415 (hivemind: only after the cheap checks)

    try:
        a.prefix = check_prefix(a.prefix)
    except ValueError as e:
        _fail(f"--prefix: {e}")
    if a.d_model < 1 or a.d_ff < 1:
        _fail(f"--d-model {a.d_model} --d-ff {a.d_ff}: both must be >= 1 (--d-model must equal the run's model.d_model)")
    if not (a.lr > 0 and math.isfinite(a.lr)):
        _fail(f"--lr {a.lr} must be a positive number")
    parts = a.host.split(".")
    if len(parts) != 4 or not all(p.isdigit() and int(p) <= 255 for p in parts):
        _fail(f"--host {a.host!r} is not an IPv4 address (e.g. 127.0.0.1, or 0.0.0.0 for every interface)")
    if not 0 <= a.port <= 65535:
        _fail(f"--port {a.port} must be in [0, 65535] (0: any free port)")
    if a.update_period <= 0 or a.expiration <= 0 or a.status_every <= 0 or a.start_timeout <= 0:
        _fail("--update-period, --expiration, --status-every and --start-timeout must be > 0 seconds")
    if a.expiration < a.update_period:
        _fail(f"--expiration {a.expiration} < --update-period {a.update_period}: the experts would vanish between declarations; make --expiration at least the period (2x is safe)")


def join_command(maddrs: list[str], a: argparse.Namespace) -> str:
    """The line another machine runs to join through this peer and serve experts."""
    grid = " ".join(map(str, a.grid))
    return f"moe-join --initial-peers {' '.join(maddrs)} --serve 4 --prefix {a.prefix} --grid {grid} --d-model {a.d_model} --d-ff {a.d_ff}"


def train_command(maddrs: list[str], a: argparse.Namespace) -> str:
    grid = ",".join(map(str, a.grid))
    E = math.prod(a.grid)
    return f"moe-train moe=hivemind moe.initial_peers=[{','.join(maddrs)}] moe.uid_prefix={a.prefix} moe.grid=[{grid}] moe.num_experts={E} model.d_model={a.d_model}"


async def _peers_seen(dht, node) -> int:
    return len(node.protocol.routing_table.peer_id_to_uid)


def free_uids(dht, uids: list[str], n: int, timeout: float) -> list[str]:
    """The first ``n`` of ``uids`` nobody declares on the DHT now."""
    from functools import partial

    from hivemind.moe.server.dht_handler import _get_experts

    found = dht.run_coroutine(partial(_get_experts, uids=uids, expiration_time=None), return_future=True).result(timeout)
    return [u for u, info in zip(uids, found) if info is None][:n]


def main(argv: list[str] | None = None) -> None:
    """Console script ``moe-join``."""
    a = build_parser().parse_args(argv)
    check_args(a)

    import torch

    from moe.swarm.expert import SwarmExpert
    from moe.swarm.records import record_validators
    from moe.swarm.server import ExpertServer, grid_uids, shutdown_dht, start_dht, visible_maddrs

    torch.set_num_threads(1)
    if a.seed is not None:
        torch.manual_seed(a.seed)
    net = dict(
        host_maddrs=[f"/ip4/{a.host}/tcp/{a.port}"],
        nat_port_map=a.nat,
        auto_nat=a.nat,
        record_validators=record_validators(a.prefix),
        **({"announce_maddrs": a.announce} if a.announce else {}),
    )
    dht = server = None
    calls = [0]
    try:
        if a.serve:
            uids = grid_uids(a.prefix, a.grid)
            if a.first is not None:
                chosen = uids[a.first : a.first + a.serve]
            elif a.initial_peers:  # look up who serves what: a short-lived probe peer
                probe = start_dht(a.initial_peers, **{**net, "host_maddrs": ["/ip4/127.0.0.1/tcp/0"]})
                try:
                    chosen = free_uids(probe, uids, a.serve, a.start_timeout)
                finally:
                    shutdown_dht(probe)
                if len(chosen) < a.serve:
                    _fail(f"--serve {a.serve}: only {len(chosen)} experts of the grid are free (the others are served already); serve fewer, use --first, or a larger --grid", code=1)
            else:
                chosen = uids[: a.serve]
            experts = {u: SwarmExpert(a.d_model, a.d_ff, activation=a.activation) for u in chosen}
            for m in experts.values():
                m.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
            for attempt in (1, 2, 3):  # hivemind's server start sometimes hangs (seen on a loaded 2-core machine): try again
                try:
                    server = ExpertServer(
                        experts, a.d_model, initial_peers=a.initial_peers, optimizer=lambda ps: torch.optim.Adam(ps, lr=a.lr),
                        update_period=a.update_period, expiration=a.expiration, ready_timeout=a.start_timeout, sign_records=not a.unsigned, **net,
                    )
                    break
                except TimeoutError:
                    if attempt == 3:
                        raise
                    print(f"moe-join: the expert server did not come up within {a.start_timeout:g} s; trying again", file=sys.stderr, flush=True)
            dht = server.dht
        else:
            dht = start_dht(a.initial_peers, **net)
        # only now: hivemind stops its helper processes with SIGTERM, and a child forked with
        # this handler would ignore it (the shutdown then waits on it forever)
        stop = threading.Event()
        main_pid = os.getpid()

        def _on_signal(signum, frame):
            if os.getpid() != main_pid:  # a helper process forked later: the default action
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
            stop.set()

        signal.signal(signal.SIGINT, _on_signal)
        signal.signal(signal.SIGTERM, _on_signal)
        maddrs = visible_maddrs(dht)
        out = sys.stdout
        print(f"moe-join: peer id {dht.peer_id.to_base58()}", file=out)
        for m in maddrs:
            print(f"moe-join: address {m}", file=out)
        if server is not None:
            print(f"moe-join: serving {len(server.uids)} experts {server.uids[0]} .. {server.uids[-1]} (d_model {a.d_model}, d_ff {a.d_ff}, {'unsigned' if a.unsigned else 'signed'})", file=out)
        else:
            print("moe-join: DHT peer only (no experts served)", file=out)
        if not a.initial_peers:
            print("moe-join: a new swarm.  To serve experts in it, run:", file=out)
        else:
            print("moe-join: joined.  Others can join through this peer too:", file=out)
        print(f"  {join_command(maddrs, a)}", file=out)
        print("moe-join: to train against it:", file=out)
        print(f"  {train_command(maddrs, a)}", file=out)
        print("moe-join: Ctrl-C leaves the swarm", file=out, flush=True)

        last_t, last_calls = time.monotonic(), 0
        while not stop.wait(a.status_every):
            now = time.monotonic()
            try:
                peers = dht.run_coroutine(_peers_seen, return_future=True).result(10)
            except Exception:
                peers = -1
            rate = (calls[0] - last_calls) / (now - last_t)
            last_t, last_calls = now, calls[0]
            served = len(server.uids) if server is not None else 0
            print(f"moe-join: status: experts {served}, expert calls/s {rate:.1f}, peers seen {peers if peers >= 0 else '?'}", file=out, flush=True)
        print("moe-join: leaving the swarm", file=out, flush=True)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the shutdown short
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if server is not None:
            server.shutdown()
        elif dht is not None:
            shutdown_dht(dht)
    sys.exit(0)


if __name__ == "__main__":
    main()
