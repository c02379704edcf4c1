"""Shared fixtures: a small token corpus built once per test session, and tiny run configs."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import time
import warnings
from pathlib import Path

import pytest

from moe.config import DataConfig, LoggerConfig, ModelConfig, MoEConfig, OptimConfig, TrainConfig
from moe.training.data import load_data

# Every process this test run starts inherits the mark (a launch's environment is a copy of
# this one), so the guard below finds it even once its parent is gone and init adopted it.
_RUN_MARK = "MOE_TEST_RUN"
os.environ[_RUN_MARK] = f"{os.getpid()}"


@pytest.fixture(scope="module", autouse=True)
def no_process_outlives_its_module(request):
    """Every process a test module started (forked peers, servers, DHTs, p2p daemons, launched
    ranks) is gone once the module's fixtures are torn down.  One that is not is SIGKILLed with
    everything under it and named in a warning: a leak must not slow down, or break, the modules
    after it (a module whose peers kept training could turn every later network test into a
    timeout)."""
    try:
        import psutil
    except ImportError:
        yield
        return
    before = {p.pid for p in _started_by_this_run(psutil)}
    yield
    deadline = time.monotonic() + 5  # a child that is shutting down gets a few seconds
    while (left := [p for p in _started_by_this_run(psutil) if p.pid not in before]) and time.monotonic() < deadline:
        time.sleep(0.2)
    names = []
    for proc in left:
        try:
            name = " ".join(proc.cmdline())[:160]
        except psutil.Error:
            name = "?"
        try:
            proc.send_signal(signal.SIGKILL)
            names.append(f"{proc.pid} {name}")
        except psutil.Error:
            pass
    # dead or a zombie within 10 s (not reaped here: a child's owner, e.g. its
    # multiprocessing.Process, still waits for it and must see its exit)
    deadline = time.monotonic() + 10
    while any(_running(psutil, p) for p in left) and time.monotonic() < deadline:
        time.sleep(0.1)
    if names:
        message = f"{request.module.__name__} left {len(names)} process(es) running, now killed: " + "; ".join(names)
        _say_now(request.config, message)
        warnings.warn(message, stacklevel=1)


def _running(psutil, proc) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _say_now(config, line: str) -> None:
    """A line on the terminal at once, between the progress dots (a run cut off by its time
    limit prints no summary)."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is None:
        return
    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        if getattr(getattr(reporter, "_tw", None), "width_of_current_line", 0):
            reporter.write("\n")
        reporter.write_line(line)


def pytest_runtest_logreport(report) -> None:
    """Each failure named as it happens, with its error and how long it took."""
    if report.failed:
        crash = getattr(report.longrepr, "reprcrash", None)
        why = crash.message.splitlines()[0][:300] if crash is not None and crash.message else ""
        _say_now(_config, f"{report.when} FAILED {report.nodeid} after {report.duration:.0f} s: {why}")


_config = None


def pytest_configure(config) -> None:
    global _config
    _config = config


# Helpers a process starts once and keeps for its lifetime: not a module's leak.
_LIFELONG = ("torch_shm_manager", "multiprocessing.resource_tracker", "multiprocessing.forkserver", "wandb-core")


def _started_by_this_run(psutil) -> list:
    """The live processes under this one or carrying this run's mark (a forked child shows its
    parent's environment as exec'd, without the mark, but stays under this process while its
    own parent lives), helpers kept for life aside."""
    me, mark = psutil.Process(), os.environ[_RUN_MARK]
    under = {p.pid for p in me.children(recursive=True)}
    out = []
    for proc in psutil.process_iter():
        try:
            if proc.pid == me.pid or proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if proc.pid not in under and proc.environ().get(_RUN_MARK) != mark:
                continue
            if not any(h in " ".join(proc.cmdline()) for h in _LIFELONG):
                out.append(proc)
        except psutil.Error:
            pass
    return out


@pytest.fixture(scope="module")
def pair():
    """Two spawned gloo ranks for a test module's cases (tests.test_expert_parallel.WorkerPair)."""
    from tests.test_expert_parallel import WorkerPair

    w = WorkerPair()
    yield w
    w.stop()


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """40 standard-library files, byte-level tokens: builds in about a second."""
    cfg = DataConfig(tokenizer="byte", max_files=40, cache_dir=str(tmp_path_factory.mktemp("cache")))
    return load_data(cfg, progress=False)


def tiny_config(out_dir, moe: str = "switch", **overrides) -> TrainConfig:
    """A 2-block model (both blocks MoE) that takes ~0.05 s a step on a CPU."""
    moe_cfg = {
        "dense": MoEConfig(name="dense", num_experts=1, aux_loss_weight=0.0, dropless=True),
        "switch": MoEConfig(name="switch", num_experts=4, top_k=1, capacity_factor=1.25, jitter_eps=0.01),
        "gshard": MoEConfig(name="gshard", num_experts=4, top_k=2, random_routing=True),
        "topk": MoEConfig(name="topk", num_experts=4, top_k=2, dropless=True, z_loss_weight=0.001),
        "base": MoEConfig(name="base", num_experts=4, top_k=1, dropless=True, aux_loss_weight=0.0),
        # 8 fine-grained experts of d_ff/2 (2 per token) + 1 shared, sigmoid, loss-free bias, grouped
        "deepseek": MoEConfig(
            name="deepseek",
            num_experts=4,
            top_k=1,
            granularity=2,
            num_shared_experts=1,
            score_func="sigmoid",
            bias_update_rate=0.01,
            aux_loss_type="sequence",
            aux_loss_weight=0.001,
            dropless=True,
            n_groups=2,
            topk_groups=1,
        ),
    }[moe]
    cfg = TrainConfig(
        model=ModelConfig(n_layers=2, d_model=64, n_heads=4, d_ff=128, seq_len=64, moe_every=1),
        moe=moe_cfg,
        data=DataConfig(tokenizer="byte", max_files=40),
        optim=OptimConfig(lr=3e-3, warmup_steps=5),
        logger=LoggerConfig(wandb=False, wandb_mode="disabled", progress=False, console=False, log_every=1),
        out_dir=str(out_dir),
        steps=30,
        batch_size=8,
        eval_every=0,
        eval_batches=2,
        ckpt_every=0,
        peak_flops=1e11,  # skip the start-up matmul benchmark in tests
        threads=0,
    )
    return dataclasses.replace(cfg, **overrides)


# What a launch test adds to the command a doc shows: 4 steps of 4 experts, evaluated and
# checkpointed at steps 2 and 4, logged every step, 10 files read, W&B off.
SMOKE_OVERRIDES = [
    "moe.num_experts=4",
    "steps=4",
    "optim.warmup_steps=1",
    "eval_every=2",
    "ckpt_every=2",
    "eval_batches=1",
    "logger.log_every=1",
    "logger.wandb=false",
    "peak_flops=1e11",
    "data.max_files=10",
]
_OUTER_LAUNCH = (
    "HYDRA_FULL_ERROR",
    "WORLD_SIZE",
    "RANK",
    "LOCAL_RANK",
    "NODE_RANK",
    "NNODES",
    "MASTER_ADDR",
    "MASTER_PORT",
    "NPROC_PER_NODE",
    "RAY_ADDRESS",
)


def launch_env(tmp_path: Path, bin_dir, **extra: str) -> dict[str, str]:
    """The environment for a launch a test starts: none of an outer launch's variables
    (torchrun's, DeepSpeed's, Ray's), ``bin_dir`` first on PATH, caches in ``tmp_path``, W&B off."""
    env = {k: v for k, v in os.environ.items() if k not in _OUTER_LAUNCH}
    env.update(
        PATH=str(bin_dir) + os.pathsep + env.get("PATH", ""),
        XDG_CACHE_HOME=str(tmp_path / "cache"),
        WANDB_MODE="disabled",
    )
    env.update(extra)
    return env


def conf_command(config: str, starts_with: str) -> list[str]:
    """The command a conf/ file's comment shows (the first comment line starting with
    ``starts_with``), split into words as written: tests run what the docs say."""
    text = (Path(__file__).resolve().parent.parent / "moe" / "conf" / config).read_text()
    line = next(ln for ln in text.splitlines() if ln.lstrip("# ").startswith(starts_with))
    return line.lstrip("# ").split()


def rank_trainer(cfg: TrainConfig, data, state):
    """A Trainer for one rank of a launched run, with the backend ``moe-train`` would build for
    ``parallel.backend`` (``moe.parallel.launch``)."""
    from moe.parallel.launch import launcher
    from moe.training.loop import Trainer

    return Trainer(cfg, backend=launcher(cfg.parallel.backend).backend(cfg, state, data))
