"""A volunteer's machine in the swarm: a DHT peer, and optionally an expert server and a
collaborative trainer peer (what ``moe-join`` runs; the command line is ``moe.cli.join``).

:class:`Volunteer` starts the roles it is asked for in an order that works with hivemind's
forked helper processes (the DHT, the server's connection handlers, the averagers), reports
one status line, and leaves cleanly: the trainer says goodbye to the other trainers, the
experts stop being declared (their records expire), the DHT peers stop.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
from hivemind import DHT
from hivemind.moe.server.dht_handler import _get_experts
from hivemind.utils.crypto import RSAPrivateKey

from moe.config import TrainConfig
from moe.swarm.collab import CollabTrainer
from moe.swarm.dht import shutdown_dht, start_dht, visible_maddrs
from moe.swarm.diloco import DiLoCoOptions, DiLoCoTrainer
from moe.swarm.expert import SwarmExpert
from moe.swarm.records import (
    RUNS_KEY,
    Keeper,
    RunShape,
    TrainerTerms,
    fingerprint,
    load_identity,
    owner_key,
    prefix_mismatch,
    record_validators,
    shape_mismatch,
    trainer_mismatch,
    trainers_key,
)
from moe.swarm.server import ExpertServer
from moe.swarm.uids import grid_uids

SERVER_START_TRIES = 3  # hivemind's server start sometimes hangs (seen on a loaded 2-core machine)


@dataclass
class VolunteerOptions:
    """What a volunteer runs (``moe-join``'s flags; see its ``--help``)."""

    initial_peers: list[str] = field(default_factory=list)  # none: start a new swarm
    host: str = "127.0.0.1"
    port: int = 0
    announce: list[str] = field(default_factory=list)
    nat: bool = False
    prefix: str = "ffn"
    grid: list[int] = field(default_factory=lambda: [8, 8])
    serve: int = 0  # experts to serve
    first: int | None = None  # serve grid uids first..first+serve-1; None: the first free ones
    d_model: int = 256
    d_ff: int = 1024
    activation: str = "gelu"
    lr: float = 1e-3  # the served experts' Adam
    signed: bool = True
    update_period: float = 15.0
    expiration: float = 30.0
    start_timeout: float = 120.0
    train: TrainConfig | None = None  # the trainer role's run config; None: no trainer
    target_batch_size: int = 256
    matchmaking_time: float = 5.0
    averaging_timeout: float = 30.0
    load_state_timeout: float = 60.0
    data_seed: int | None = None
    out: str | None = None  # the trainer's run directory; None: runs/collab-<its peer id tail>
    identity: str | None = None  # file of this peer's signing key (made if missing); None: a new key each start
    sync: str = "every-step"  # the trainer's sync: every-step (hivemind.Optimizer) or diloco
    diloco: DiLoCoOptions = field(default_factory=DiLoCoOptions)  # with sync=diloco
    compression: str = "none"  # every-step: what gradients and state are averaged in
    new_run: bool = False  # start this prefix's run in a swarm that runs others


class ShapeMismatch(RuntimeError):
    """The swarm's run has another shape than this peer's experts (or trainer) would have."""


class NotEnoughFreeExperts(RuntimeError):
    """Fewer experts of the grid are free than ``--serve`` asks for."""


def free_uids(dht: DHT, uids: list[str], n: int, timeout: float) -> list[str]:
    """The first ``n`` of ``uids`` nobody declares on the DHT now."""
    found = dht.run_coroutine(partial(_get_experts, uids=uids, expiration_time=None), return_future=True).result(
        timeout
    )
    return [u for u, info in zip(uids, found) if info is None][:n]


async def _peers_seen(dht, node) -> int:
    return len(node.protocol.routing_table.peer_id_to_uid)


class Volunteer:
    """This machine's roles in the swarm, started in the constructor, stopped by :meth:`shutdown`.

    Args:
        opts: what to run.
        log: where progress lines go (a retry of a hung server start).
    """

    def __init__(
        self, opts: VolunteerOptions, *, log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)
    ):
        self.opts = opts
        self.calls = 0  # forward calls of the served experts
        self.dht: DHT | None = None
        self.server: ExpertServer | None = None
        self.trainer: CollabTrainer | DiLoCoTrainer | None = None
        self.keepers: list[Keeper] = []
        self.train_dht: DHT | None = None
        o = opts
        self.key = load_identity(o.identity) if o.identity else RSAPrivateKey.process_wide()
        self.shape = RunShape(o.d_model, o.d_ff, tuple(o.grid))
        self.net = dict(
            host_maddrs=[f"/ip4/{o.host}/tcp/{o.port}"],
            nat_port_map=o.nat,
            auto_nat=o.nat,
            record_validators=record_validators(o.prefix, self.key),
            **({"announce_maddrs": o.announce} if o.announce else {}),
        )
        try:
            free = self._look_around() if o.initial_peers and (o.serve or o.train is not None) else None
            if o.serve:
                self.server = self._serve(self._choose_uids(free), log)
                self.dht = self.server.dht
            else:
                self.dht = start_dht(o.initial_peers, **self.net)
            if o.train is not None:
                self.trainer = self._trainer()
                terms = TrainerTerms.of(self.trainer.model, o.sync, o.diloco.inner_steps, o.train.seed)
                why = trainer_mismatch(self.train_dht, o.prefix, terms, timeout=o.start_timeout)
                if why is not None:
                    raise ShapeMismatch(why)
                self.keepers.append(Keeper(self.train_dht, {RUNS_KEY: o.prefix, trainers_key(o.prefix): terms.text()}))
            if self.server is not None:
                self.keepers.append(Keeper(self.dht, {RUNS_KEY: o.prefix}))
        except BaseException:
            self.shutdown()
            raise

    @property
    def fingerprint(self) -> str:
        """This peer's signing key, as trainers list it in ``moe.swarm.trusted_keys``."""
        return fingerprint(owner_key(self.key))

    def _look_around(self) -> list[str]:
        """Before joining: the run's shape must be this peer's (every member states it, signed),
        and which uids of the grid nobody serves yet.  Through a short-lived probe peer."""
        o = self.opts
        probe = start_dht(o.initial_peers, **{**self.net, "host_maddrs": ["/ip4/127.0.0.1/tcp/0"]})
        try:
            why = None if o.new_run else prefix_mismatch(probe, o.prefix, timeout=o.start_timeout)
            if why is not None:
                raise ShapeMismatch(why)
            why = shape_mismatch(probe, o.prefix, self.shape, timeout=o.start_timeout)
            if why is not None:
                grid = " ".join(map(str, o.grid))
                raise ShapeMismatch(
                    f"{why}; join with the run's --d-model, --d-ff and --grid (this peer has --d-model "
                    f"{o.d_model} --d-ff {o.d_ff} --grid {grid})"
                )
            return free_uids(probe, grid_uids(o.prefix, o.grid), math.prod(o.grid), o.start_timeout)
        finally:
            shutdown_dht(probe)

    def _choose_uids(self, free: list[str] | None) -> list[str]:
        o = self.opts
        uids = grid_uids(o.prefix, o.grid)
        if o.first is not None:
            return uids[o.first : o.first + o.serve]
        if free is None:  # a new swarm: nobody serves anything yet
            return uids[: o.serve]
        chosen = free[: o.serve]
        if len(chosen) < o.serve:
            raise NotEnoughFreeExperts(
                f"--serve {o.serve}: only {len(chosen)} experts of the grid are free (the others are "
                "served already); serve fewer, use --first, or a larger --grid"
            )
        return chosen

    def _count_call(self, *_) -> None:
        self.calls += 1

    def _serve(self, uids: list[str], log: Callable[[str], None]) -> ExpertServer:
        o = self.opts
        experts = {u: SwarmExpert(o.d_model, o.d_ff, activation=o.activation) for u in uids}
        for m in experts.values():
            m.register_forward_hook(self._count_call)
        for attempt in range(1, SERVER_START_TRIES + 1):
            try:
                return ExpertServer(
                    experts,
                    o.d_model,
                    initial_peers=o.initial_peers,
                    optimizer=lambda ps: torch.optim.Adam(ps, lr=o.lr),
                    update_period=o.update_period,
                    expiration=o.expiration,
                    ready_timeout=o.start_timeout,
                    sign_records=o.signed,
                    shape=self.shape,
                    **self.net,
                )
            except TimeoutError:
                if attempt == SERVER_START_TRIES:
                    raise
                log(f"moe-join: the expert server did not come up within {o.start_timeout:g} s; trying again")
        raise AssertionError("unreachable")

    def _trainer(self) -> CollabTrainer:
        """Before any signal handler is set: hivemind's averagers are forked here."""
        o = self.opts
        self.train_dht = self.dht
        if (
            self.server is not None
        ):  # a peer cannot call experts through its own p2p identity ("dial to self"): a second DHT peer
            net = {k: v for k, v in self.net.items() if k != "announce_maddrs"}
            self.train_dht = start_dht(visible_maddrs(self.dht), **{**net, "host_maddrs": [f"/ip4/{o.host}/tcp/0"]})
        tc = o.train
        if o.out is None:
            tc = dataclasses.replace(tc, out_dir=f"runs/collab-{self.train_dht.peer_id.to_base58()[-8:]}")
        if o.sync == "diloco":
            opts = dataclasses.replace(
                o.diloco,
                matchmaking_time=o.matchmaking_time,
                averaging_timeout=o.averaging_timeout,
                load_state_timeout=o.load_state_timeout,
            )
            return DiLoCoTrainer(tc, dht=self.train_dht, options=opts, data_seed=o.data_seed)
        return CollabTrainer(
            tc,
            dht=self.train_dht,
            compression=o.compression,
            target_batch_size=o.target_batch_size,
            matchmaking_time=o.matchmaking_time,
            averaging_timeout=o.averaging_timeout,
            load_state_timeout=o.load_state_timeout,
            data_seed=o.data_seed,
        )

    @property
    def maddrs(self) -> list[str]:
        """The addresses other peers join through."""
        return visible_maddrs(self.dht)

    def peers_seen(self) -> int:
        """Peers in this DHT peer's routing table (-1 when the DHT does not answer)."""
        try:
            return self.dht.run_coroutine(_peers_seen, return_future=True).result(10)
        except Exception:
            return -1

    def shutdown(self) -> None:
        """Leave: the trainer's goodbye, then its DHT peer, then the server (with its DHT) or the DHT."""
        try:
            for k in self.keepers:
                k.stop()
            self.keepers.clear()
            if self.trainer is not None:
                self.trainer.shutdown()  # goodbye to the other trainers, averagers stopped
        finally:
            if self.train_dht is not None and self.train_dht is not self.dht:
                shutdown_dht(self.train_dht)
            if self.server is not None:
                self.server.shutdown()
            elif self.dht is not None:
                shutdown_dht(self.dht)
            self.trainer = self.server = self.dht = self.train_dht = None
