"""A collaborative trainer peer (DeDLOC): trains the run's model with other peers through
hivemind's ``Optimizer``, averaging gradients at every collaborative step (``moe-join --sync
every-step``; ``moe.swarm.diloco`` is the low-communication alternative).

The model is ``TransformerLM`` (``PeerModel``, shared with DiLoCo peers).  With
``moe=hivemind`` blocks the experts live on expert servers (``moe-join --serve``), which
update them themselves on every backward request; with any other layer they are local.
What a trainer peer holds locally is trained collaboratively: every peer accumulates
gradients on its own batches until the peers together have ``target_batch_size``
sequences, then they average the gradients (all-reduce through the DHT's matchmaking) and
take one optimizer step each: the *collaborative step* (hivemind's epoch,
``opt.local_epoch``).  Peers come and go: a peer that joins mid-run downloads the current
parameters, optimizer state and collaborative step from another peer (``load_state``), and
the others keep stepping when one leaves.

Learning rate: ``moe.training.optim.lr_at(collaborative step)``, through hivemind's scheduler hook (a
``LambdaLR`` hivemind steps once per collaborative step and re-aligns when state is loaded),
so every peer, late joiners included, is on the same point of the schedule.

Progress records (samples accumulated, collaborative step) are hivemind's, stored under
``<prefix>_collab_progress`` with one subkey per peer that names the peer's RSA key and
signed with it (``moe.swarm.records``): no other peer can overwrite or delete them.  The
averagers count the tensor bytes they send and receive (``moe.swarm.compression.Traffic``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from functools import partial
from pathlib import Path

import torch
from hivemind import DHT, Optimizer
from hivemind.averaging.control import AveragingStage
from hivemind.optim.grad_averager import GradientAverager
from hivemind.optim.state_averager import TrainingStateAverager
from hivemind.utils import get_dht_time

from moe.config import TrainConfig, validate
from moe.model.layers import LayerContext
from moe.model.transformer import TransformerLM
from moe.swarm.compression import PeerCompression, Traffic, counting
from moe.swarm.layer import SwarmConnection
from moe.swarm.records import collab_run_id, signing_key
from moe.training.data import TokenData, load_data
from moe.training.optim import lr_at
from moe.training.sinks import MetricsLogger


class PeerModel:
    """What every trainer peer holds, whatever its sync: the run's model (the same initial
    weights on every peer, from ``cfg.seed``), its tokens, and the expert-serving stats of a
    window of local steps.

    Any expert layer: with ``moe=hivemind`` the blocks call the swarm's experts through this
    peer's DHT (their servers train them), with any other layer every parameter is local and
    collaborative.
    """

    def __init__(self, cfg: TrainConfig, dht: DHT, data: TokenData | None = None):
        validate(cfg)
        self.cfg = cfg
        self.data = data if data is not None else load_data(cfg.data, progress=False)
        self.model_cfg = dataclasses.replace(cfg.model, vocab_size=cfg.model.vocab_size or self.data.vocab_size)
        torch.manual_seed(cfg.seed)  # the same initial weights on every peer of the run
        # the layers call experts through this peer's DHT (its owner stops it: no SwarmConnection.close here)
        runtime = SwarmConnection(dht) if cfg.moe.name == "hivemind" else None
        self.model = TransformerLM(self.model_cfg, cfg.moe, context=LayerContext(runtime=runtime))
        self.model.train()
        self._served: list[float] = []  # per local step and swarm block: fraction of tokens a live expert served
        self._failed: set[str] = set()  # expert uids that failed (forward or backward) in the window

    def observe(self, out) -> None:
        """Note which tokens the swarm's live experts served in this local step."""
        for la in out.layer_aux:
            if hasattr(la, "alive_TK"):  # SwarmAux: which tokens a live expert served, which experts failed
                self._served.append(float(la.alive_TK.any(dim=-1).float().mean()) if la.alive_TK.numel() else 0.0)
                self._failed.update(u for u in (*la.failed, *la.backward_failed) if not u.startswith("<"))

    def take_window(self) -> dict:
        """The window's expert stats (moe=hivemind only), and a fresh window."""
        rec = {}
        if self.cfg.moe.name == "hivemind":
            rec = {
                "moe/served_fraction": sum(self._served) / len(self._served) if self._served else 0.0,
                "moe/failed_experts": len(self._failed),
            }
        self._served.clear()
        self._failed.clear()
        return rec

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation LM loss over ``eval_batches`` fixed batches (the same on every peer)."""
        c = self.cfg
        self.model.eval()
        try:
            losses = [
                self.model(*self.data.get_batch("val", i, c.batch_size, self.model_cfg.seq_len, c.seed)).lm_loss.item()
                for i in range(c.eval_batches)
            ]
        finally:
            self.model.train()
        return sum(losses) / len(losses)


def leave_progress(dht: DHT, tracker, timeout: float) -> None:
    """Stop ``tracker``'s reports and say goodbye: this peer's progress record set to None
    (signed), waited for.  Best effort: the record expires after ``metadata_expiration`` anyway."""
    tracker.shutdown(timeout)
    try:
        subkey = b"[owner:" + signing_key(dht).get_public_key().to_bytes() + b"]"
        dht.store(
            tracker.training_progress_key,
            None,
            get_dht_time() + tracker.metadata_expiration,
            subkey=subkey,
            return_future=True,
        ).result(10)
    except Exception:
        pass


def peer_seed(dht: DHT) -> int:
    """A data seed of this peer's own, from its peer id: every peer reads other batches."""
    return int.from_bytes(hashlib.sha256(dht.peer_id.to_bytes()).digest()[:4], "big") & 0x7FFFFFFF


class CollabTrainer:
    """One trainer peer of a collaborative run.

    Args:
        cfg: the run's config: ``model``, ``moe`` (``moe=hivemind``: ``moe.swarm``'s grid, prefix, k_best, ...),
            ``optim`` (AdamW and the LR schedule; ``steps`` is the schedule's length in
            collaborative steps), ``data``, ``batch_size`` (sequences per local step),
            ``seed`` (the initial weights: the same on every peer), ``out_dir`` (this peer's
            ``metrics.jsonl``), ``logger``, ``eval_every``/``eval_batches`` (collaborative
            steps between validation losses; 0: none).
        dht: this peer's running DHT, started with ``record_validators(cfg.moe.swarm.uid_prefix)``
            (its key signs the progress records).
        target_batch_size: sequences all peers together accumulate per collaborative step.
        matchmaking_time: seconds a peer waits for others to join an averaging round (hivemind:
            3-5 for small local runs, 10-15 over the internet); each matchmaking request may
            take half of it (hivemind warns of rare deadlocks when a request outlasts it).
        averaging_timeout: seconds an averaging round may take before the peer goes on with
            its local gradients.
        load_state_timeout: seconds one attempt to download the state from a peer may take.
        average_state_every: also average the parameters every this many collaborative steps
            (in the background), so peers that missed a round drift back together.
        compression: what gradients and state are averaged in: none (fp32), fp16, int8.
        data_seed: seed of this peer's batches (default: ``peer_seed(dht)``).
        data: the tokens (default ``load_data(cfg.data)``).
        log: write ``metrics.jsonl`` (and W&B, per ``cfg.logger``) in ``cfg.out_dir``.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        dht: DHT,
        target_batch_size: int,
        matchmaking_time: float = 5.0,
        averaging_timeout: float = 30.0,
        load_state_timeout: float = 60.0,
        average_state_every: int = 1,
        compression: str = "none",
        data_seed: int | None = None,
        data: TokenData | None = None,
        log: bool = True,
    ):
        if target_batch_size < 1 or cfg.batch_size < 1:
            raise ValueError(f"target_batch_size={target_batch_size} and batch_size={cfg.batch_size} must be >= 1")
        if min(matchmaking_time, averaging_timeout, load_state_timeout) <= 0:
            raise ValueError("matchmaking_time, averaging_timeout and load_state_timeout must be > 0 seconds")
        self.cfg, self.dht = cfg, dht
        self.target_batch_size = target_batch_size
        self.pm = PeerModel(cfg, dht, data)
        self.model, self.data, self.model_cfg = self.pm.model, self.pm.data, self.pm.model_cfg
        self.data_seed = peer_seed(dht) if data_seed is None else data_seed
        self.traffic = Traffic()
        self.compression = PeerCompression(compression, traffic=self.traffic)
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        o = cfg.optim
        self.opt = _CountingOptimizer(
            self.traffic,
            dht=dht,
            run_id=collab_run_id(cfg.moe.swarm.uid_prefix),
            params=[{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            optimizer=partial(torch.optim.AdamW, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps),
            scheduler=partial(torch.optim.lr_scheduler.LambdaLR, lr_lambda=partial(_lr_factor, cfg=cfg)),
            target_batch_size=target_batch_size,
            batch_size_per_step=cfg.batch_size,
            matchmaking_time=matchmaking_time,
            averaging_timeout=averaging_timeout,
            load_state_timeout=load_state_timeout,
            average_state_every=average_state_every,
            grad_compression=self.compression,
            state_averaging_compression=self.compression,
            # both averagers (hivemind passes averager_opts to the state averager only)
            averager_opts=dict(request_timeout=min(3.0, matchmaking_time / 2)),
            grad_averager_factory=partial(
                counting(GradientAverager, self.traffic), request_timeout=min(3.0, matchmaking_time / 2)
            ),
            tracker_opts=dict(
                private_key=signing_key(dht), min_refresh_period=0.2, max_refresh_period=2.0, default_refresh_period=1.0
            ),
            verbose=False,
        )
        self.local_steps = 0  # local batches this peer trained on
        self.samples = 0  # sequences this peer contributed
        self.rounds_joined = 0  # collaborative steps this peer took part in
        self.last_outcome = "none yet"
        self._window: list[float] = []  # local losses since the last collaborative step
        self._last_epoch = self.opt.local_epoch
        self.history: list[dict] = []  # one record per collaborative step this peer took part in
        self.logger = None
        if log:
            run = dataclasses.asdict(cfg) | {
                "collab": {"target_batch_size": target_batch_size, "data_seed": self.data_seed}
            }
            self.logger = MetricsLogger(Path(cfg.out_dir), cfg.logger, run_config=run, run_name=cfg.run_name)
        self._closed = False
        self._left = False  # leave_rounds() done

    @property
    def collab_step(self) -> int:
        """The collaborative step (hivemind's epoch) this peer is on."""
        return self.opt.local_epoch

    @property
    def num_peers(self) -> int:
        """Trainer peers that reported progress recently (this one included)."""
        return self.opt.tracker.global_progress.num_peers

    @property
    def lr(self) -> float:
        return self.opt.opt.param_groups[0]["lr"]

    @property
    def sent_bytes(self) -> int:
        """Tensor bytes this peer sent: gradient and state averaging, state it shared."""
        return self.traffic.sent

    @property
    def received_bytes(self) -> int:
        return self.traffic.received

    def load_state(self) -> int:
        """Download the current state (parameters, optimizer, collaborative step) from a peer;
        the collaborative step after it (unchanged when no peer has state yet)."""
        self.opt.load_state_from_peers()
        self._last_epoch = self.opt.local_epoch
        self._window.clear()
        self.pm.take_window()
        return self.opt.local_epoch

    def train_step(self) -> dict | None:
        """One local batch: forward, backward, ``opt.step()`` (which averages and steps when
        the peers have the target batch).  Returns the record logged when this call finished
        a collaborative step, else None."""
        if self._left:
            raise RuntimeError("this peer left the rounds (leave_rounds()): a new trainer joins the run again")
        c = self.cfg
        x, y = self.data.get_batch("train", self.local_steps, c.batch_size, self.model_cfg.seq_len, self.data_seed)
        out = self.model(x, y)
        out.total_loss(c.moe).backward()
        if c.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.optim.grad_clip)
        loss = out.lm_loss.item()
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"training diverged on this peer: lm loss {loss} at collaborative step "
                f"{self.collab_step}; lower optim.lr"
            )
        self._window.append(loss)
        self.pm.observe(out)
        self.opt.step()
        self.opt.zero_grad()
        self.local_steps += 1
        self.samples += c.batch_size
        if self.opt.local_epoch == self._last_epoch:
            return None
        record = {
            "train/loss": sum(self._window) / len(self._window),
            "train/lr": self.lr,
            "collab/peers": self.num_peers,
            "collab/local_steps": self.local_steps,
            "collab/samples": self.samples,
            "collab/sent_bytes": self.sent_bytes,
            "collab/received_bytes": self.received_bytes,
            **self.pm.take_window(),
        }
        self._window.clear()
        self.rounds_joined += 1
        self.last_outcome = f"stepped with the swarm ({self.num_peers} trainer peers)"
        self._last_epoch = step = self.opt.local_epoch
        if c.eval_every and step % c.eval_every == 0:
            record["val/loss"] = self.evaluate()
        self.history.append({"step": step, **record})
        if self.logger is not None:
            self.logger.log(step, record)
        return {"step": step, **record}

    def evaluate(self) -> float:
        """Mean validation LM loss over ``eval_batches`` fixed batches (the same on every peer)."""
        return self.pm.evaluate()

    def params_vector(self) -> torch.Tensor:
        """Every local parameter, flattened (for comparing peers)."""
        return torch.cat([p.detach().reshape(-1) for p in self.model.parameters()])

    def leave_rounds(self) -> None:
        """Take part in no more collaborative steps: say goodbye in the progress records, so
        the others stop counting on this peer (hivemind counts a silent peer until its record
        expires, and waits for it in every averaging round until then).  Its averagers stay up:
        a peer that joins later can still download the state from it.  Idempotent."""
        if self._left:
            return
        self._left = True
        leave_progress(self.dht, self.opt.tracker, self.opt.shutdown_timeout)
        # the rounds hivemind booked ahead: cancelled while still matchmaking, else joined with
        # weight 0 (as its Optimizer.shutdown does), so no group waits for this peer
        for name in ("scheduled_grads", "scheduled_state"):
            scheduled = getattr(self.opt, name, None)
            if scheduled is not None and not scheduled.done():
                if scheduled.stage == AveragingStage.LOOKING_FOR_GROUP:
                    scheduled.cancel()
                else:
                    self.opt._tag_along_with_zero_weight(scheduled)
            setattr(self.opt, name, None)

    def shutdown(self) -> None:
        """Leave the run: say goodbye in the progress records, stop the averagers.  The DHT
        stays up (its owner stops it).  Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            # hivemind's shutdown sends the goodbye (this peer's progress record set to None)
            # without waiting for it, then stops the averagers, whose exit can make that last
            # DHT command fail; so stop the reports and say goodbye here, and wait for it
            self.leave_rounds()
            self.opt.shutdown()
        finally:
            if self.logger is not None:
                self.logger.close()

    def __enter__(self) -> CollabTrainer:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


class _CountingOptimizer(Optimizer):
    """hivemind's ``Optimizer`` whose state averager counts its traffic (the gradient
    averager's factory does the same for gradients)."""

    def __init__(self, traffic: Traffic, *args, **kwargs):
        self._traffic = traffic
        super().__init__(*args, **kwargs)

    def _make_state_averager(self, **kwargs):
        return counting(TrainingStateAverager, self._traffic)(
            dht=self.dht,
            prefix=f"{self.run_id}_state_averager",
            min_matchmaking_time=self.matchmaking_time,
            allreduce_timeout=self.allreduce_timeout,
            shutdown_timeout=self.shutdown_timeout,
            offload_optimizer=self.offload_optimizer,
            custom_gradients=self.offload_optimizer,
            status_loglevel=self.status_loglevel,
            next_chunk_timeout=self.next_chunk_timeout,
            client_mode=self.client_mode,
            auxiliary=self.auxiliary,
            start=True,
            **kwargs,
        )


def _lr_factor(epoch: int, cfg: TrainConfig) -> float:
    """``LambdaLR``'s multiplier of ``optim.lr`` at collaborative step ``epoch``."""
    return lr_at(epoch, cfg) / cfg.optim.lr
