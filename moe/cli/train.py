"""``moe-train``: the Hydra entry point.

Config problems end the command with one line on stderr naming the key and the fix, exit
code 2, before any data is read or any worker starts (this module imports torch only after
the config has passed).

With ``parallel=ddp`` every process torchrun starts runs this same entry point:

    torchrun --nproc_per_node 2 --no-python moe-train parallel=ddp parallel.ep_size=2

Each checks the launch against the config (``validate_launch``), joins the process group
(``moe.parallel.launch``), and trains as one rank; rank 0 alone prints, logs and writes (the
other ranks print errors only, and keep Hydra from writing ``.hydra/`` and its log file into
the shared run directory).  The group is left at exit, however the run ends.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import traceback

from moe.cli.config import CONF_DIR, check_group_overrides, compose, config_from_hydra, one_line
from moe.config import ConfigError, TrainConfig, validate_launch


def _fail(msg: str, code: int = 2) -> None:
    print(f"moe-train: error: {msg}", file=sys.stderr)
    sys.exit(code)


def _run(cfg) -> None:
    try:
        tc = config_from_hydra(cfg)  # before importing torch: a bad value fails in well under a second
        validate_launch(tc, os.environ)  # before any process group: torchrun's environment fits the config
    except ConfigError as e:
        _fail(str(e))
    if tc.parallel.backend == "ray":  # this process is Ray's driver; the ranks are Ray Train workers
        _train_ray(tc)
    elif tc.parallel.backend in ("ddp", "deepspeed"):
        train_in_process_group(tc)
    else:
        _train(tc)


def train_in_process_group(tc: TrainConfig) -> None:
    """This rank's part of a ``parallel=ddp`` or ``parallel=deepspeed`` run: join the launcher's
    process group, train, and leave it, freeing every group before the interpreter exits.

    A process group lives while anything references it, and its gloo worker threads with it.
    One that outlives the interpreter can abort a finished rank at exit ('terminate called
    without an active exception': a worker thread releasing a collective's tensors after
    Python is gone), and torchrun then holds the other nodes at its exit barrier for 300 s.
    So the state, and the frames of an exception on its way out (the trainer is in them), let
    go of their groups before ``stop()`` destroys them."""
    from moe.parallel.launch import launcher
    from moe.parallel.reduce import broadcast_object

    launch = launcher(tc.parallel.backend)
    state = launch.start(tc.parallel, tc.device)
    try:
        # rank 0's run directory for all (Hydra resolved it on each rank: ${now:} may differ)
        tc = dataclasses.replace(tc, out_dir=broadcast_object(tc.out_dir, state))
        _train(tc, functools.partial(launch.backend, tc, state), main=state.is_main)
    finally:
        del state
        exc = sys.exc_info()[1]
        if exc is not None:  # the finished frames keep their locals (the trainer, its model) alive
            traceback.clear_frames(exc.__traceback__)
        launch.stop()


def _train_ray(tc: TrainConfig) -> None:
    from moe.parallel.ray_train import fit_on_ray
    from moe.training.checkpoint import CheckpointError
    from moe.training.loop import TrainingDiverged
    from moe.training.report import format_summary

    try:
        result = fit_on_ray(tc)
    except (ConfigError, CheckpointError) as e:
        _fail(str(e))
    except TrainingDiverged as e:
        _fail(str(e), code=1)
    except KeyboardInterrupt:
        sys.exit(130)
    print(format_summary(result))


def _train(tc: TrainConfig, make_backend=None, *, main: bool = True) -> None:
    """Build this process's backend (``make_backend(data)``; default one process), train, print
    the summary (main rank)."""
    from moe.training.backend import Backend
    from moe.training.checkpoint import CheckpointError
    from moe.training.data import load_data
    from moe.training.loop import Trainer, TrainingDiverged
    from moe.training.report import data_line, format_summary

    try:
        # every rank reads the token cache (a first build is safe to race: it is published atomically)
        data = load_data(tc.data, progress=tc.logger.progress and main)
        backend = make_backend(data) if make_backend is not None else Backend(tc, data=data)
        trainer = Trainer(tc, backend=backend)
    except ConfigError as e:
        _fail(str(e))
    if main:
        print(data_line(data.meta), file=sys.stderr)
        print(f"run directory: {tc.out_dir}", file=sys.stderr)
    try:
        result = trainer.fit()
    except (ConfigError, CheckpointError) as e:  # the checkpoint: another config's, or unreadable
        _fail(str(e))
    except TrainingDiverged as e:
        _fail(str(e), code=1)
    except KeyboardInterrupt:
        sys.exit(130)
    finally:
        trainer.close()  # moe=hivemind: leave the swarm
    if main:
        print(format_summary(result))


def _quiet_hydra_on_other_ranks(args: list[str]) -> list[str]:
    """Under torchrun, ranks > 0 keep Hydra from writing ``.hydra/`` and its job log into the
    run directory rank 0 writes (unless the user set those themselves)."""
    if os.environ.get("RANK", "0") in ("", "0"):
        return args
    extra = []
    if not any(a.lstrip("+").startswith("hydra.output_subdir=") for a in args):
        extra.append("hydra.output_subdir=null")
    if not any(a.lstrip("+~").startswith("hydra/job_logging") for a in args):
        extra.append("hydra/job_logging=disabled")
    return [*args, *extra]


def check_before_hydra(args: list[str]) -> None:
    """The whole config composed and validated (and the launch checked against it) before
    Hydra runs: Hydra creates the run directory, its ``.hydra/`` and log before our code sees
    the config, so a rejected command would leave them behind.  For plain ``key=value``
    overrides; a command with Hydra's own flags (``-m``, ``--cfg``, ``-cn``, ...) is checked
    when Hydra hands the config over, as before."""
    if not all("=" in a and not a.startswith("-") for a in args):
        return
    tc = compose([a for a in args if not a.lstrip("+~").startswith("hydra")], job_name="moe-train")
    validate_launch(tc, os.environ)


def train_main() -> None:
    """Console script ``moe-train`` (overrides as arguments, e.g. ``moe=gshard steps=100``)."""
    import hydra

    try:
        check_group_overrides(sys.argv[1:])
        check_before_hydra(sys.argv[1:])
    except ConfigError as e:
        _fail(str(e))
    sys.argv[1:] = _quiet_hydra_on_other_ranks(sys.argv[1:])
    main = hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="config")(_run)
    if os.environ.get("HYDRA_FULL_ERROR"):  # the user asked for Hydra's full stack traces
        main()
        return
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    # Hydra prints its own errors as multi-line blocks (or, when formatting fails, a traceback);
    # with HYDRA_FULL_ERROR it re-raises them instead, and a config error becomes one line here.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except (HydraException, OmegaConfBaseException) as e:
        _fail(one_line(e))
    finally:
        os.environ.pop("HYDRA_FULL_ERROR", None)


if __name__ == "__main__":
    train_main()
