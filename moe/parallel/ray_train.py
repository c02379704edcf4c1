"""The ``ray`` backend: ``moe-train`` is Ray's driver; Ray Train's ``TorchTrainer`` runs
``parallel.num_workers`` ranks, each the same loop (:class:`moe.training.loop.Trainer`) with the
same :class:`~moe.parallel.ddp.DDPBackend` as under torchrun.

    moe-train parallel=ray parallel.num_workers=2 parallel.ep_size=2 experiment=smoke

- **Where.**  ``parallel.ray_address=local`` starts a private Ray on this machine, bound to
  127.0.0.1 (no dashboard, a small object store) and shuts it down at the end;
  ``auto`` / ``ray://HEAD:10001`` / ``HEAD:6379`` join a running cluster (``ray start``) and
  leave it running.  A Ray already initialised in this process (``ray.is_initialized()``) is
  used as it is and left running.
- **Ranks.**  Ray Train initialises ``torch.distributed`` in every worker (gloo on CPU, NCCL
  with ``parallel.use_gpu=true``); each worker builds its :class:`ParallelState` from it,
  reads the data and trains.  Rank 0 alone logs and writes ``out_dir`` (metrics.jsonl,
  checkpoint.pt), as under torchrun.  On CPU each worker runs ``cpus_per_worker`` torch
  threads (unless ``threads=`` is set).
- **Reports.**  One ``ray.train.report`` per logged step, on every worker (Ray's report is a
  barrier: all must call it equally often): the step's train metrics (``train/loss``,
  ``perf/tokens_per_s``, ...), ``val/loss`` when it evaluated, and ``step``.  A step's
  metrics are held until the step is over (the next step logs, or a checkpoint is written, or
  the run ends), so that a step evaluated and checkpointed is still one report: the one that
  carries the checkpoint, which rank 0 attaches (a directory holding a hard link to
  ``checkpoint.pt``; Ray copies it to ``out_dir/ray/train/checkpoint_*``, keeping the latest)
  and the other ranks report ``None`` for.  So Ray's ``Result.metrics`` are the last step's
  (train and val), ``Result.checkpoint`` the final checkpoint.
- **Result.**  Rank 0 returns its :class:`RunResult`; Ray hands it to the driver
  (``Result.return_value``) and ``fit_on_ray`` returns it.
- **Errors.**  A worker's ``ConfigError`` or ``TrainingDiverged`` (raised on every rank
  together) is re-raised in the driver as itself, so ``moe-train`` prints its one line; other
  worker exceptions are re-raised as the lowest rank's original exception, caused by Ray's
  error (whose message holds the workers' tracebacks).  Config and
  resource problems are found before Ray starts (or, on a cluster, before any worker starts).
- **Resume.**  Each rank resumes from ``out_dir/checkpoint.pt`` (``resume=true``), as under
  torchrun: on a cluster ``out_dir`` must be on a filesystem every node sees, given as an
  absolute path.  Ray's copy under ``out_dir/ray`` is for Ray's tools
  (``ray.train.Result.from_path``); ``resume=false`` clears it with the run.

Only this module imports ``ray``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from moe.config import ConfigError, ParallelConfig, TrainConfig, validate, validate_launch
from moe.parallel.ddp import DDPBackend
from moe.parallel.state import ParallelState
from moe.training.checkpoint import CheckpointError
from moe.training.data import load_data
from moe.training.loop import Trainer, TrainerHooks, TrainingDiverged
from moe.training.report import RunResult

RAY_DIR = "ray"  # Ray Train's storage inside out_dir: <out_dir>/ray/train/checkpoint_*
RAY_RUN_NAME = "train"
OBJECT_STORE_BYTES = 256 * 1024 * 1024  # a private Ray's object store: we pass configs and results, not tensors


# ---------------------------------------------------------------------------------------------
# checks before anything starts


def check_ray_run(
    tc: TrainConfig, env: Mapping[str, str], *, cpu_count: int | None = None, gpu_count: int | None = None
) -> None:
    """The config fits a Ray run on this machine; one-line :class:`ConfigError` otherwise.
    Cheap, no Ray started.  ``cpu_count``/``gpu_count``: this machine's (default: measured),
    checked only for ``ray_address=local`` (a cluster's are checked once connected)."""
    validate(tc)
    p = tc.parallel
    if p.backend != "ray":
        raise ConfigError(f"parallel.backend={p.backend}: fit_on_ray runs parallel=ray only; add parallel=ray")
    validate_launch(tc, env)
    if p.use_gpu and tc.device == "cpu":
        raise ConfigError(
            "parallel.use_gpu=true with device=cpu: the workers would hold GPUs and compute on "
            "the CPU; set device=auto or parallel.use_gpu=false"
        )
    if not p.use_gpu and tc.device not in ("auto", "cpu"):
        raise ConfigError(
            f"device={tc.device} with parallel.use_gpu=false: Ray gives the workers no GPU; set "
            "parallel.use_gpu=true (one GPU per worker) or device=auto"
        )
    if p.dist_backend == "nccl" and not p.use_gpu:
        raise ConfigError(
            "parallel.dist_backend=nccl needs parallel.use_gpu=true (NCCL runs on GPUs); use parallel.dist_backend=auto"
        )
    if p.ray_address != "local":
        return
    cpus = cpu_count if cpu_count is not None else _cpu_count()
    need = p.num_workers * p.cpus_per_worker
    if need > cpus:
        raise ConfigError(
            f"parallel.num_workers*cpus_per_worker={p.num_workers}*{p.cpus_per_worker}={need} "
            f"CPUs but this machine has {cpus}; "
            f"lower parallel.num_workers or parallel.cpus_per_worker, or run on a cluster (parallel.ray_address=auto)"
        )
    if p.use_gpu:
        gpus = gpu_count if gpu_count is not None else _gpu_count()
        if p.num_workers > gpus:
            raise ConfigError(
                f"parallel.use_gpu=true with parallel.num_workers={p.num_workers} but this machine "
                f"has {gpus} GPU(s); lower num_workers to {gpus} or run on a cluster"
            )


def check_cluster(p: ParallelConfig, total: Mapping[str, float], per_node: list[Mapping[str, float]]) -> None:
    """The Ray cluster has the CPUs (and GPUs) the workers ask for: ``total`` is
    ``ray.cluster_resources()``, ``per_node`` each alive node's resources.  Without this
    check Ray would wait for resources that never come."""
    need_cpu = p.num_workers * p.cpus_per_worker
    if total.get("CPU", 0) < need_cpu:
        raise ConfigError(
            f"parallel.num_workers*cpus_per_worker={need_cpu} CPUs but the Ray cluster has "
            f"{total.get('CPU', 0):g}; lower parallel.num_workers or parallel.cpus_per_worker, or "
            "add nodes"
        )
    if not any(n.get("CPU", 0) >= p.cpus_per_worker and (not p.use_gpu or n.get("GPU", 0) >= 1) for n in per_node):
        raise ConfigError(
            f"parallel.cpus_per_worker={p.cpus_per_worker}{' and a GPU' if p.use_gpu else ''}: no "
            "node of the Ray cluster has that much; lower parallel.cpus_per_worker"
        )
    if p.use_gpu and total.get("GPU", 0) < p.num_workers:
        raise ConfigError(
            f"parallel.use_gpu=true with parallel.num_workers={p.num_workers} but the Ray cluster "
            f"has {total.get('GPU', 0):g} GPU(s); lower num_workers or add GPU nodes"
        )


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _absolute(tc: TrainConfig) -> TrainConfig:
    """Paths the workers read, made absolute (a worker's working directory is Ray's, not ours)."""

    def absolute(path: str) -> str:
        return str(Path(path).expanduser().resolve()) if path else path

    data = dataclasses.replace(tc.data, path=absolute(tc.data.path), cache_dir=absolute(tc.data.cache_dir))
    return dataclasses.replace(tc, out_dir=absolute(tc.out_dir), data=data)


# ---------------------------------------------------------------------------------------------
# the driver


@contextmanager
def _environ(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def local_ray(p: ParallelConfig) -> Iterator[None]:
    """A private Ray on this machine for the duration: bound to 127.0.0.1, no dashboard, no
    usage reporting, CPUs (and GPUs) for the workers only (Ray Train's controller takes none),
    a 256 MB object store.  Shut down on exit."""
    # Ray binds to the machine's routable address unless told this is not a cluster; it reads
    # the variable at import, and `import ray` has happened already if validate() looked for
    # ray.train: set the module's flag too (child processes read the variable).
    with _environ(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0"):
        from ray._private import ray_constants

        was = ray_constants.ENABLE_RAY_CLUSTER
        ray_constants.ENABLE_RAY_CLUSTER = False
        import ray

        try:
            ray.init(
                address="local",
                num_cpus=p.num_workers * p.cpus_per_worker,
                num_gpus=p.num_workers if p.use_gpu else 0,
                include_dashboard=False,
                object_store_memory=OBJECT_STORE_BYTES,
                log_to_driver=True,  # the workers' console lines and errors, prefixed with their pid
                logging_level=logging.WARNING,
                # Ray's processes log errors only: without Ray's dashboard (ray[default]) its
                # state API is down, and Ray Train's placement-group cleaner warns so every second
                logging_config=ray.LoggingConfig(log_level="ERROR"),
            )
            yield
        finally:
            ray.shutdown()
            ray_constants.ENABLE_RAY_CLUSTER = was


def unreachable(address: str, timeout: float = 5.0) -> str | None:
    """Why ``HOST:PORT`` (or ``ray://HOST:PORT``) accepts no TCP connection within ``timeout``
    seconds; None when it does, and for ``auto`` (Ray finds the cluster this node joined)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return None
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        return f"{type(e).__name__}: {e}"
    return None


def unreachable_head(address: str, timeout: float = 10.0) -> str | None:
    """Why the cluster whose GCS answers at ``HOST:PORT`` cannot be used from here: its live
    nodes advertise addresses (their raylets, where a driver connects next) that accept no TCP
    connection from this machine -- Ray itself would retry them for ten minutes.  None when
    the head is reachable, or when this cannot be told (``auto``, ``ray://``, an old GCS)."""
    if address == "auto" or address.startswith("ray://") or unreachable(address) is not None:
        return None
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
        from ray._raylet import GcsClient

        # as ray.init does next: a cluster with token authentication needs this machine's token
        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
        nodes = GcsClient(address=address).get_all_node_info(timeout=timeout).values()
    except Exception:  # the GCS did not say: leave it to ray.init
        return None
    alive = [n for n in nodes if n.state == n.GcsNodeState.ALIVE]
    heads = [n for n in alive if n.is_head_node] or alive
    for n in heads:
        target = f"{n.node_manager_address}:{n.node_manager_port}"
        why = unreachable(target, timeout=min(timeout, 5.0))
        if why is not None:
            return (
                f"the head answers at {address} but advertises {n.node_manager_address} (its raylet at "
                f"{target}), which this machine cannot reach ({why}); start the head with "
                f"`ray start --head --node-ip-address=ADDR` where ADDR is an address of the head this machine "
                f"reaches (RAY_START_ARGS=--node-ip-address=ADDR launch/ray_cluster.sh head)"
            )
    return None


@contextmanager
def _connected(p: ParallelConfig) -> Iterator[None]:
    """Ray for this run: the one already initialised in this process, a private local one, or
    the cluster at ``parallel.ray_address`` (disconnected from at the end, left running)."""
    import ray

    if ray.is_initialized():
        yield
    elif p.ray_address == "local":
        with local_ray(p):
            yield
    else:
        why = unreachable(p.ray_address)
        if why is not None:  # Ray itself would retry the head for many minutes before failing
            raise ConfigError(
                f"parallel.ray_address={p.ray_address}: nothing answers there ({why}); start the head "
                "with `ray start --head` (launch/ray_cluster.sh head) and check the address, or use "
                "parallel.ray_address=local"
            )
        why = unreachable_head(p.ray_address)
        if why is not None:
            raise ConfigError(f"parallel.ray_address={p.ray_address}: {why}")
        try:
            ray.init(address=p.ray_address, log_to_driver=True, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(
                f"parallel.ray_address={p.ray_address}: cannot connect to a Ray cluster there "
                f"({first}); start one with `ray start --head`, or use parallel.ray_address=local"
            ) from None
        try:
            yield
        finally:
            ray.shutdown()


def _check_v2() -> None:
    from ray.train.v2._internal.constants import V2_ENABLED_ENV_VAR, is_v2_enabled

    if not is_v2_enabled():
        raise ConfigError(
            f"{V2_ENABLED_ENV_VAR}=0: parallel=ray uses Ray Train V2 (Ray's default); unset {V2_ENABLED_ENV_VAR}"
        )


def train_on_ray(tc: TrainConfig) -> tuple[RunResult, Any]:
    """Run ``tc`` on Ray Train; returns (rank 0's :class:`moe.training.report.RunResult`, Ray's
    ``ray.train.Result``: the last reported metrics and the latest checkpoint).

    Raises the workers' ``ConfigError`` / ``TrainingDiverged`` as themselves (module docstring).
    """
    check_ray_run(tc, os.environ)
    tc = _absolute(tc)
    load_data(tc.data, progress=tc.logger.progress)  # bad data fails here; the workers then read the cache
    _check_v2()
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchConfig, TorchTrainer

    p = tc.parallel
    storage = Path(tc.out_dir) / RAY_DIR
    if not tc.resume:  # a fresh start: Ray's copies of the old run's checkpoints go with it
        shutil.rmtree(storage / RAY_RUN_NAME, ignore_errors=True)
    with _connected(p):
        check_cluster(p, ray.cluster_resources(), [n["Resources"] for n in ray.nodes() if n.get("Alive")])
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"tc": tc},
            torch_config=TorchConfig(
                backend=None if p.dist_backend == "auto" else p.dist_backend, timeout_s=int(max(1, p.timeout_s))
            ),
            scaling_config=ScalingConfig(
                num_workers=p.num_workers,
                use_gpu=p.use_gpu,
                resources_per_worker={"CPU": p.cpus_per_worker, **({"GPU": 1} if p.use_gpu else {})},
            ),
            run_config=RunConfig(
                name=RAY_RUN_NAME,
                storage_path=str(storage),
                failure_config=FailureConfig(max_failures=0),  # a failed rank fails the run; resume=true goes on
                checkpoint_config=CheckpointConfig(num_to_keep=1),
                # Ray Train's console logs off (its files under /tmp/ray/session_*/logs/train
                # keep them): each report at INFO, "safe to ignore" warnings on a busy machine,
                # and each worker's traceback at ERROR, which the driver raises below anyway
                logging_config=LoggingConfig(log_level="CRITICAL"),
            ),
        )
        print(
            f"run directory: {tc.out_dir} (Ray: {p.num_workers} workers, ep_size {p.ep_size}, "
            f"{'GPU' if p.use_gpu else 'CPU'})",
            file=sys.stderr,
        )
        try:
            result = trainer.fit()
        except TrainingFailedError as e:
            err = worker_error(e)
            if isinstance(err, (ConfigError, CheckpointError, TrainingDiverged)):
                raise err from None  # moe-train prints its one line
            if err is e:
                raise
            raise err from e  # an unexpected error: e's message holds the workers' tracebacks
    if result.return_value is None:
        raise RuntimeError("Ray Train finished without rank 0's result")
    return result.return_value, result


def fit_on_ray(tc: TrainConfig) -> RunResult:
    """``moe-train parallel=ray``: train ``tc`` on Ray Train, return rank 0's :class:`moe.training.report.RunResult`."""
    return train_on_ray(tc)[0]


def worker_error(e: BaseException) -> BaseException:
    """The exception to raise in the driver for Ray's ``TrainingFailedError`` ``e``: a worker's
    ``ConfigError``, ``CheckpointError`` or ``TrainingDiverged`` (every rank raises those
    together; a peer may instead see its collective fail), else the lowest rank's own
    exception, else ``e``."""
    failures = getattr(e, "worker_failures", None) or {}
    ordered = [failures[r] for r in sorted(failures)]
    for kind in (ConfigError, CheckpointError, TrainingDiverged):
        for err in ordered:
            if isinstance(err, kind):
                return err
    return ordered[0] if ordered and isinstance(ordered[0], BaseException) else e


# ---------------------------------------------------------------------------------------------
# the workers


class RayReporter:
    """Trainer hooks -> ``ray.train.report``, one report per logged step (module docstring).

    Called identically on every rank, so every rank reports equally often.  Args:
        is_main: this rank attaches the checkpoint (rank 0); the others report ``None``.
        report: ``ray.train.report``-like ``(metrics, checkpoint=None)``.
        checkpoint_from_dir: ``ray.train.Checkpoint.from_directory``.
    """

    def __init__(self, is_main: bool, report: Callable[..., None], checkpoint_from_dir: Callable[[str], Any]):
        self.is_main = is_main
        self._report = report
        self._from_dir = checkpoint_from_dir
        self._step: int | None = None  # the step whose metrics are held
        self._metrics: dict[str, float] = {}

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        if self._step is not None and step != self._step:
            self.flush()
        self._step = step
        self._metrics.update(metrics)

    def on_checkpoint(self, step: int, path: Path) -> None:
        if self._step is not None and step != self._step:
            self.flush()
        metrics = {**self._metrics, "step": step}
        self._step, self._metrics = None, {}
        if not self.is_main:
            self._report(metrics, checkpoint=None)
            return
        stage = _stage(Path(path))
        try:
            self._report(metrics, checkpoint=self._from_dir(str(stage)))  # Ray copies it before returning
        finally:
            shutil.rmtree(stage, ignore_errors=True)

    def flush(self) -> None:
        """Report the held step's metrics (at the end of the run, or when the next step logs)."""
        if self._step is None:
            return
        metrics = {**self._metrics, "step": self._step}
        self._step, self._metrics = None, {}
        self._report(metrics, checkpoint=None)


def _stage(path: Path) -> Path:
    """A fresh directory beside ``path`` holding only it (a hard link; a copy across filesystems):
    Ray copies the whole directory it is given, and out_dir holds more (and Ray's own storage)."""
    stage = Path(tempfile.mkdtemp(prefix=".ray-checkpoint-", dir=path.parent))
    try:
        os.link(path, stage / path.name)
    except OSError:
        shutil.copy2(path, stage / path.name)
    return stage


def train_loop_per_worker(config: dict) -> RunResult | None:
    """One rank, inside a Ray Train worker (``torch.distributed`` is up): rank 0 returns its RunResult."""
    import ray.train
    import ray.train.torch

    logging.getLogger().setLevel(logging.WARNING)  # Ray Train logs each report at INFO through the root logger
    tc: TrainConfig = config["tc"]
    p = tc.parallel
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device() if p.use_gpu else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    elif not tc.threads:
        torch.set_num_threads(p.cpus_per_worker)
    state = ParallelState.build(
        p.ep_size, device=device, local_rank=ctx.get_local_rank(), timeout=timedelta(seconds=p.timeout_s)
    )
    # a progress bar does not survive Ray's log forwarding: rank 0 prints a console line per log instead
    tc = dataclasses.replace(tc, logger=dataclasses.replace(tc.logger, progress=False))
    data = load_data(tc.data, progress=False)
    reporter = RayReporter(state.is_main, ray.train.report, ray.train.Checkpoint.from_directory)
    trainer = Trainer(
        tc,
        backend=DDPBackend(tc, state, data=data),
        hooks=TrainerHooks(on_log=reporter.on_log, on_checkpoint=reporter.on_checkpoint),
    )
    try:
        result = trainer.fit()
        reporter.flush()
    finally:
        trainer.close()
    return result if state.is_main else None
