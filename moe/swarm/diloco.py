"""A low-communication trainer peer (DiLoCo, Douillard et al. 2023): H local AdamW steps, then
the peers present average their parameter change and take one outer Nesterov step.

Each peer holds the run's *global* parameters theta (the same on every peer, up to the
rounding of a compressed average) and a local copy it trains.  One *round*:

1. ``inner_steps`` (H) AdamW steps on this peer's own batches, from theta;
2. the pseudo-gradient delta = theta - local parameters, averaged over the peers present
   (hivemind's ``DecentralizedAverager``: matchmaking through the DHT, a butterfly
   all-reduce, each peer weighted by the sequences it trained this round), sent in fp32, fp16
   or 8 bits (:mod:`moe.swarm.compression`; 8 bits optionally with error feedback);
3. the outer step: SGD with Nesterov momentum on theta with the averaged delta as its
   gradient (DiLoCo's outer lr 0.7, momentum 0.9); the local parameters restart from theta.
   The inner AdamW keeps its state across rounds, as in the paper.

A peer talks to the others once per H steps, not once per step: H times fewer rounds, each
as large as one of every-step averaging (``moe.swarm.collab``), and smaller again by the
compression.

Peers come and go:

- **join**: a new peer downloads theta, the outer momentum, the inner AdamW state and the
  round from the peer furthest ahead (``load_state``), then trains only the inner steps the
  others have left in this round (from the progress records), so it reaches the next
  averaging with them;
- **straggle or die**: an averaging round waits ``matchmaking_time`` for group mates and
  ``averaging_timeout`` for the all-reduce; a peer that did not make it finds the others a
  round ahead in the progress records, drops its late round and downloads theta again;
  a peer that dies in the middle of an all-reduce costs its mates at most the timeout;
- **incomplete averaging**: hivemind's all-reduce fills the parts a mate failed to return
  with the peer's own delta (or breaks off midway, some parts averaged in); such a peer
  never applies its result (its theta would differ from the others' for good): it downloads
  the state of a mate that finished the round, or, when none did, starts the round over
  from the round's theta;
- **alone**: a peer with no live mate applies its own delta: the run advances with one peer.
  Peers that all missed each other in a round do not each do so: the first by peer id goes
  on, the others wait a little, find it ahead and download its state.

Progress records (round, sequences trained this round) are hivemind's ``ProgressTracker``'s
under ``<prefix>_diloco_progress``, one subkey per peer, signed with the peer's RSA key
(``moe.swarm.records``).  A DiLoCo run and an every-step run of the same prefix do not
see each other's records; ``moe-join`` refuses to mix them.

The LR schedule (``moe.training.optim.lr_at``) runs over inner steps: round r's i-th inner
step is step ``r * H + i`` of ``cfg.steps``.
"""

from __future__ import annotations

import ctypes
import dataclasses
import math
import multiprocessing as mp
import threading
import time
from pathlib import Path

import torch
from hivemind import DHT
from hivemind.averaging import DecentralizedAverager
from hivemind.optim.progress_tracker import LocalTrainingProgress, ProgressTracker
from hivemind.utils import MPFuture

from moe.config import TrainConfig
from moe.swarm.collab import PeerModel, leave_progress, peer_seed
from moe.swarm.compression import PeerCompression, Traffic, counting
from moe.swarm.records import diloco_run_id, signing_key
from moe.training.data import TokenData
from moe.training.optim import lr_at
from moe.training.sinks import MetricsLogger


@dataclasses.dataclass(frozen=True)
class DiLoCoOptions:
    """How a DiLoCo peer syncs (``moe-join --sync diloco``'s flags).

    Attributes:
        inner_steps: H, local AdamW steps per round.
        outer_lr, outer_momentum: the outer SGD's learning rate and Nesterov momentum.
        compression: what the averaged delta is sent as: none (fp32), fp16, int8.
        error_feedback: with int8, carry each round's quantisation error into the next.
        matchmaking_time: seconds a peer waits for others to join an averaging round.
        averaging_timeout: seconds the all-reduce may take once the group is formed.
        load_state_timeout: seconds one download of the state may take.
    """

    inner_steps: int = 50
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    compression: str = "fp16"
    error_feedback: bool = True
    matchmaking_time: float = 5.0
    averaging_timeout: float = 60.0
    load_state_timeout: float = 60.0

    def check(self) -> None:
        if self.inner_steps < 1:
            raise ValueError(f"inner_steps={self.inner_steps}: a round needs at least one local step")
        if not (self.outer_lr > 0 and 0 <= self.outer_momentum < 1):
            raise ValueError(f"outer_lr={self.outer_lr} must be > 0 and outer_momentum={self.outer_momentum} in [0, 1)")
        if min(self.matchmaking_time, self.averaging_timeout, self.load_state_timeout) <= 0:
            raise ValueError("matchmaking_time, averaging_timeout and load_state_timeout must be > 0 seconds")
        PeerCompression(self.compression)  # names a codec


class _Averager(DecentralizedAverager):
    """hivemind's averager whose shared state is the trainer's (round, theta, momentum, AdamW),
    and which says how much of the group's result its last ``step`` put in the tensors
    (``received``)."""

    def __init__(self, *args, state_fn, **kwargs):
        self._state_fn = state_fn
        # shared with the averager's process (forked below): 1.0 while a step has not touched the
        # tensors or returned the whole of the group's result; less when it returned part of it
        # (hivemind puts this peer's own values where a mate's reply is missing, and only logs
        # "received N% results"); 0.0 when an all-reduce failed midway (or was cut by the
        # timeout), and for the rest of a step that retried after that
        self.received = mp.Value(ctypes.c_double, 1.0)
        super().__init__(*args, **kwargs)

    def step(self, *args, **kwargs):
        self.received.value = 1.0
        return super().step(*args, **kwargs)

    async def _run_allreduce_inplace_(self, tensors, group_info, group_id=None, **kwargs):  # averager's process
        untouched = self.received.value == 1.0  # not by an earlier, failed attempt of this step
        self.received.value = 0.0
        await super()._run_allreduce_inplace_(tensors, group_info, group_id=group_id, **kwargs)
        runner = self._running_groups[group_info.group_id if group_id is None else group_id].result()
        parts = runner.tensor_part_container
        if untouched:
            self.received.value = 1.0 - parts.failed_size / max(1, parts.total_size)

    def get_current_state(self):
        return self._state_fn()

    def prepare_round(self, round_: int, size: int) -> None:
        """Look for group mates of round ``round_`` only (its number in the group key: a peer a
        round late never averages its stale update into the others'), and close matchmaking
        as soon as ``size`` peers are in (the peers known to be in this round) instead of
        always waiting ``min_matchmaking_time``."""
        future = MPFuture()
        self._outer_pipe.send(("_prepare_round", [], dict(bits=format(round_ % 256, "08b"), size=size, future=future)))
        future.result(10)

    async def _prepare_round(self, bits: str, size: int, future: MPFuture) -> None:  # in the averager's process
        self._matchmaking.group_key_manager.group_bits = bits
        self._matchmaking.target_group_size = size
        self._matchmaking.potential_leaders.target_group_size = size
        future.set_result(None)


def _moment(sent: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A downloaded optimizer moment as ``like``'s dtype (sent as bf16 bits in int16)."""
    return (sent.view(torch.bfloat16) if sent.dtype == torch.int16 else sent).to(like.dtype, copy=True)


class DiLoCoTrainer:
    """One low-communication trainer peer of a collaborative run.

    Args:
        cfg: the run's config, as for :class:`moe.swarm.collab.CollabTrainer` (any expert
            layer: ``moe=hivemind``'s experts stay on their servers, everything else is
            averaged); ``steps`` is the LR schedule's length in inner steps.
        dht: this peer's running DHT, started with ``record_validators(prefix)``.
        options: the sync's settings (:class:`DiLoCoOptions`).
        data_seed, data, log: as for ``CollabTrainer``.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        dht: DHT,
        options: DiLoCoOptions = DiLoCoOptions(),
        data_seed: int | None = None,
        data: TokenData | None = None,
        log: bool = True,
    ):
        options.check()
        self.cfg, self.dht, self.options = cfg, dht, options
        self.pm = PeerModel(cfg, dht, data)
        self.model, self.data, self.model_cfg = self.pm.model, self.pm.data, self.pm.model_cfg
        self.data_seed = peer_seed(dht) if data_seed is None else data_seed
        params = list(self.model.parameters())
        o = cfg.optim
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        self.inner = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=o.lr,
            betas=(o.beta1, o.beta2),
            eps=o.eps,
        )
        self.theta = [p.detach().clone() for p in params]  # the run's global parameters
        self.outer = torch.optim.SGD(
            self.theta, lr=options.outer_lr, momentum=options.outer_momentum, nesterov=options.outer_momentum > 0
        )
        self.delta = [torch.zeros_like(p) for p in params]  # averaged in place (shared with the averager)
        self.round = 0
        self.inner_done = 0  # inner steps of this round
        self.round_samples = 0
        self.local_steps = 0  # every inner step this peer trained
        self.samples = 0
        self.rounds_joined = 0  # rounds averaged with at least one other peer
        self.last_outcome = "none yet"
        self.behind: str | None = None  # why this peer cannot catch up with the run (its last download's news)
        self.traffic = Traffic()
        self.compression = PeerCompression(options.compression, traffic=self.traffic)
        ef = options.error_feedback and options.compression == "int8"
        self.residual = [torch.zeros_like(p) for p in params] if ef else None
        self._state_lock = threading.Lock()
        self._shared = self._snapshot()
        run_id = diloco_run_id(cfg.moe.swarm.uid_prefix)
        self.averager = counting(_Averager, self.traffic)(
            self.delta,
            dht,
            start=True,
            prefix=f"{run_id}_averager",
            min_group_size=2,
            min_matchmaking_time=options.matchmaking_time,
            request_timeout=min(3.0, options.matchmaking_time / 2),
            allreduce_timeout=options.averaging_timeout,
            next_chunk_timeout=options.averaging_timeout / 2,
            compression=self.compression,
            state_compression=PeerCompression("none", traffic=self.traffic),
            declare_state_period=max(1.0, options.matchmaking_time),
            state_fn=self._shared_state,
        )
        self.tracker = ProgressTracker(
            dht,
            run_id,
            target_batch_size=options.inner_steps * cfg.batch_size,
            private_key=signing_key(dht),
            min_refresh_period=0.2,
            max_refresh_period=2.0,
            default_refresh_period=1.0,
            start=True,
        )
        self._window: list[float] = []
        self.history: list[dict] = []
        self.on_phase = None  # called with "averaging" as a round's averaging starts, "training" after it
        self.logger = None
        if log:
            run = dataclasses.asdict(cfg) | {
                "collab": {"sync": "diloco", **dataclasses.asdict(options), "data_seed": self.data_seed}
            }
            self.logger = MetricsLogger(Path(cfg.out_dir), cfg.logger, run_config=run, run_name=cfg.run_name)
        self._closed = False

    # what CollabTrainer offers too (moe-join and the benchmark drive either)
    @property
    def collab_step(self) -> int:
        """The round this peer is in (rounds finished by the run)."""
        return self.round

    @property
    def num_peers(self) -> int:
        return max(1, self.tracker.global_progress.num_peers)

    @property
    def sent_bytes(self) -> int:
        """Tensor bytes this peer sent: averaging rounds and the state it shared."""
        return self.traffic.sent

    @property
    def received_bytes(self) -> int:
        return self.traffic.received

    @property
    def lr(self) -> float:
        return self.inner.param_groups[0]["lr"]

    # ---- state shared with joiners
    def _snapshot(self):
        """(metadata, tensors) of the state at the start of this round."""
        moms = [self.outer.state.get(t, {}).get("momentum_buffer") for t in self.theta]
        moms = [torch.zeros_like(t) if m is None else m for m, t in zip(moms, self.theta)]
        adam = []
        steps = 0
        for p in self.model.parameters():
            st = self.inner.state.get(p, {})
            steps = int(st["step"]) if "step" in st else steps
            adam += [st.get("exp_avg", torch.zeros_like(p)), st.get("exp_avg_sq", torch.zeros_like(p))]
        meta = {"round": self.round, "inner_step": steps, "samples": self.samples}
        # theta exact; the moments (running averages, noisy anyway) in bf16, its bits sent as int16
        # (hivemind's wire format widens bf16 to fp32 by default): 10 bytes a parameter, not 16
        moments = [m.detach().to(torch.bfloat16).view(torch.int16) for m in (*moms, *adam)]
        return meta, [t.detach().clone() for t in self.theta] + moments

    def _shared_state(self):
        with self._state_lock:
            meta, tensors = self._shared
        return meta, tensors, None

    def _publish(self) -> None:
        """Share this round's starting state; peers further ahead are downloaded from first."""
        snap = self._snapshot()
        with self._state_lock:
            self._shared = snap
        self.averager.state_sharing_priority = float(self.round)

    def load_state(self, ahead: bool = False) -> int:
        """Download the state from the peer furthest ahead, line up with the others' progress
        in this round; the round after it (unchanged when no peer has state to share; with
        ``ahead``, when none further on than this peer has).  ``behind`` says afterwards why
        this peer cannot catch up, if it cannot."""
        self.behind = None
        if self.round == 0 and all(r.epoch == 0 for r in self._others()):
            # nobody has finished a round: their state is the run's seed's, as this peer's (the
            # run's trainers all have the same seed: moe-join checks it) -- nothing to download
            self.inner_done = self._others_progress()
            self._report()
            return self.round
        t0 = time.monotonic()
        deadline = t0 + self.options.load_state_timeout
        while True:
            try:
                got = self.averager.load_state_from_peers(timeout=max(1.0, deadline - time.monotonic()))
            except TimeoutError:
                got = None
            if got is not None and ahead and int(got[0].get("round", -1)) <= self.round:
                got = None  # a peer of this round whose new priority is not declared yet: not the one
            # the others' offers to share (hivemind's ``all_averagers`` records) can be missing for
            # a moment: a peer just started, an offer expiring before its renewal arrives; while
            # their progress says they have state, ask again
            if got is not None or time.monotonic() + 1.0 > deadline:
                break
            if not self._ahead():
                break
            time.sleep(1.0)
        took = time.monotonic() - t0
        if got is None:
            self._report()
            return self.round
        meta, tensors = got
        if int(meta.get("round", -1)) < self.round:  # a peer behind this one: nothing to learn from it
            return self.round
        n = len(self.theta)
        params = list(self.model.parameters())
        if len(tensors) != 4 * n or any(t.shape != p.shape for t, p in zip(tensors, self.theta)):
            raise RuntimeError(
                "the state downloaded from a peer does not fit this model: its run has another model "
                "shape; use the run's config overrides"
            )
        with torch.no_grad():
            for i, (t, p) in enumerate(zip(self.theta, params)):
                t.copy_(tensors[i])
                p.copy_(tensors[i])
                self.outer.state[t] = {"momentum_buffer": _moment(tensors[n + i], t)}
                if meta["inner_step"] > 0:
                    self.inner.state[p] = {
                        "step": torch.tensor(float(meta["inner_step"])),
                        "exp_avg": _moment(tensors[2 * n + 2 * i], p),
                        "exp_avg_sq": _moment(tensors[2 * n + 2 * i + 1], p),
                    }
        self.round = int(meta["round"])
        self.inner_done = self._others_progress()
        self.round_samples = 0
        self._window.clear()
        self._publish()
        self._report()
        self.behind = self._behind(took)
        return self.round

    def _behind(self, took: float) -> str | None:
        """Why this peer cannot catch up, when the run moved on while it downloaded a state and
        the download outlasts a round (the next download would be as late); else None."""
        others = self._others()
        moved = max((r.epoch for r in others), default=self.round) - self.round
        if moved <= 0:
            return None
        if moved == 1:  # a round ended during the download: a slow link, or an unlucky moment?
            rates = [r.samples_per_second for r in others if r.samples_per_second > 0]
            if not rates:  # no peer's speed known yet: no ground to say this peer cannot catch up
                return None
            training = self.options.inner_steps * self.cfg.batch_size * len(rates) / sum(rates)
            if took < training:  # shorter than a round's training alone: the next download catches up
                return None
        with self._state_lock:
            size = sum(t.numel() * t.element_size() for t in self._shared[1])  # theta, momentum, AdamW's moments
        return (
            f"the run moved {moved} round{'s' if moved > 1 else ''} on during this peer's {took:.0f} s download "
            f"of its state ({size / 1e6:.1f} MB): a round takes ~{took / moved:.0f} s there; while a download "
            "outlasts a round this peer cannot catch up: the run needs longer rounds (a larger --inner-steps for "
            "all its trainers) or this peer a faster link to them"
        )

    def _others(self) -> list[LocalTrainingProgress]:
        """The other trainer peers' progress records, read from the DHT now (the tracker's
        own view is refreshed every few seconds, and a round can be shorter)."""
        got = self.dht.get(self.tracker.training_progress_key, latest=True)
        me = self.dht.peer_id.to_bytes()
        out = []
        if got is not None and isinstance(got.value, dict):
            for v in got.value.values():
                if v.value is None:  # a peer that said goodbye
                    continue
                try:
                    rec = LocalTrainingProgress.parse_obj(v.value)
                except Exception:
                    continue
                if rec.peer_id != me and not rec.client_mode:
                    out.append(rec)
        return out

    def _ahead(self, wait: float = 0.0) -> bool:
        """Whether another peer is a round ahead of this one by the progress records; waits up
        to ``wait`` seconds for one."""
        deadline = time.monotonic() + wait
        while not any(r.epoch > self.round for r in self._others()):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.5)
        return True

    def _others_progress(self) -> int:
        """Inner steps the other peers have done in this round (0 if none are in it)."""
        now = [r.samples_accumulated for r in self._others() if r.epoch == self.round]
        if not now:
            return 0
        per_peer = sum(now) / len(now) / self.cfg.batch_size
        return min(self.options.inner_steps - 1, int(per_peer))

    def _report(self) -> None:
        self.tracker.report_local_progress(self.round, self.round_samples)

    # ---- training
    def train_step(self) -> dict | None:
        """One inner step; at the round's last, the averaging and the outer step.  Returns the
        record logged when this call finished a round, else None."""
        c = self.cfg
        if self.tracker.global_epoch > self.round:  # the others finished this round without us
            record = self._resync("the others finished the round first")
            if record is not None:
                return record
        for g in self.inner.param_groups:
            g["lr"] = lr_at(self.round * self.options.inner_steps + self.inner_done, c)
        x, y = self.data.get_batch("train", self.local_steps, c.batch_size, self.model_cfg.seq_len, self.data_seed)
        out = self.model(x, y)
        out.total_loss(c.moe).backward()
        if c.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.optim.grad_clip)
        loss = out.lm_loss.item()
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"training diverged on this peer: lm loss {loss} in round {self.round}; lower optim.lr"
            )
        self.pm.observe(out)
        self.inner.step()
        self.inner.zero_grad(set_to_none=True)
        self._window.append(loss)
        self.local_steps += 1
        self.inner_done += 1
        self.samples += c.batch_size
        self.round_samples += c.batch_size
        self._report()
        if self.inner_done < self.options.inner_steps:
            return None
        return self._end_round()

    def _end_round(self) -> dict:
        params = list(self.model.parameters())
        t0 = time.monotonic()
        residual = [r.clone() for r in self.residual] if self.residual is not None else None  # if the round is redone
        with self.averager.get_tensors() as delta, torch.no_grad():
            for i, (d, t, p) in enumerate(zip(delta, self.theta, params)):
                d.copy_(t - p)
                self.compression.round_trip_(d, self.residual[i] if self.residual is not None else None)
        group = 1
        outcome = "alone"
        others = self._others()
        if any(r.epoch > self.round for r in others) and (record := self._resync("the others were a round ahead")):
            return record
        # mates: peers in this round, or a round behind as far as their records say (a record
        # is published a moment after its peer moves on; a peer really behind resyncs itself)
        mates = sum(r.epoch >= self.round - 1 for r in others)
        if mates:
            self.averager.prepare_round(self.round, mates + 1)
            mm = self.options.matchmaking_time
            if self.on_phase is not None:
                self.on_phase("averaging")
            try:
                gathered = self.averager.step(
                    gather={"round": self.round}, weight=float(self.round_samples), timeout=2 * mm + 5
                )
            except Exception:
                gathered = None
            finally:
                if self.on_phase is not None:
                    self.on_phase("training")
            if gathered:
                rounds = [v.get("round") if isinstance(v, dict) else None for v in gathered.values()]
                ahead = [r for r in rounds if isinstance(r, int) and r > self.round]
                if ahead:  # mates a round ahead: the run moved on without this peer
                    record = self._resync(f"grouped with peers on rounds {sorted(set(map(str, rounds)))}")
                    if record is not None:
                        return record
            if (received := self.averager.received.value) < 1.0:
                why = f"{received:.0%} of the group's result arrived" if gathered else "its all-reduce failed midway"
                return self._incomplete(why, len(gathered) if gathered else 1, residual, t0)
            if gathered:
                group = len(gathered)
                outcome = f"averaged with {group - 1} peer{'s' if group > 2 else ''}"
                self.rounds_joined += 1
            elif record := self._alone():
                return record
            else:
                outcome = "alone (no peer joined the averaging)"
        with self.averager.get_tensors() as delta, torch.no_grad():
            for d, t in zip(delta, self.theta):
                t.grad = d.clone()
        self.outer.step()
        with torch.no_grad():
            for t, p in zip(self.theta, params):
                t.grad = None
                p.copy_(t)
        return self._finish_round(outcome, group, time.monotonic() - t0)

    def _alone(self) -> dict | None:
        """No group formed: go on alone, unless the round's other peers went on first (then take
        their state).  Peers that missed each other in one round must not each apply their own
        change (their theta would part for good); they fail at about the same moment (the same
        timeout), so each waits ``rank`` x a few seconds first, ranked by peer id among the
        round's peers: the first goes on, the others find it ahead and take its state."""
        me = self.dht.peer_id.to_bytes()
        rank = sorted([r.peer_id for r in self._others() if r.epoch == self.round] + [me]).index(me)
        if self._ahead(wait=rank * max(3.0, self.options.matchmaking_time)):
            return self._resync("missed the averaging")
        return None

    def _incomplete(self, detail: str, group: int, residual, t0: float) -> dict:
        """This peer's averaging put only part of the group's result in its delta (hivemind
        filled the rest with this peer's own, or the all-reduce broke off): applied, it would
        leave theta apart from the others' for good.  Take the run's state from a group mate
        that finished the round (it is done within the all-reduce's chunk timeout); if none
        did, start the round over from its theta (untouched), as the other incomplete peers do."""
        why = f"its averaging was incomplete ({detail})"
        if self._ahead(wait=self.options.averaging_timeout / 2 + 5.0) and (record := self._resync(why)):
            return record
        with torch.no_grad():
            for t, p in zip(self.theta, self.model.parameters()):
                p.copy_(t)
            for r, before in zip(self.residual or [], residual or []):
                r.copy_(before)  # the round's quantisation error was never applied
        self.inner_done = 0
        outcome = f"round {self.round} started over: {why} and no group mate finished it"
        return self._finish_round(outcome, group, time.monotonic() - t0, advance=False)

    def _resync(self, why: str) -> dict | None:
        """Drop this late round and download the run's state; the record, or None when no peer
        has state to share (this peer then goes on with its own round)."""
        before = self.round
        self.load_state(ahead=True)
        if self.round == before:
            return None
        return self._finish_round(
            f"resynced: {why}" + (f"; {self.behind}" if self.behind else ""), 0, 0.0, advance=False
        )

    def _finish_round(self, outcome: str, group: int, seconds: float, advance: bool = True) -> dict:
        if advance:
            self.round += 1
            self.inner_done = 0
        self.round_samples = 0
        self.last_outcome = outcome
        self._publish()
        with self.tracker.pause_updates():
            self.tracker.update_epoch(self.round)
        record = {
            "train/loss": sum(self._window) / len(self._window) if self._window else float("nan"),
            "train/lr": self.lr,
            "collab/peers": self.num_peers,
            "collab/group": group,
            "collab/local_steps": self.local_steps,
            "collab/samples": self.samples,
            "collab/sent_bytes": self.sent_bytes,
            "collab/received_bytes": self.received_bytes,
            "collab/averaging_s": seconds,
            **self.pm.take_window(),
        }
        self._window.clear()
        c = self.cfg
        if advance and c.eval_every and self.round % c.eval_every == 0:
            record["val/loss"] = self.evaluate()
        full = {"step": self.round, "outcome": outcome, **record}
        self.history.append(full)
        if self.logger is not None:
            self.logger.log(self.round, record)
        return full

    def evaluate(self) -> float:
        return self.pm.evaluate()

    def params_vector(self) -> torch.Tensor:
        """The run's global parameters theta on this peer, flattened."""
        return torch.cat([t.reshape(-1) for t in self.theta])

    def shutdown(self) -> None:
        """Leave: say goodbye in the progress records, stop the averager (the DHT stays up)."""
        if self._closed:
            return
        self._closed = True
        try:
            leave_progress(self.dht, self.tracker, 5.0)
            self.averager.shutdown()
        finally:
            if self.logger is not None:
                self.logger.close()

    def __enter__(self) -> DiLoCoTrainer:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
