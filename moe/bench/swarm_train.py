"""``moe-bench swarm --train``: collaborative training over a network, every-step averaging
against DiLoCo, on loopback and on an emulated wide-area link, and with a peer SIGKILLed in
the middle of an averaging round.

Each arm is a fresh run of ``--peers`` trainer peers (forked processes, one torch thread
each) training the same local MoE model (``moe=switch`` by default: every parameter is
averaged) for the same number of local steps, so every arm trains the same tokens:

- ``every-step``: hivemind's ``Optimizer`` (DeDLOC; ``moe.swarm.collab``): the peers average
  gradients at every collaborative step (target batch = one local batch from each peer)
  and the parameters and optimizer state in the background after each, as ``moe-join
  --train`` does by default;
- ``diloco fp16`` / ``diloco int8``: ``moe.swarm.diloco`` with ``--inner-steps`` H: the
  parameter change averaged once a round, in fp16 or 8 bits with error feedback.

Every peer listens behind its own link of the user-space relay (``moe.swarm.netem``):
``loopback`` links add nothing, ``emulated`` ones add ``--network`` (default 50 ms round
trip, 100 Mbit/s).  Measured per arm:

- tokens/s of each peer (its tokens over its wall time, averaging included);
- bytes each peer sent per million trained tokens: the tensors its averagers sent
  (``moe.swarm.compression.Traffic``) and everything on the wire between peers (the
  relay's count: DHT, matchmaking and framing included);
- the validation loss of the final parameters (peer 0's; the same batches in every arm).

The ``killed`` arm runs DiLoCo (fp16, emulated network) with one more peer and SIGKILLs it
once it is inside an averaging round: the others must finish every step, in bounded time.
"""

from __future__ import annotations

import ctypes
import dataclasses
import datetime
import multiprocessing as mp
import os
import signal
import statistics
import time

import torch

from moe.bench.results import machine

ARMS = ("every-step", "diloco fp16", "diloco int8")
# a 4-block model with 4 switch experts in blocks 2 and 4, byte tokens of the standard library
DEFAULT_CONFIG = (
    "moe=switch",
    "model=tiny",
    "model.n_layers=4",
    "model.d_model=128",
    "model.d_ff=512",
    "model.n_heads=4",
    "model.seq_len=128",
    "model.moe_every=2",
    "batch_size=8",
    "data.tokenizer=byte",
    "data.max_files=400",
    "optim.warmup_steps=20",
    "logger=none",
    "eval_batches=20",
)
NETWORKS = ("loopback", "emulated")


def _peer_main(conn, spec: dict, flag) -> None:
    """One trainer peer in a forked child: build, report ready, train on "go", report, stop."""
    os.setsid()  # its own session: the bench can kill it with everything it started
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    torch.set_num_threads(1)
    from moe.swarm.dht import shutdown_dht, start_dht
    from moe.swarm.records import new_identity, record_validators

    cfg, steps = spec["cfg"], spec["steps"]
    dht = start_dht(
        spec["initial_peers"],
        host_maddrs=[f"/ip4/127.0.0.1/tcp/{spec['port']}"],
        announce_maddrs=[f"/ip4/127.0.0.1/tcp/{spec['link']}"],
        record_validators=record_validators(cfg.moe.swarm.uid_prefix, new_identity()),
    )
    trainer = None
    try:
        if spec["sync"] == "every-step":
            from moe.swarm.collab import CollabTrainer

            trainer = CollabTrainer(
                cfg,
                dht=dht,
                target_batch_size=spec["target_batch_size"],
                matchmaking_time=spec["matchmaking_time"],
                averaging_timeout=spec["averaging_timeout"],
                data_seed=spec["data_seed"],
                data=spec["data"],
                log=False,
            )
        else:
            from moe.swarm.diloco import DiLoCoOptions, DiLoCoTrainer

            opts = DiLoCoOptions(
                inner_steps=spec["inner_steps"],
                outer_lr=spec["outer_lr"],
                outer_momentum=spec["outer_momentum"],
                compression=spec["compression"],
                matchmaking_time=spec["matchmaking_time"],
                averaging_timeout=spec["averaging_timeout"],
            )
            trainer = DiLoCoTrainer(
                cfg, dht=dht, options=opts, data_seed=spec["data_seed"], data=spec["data"], log=False
            )
        conn.send(("ready", trainer.params_vector().numel()))
        assert conn.recv() == "go"
        trainer.load_state()
        if spec["sync"] == "diloco":  # up while an averaging round runs: the parent may kill this peer then

            def phase(p):
                flag.value = int(p == "averaging")

            trainer.on_phase = phase
        t0 = time.monotonic()
        while trainer.local_steps < steps:
            trainer.train_step()
        seconds = time.monotonic() - t0
        if spec["sync"] == "every-step":
            # done: no more collaborative steps, so the others stop waiting for this peer in
            # theirs (its state stays downloadable); a DiLoCo peer that finished is a round
            # ahead of any straggler, which downloads its state from it
            trainer.leave_rounds()
        val = trainer.evaluate() if spec["evaluate"] else None
        conn.send(
            (
                "done",
                {
                    "seconds": seconds,
                    "local_steps": trainer.local_steps,
                    "samples": trainer.samples,
                    "tensor_sent": trainer.sent_bytes,
                    "tensor_received": trainer.received_bytes,
                    "rounds": trainer.collab_step,
                    "rounds_joined": trainer.rounds_joined,
                    "val_loss": val,
                    "history": [
                        {k: v for k, v in r.items() if isinstance(v, (int, float, str))} for r in trainer.history
                    ],
                },
            )
        )
        conn.poll(600)  # the others may still need this peer's state or averaging: wait for "stop"
    finally:
        if trainer is not None:
            trainer.shutdown()
        shutdown_dht(dht)


class _Peer:
    def __init__(self, spec: dict):
        ctx = mp.get_context("fork")
        self.flag = ctx.Value(ctypes.c_int, 0)
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_peer_main, args=(child, spec, self.flag), daemon=False)
        self.proc.start()
        child.close()

    def recv(self, timeout: float):
        if not self.conn.poll(timeout):
            raise TimeoutError(f"trainer peer {self.proc.pid} did not answer within {timeout:g} s")
        return self.conn.recv()

    def kill(self) -> None:
        from moe.swarm.server import kill_session

        kill_session(self.proc)

    def stop(self) -> None:
        if self.proc.is_alive():
            try:
                self.conn.send("stop")
            except (BrokenPipeError, OSError):
                pass
            self.proc.join(60)
        self.kill()


def run_arm(name: str, network: str, args, cfg, data, *, peers: int, kill_one: bool = False) -> dict:
    """Train one arm; its measurements (one dict per surviving peer, and the arm's totals)."""
    from moe.parallel.ports import free_port
    from moe.swarm.dht import shutdown_dht, start_dht
    from moe.swarm.netem import LinkSpec, NetemProcess, peer_bytes
    from moe.swarm.records import record_validators

    spec_net = LinkSpec.parse(args.network) if network == "emulated" else LinkSpec()
    sync, _, comp = name.partition(" ")
    comp = comp or "none"
    net = NetemProcess()
    root = start_dht(record_validators=record_validators(cfg.moe.swarm.uid_prefix))
    procs: list[_Peer] = []
    ports: dict[str, tuple[int, int]] = {}
    t_start = time.monotonic()
    killed_at = None
    try:
        initial = [str(m) for m in root.get_visible_maddrs()]
        for i in range(peers):
            port = free_port()
            link = net.add_link(("127.0.0.1", port), dataclasses.replace(spec_net, seed=i))
            ports[f"peer{i}"] = (port, link)
            spec = dict(
                cfg=cfg,
                data=data,
                steps=args.steps,
                sync="diloco" if sync == "diloco" else "every-step",
                compression=comp,
                inner_steps=args.inner_steps,
                outer_lr=args.outer_lr,
                outer_momentum=args.outer_momentum,
                target_batch_size=(peers - (1 if kill_one else 0)) * cfg.batch_size,
                matchmaking_time=args.matchmaking_time,
                averaging_timeout=args.averaging_timeout,
                data_seed=1000 + i,
                initial_peers=initial,
                port=port,
                link=link,
                evaluate=i == 0,
            )
            procs.append(_Peer(spec))
        n_params = [p.recv(300)[1] for p in procs][0]
        for p in procs:
            p.conn.send("go")
        victim = procs[-1] if kill_one else None
        if victim is not None:  # SIGKILL it inside an averaging round (its flag is up during the round's last step)
            deadline = time.monotonic() + args.steps * 10
            while victim.flag.value == 0 and time.monotonic() < deadline:
                time.sleep(0.005)
            time.sleep(0.1)  # into the all-reduce itself
            victim.kill()
            killed_at = time.monotonic() - t_start
        survivors = [p for p in procs if p is not victim]
        results = [p.recv(args.steps * 30 + 600)[1] for p in survivors]
        wire = peer_bytes(net.stats(), ports)
    finally:
        for p in procs:
            p.stop()
        shutdown_dht(root)
        net.close()
    seq = cfg.model.seq_len
    rows = []
    for i, r in enumerate(results):
        tokens = r["samples"] * seq
        w = wire.get(f"peer{i}", {"sent": 0, "received": 0})
        rows.append(
            {
                "peer": i,
                "tokens": tokens,
                "tokens_per_s": tokens / r["seconds"],
                "tensor_bytes_sent_per_mtok": r["tensor_sent"] / tokens * 1e6,
                "wire_bytes_sent_per_mtok": w["sent"] / tokens * 1e6,
                "wire_bytes_received_per_mtok": w["received"] / tokens * 1e6,
                **{k: r[k] for k in ("seconds", "rounds", "rounds_joined", "val_loss", "local_steps")},
                "outcomes": sorted({h.get("outcome", "stepped") for h in r["history"]}),
            }
        )
    return {
        "arm": name + (f" (1 of {peers} peers killed)" if kill_one else ""),
        "sync": sync,
        "compression": comp,
        "network": network,
        "link": spec_net.describe(),
        "peers": peers,
        "params": n_params,
        "killed_at_s": killed_at,
        "wall_s": time.monotonic() - t_start,
        "tokens_per_s": statistics.mean(r["tokens_per_s"] for r in rows),
        "tensor_bytes_sent_per_mtok": statistics.mean(r["tensor_bytes_sent_per_mtok"] for r in rows),
        "wire_bytes_sent_per_mtok": statistics.mean(r["wire_bytes_sent_per_mtok"] for r in rows),
        "val_loss": rows[0]["val_loss"],
        "finished": all(r["local_steps"] >= args.steps for r in rows),
        "peers_rows": rows,
    }


def bench_train(args) -> dict:
    from moe.cli.config import compose
    from moe.training.data import load_data

    cfg = compose([*args.config, f"steps={args.steps}"], job_name="moe-bench")  # the LR schedule: the arm's steps
    data = load_data(cfg.data, progress=False)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=data.vocab_size))
    arms = []
    for network in args.networks:
        for name in args.arms:
            print(f"moe-bench swarm --train: {name} on {network}, {args.peers} peers x {args.steps} steps", flush=True)
            arms.append(run_arm(name, network, args, cfg, data, peers=args.peers))
            a = arms[-1]
            print(
                f"  {a['tokens_per_s']:,.0f} tokens/s a peer, {a['wire_bytes_sent_per_mtok'] / 1e6:,.2f} MB sent "
                f"a peer per M tokens, val loss {a['val_loss']:.4f}, {a['wall_s']:.0f} s",
                flush=True,
            )
    if args.kill:
        print(f"moe-bench swarm --train: diloco fp16 on emulated, {args.peers + 1} peers, one SIGKILLed", flush=True)
        arms.append(run_arm("diloco fp16", "emulated", args, cfg, data, peers=args.peers + 1, kill_one=True))
    return {
        "benchmark": "swarm-train",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "config": list(args.config),
        "steps": args.steps,
        "inner_steps": args.inner_steps,
        "outer_lr": args.outer_lr,
        "outer_momentum": args.outer_momentum,
        "peers": args.peers,
        "network": args.network,
        "tokens_per_peer": args.steps * cfg.batch_size * cfg.model.seq_len,
        "matchmaking_time": args.matchmaking_time,
        "machine": machine(),
        "arms": arms,
        "summary": summarize(arms),
    }


def summarize(arms: list[dict]) -> dict:
    """The issue's bars, from the arms measured side by side."""
    by = {(a["arm"], a["network"]): a for a in arms}
    out: dict = {}
    base = by.get(("every-step", "loopback"))
    for comp in ("fp16", "int8"):
        d = by.get((f"diloco {comp}", "loopback"))
        if base and d:
            out[f"bytes_every_step_over_diloco_{comp}"] = base["wire_bytes_sent_per_mtok"] / max(
                d["wire_bytes_sent_per_mtok"], 1
            )
            out[f"val_loss_gap_diloco_{comp}_pct"] = 100 * (d["val_loss"] - base["val_loss"]) / base["val_loss"]
        e = by.get((f"diloco {comp}", "emulated"))
        if d and e:
            out[f"diloco_{comp}_emulated_over_loopback_tokens_per_s"] = e["tokens_per_s"] / d["tokens_per_s"]
    killed = [a for a in arms if "killed" in a["arm"]]
    if killed:
        out["killed_run_finished"] = killed[0]["finished"]
        out["killed_run_wall_s"] = killed[0]["wall_s"]
    return out


def markdown_table(result: dict) -> str:
    lines = [
        "| arm | network | peers | tokens/s a peer | MB sent a peer per M tokens (wire) | (tensors) "
        "| val loss | rounds | all steps done |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for a in result["arms"]:
        rounds = statistics.mean(r["rounds"] for r in a["peers_rows"])
        lines.append(
            f"| {a['arm']} | {a['network']} ({a['link']}) | {a['peers']} | {a['tokens_per_s']:,.0f} | "
            f"{a['wire_bytes_sent_per_mtok'] / 1e6:,.2f} | {a['tensor_bytes_sent_per_mtok'] / 1e6:,.2f} | "
            f"{a['val_loss']:.4f} | {rounds:.0f} | {'yes' if a['finished'] else 'NO'} |"
        )
    s = result["summary"]
    if s:
        lines.append("")
        lines.extend(f"- {k}: {v:.3g}" if isinstance(v, float) else f"- {k}: {v}" for k, v in s.items())
    return "\n".join(lines)
