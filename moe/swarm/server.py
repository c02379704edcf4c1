"""Expert servers: host experts on this machine and declare them on hivemind's DHT.

``ExpertServer`` runs a hivemind ``Server`` (its runtime thread, connection-handler
processes, a DHT process) in this process; ``ServerProcess`` runs one in a forked child in
its own session, so it can be stopped cleanly or killed outright with everything it started
(the DHT process, the handlers, the p2p daemon).

Safe defaults, unlike hivemind's: the DHT's (``moe.swarm.dht``), and connection handlers sized
to the machine's cores.  Expert uids follow hivemind's grid layout (``moe.swarm.uids``).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn as nn
from hivemind.moe.expert_uid import is_valid_uid
from hivemind.moe.server import ModuleBackend, Server
from hivemind.utils.tensor_descr import BatchTensorDescriptor

from moe.swarm.dht import LOOPBACK, prepare_to_fork, start_dht, visible_maddrs
from moe.swarm.records import RunShape, SignedDeclarer


def default_num_handlers() -> int:
    """Connection-handler processes: half the cores, between 1 and 4 (each is an asyncio loop)."""
    return max(1, min(4, (os.cpu_count() or 2) // 2))


class ExpertServer:
    """Hosts experts in this process and declares them on the DHT.

    Args:
        experts: uid -> module mapping ``(N, D) -> (N, D)`` (normally ``SwarmExpert``); each uid
            ``<prefix>.<i>.<j>...`` as made by ``grid_uids``.
        d_model: D, the width of every expert's input and output (float32 rows), or a
            mapping uid -> D for experts of several widths on one server.
        initial_peers: multiaddrs of DHT peers to join; empty: this server starts a new DHT.
        host_maddrs: addresses to listen on (default 127.0.0.1, a free port).
        nat_port_map, auto_nat: hivemind's NAT traversal, off unless asked for.
        optimizer: ``params -> torch.optim.Optimizer``; each expert gets its own and steps it
            after every backward request (hivemind's server-side training).  None: the
            server computes gradients (accumulated in ``.grad``) but never updates weights.
        num_handlers: connection-handler processes (default ``default_num_handlers()``).
        max_batch_size: rows the runtime batches into one expert call.
        update_period: seconds between re-declarations of the experts on the DHT.
        expiration: seconds a declaration lives (default hivemind's: max(2 x period, 30)).
        ready_timeout: seconds to wait for the server to come up before ``TimeoutError``.
        sign_records: also declare the experts in signed records (``moe.swarm.records``), at
            the same period; the DHT must then be started with
            ``record_validators=moe.swarm.records.record_validators(prefix, key)`` (pass it
            here: it goes to the DHT).
        shape: with ``sign_records``, this server's statement of the run's shape
            (``moe.swarm.records.RunShape``), declared signed beside the experts: joiners of
            another shape are refused.
        dht_kwargs: more keyword arguments for ``hivemind.DHT``.

    The server owns its DHT: ``shutdown()`` stops both (hivemind's ``Server.shutdown`` does).
    """

    def __init__(
        self,
        experts: Mapping[str, nn.Module],
        d_model: int | Mapping[str, int],
        *,
        initial_peers: Iterable[str] = (),
        host_maddrs: Sequence[str] = LOOPBACK,
        nat_port_map: bool = False,
        auto_nat: bool = False,
        optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] | None = None,
        num_handlers: int | None = None,
        max_batch_size: int = 16384,
        update_period: float = 15.0,
        expiration: float | None = None,
        ready_timeout: float = 60.0,
        sign_records: bool = False,
        shape: RunShape | None = None,
        **dht_kwargs,
    ):
        if not experts:
            raise ValueError("an expert server needs at least one expert")
        bad = [uid for uid in experts if not is_valid_uid(uid)]
        if bad:
            raise ValueError(f"invalid expert uids {bad}: use <prefix>.<i>.<j>... (see moe.swarm.server.grid_uids)")
        widths = dict(d_model) if isinstance(d_model, Mapping) else dict.fromkeys(experts, d_model)
        if set(widths) != set(experts):
            raise ValueError(
                f"d_model has widths for uids {sorted(widths)}, the experts are {sorted(experts)}: "
                "give one width per expert uid"
            )
        self.uids = list(experts)
        self.dht = start_dht(
            initial_peers, host_maddrs=host_maddrs, nat_port_map=nat_port_map, auto_nat=auto_nat, **dht_kwargs
        )
        try:
            backends = {
                uid: ModuleBackend(
                    name=uid,
                    module=module,
                    optimizer=optimizer(module.parameters()) if optimizer is not None else None,
                    args_schema=(BatchTensorDescriptor(widths[uid], dtype=torch.float32),),
                    outputs_schema=BatchTensorDescriptor(widths[uid], dtype=torch.float32),
                    max_batch_size=max_batch_size,
                )
                for uid, module in experts.items()
            }
            self.server = Server(
                self.dht,
                backends,
                num_connection_handlers=num_handlers or default_num_handlers(),
                update_period=update_period,
                expiration=expiration,
                start=False,
            )
            self.server.run_in_background(await_ready=True, timeout=ready_timeout)
            self.signed = None
            if sign_records:
                period = update_period
                self.signed = SignedDeclarer(
                    self.dht,
                    self.uids,
                    update_period=period,
                    expiration=expiration or max(2 * period, 30.0),
                    shape=shape,
                )
        except BaseException:
            if getattr(self, "server", None) is not None and self.server.is_alive():
                self.server.shutdown()  # stops the DHT too
            else:
                self.dht.shutdown()
            raise
        self._closed = False

    @property
    def maddrs(self) -> list[str]:
        """Multiaddrs other peers pass as ``initial_peers``."""
        return visible_maddrs(self.dht)

    @property
    def modules(self) -> dict[str, nn.Module]:
        """uid -> the served module (the live weights)."""
        return {uid: b.module for uid, b in self.server.module_backends.items()}

    def shutdown(self, timeout: float = 15.0) -> None:
        """Stop serving: handlers, DHT declarations, DHT and runtime.  Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.signed is not None:
            self.signed.stop()
        self.server.shutdown()
        self.server.join(timeout)

    def __enter__(self) -> ExpertServer:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def kill_session(process) -> None:
    """SIGKILL a forked child that leads a session of its own (``os.setsid()``, first thing)
    and every process it started (DHT, averagers, p2p daemons); reap it within 10 s."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.join(10)


class ServerProcess:
    """An ``ExpertServer`` in a forked child process, in a session of its own.

    ``experts`` (modules built in this process) reach the child by fork, so any module
    works, including test doubles.  ``shutdown()`` asks the child to stop cleanly and kills
    the session if it does not within ``timeout``; ``kill()`` sends SIGKILL to the whole
    session (child, DHT process, handlers, p2p daemon): a peer vanishing without a goodbye.
    The child also stops by itself when this process goes away.

    Args:
        experts, d_model, server_kwargs: as for ``ExpertServer``.
        start_timeout: seconds to wait for the child to report its addresses.
    """

    def __init__(
        self,
        experts: Mapping[str, nn.Module],
        d_model: int | Mapping[str, int],
        *,
        start_timeout: float = 90.0,
        **server_kwargs,
    ):
        ctx = mp.get_context("fork")
        prepare_to_fork()
        self._conn, child_conn = ctx.Pipe()
        self.uids = list(experts)
        self.process = ctx.Process(
            target=_serve_in_child, args=(child_conn, dict(experts), d_model, server_kwargs), daemon=False
        )
        self.process.start()
        child_conn.close()
        try:
            if not self._conn.poll(start_timeout):
                raise TimeoutError(f"expert server did not start within {start_timeout} s")
            status, payload = self._conn.recv()
            if status != "ok":
                raise RuntimeError(f"expert server failed to start: {payload}")
        except BaseException:
            self.kill()
            raise
        self.maddrs: list[str] = payload

    @property
    def pid(self) -> int:
        return self.process.pid

    def shutdown(self, timeout: float = 20.0) -> None:
        """Ask the child to stop cleanly; SIGKILL its session after ``timeout`` seconds."""
        if self.process.is_alive():
            try:
                self._conn.send("stop")
            except (BrokenPipeError, OSError):
                pass
            self.process.join(timeout)
        self.kill()

    def kill(self) -> None:
        """SIGKILL the child's whole session (no clean shutdown: its DHT records stay until they expire)."""
        kill_session(self.process)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _serve_in_child(conn, experts: dict, d_model, server_kwargs: dict) -> None:
    os.setsid()  # its own session: kill() reaches every process this server starts
    torch.set_num_threads(1)  # intra-op pools inherited through fork are not safe to reuse
    parent = os.getppid()
    try:
        server = ExpertServer(experts, d_model, **server_kwargs)
    except BaseException as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    try:
        conn.send(("ok", server.maddrs))
        while os.getppid() == parent:  # stop with the parent, too
            if conn.poll(1.0):
                try:
                    conn.recv()
                except EOFError:
                    pass
                break
    finally:
        server.shutdown()
        time.sleep(0.1)
