"""Multi-process training: the trainer on 2 (and 4) real gloo processes equals one process.

Every worker runs the real :class:`moe.training.loop.Trainer` with a :class:`ParallelState` (one torch
thread per process, 127.0.0.1); the one-process references run in the test process.  What
"equal" means, per case (tolerance: fp32, ``rtol = atol = 1e-5`` on losses, gradient norms and
every parameter after 3 steps; the 2 processes and the reference sum the same numbers in
different orders, nothing more):

- **DP=2, batch b per rank == one process, batch 2b** (dense; switch dropless without
  balancing loss): the two ranks' shards of a step are the two halves of the one process's
  batch (``TokenData.get_batch(..., shard, num_shards)``).  A router's balancing loss and its
  capacity are computed over a rank's own tokens (as in DeepSpeed), so with those on, the
  equal one-process run is
- **DP=2 == one process with batch b and grad_accum=2**: micro-batch m of the one process is
  rank m's shard; switch with capacity (tokens dropped), balancing loss, z-loss.  The logged
  expert load (summed over the ranks) equals the one process's (summed over micro-batches).
- **EP=2 (world 2: 2 data-parallel ranks whose experts are split in two)** against the same
  two references (dropless switch and BASE, whose balanced assignment spans both ranks'
  tokens, against batch 2b; switch with capacity and aux loss against b x grad_accum 2), with
  clipping active (``grad_clip`` far below the norm): the global gradient norm counts every
  expert once, so the norms and the clipped updates agree.  Start-up weights are identical:
  non-expert weights on every rank, each expert shard a slice of the one-process init.
- **Checkpoints** written at EP=2 load at EP=1 (one process, batch 2b) and at EP=4 (4
  processes, slow): the next steps' losses and the final weights match the EP=2 run's own
  continuation, which needs the AdamW moments of every expert.
- ``torchrun`` end to end with the command in conf/parallel/ddp.yaml; Ctrl-C on one rank
  stops both at the same step; a dead or hung peer ends a collective within
  ``parallel.timeout_s``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import multiprocessing
import os
import queue
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch

from moe.config import ConfigError, ParallelConfig, to_dict
from moe.parallel import ParallelState
from moe.parallel.ddp import DDPBackend
from moe.parallel.ports import free_port
from moe.training import checkpoint as ckpt
from moe.training.loop import Trainer, check_resumable
from tests.conftest import SMOKE_OVERRIDES, launch_env, rank_trainer, tiny_config
from tests.test_expert_parallel import WorkerPair

TOL = dict(rtol=1e-5, atol=1e-5)
B = 4  # sequences per rank


def _cfg(
    out_dir,
    moe: str,
    *,
    ep: int = 1,
    world: int = 1,
    steps: int = 3,
    batch_size: int = B,
    grad_accum: int = 1,
    **moe_over,
):
    """tiny_config, RNG-free routing unless asked (no jitter, no random routing: a rank's draws
    are its own), ``parallel=ddp`` when ``world`` > 1."""
    c = tiny_config(out_dir, moe, steps=steps, batch_size=batch_size, grad_accum=grad_accum)
    moe_cfg = dataclasses.replace(c.moe, **{"jitter_eps": 0.0, "random_routing": False, **moe_over})
    par = ParallelConfig(backend="ddp", ep_size=ep) if world > 1 else ParallelConfig()
    return dataclasses.replace(c, moe=moe_cfg, parallel=par, optim=dataclasses.replace(c.optim, warmup_steps=1))


def _clipped(cfg, clip: float = 0.05):
    return dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, grad_clip=clip))


# ---------------------------------------------------------------------------------------------
# run inside the workers


def case_fit(rank, states, *, cfg, data, stop_after=None):
    """Build a Trainer on this rank, train; rank 0 returns history, start-up and final state."""
    t = rank_trainer(cfg, data, states[cfg.parallel.ep_size])
    init = t.backend.state_dict()  # collective: every rank gathers
    init = {k: v.clone() for k, v in init["model"].items()} if rank == 0 else None  # (may share the live weights)
    res = t.fit(stop_after=stop_after)
    final = t.backend.state_dict()
    if rank != 0:
        return None
    return {
        "history": res.history,
        "init": init,
        "model": final["model"],
        "optimizer": final["optimizer"],
        "step": res.step,
    }


def case_global_grad_norm(rank, states, *, cfg, data):
    """Every gradient set to 1: the global norm is sqrt(parameters of the whole model), each
    expert counted once, on every rank, whatever it holds."""
    from moe.parallel import clip_grad_norm_

    t = rank_trainer(cfg, data, states[cfg.parallel.ep_size])
    for p in t.model.parameters():
        p.grad = torch.ones_like(p)
    norm = clip_grad_norm_(t.model, float("inf"), t.backend.state).item()
    return norm, t.params["total"], sum(p.numel() for p in t.model.parameters())


def fit_with_ctrl_c_on_rank_1(trainer_cls, make, rank):
    """Patch ``trainer_cls.train_step`` so that rank 1 alone gets SIGINT after step 2, build the
    trainer with ``make()``, fit it; ("interrupted" | "finished", the step it stopped at)."""
    real = trainer_cls.train_step

    def step(self, *args):
        out = real(self, *args)
        if rank == 1 and self.step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    trainer_cls.train_step = step
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        t = make()
        try:
            t.fit()
        except KeyboardInterrupt:
            return ("interrupted", t.step)
        return ("finished", t.step)
    finally:
        trainer_cls.train_step = real
        signal.signal(signal.SIGINT, previous)


def case_ctrl_c_on_one_rank(rank, states, *, cfg, data):
    """Rank 1 alone gets Ctrl-C after step 2: both ranks stop (and checkpoint) at step 3."""
    return fit_with_ctrl_c_on_rank_1(Trainer, lambda: rank_trainer(cfg, data, states[cfg.parallel.ep_size]), rank)


def case_nan_on_one_rank(rank, states, *, cfg, data):
    """Rank 1's loss alone turns NaN at step 2: every rank stops there, before stepping."""
    from moe.model.transformer import ModelOutput
    from moe.training.loop import TrainingDiverged

    t = rank_trainer(cfg, data, states[cfg.parallel.ep_size])
    real = t.backend.forward

    def poisoned(split, index, *args):
        out = real(split, index, *args)
        if rank == 1 and split == "train" and t.step == 1:
            return ModelOutput(out.logits, out.lm_loss * float("nan"), out.aux_loss, out.z_loss, out.layer_aux)
        return out

    t.backend.forward = poisoned
    try:
        t.fit()
    except TrainingDiverged as e:  # (step, message, weights untouched by the NaN)
        return (
            "diverged",
            t.step,
            "diverged at step 2" in str(e),
            all(bool(torch.isfinite(v).all()) for v in t.model.state_dict().values()),
        )
    return ("finished", t.step, False, False)


# ---------------------------------------------------------------------------------------------
# helpers in the test process


def _reference(cfg, data, stop_after=None):
    t = Trainer(cfg, data=data)
    init = {k: v.clone() for k, v in t.model.state_dict().items()}
    res = t.fit(stop_after=stop_after)
    return {
        "history": res.history,
        "init": init,
        "model": t.model.state_dict(),
        "optimizer": t.backend.optimizer.state_dict(),
        "step": res.step,
    }


def _assert_states_close(got: dict, want: dict, **tol):
    assert set(got) == set(want)
    for k in want:
        assert got[k].shape == want[k].shape, k
        torch.testing.assert_close(got[k], want[k], **(tol or TOL), msg=lambda m: f"{k}: {m}")


ALL_LOSSES = ("train/loss", "train/aux_loss", "train/z_loss", "train/grad_norm")
NO_AUX = ("train/loss", "train/z_loss", "train/grad_norm")  # the logged balancing loss is per rank (weight 0 here)


def _assert_same_run(par: dict, ref: dict, *, keys=ALL_LOSSES):
    assert par["step"] == ref["step"]
    assert len(par["history"]) == len(ref["history"])
    for hp, hr in zip(par["history"], ref["history"]):
        for k in keys:
            assert hp[k] == pytest.approx(hr[k], **{"rel": TOL["rtol"], "abs": TOL["atol"]}), (
                hp["step"],
                k,
                hp[k],
                hr[k],
            )
    _assert_states_close(par["model"], ref["model"])


def _metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# data parallel


@pytest.mark.parametrize("moe", ["dense", "switch"])
def test_dp2_equals_one_process_with_the_double_batch(pair, tmp_path, tiny_data, moe):
    over = {} if moe == "dense" else {"dropless": True, "aux_loss_weight": 0.0, "z_loss_weight": 0.001}
    par = pair.run(case_fit, cfg=_cfg(tmp_path / "dp", moe, world=2, **over), data=tiny_data)[0]
    ref = _reference(_cfg(tmp_path / "ref", moe, batch_size=2 * B, **over), tiny_data)
    _assert_states_close(par["init"], ref["init"], rtol=0, atol=0)  # the same weights at start-up
    _assert_same_run(par, ref, keys=NO_AUX)
    # only rank 0 wrote: one record per step, one checkpoint
    rows = [r for r in _metrics(tmp_path / "dp" / "metrics.jsonl") if "train/loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[-1]["perf/comm_time_s"] > 0  # the gradient all-reduce took some time
    assert (tmp_path / "dp" / "checkpoint.pt").exists() and not list((tmp_path / "dp").glob(".*tmp*"))


def test_dp2_equals_one_process_with_grad_accum_aux_loss_and_capacity(pair, tmp_path, tiny_data):
    """Capacity (tokens dropped) and the balancing loss are per rank: micro-batch m == rank m."""
    over = {"capacity_factor": 0.75, "min_capacity": 0, "aux_loss_weight": 0.1, "z_loss_weight": 0.001}
    par = pair.run(case_fit, cfg=_cfg(tmp_path / "dp", "switch", world=2, **over), data=tiny_data)[0]
    ref = _reference(_cfg(tmp_path / "ref", "switch", grad_accum=2, **over), tiny_data)
    _assert_same_run(par, ref)
    got, want = ([r for r in _metrics(tmp_path / d / "metrics.jsonl") if "train/loss" in r] for d in ("dp", "ref"))
    load_keys = [k for k in want[0] if k.startswith("moe/layer_")]
    assert len(got) == len(want) == 3 and len(load_keys) == 2 * (7 + 4)
    assert all(w["moe/layer_0/dropped_frac"] > 0 for w in want)  # capacity did drop tokens
    for g, w in zip(got, want):
        for k in load_keys:  # the global expert load: summed over ranks == over micro-batches
            assert g[k] == pytest.approx(w[k], rel=1e-6, abs=1e-9), k


# ---------------------------------------------------------------------------------------------
# expert parallel (world 2 = 2 data-parallel ranks, experts split over both)


@pytest.mark.parametrize("moe", ["switch", "base"])
def test_ep2_equals_one_process_with_the_double_batch_and_clipping(pair, tmp_path, tiny_data, moe):
    over = {"dropless": True, "aux_loss_weight": 0.0} if moe == "switch" else {}
    par = pair.run(case_fit, cfg=_clipped(_cfg(tmp_path / "ep", moe, ep=2, world=2, **over)), data=tiny_data)[0]
    ref = _reference(_clipped(_cfg(tmp_path / "ref", moe, batch_size=2 * B, **over)), tiny_data)
    _assert_states_close(par["init"], ref["init"], rtol=0, atol=0)  # shards of the one-process init
    assert all(h["train/grad_norm"] > 0.05 * 4 for h in ref["history"])  # clipping active every step
    _assert_same_run(par, ref, keys=NO_AUX)
    for i, s in ref["optimizer"]["state"].items():  # AdamW moments of every expert gathered in order
        for name in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(par["optimizer"]["state"][i][name], s[name], **TOL)


def test_ep2_equals_one_process_with_grad_accum_aux_loss_and_capacity(pair, tmp_path, tiny_data):
    over = {"capacity_factor": 0.75, "min_capacity": 0, "aux_loss_weight": 0.1}
    par = pair.run(case_fit, cfg=_clipped(_cfg(tmp_path / "ep", "gshard", ep=2, world=2, **over)), data=tiny_data)[0]
    ref = _reference(_clipped(_cfg(tmp_path / "ref", "gshard", grad_accum=2, **over)), tiny_data)
    _assert_same_run(par, ref)


def case_overlap(rank, states, *, cfg, data, steps):
    """The trainer's steps with its bucketed reducer; returns (buckets per kind, buckets sent
    during the last backward, the rank-0 state) - or, with bucket_mb=0, the one-shot path."""
    t = rank_trainer(cfg, data, states[cfg.parallel.ep_size])
    from moe.training.telemetry import LoadAccumulator

    sent = []
    for _ in range(steps):
        t.train_step(LoadAccumulator())
        sent.append(t.backend.reducer.launched_in_backward if t.backend.reducer is not None else 0)
    buckets = [len(k[2]) for k in t.backend.reducer.kinds] if t.backend.reducer is not None else []
    sd = t.backend.state_dict()
    return (buckets, sent, sd["model"] if rank == 0 else None)


@pytest.mark.parametrize("ep", [1, 2])
def test_gradient_buckets_sent_during_the_backward_equal_one_all_reduce_after_it(pair, tmp_path, tiny_data, ep):
    """Tiny buckets (one parameter or so each), sent from the gradient hooks while the backward
    runs, give the same step as the one all-reduce after it (bucket_mb=0), with grad_accum 2
    (only the last backward sends) and clipping."""
    base = _clipped(
        _cfg(
            tmp_path / "o",
            "switch",
            ep=ep,
            world=2,
            grad_accum=2,
            capacity_factor=0.75,
            min_capacity=0,
            aux_loss_weight=0.1,
        )
    )
    tiny = dataclasses.replace(base, parallel=dataclasses.replace(base.parallel, bucket_mb=0.01))
    off = dataclasses.replace(base, parallel=dataclasses.replace(base.parallel, bucket_mb=0))
    (buckets, sent, got), _ = pair.run(case_overlap, cfg=tiny, data=tiny_data, steps=3)
    (_, _, want), _ = pair.run(case_overlap, cfg=off, data=tiny_data, steps=3)
    assert buckets[0] >= 5  # shared parameters: several small buckets
    assert all(n > 0 for n in sent)  # some went out before the backward ended, every step
    _assert_states_close(got, want, rtol=0, atol=0)  # the same sums: bit-identical


def test_global_grad_norm_counts_every_expert_once(pair, tmp_path, tiny_data):
    cfg = _cfg(tmp_path, "switch", ep=2, world=2)
    for norm, total, local in pair.run(case_global_grad_norm, cfg=cfg, data=tiny_data):
        assert local < total  # each rank holds half of the experts ...
        assert norm == pytest.approx(math.sqrt(total), rel=1e-6)  # ... the norm is the whole model's


# ---------------------------------------------------------------------------------------------
# checkpoints across expert-parallel sizes


def _ep2_checkpoint(pair, tmp_path, data):
    """EP=2 for 3 steps (checkpoint), then on to step 5: the continuation every reshard must match."""
    cfg = _cfg(tmp_path / "ep2", "switch", ep=2, world=2, steps=5, dropless=True, aux_loss_weight=0.0)
    pair.run(case_fit, cfg=cfg, data=data, stop_after=3)
    saved = tmp_path / "at_step_3.pt"
    shutil.copy(tmp_path / "ep2" / "checkpoint.pt", saved)
    cont = pair.run(case_fit, cfg=cfg, data=data)[0]  # resumes its own checkpoint
    assert cont["step"] == 5 and [h["step"] for h in cont["history"]] == [4, 5]
    return saved, cont


def test_ep2_checkpoint_loads_at_ep1_with_optimizer_state(pair, tmp_path, tiny_data):
    saved, cont = _ep2_checkpoint(pair, tmp_path, tiny_data)
    state = ckpt.load(saved)
    assert state["layout"] == {"world_size": 2, "dp_size": 2, "ep_size": 2}
    assert state["model"]["blocks.0.ffn.experts.w1_EDF"].shape[0] == 4  # every expert, the one-process format
    (tmp_path / "ep1").mkdir()
    shutil.copy(saved, tmp_path / "ep1" / "checkpoint.pt")
    cfg = _cfg(tmp_path / "ep1", "switch", steps=5, batch_size=2 * B, dropless=True, aux_loss_weight=0.0)
    t = Trainer(cfg, data=tiny_data)
    t.backend.restore(ckpt.load(saved))  # weights and AdamW moments exactly the file's
    _assert_states_close(t.model.state_dict(), state["model"], rtol=0, atol=0)
    for i, s in state["optimizer"]["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(t.backend.optimizer.state_dict()["state"][i][name], s[name])
    t = Trainer(cfg, data=tiny_data)
    res = t.fit()  # resumes at step 3 and trains steps 4 and 5 as one process
    _assert_same_run({"history": res.history, "model": t.model.state_dict(), "step": res.step}, cont, keys=NO_AUX)


@pytest.mark.slow
def test_ep2_checkpoint_loads_at_ep4_on_four_processes(pair, tmp_path, tiny_data):
    saved, cont = _ep2_checkpoint(pair, tmp_path, tiny_data)
    (tmp_path / "ep4").mkdir()
    shutil.copy(saved, tmp_path / "ep4" / "checkpoint.pt")
    cfg = _cfg(
        tmp_path / "ep4", "switch", ep=4, world=4, steps=5, batch_size=B // 2, dropless=True, aux_loss_weight=0.0
    )
    four = WorkerPair(world=4)
    try:
        got = four.run(case_fit, cfg=cfg, data=tiny_data)[0]
    finally:
        four.stop()
    _assert_same_run(got, cont, keys=NO_AUX)
    for i, s in cont["optimizer"]["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(got["optimizer"]["state"][i][name], s[name], **TOL)


# ---------------------------------------------------------------------------------------------
# stopping together


def test_ctrl_c_on_one_rank_stops_every_rank_at_the_same_step(pair, tmp_path, tiny_data):
    cfg = _cfg(tmp_path, "switch", ep=2, world=2, steps=8)
    assert pair.run(case_ctrl_c_on_one_rank, cfg=cfg, data=tiny_data) == [("interrupted", 3), ("interrupted", 3)]
    assert ckpt.load(tmp_path / "checkpoint.pt")["step"] == 3


def test_nan_on_one_rank_stops_every_rank_before_the_step(pair, tmp_path, tiny_data):
    got = pair.run(case_nan_on_one_rank, cfg=_cfg(tmp_path, "switch", ep=2, world=2, steps=5), data=tiny_data)
    assert got == [("diverged", 1, True, True), ("diverged", 1, True, True)]


def test_ep2_resume_is_bit_exact_with_each_ranks_rng(pair, tmp_path, tiny_data):
    """GShard's random routing and dropout draw from each rank's own RNG stream; the checkpoint
    keeps every rank's, so 3 steps + resume + 3 steps == 6 steps, bit for bit."""

    def cfg(d):
        c = _cfg(d, "gshard", ep=2, world=2, steps=6, random_routing=True, expert_dropout=0.1)
        return dataclasses.replace(c, model=dataclasses.replace(c.model, dropout=0.1))

    straight = pair.run(case_fit, cfg=cfg(tmp_path / "a"), data=tiny_data)[0]
    first = pair.run(case_fit, cfg=cfg(tmp_path / "b"), data=tiny_data, stop_after=3)[0]
    assert len(ckpt.load(tmp_path / "b" / "checkpoint.pt")["rng_ranks"]) == 2
    resumed = pair.run(case_fit, cfg=cfg(tmp_path / "b"), data=tiny_data)[0]
    losses = [h["train/loss"] for h in first["history"] + resumed["history"]]
    assert losses == [h["train/loss"] for h in straight["history"]]  # exact, not approx
    assert all(torch.equal(straight["model"][k], resumed["model"][k]) for k in straight["model"])


def _peer(rank: int, port: int, behaviour: str, results) -> None:
    """One rank of a 2-process ddp group (torchrun's environment set by hand, 3 s timeout):
    rank 0 all-reduces; rank 1 exits or sleeps instead."""
    os.environ.update(
        RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    from moe.parallel import ddp

    try:
        state = ddp.start(ParallelConfig(backend="ddp", timeout_s=3.0), device="cpu")
        results.put((rank, "started", 0.0))
        if rank == 1:
            if behaviour == "hang":
                time.sleep(60)
            os._exit(1)  # a crash: no goodbye
        time.sleep(0.5)
        t0 = time.perf_counter()
        try:
            import torch.distributed as dist

            dist.all_reduce(torch.ones(1), group=state.dp_group)
            results.put((rank, "no error", time.perf_counter() - t0))
        except Exception as e:  # noqa: BLE001 - what a collective raises when the peer is gone
            results.put((rank, type(e).__name__, time.perf_counter() - t0))
        del state  # so stop() frees its groups
        ddp.stop()
    except BaseException:
        results.put((rank, traceback.format_exc(), 0.0))


@contextlib.contextmanager
def _two_ranks(target, *args):
    """Spawn ``target(rank, port, *args, results)`` as ranks 0 and 1 (a fresh port); yields the
    results queue.  On leaving, rank 0 gets 30 s to exit and whatever still runs is killed."""
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=target, args=(r, port, *args, results), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    try:
        yield results
    finally:
        procs[0].join(timeout=30)
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=10)


@pytest.mark.parametrize("behaviour", ["crash", "hang"])
def test_a_dead_or_hung_peer_ends_the_collective_within_the_timeout(behaviour):
    with _two_ranks(_peer, behaviour) as results:  # the hung rank 1 is still asleep at the end: killed
        got = {}
        deadline = time.monotonic() + 120
        while 0 not in got or got[0][0] == "started":
            try:
                rank, what, dt = results.get(timeout=max(1.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"no answer within 120 s: {got}")
            if rank == 0:
                got[0] = (what, dt)
        what, dt = got[0]
        assert what not in ("no error",) and "Traceback" not in what, what
        assert dt < 30, f"the survivor waited {dt:.0f} s"


def _gloo_threads() -> list[str]:
    """The names of this process's gloo threads (Linux: /proc), one worker loop per group and more."""
    return sorted(n for n in (p.read_text().strip() for p in Path("/proc/self/task").glob("*/comm")) if "gloo" in n)


def _rank_of_a_cli_run(rank: int, port: int, cfg, results) -> None:
    """One rank of ``moe-train parallel=<ddp|deepspeed>`` as the entry point runs it (torchrun's
    environment set by hand): train, then report the gloo threads still alive."""
    os.environ.update(
        RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    try:
        import gc

        from moe.cli.train import train_in_process_group

        gc.disable()  # only what the entry point frees counts, not a collection that happens to run
        train_in_process_group(cfg)
        left = _gloo_threads()
        # the names are torch's: a live group of one shows them (so an empty list means something)
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
        dist.all_reduce(torch.ones(1))
        deadline = time.monotonic() + 10  # a thread names itself once it runs
        while not (live := len(_gloo_threads())) and time.monotonic() < deadline:
            time.sleep(0.05)
        dist.destroy_process_group()
        results.put((rank, (left, live > 0)))
    except BaseException:
        results.put((rank, traceback.format_exc()))


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads through Linux's /proc")
@pytest.mark.parametrize(
    "backend, ep, pp",
    [
        ("ddp", 2, 1),
        pytest.param("deepspeed", 2, 1, marks=pytest.mark.slow),
        pytest.param("deepspeed", 1, 2, marks=pytest.mark.slow, id="deepspeed-pipeline"),
    ],
)
def test_a_finished_rank_frees_every_process_group_before_exit(tmp_path, backend, ep, pp):
    """Every group the run made (world, expert, data; DeepSpeed's expert groups and its
    pipeline grid) is destroyed before the interpreter exits.  A group still alive then keeps
    gloo worker threads that may release a collective's tensors after Python is gone, aborting
    a finished rank ('terminate called without an active exception'); torchrun then held the
    other node at its exit barrier for 300 s."""
    if backend == "deepspeed":
        pytest.importorskip("deepspeed")
    cfg = _cfg(tmp_path / "run", "switch", ep=ep, world=2, steps=2)
    cfg = dataclasses.replace(
        cfg,
        parallel=dataclasses.replace(cfg.parallel, backend=backend, pp_size=pp),
        ckpt_every=1,
        data=dataclasses.replace(cfg.data, cache_dir=str(tmp_path / "cache")),
    )
    with _two_ranks(_rank_of_a_cli_run, cfg) as results:
        got = {}
        for _ in range(2):
            try:
                rank, value = results.get(timeout=240)
            except queue.Empty:
                pytest.fail(f"no answer within 240 s: {got}")
            got[rank] = value
        assert got == {0: ([], True), 1: ([], True)}, got
        rows = _metrics(Path(cfg.out_dir) / "metrics.jsonl")
        assert [r["step"] for r in rows if "train/loss" in r] == [1, 2]  # it did train, through the collectives


# ---------------------------------------------------------------------------------------------
# no processes


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_ddp_start_on_a_gpu_device_reaches_torch():
    """``device=cuda:N`` selects the GPU before joining the group.  On a CPU-only build torch
    itself refuses; a NameError from start() (a function-level import once made ``torch``
    local there) would mean the GPU path breaks before it begins."""
    from moe.parallel import ddp

    with pytest.raises(Exception) as info:
        ddp.start(ParallelConfig(backend="ddp"), device="cuda:0")
    assert not isinstance(info.value, NameError), info.value


def test_resuming_at_another_layout_needs_the_same_global_batch(tmp_path):
    """parallel.* may change on resume; batch_size and grad_accum only as far as the global
    batch (batch_size x grad_accum x data-parallel ranks) stays the same."""
    saved = to_dict(_cfg(tmp_path, "switch", ep=2, world=2, batch_size=4))
    check_resumable(saved, to_dict(_cfg(tmp_path, "switch", batch_size=8)), tmp_path, saved_dp_size=2, dp_size=1)
    check_resumable(
        saved, to_dict(_cfg(tmp_path, "switch", batch_size=2, grad_accum=2)), tmp_path, saved_dp_size=2, dp_size=2
    )
    check_resumable(
        saved, to_dict(_cfg(tmp_path, "switch", ep=4, world=4, batch_size=2)), tmp_path, saved_dp_size=2, dp_size=4
    )
    with pytest.raises(
        ConfigError, match=r"global batch \(batch_size x grad_accum x data-parallel ranks\): 4x1x2=8 -> 4x1x1=4"
    ) as e:
        check_resumable(saved, to_dict(_cfg(tmp_path, "switch", batch_size=4)), tmp_path, saved_dp_size=2, dp_size=1)
    assert "\n" not in str(e.value)


def test_trainer_refuses_a_state_of_another_ep_size(tmp_path, tiny_data):
    with pytest.raises(ConfigError, match=r"parallel\.ep_size=2 but the process groups were built with ep_size=1"):
        DDPBackend(_cfg(tmp_path, "switch", ep=2, world=2), ParallelState.single(), data=tiny_data)


# ---------------------------------------------------------------------------------------------
# torchrun, the real command


def _launch_command() -> list[str]:
    from tests.conftest import conf_command

    return conf_command("parallel/ddp.yaml", "torchrun --nproc_per_node")


def test_torchrun_end_to_end(tmp_path):
    cmd = _launch_command()
    assert cmd[:4] == ["torchrun", "--nproc_per_node", "2", "--no-python"] and "parallel=ddp" in cmd
    bin_dir = str(Path(sys.executable).parent)
    torchrun = shutil.which("torchrun", path=bin_dir)
    assert torchrun, "torchrun not installed next to the interpreter"
    args = [torchrun, "--nnodes", "1", "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *cmd[1:]]
    args += [
        *SMOKE_OVERRIDES,
    ]
    env = launch_env(tmp_path, bin_dir)
    p = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    run = tmp_path / "runs" / "smoke-switch"
    rows = _metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4]  # once each: rank 0 alone writes
    assert [r["step"] for r in rows if "val/loss" in r] == [2, 4]
    assert len([r for r in rows if r.get("type") == "summary"]) == 1
    assert rows[0]["params/expert"] == 4 * 2 * 2 * 64 * 128  # the whole model's experts, not one shard
    assert sorted(f.name for f in run.iterdir() if "checkpoint" in f.name) == ["checkpoint.pt"]
    state = ckpt.load(run / "checkpoint.pt")
    assert (
        state["step"] == 4
        and state["layout"]["ep_size"] == 2
        and state["model"]["blocks.0.ffn.experts.w1_EDF"].shape[0] == 4
    )
    assert p.stdout.count("done: 4 steps") == 1  # one summary: rank 1 prints nothing
    assert p.stderr.count("run directory:") == 1
    assert "Traceback" not in p.stderr
