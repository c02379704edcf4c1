"""``moe-join``: connect this machine to a swarm, or start one; serve experts in it, train as
a collaborative peer, or both.

    moe-join                                        # the first peer: prints the line others run
    moe-join --initial-peers /ip4/.../p2p/Qm... --serve 8 --grid 8 8 --d-model 256 --d-ff 1024
    moe-join --initial-peers /ip4/.../p2p/Qm... --train --target-batch-size 256 experiment=smoke

With ``--serve N`` the peer hosts N experts (``moe.swarm.expert.SwarmExpert``, trained on
this machine by its own Adam on every backward request) under the run's grid prefix, on
the uids of the grid nobody declares yet (or from ``--first``), declared on the DHT, signed
by default (``moe.swarm.records``).  With ``--train`` the peer trains the run's model as a
collaborative peer (``moe.swarm.collab.CollabTrainer``: hivemind's ``Optimizer``, DeDLOC):
it loads the current state from the other trainer peers, then accumulates gradients on its
own batches until the peers together reach ``--target-batch-size`` sequences, and steps
with them; the trailing ``KEY=VALUE`` arguments are Hydra overrides of the run's config, as
for ``moe-train`` (``experiment=smoke``, ``moe.swarm.k_best=2``, ...).  With neither the peer is a
DHT node only (e.g. the swarm's root).  A status line (experts served, expert calls/s,
collaborative step, trainer peers, peers seen) every ``--status-every`` seconds; Ctrl-C
(SIGINT) or SIGTERM leaves cleanly: the optimizer says goodbye to the other trainers, the
experts stop being declared (their records expire after ``--expiration`` s), the other
peers go on.

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

from moe.cli.config import compose
from moe.config import MAX_RECORD_LIFETIME, ConfigError, check_multiaddr

EPILOG = (
    "Roles: a DHT peer (always), an expert server (--serve N), a collaborative trainer peer "
    "(--train: hivemind.Optimizer, as in DeDLOC), or both.  With --train, KEY=VALUE arguments "
    "override the run's config as for moe-train (e.g. experiment=smoke moe.swarm.k_best=2 moe.top_k=2); "
    "every trainer peer of a run must use the same model and optim settings.  A single trainer "
    "(no collaboration) can also run `moe-train moe=hivemind moe.swarm.initial_peers=[ADDR]`."
)

# overrides moe-join sets from its own flags for the trainer (key -> the flag to use instead)
_TRAIN_KEYS = {
    "moe.swarm.uid_prefix": "--prefix",
    "moe.swarm.grid": "--grid",
    "moe.num_experts": "--grid",
    "model.d_model": "--d-model",
    "moe.expert_d_ff": "--d-ff",
    "out_dir": "--out",
    "moe.swarm.initial_peers": "--initial-peers",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + message
        _fail(message)


def _fail(msg: str, code: int = 2) -> None:
    print(f"moe-join: error: {msg}", file=sys.stderr, flush=True)
    sys.exit(code)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="moe-join", description="Join a swarm of expert servers (hivemind DHT), or start one.", epilog=EPILOG
    )
    p.add_argument(
        "--initial-peers",
        nargs="+",
        default=[],
        metavar="MULTIADDR",
        help="addresses of running peers (as printed by the first peer); none: start a new swarm",
    )
    p.add_argument(
        "--serve", type=int, default=0, metavar="N", help="serve N experts of the grid (default 0: a DHT peer only)"
    )
    p.add_argument("--prefix", default="ffn", help="the run's grid prefix, moe.swarm.uid_prefix (default ffn)")
    p.add_argument(
        "--grid", type=int, nargs="+", default=[8, 8], metavar="G", help="the run's grid, moe.swarm.grid (default 8 8)"
    )
    p.add_argument(
        "--first",
        type=int,
        default=None,
        metavar="I",
        help="serve grid uids I..I+N-1 (row-major); default: the first N nobody declares",
    )
    p.add_argument("--d-model", type=int, default=256, help="model.d_model of the run (default 256, model=small)")
    p.add_argument("--d-ff", type=int, default=1024, help="each expert's hidden size (default 1024)")
    p.add_argument("--activation", default="gelu", choices=["gelu", "relu", "silu"])
    p.add_argument("--lr", type=float, default=1e-3, help="the experts' Adam learning rate (default 1e-3)")
    p.add_argument("--seed", type=int, default=None, help="seed of the experts' initial weights")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="IPv4 address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: all interfaces)",
    )
    p.add_argument("--port", type=int, default=0, help="TCP port (default 0: any free port)")
    p.add_argument(
        "--announce",
        nargs="+",
        default=[],
        metavar="MULTIADDR",
        help="addresses other peers should dial, e.g. /ip4/PUBLIC_IP/tcp/PORT",
    )
    p.add_argument(
        "--nat",
        action="store_true",
        help="turn on hivemind's NAT port mapping (UPnP) and auto-NAT (off by default: both send "
        "traffic off the machine)",
    )
    p.add_argument(
        "--unsigned",
        action="store_true",
        help="do not sign expert declarations (trainers with moe.swarm.require_signed=true will not use them)",
    )
    p.add_argument(
        "--identity",
        default=None,
        metavar="FILE",
        help="file of this peer's signing key, made there if missing: the same key (fingerprint) at every start, "
        "so trainers can list it in moe.swarm.trusted_keys (default: a new key each start)",
    )
    p.add_argument(
        "--update-period", type=float, default=15.0, help="seconds between re-declarations of the experts (default 15)"
    )
    p.add_argument(
        "--expiration", type=float, default=30.0, help="seconds a declaration lives after this peer stops (default 30)"
    )
    p.add_argument("--status-every", type=float, default=10.0, help="seconds between status lines (default 10)")
    p.add_argument(
        "--start-timeout",
        type=float,
        default=120.0,
        help="seconds to wait for the DHT and the server to come up (default 120)",
    )
    t = p.add_argument_group("collaborative training (--train)")
    t.add_argument(
        "--train", action="store_true", help="train the run's model as a collaborative peer (hivemind.Optimizer)"
    )
    t.add_argument(
        "--target-batch-size",
        type=int,
        default=256,
        help="sequences all trainer peers accumulate per collaborative step (default 256; the same on every peer)",
    )
    t.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="sequences per local step of this peer (default: the config's batch_size)",
    )
    t.add_argument(
        "--steps",
        type=int,
        default=0,
        help="leave after this collaborative step (DiLoCo: round) (default 0: train until Ctrl-C); the LR "
        "schedule's length is the config's steps=",
    )
    t.add_argument(
        "--out", default=None, help="this peer's run directory, for metrics.jsonl (default runs/collab-<peer id tail>)"
    )
    t.add_argument(
        "--matchmaking-time",
        type=float,
        default=5.0,
        help="seconds to wait for other peers to join an averaging round (default 5; 10-15 over the internet)",
    )
    t.add_argument(
        "--averaging-timeout",
        type=float,
        default=30.0,
        help="seconds an averaging round may take before this peer goes on with its own gradients (default 30)",
    )
    t.add_argument(
        "--load-state-timeout",
        type=float,
        default=60.0,
        help="seconds one download of the run's state from a peer may take (default 60)",
    )
    t.add_argument(
        "--data-seed", type=int, default=None, help="seed of this peer's batches (default: from its peer id)"
    )
    t.add_argument(
        "--sync",
        choices=["every-step", "diloco"],
        default="every-step",
        help="every-step: average gradients at every collaborative step (hivemind.Optimizer, DeDLOC); diloco: "
        "--inner-steps local AdamW steps, then average the parameter change and take an outer Nesterov step "
        "(DiLoCo: H times fewer rounds). Every trainer of a run uses the same (default every-step)",
    )
    t.add_argument(
        "--inner-steps",
        type=int,
        default=50,
        metavar="H",
        help="with --sync diloco: local steps per round (default 50)",
    )
    t.add_argument(
        "--compression",
        choices=["none", "fp16", "int8"],
        default=None,
        help="what averaged tensors are sent as (default: fp16 with --sync diloco, none with every-step)",
    )
    t.add_argument(
        "--outer-lr", type=float, default=0.7, help="with --sync diloco: the outer Nesterov step's rate (default 0.7)"
    )
    t.add_argument(
        "--outer-momentum", type=float, default=0.9, help="with --sync diloco: the outer momentum (default 0.9)"
    )
    t.add_argument(
        "--no-error-feedback",
        action="store_true",
        help="with --sync diloco --compression int8: drop each round's rounding instead of carrying it over",
    )
    p.add_argument(
        "--new-run",
        action="store_true",
        help="start this --prefix's run in a swarm that runs others (by default a prefix the swarm does not "
        "run is refused: usually a typo)",
    )
    t.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="with --train: Hydra overrides of the run's config, as for moe-train",
    )
    return p


def check_args(a: argparse.Namespace) -> None:
    """Every bad input as one ``_fail`` line, before anything starts."""
    for addr in a.initial_peers:
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
        _fail(
            f"--serve {a.serve}: the grid {'x'.join(map(str, a.grid))} has {E} experts"
            + (f" ({E - first} from --first {first})" if first else "")
            + "; serve fewer or use a larger --grid"
        )
    from moe.swarm.uids import check_prefix  # noqa: PLC0415 (hivemind: only after the cheap checks)

    try:
        a.prefix = check_prefix(a.prefix)
    except ValueError as e:
        _fail(f"--prefix: {e}")
    if a.d_model < 1 or a.d_ff < 1:
        _fail(
            f"--d-model {a.d_model} --d-ff {a.d_ff}: both must be >= 1 (--d-model must equal the run's model.d_model)"
        )
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
        _fail(
            f"--expiration {a.expiration} < --update-period {a.update_period}: the experts would "
            "vanish between declarations; make --expiration at least the period (2x is safe)"
        )
    if a.expiration > MAX_RECORD_LIFETIME:
        _fail(
            f"--expiration {a.expiration:g}: the run's peers refuse records that live more than "
            f"{MAX_RECORD_LIFETIME:g} s (so no peer can pin a declaration); lower it"
        )
    a.train_config = None
    if not a.train:
        if a.overrides:
            _fail(f"{a.overrides[0]!r}: config overrides are for the trainer role; add --train (or remove them)")
        return
    if a.target_batch_size < 1:
        _fail(
            f"--target-batch-size {a.target_batch_size} must be >= 1 (sequences per collaborative step, over all peers)"
        )
    if a.batch_size is not None and a.batch_size < 1:
        _fail(f"--batch-size {a.batch_size} must be >= 1")
    if a.steps < 0:
        _fail(f"--steps {a.steps} must be >= 0 (0: train until Ctrl-C)")
    if not min(a.matchmaking_time, a.averaging_timeout, a.load_state_timeout) > 0:
        _fail("--matchmaking-time, --averaging-timeout and --load-state-timeout must be > 0 seconds")
    if a.compression is None:
        a.compression = "fp16" if a.sync == "diloco" else "none"
    if a.sync == "diloco":
        if a.inner_steps < 1:
            _fail(f"--inner-steps {a.inner_steps} must be >= 1 (local steps per round)")
        if not (a.outer_lr > 0 and 0 <= a.outer_momentum < 1):
            _fail(f"--outer-lr {a.outer_lr} must be > 0 and --outer-momentum {a.outer_momentum} in [0, 1)")
    a.train_config = train_config(a)


def train_config(a: argparse.Namespace):
    """The trainer's ``TrainConfig``: moe-train's config with ``a.overrides``, then the swarm's
    settings from moe-join's flags; a bad override ends with one ``_fail`` line."""
    for o in a.overrides:
        key = o.split("=", 1)[0].lstrip("+~")
        if "=" not in o or o.startswith("-"):
            _fail(f"{o!r}: not an option; config overrides are KEY=VALUE (e.g. experiment=smoke)")
        if key in _TRAIN_KEYS:
            _fail(f"{o!r}: moe-join sets {key} itself; use {_TRAIN_KEYS[key]}")
    grid = ",".join(map(str, a.grid))
    layer = next((o.split("=", 1)[1] for o in a.overrides if o.split("=", 1)[0] == "moe"), "hivemind")
    ours = [f"moe.swarm.uid_prefix={a.prefix}", f"model.d_model={a.d_model}", f"out_dir={a.out or 'runs/collab'}"]
    if layer == "hivemind":  # the swarm's experts: the grid and the experts' width are moe-join's
        ours = [
            "moe=hivemind",
            *ours,
            f"moe.swarm.grid=[{grid}]",
            f"moe.num_experts={math.prod(a.grid)}",
            f"moe.expert_d_ff={a.d_ff}",
        ]
    if a.batch_size is not None:
        ours.append(f"batch_size={a.batch_size}")
    try:
        tc = compose([*a.overrides, *ours], job_name="moe-join")
    except ConfigError as e:
        _fail(str(e))
    if tc.parallel.backend != "single":
        _fail(
            f"parallel={tc.parallel.backend}: a trainer peer is one process; its data parallelism "
            "is the collaboration (leave parallel=single)"
        )
    if tc.grad_accum != 1:
        _fail(
            f"grad_accum={tc.grad_accum}: a trainer peer accumulates up to --target-batch-size by "
            "itself; leave grad_accum=1"
        )
    return tc


def join_command(maddrs: list[str], a: argparse.Namespace) -> str:
    """The line another machine runs to join through this peer and serve experts."""
    grid = " ".join(map(str, a.grid))
    return (
        f"moe-join --initial-peers {' '.join(maddrs)} --serve 4 --prefix {a.prefix} --grid {grid} "
        f"--d-model {a.d_model} --d-ff {a.d_ff}"
    )


def collab_command(maddrs: list[str], a: argparse.Namespace) -> str:
    """The line another machine runs to train with this swarm as a collaborative peer."""
    grid = " ".join(map(str, a.grid))
    if a.train and a.sync == "diloco":
        sync = f"--sync diloco --inner-steps {a.inner_steps} --compression {a.compression}"
    else:
        sync = f"--target-batch-size {a.target_batch_size}"
    return (
        f"moe-join --initial-peers {' '.join(maddrs)} --train {sync} "
        f"--prefix {a.prefix} --grid {grid} --d-model {a.d_model} --d-ff {a.d_ff}"
    )


def train_command(maddrs: list[str], a: argparse.Namespace) -> str:
    grid = ",".join(map(str, a.grid))
    E = math.prod(a.grid)
    return (
        f"moe-train moe=hivemind moe.swarm.initial_peers=[{','.join(maddrs)}] moe.swarm.uid_prefix={a.prefix} "
        f"moe.swarm.grid=[{grid}] moe.num_experts={E} model.d_model={a.d_model}"
    )


def options(a: argparse.Namespace):
    """The checked arguments as the swarm's ``VolunteerOptions``."""
    # the swarm imports hivemind: only once the arguments are good
    from moe.swarm.diloco import DiLoCoOptions
    from moe.swarm.peer import VolunteerOptions

    return VolunteerOptions(
        initial_peers=a.initial_peers,
        host=a.host,
        port=a.port,
        announce=a.announce,
        nat=a.nat,
        prefix=a.prefix,
        grid=a.grid,
        serve=a.serve,
        first=a.first,
        d_model=a.d_model,
        d_ff=a.d_ff,
        activation=a.activation,
        lr=a.lr,
        signed=not a.unsigned,
        update_period=a.update_period,
        expiration=a.expiration,
        start_timeout=a.start_timeout,
        train=a.train_config,
        target_batch_size=a.target_batch_size,
        matchmaking_time=a.matchmaking_time,
        averaging_timeout=a.averaging_timeout,
        load_state_timeout=a.load_state_timeout,
        data_seed=a.data_seed,
        out=a.out,
        identity=a.identity,
        sync=a.sync if a.train else "every-step",
        diloco=DiLoCoOptions(
            inner_steps=a.inner_steps,
            outer_lr=a.outer_lr,
            outer_momentum=a.outer_momentum,
            compression=a.compression or "fp16",
            error_feedback=not a.no_error_feedback,
        ),
        compression=a.compression or "none",
        new_run=a.new_run,
    )


def announce(v, a: argparse.Namespace, out) -> None:
    """Who this peer is, what it runs, and the lines other machines run to join it."""
    maddrs = v.maddrs
    print(f"moe-join: peer id {v.dht.peer_id.to_base58()}", file=out)
    print(
        f"moe-join: signing key {v.fingerprint} (a trainer that trusts only its own servers lists it in "
        "moe.swarm.trusted_keys; --identity FILE keeps it across restarts)",
        file=out,
    )
    for m in maddrs:
        print(f"moe-join: address {m}", file=out)
    if v.server is not None:
        print(
            f"moe-join: serving {len(v.server.uids)} experts {v.server.uids[0]} .. "
            f"{v.server.uids[-1]} (d_model {a.d_model}, d_ff {a.d_ff}, "
            f"{'unsigned' if a.unsigned else 'signed'})",
            file=out,
        )
    elif v.trainer is None:
        print("moe-join: DHT peer only (no experts served)", file=out)
    if v.trainer is not None:
        tc = v.trainer.cfg
        if v.train_dht is not v.dht:
            print(
                f"moe-join: the trainer is DHT peer {v.train_dht.peer_id.to_base58()} (its experts "
                "are called like any server's)",
                file=out,
            )
        if a.sync == "diloco":
            how = (
                f"DiLoCo: {a.inner_steps} local steps of {tc.batch_size} sequences per round, the parameter "
                f"change averaged in {a.compression}, outer Nesterov lr {a.outer_lr} momentum {a.outer_momentum}; "
                f"LR schedule over {tc.steps} local steps"
            )
        else:
            how = (
                f"every step: target batch {a.target_batch_size} sequences per collaborative step, "
                f"{tc.batch_size} per local step here; LR schedule over {tc.steps} steps"
            )
        layer = "the swarm's experts" if tc.moe.name == "hivemind" else f"moe={tc.moe.name}, experts local"
        print(
            f"moe-join: training as a collaborative peer of run {tc.moe.swarm.uid_prefix} ({layer}), synced "
            f"{how}; metrics in {tc.out_dir}/metrics.jsonl",
            file=out,
        )
    print(
        "moe-join: a new swarm.  To serve experts in it, run:"
        if not a.initial_peers
        else "moe-join: joined.  Others can join through this peer too:",
        file=out,
    )
    print(f"  {join_command(maddrs, a)}", file=out)
    print(
        "moe-join: to train with it as a collaborative peer (same config overrides on every "
        "trainer), or as a single trainer:",
        file=out,
    )
    print(f"  {collab_command(maddrs, a)}" + (" " + " ".join(a.overrides) if a.overrides else ""), file=out)
    print(f"  {train_command(maddrs, a)}", file=out)
    print("moe-join: Ctrl-C leaves the swarm", file=out, flush=True)


def _bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


class _Status:
    """The status line every ``--status-every`` seconds: what a volunteer wants to know.  Experts
    served and their calls/s; as a trainer: the round (collaborative step), trainer peers, this
    peer's contribution (tokens trained, rounds it averaged in), bytes its averagers sent and
    received, and how the last round went; peers seen."""

    def __init__(self, v, out):
        self.v, self.out = v, out
        self.t, self.calls = time.monotonic(), 0
        self.loss: float | None = None
        self.served: float | None = None

    def trained(self, record: dict) -> None:
        self.loss, self.served = record["train/loss"], record.get("moe/served_fraction")

    def __call__(self) -> None:
        v, now = self.v, time.monotonic()
        peers = v.peers_seen()
        rate = (v.calls - self.calls) / max(now - self.t, 1e-9)
        self.t, self.calls = now, v.calls
        parts = []
        if v.server is not None:
            parts.append(f"experts {len(v.server.uids)}, expert calls/s {rate:.1f}")
        if v.trainer is not None:
            t = v.trainer
            tokens = t.samples * t.model_cfg.seq_len
            parts.append(
                f"round {t.collab_step}, trainer peers {t.num_peers}, contributed {tokens:,} tokens in "
                f"{t.local_steps} local steps, rounds joined {t.rounds_joined}, sent {_bytes(t.sent_bytes)}, "
                f"received {_bytes(t.received_bytes)}, last round: {t.last_outcome}"
            )
            if self.loss is not None:
                parts.append(f"loss {self.loss:.4f}")
            if self.served is not None:
                parts.append(f"tokens served by experts {100 * self.served:.0f}%")
        if not parts:
            parts.append("DHT peer")
        print(
            f"moe-join: status: {', '.join(parts)}, peers seen {peers if peers >= 0 else '?'}",
            file=self.out,
            flush=True,
        )


def _stop_on_signals() -> threading.Event:
    """SIGINT and SIGTERM set the returned event.  Set only once every helper process is forked:
    hivemind stops them with SIGTERM, and a child forked with this handler would ignore it (the
    shutdown then waits on it forever); a helper forked later still gets the default action."""
    stop = threading.Event()
    main_pid = os.getpid()

    def on_signal(signum, frame):
        if os.getpid() != main_pid:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    return stop


def run(v, a: argparse.Namespace, stop: threading.Event, out) -> None:
    """Serve (and train) until a signal, or the trainer's ``--steps``."""
    status = _Status(v, out)
    if v.trainer is None:
        while not stop.wait(a.status_every):
            status()
        return
    step = v.trainer.load_state()
    print(
        f"moe-join: loaded the run's state: collaborative step {step}"
        if step
        else "moe-join: starting at collaborative step 0 (no trainer peer has state to share yet)",
        file=out,
        flush=True,
    )
    if behind := getattr(v.trainer, "behind", None):
        print(f"moe-join: warning: {behind}", file=out, flush=True)
    next_status = time.monotonic() + a.status_every
    while not stop.is_set():
        if a.steps and v.trainer.collab_step >= a.steps:
            print(
                f"moe-join: reached collaborative step {v.trainer.collab_step} (--steps {a.steps})",
                file=out,
                flush=True,
            )
            return
        record = v.trainer.train_step()
        if record is not None:
            status.trained(record)
        if time.monotonic() >= next_status:
            status()
            next_status = time.monotonic() + a.status_every


def main(argv: list[str] | None = None) -> None:
    """Console script ``moe-join``."""
    a = build_parser().parse_args(argv)
    check_args(a)
    import torch

    from moe.swarm.dht import SwarmConnectError
    from moe.swarm.peer import NotEnoughFreeExperts, ShapeMismatch, Volunteer

    torch.set_num_threads(1)
    if a.seed is not None:
        torch.manual_seed(a.seed)
    out = sys.stdout
    volunteer = None
    try:
        try:
            volunteer = Volunteer(options(a))
        except NotEnoughFreeExperts as e:
            _fail(str(e), code=1)
        except ShapeMismatch as e:  # another run's shape: refused before serving anything
            _fail(str(e))
        except SwarmConnectError as e:  # an address that parses but leads nowhere
            _fail(str(e))
        announce(volunteer, a, out)
        run(volunteer, a, _stop_on_signals(), out)
        print("moe-join: leaving the swarm", file=out, flush=True)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the shutdown short
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if volunteer is not None:
            volunteer.shutdown()
    sys.exit(0)


if __name__ == "__main__":
    main()
