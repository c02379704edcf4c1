"""``moe-train``: the Hydra entry point.  The only module that sees a ``DictConfig``.

Config problems end the command with one line on stderr naming the key and the fix, exit
code 2, before any data is read or any worker starts.

With ``parallel=ddp`` every process torchrun starts runs this same entry point:

    torchrun --nproc_per_node 2 --no-python moe-train parallel=ddp parallel.ep_size=2

Each checks the launch against the config (``validate_launch``), joins the process group
(``moe.parallel.ddp``), and trains as one rank; rank 0 alone prints, logs and writes (the
other ranks print errors only, and keep Hydra from writing ``.hydra/`` and its log file into
the shared run directory).  The group is left at exit, however the run ends.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

from moe.config import ConfigError, TrainConfig, check_key, from_dict, validate, validate_launch

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"  # moe/conf: shipped inside the package


def _fail(msg: str, code: int = 2) -> None:
    print(f"moe-train: error: {msg}", file=sys.stderr)
    sys.exit(code)


def check_group_overrides(args: list[str], conf_dir: Path = CONF_DIR) -> None:
    """Catch what Hydra would report as a multi-line block, as one line, before Hydra starts.

    ``moe=foo`` for a group without a foo.yaml lists what exists (each value of a ``-m`` sweep
    ``moe=switch,foo`` is checked); ``model.foo=1`` / ``+foo=1`` for a key TrainConfig does not
    have names the key and lists the known ones.  ``hydra.*``, ``group/sub=...`` and
    ``key@package=...`` overrides are left to Hydra.
    """
    for a in args:
        if a.startswith("-") or "=" not in a:
            continue
        key, value = a.split("=", 1)
        key = key.lstrip("+~")
        if not key or key == "hydra" or key.startswith("hydra.") or "/" in key or "@" in key:
            continue
        group = conf_dir / key
        if "." not in key and group.is_dir():
            if not value or "(" in value:  # `~moe=`, or a sweep function like glob(*)
                continue
            options = sorted(p.stem for p in group.glob("*.yaml"))
            for v in (v.strip() for v in value.split(",")):
                if v not in options:
                    raise ConfigError(f"{key}={v}: there is no {key} config named {v!r}; choose one of {', '.join(options)}")
            continue
        check_key(key)


def one_line(e: BaseException) -> str:
    """A Hydra / OmegaConf error (often several lines and a hint block) as one line naming the key."""
    from hydra.errors import OverrideParseException
    from omegaconf.errors import InterpolationResolutionError

    noise = ("full_key:", "object_type=", "reference_type=", "See https://", "Set the environment variable HYDRA_FULL_ERROR")
    lines = [ln.strip().rstrip(".") for ln in str(e).splitlines() if ln.strip() and not ln.strip().startswith(noise)]
    msg = "; ".join(lines) or type(e).__name__
    cause = e.__cause__ if e.__cause__ is not None else e
    key = getattr(e, "full_key", None) or getattr(cause, "full_key", None)
    if key and not msg.startswith(str(key)):
        msg = f"{key}: {msg}"
    if isinstance(e, OverrideParseException):
        if e.override not in msg:
            msg = f"{e.override}: {msg}"
        msg += "; write overrides as key=value (e.g. moe.top_k=2) or group=option (e.g. moe=gshard)"
    elif isinstance(cause, InterpolationResolutionError):
        msg += "; fix the ${...} reference (it must name an existing key, e.g. ${moe.name}) or give a plain value"
    return msg


def config_from_hydra(cfg) -> TrainConfig:
    """DictConfig -> validated TrainConfig (resolving interpolations)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

    try:
        data = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as e:
        raise ConfigError(f"{e.full_key} is required here (it is ??? in the config); set it, e.g. {e.full_key}=...") from None
    except OmegaConfBaseException as e:
        raise ConfigError(one_line(e)) from None
    data.pop("hydra", None)
    tc = from_dict(TrainConfig, data)
    validate(tc)
    return tc


def data_line(meta: dict) -> str:
    """One line on what the run trains on, e.g. for the default corpus:
    ``data: stdlib, 1758 files (32 skipped: empty 28, not UTF-8 4), bpe vocab 4096, 9,027,506 train / 351,110 val tokens (cached)``."""
    parts = [f"data: {meta.get('source', '?')}"]
    if "n_files" in meta:
        skipped = meta.get("skipped", 0)
        why = ", ".join(f"{k} {v}" for k, v in meta.get("skipped_reasons", {}).items())
        parts.append(f"{meta['n_files']} files" + (f" ({skipped} skipped: {why})" if skipped else ""))
    parts.append(f"{meta.get('tokenizer') or 'pre-tokenized'} vocab {meta.get('vocab_size', '?')}")
    n_train, n_val = meta.get("n_train_tokens"), meta.get("n_val_tokens")
    if n_train is not None and n_val is not None:
        parts.append(f"{n_train:,} train / {n_val:,} val tokens")
    line = ", ".join(parts)
    return line + (" (cached)" if meta.get("from_cache") else "")


def _run(cfg) -> None:
    try:
        tc = config_from_hydra(cfg)  # before importing torch: a bad value fails in well under a second
        validate_launch(tc, os.environ)  # before any process group: torchrun's environment fits the config
    except ConfigError as e:
        _fail(str(e))
    backend = tc.parallel.backend
    if backend == "ray":  # this process is Ray's driver; the ranks are Ray Train workers
        _train_ray(tc)
        return
    if backend in ("ddp", "deepspeed"):
        train_in_process_group(tc)
    else:
        _train(tc, None)


def train_in_process_group(tc: TrainConfig) -> None:
    """This rank's part of a ``parallel=ddp`` or ``parallel=deepspeed`` run: join the launcher's
    process group, train, and leave it, freeing every group before the interpreter exits.

    A process group lives while anything references it, and its gloo worker threads with it.
    One that outlives the interpreter can abort a finished rank at exit ('terminate called
    without an active exception': a worker thread releasing a collective's tensors after
    Python is gone), and torchrun then holds the other nodes at its exit barrier for 300 s.
    So the state, and the frames of an exception on its way out (the trainer is in them), let
    go of their groups before ``stop()`` destroys them."""
    if tc.parallel.backend == "deepspeed":
        from moe.parallel import ds as launcher
    else:
        from moe.parallel import ddp as launcher
    state = launcher.start(tc.parallel, device=tc.device)
    try:
        _train(tc, state)
    finally:
        del state
        exc = sys.exc_info()[1]
        if exc is not None:  # the finished frames keep their locals (the trainer, its model) alive
            traceback.clear_frames(exc.__traceback__)
        launcher.stop()


def _train_ray(tc: TrainConfig) -> None:
    from moe.parallel.ray_train import fit_on_ray
    from moe.training.loop import TrainingDiverged, format_summary

    try:
        result = fit_on_ray(tc)
    except ConfigError as e:
        _fail(str(e))
    except TrainingDiverged as e:
        _fail(str(e), code=1)
    except KeyboardInterrupt:
        sys.exit(130)
    print(format_summary(result))


def _train(tc: TrainConfig, state) -> None:
    import dataclasses

    from moe.training.data import load_data
    from moe.training.loop import Trainer, TrainingDiverged, format_summary

    main = state is None or state.is_main
    if state is not None:  # rank 0's run directory for all (Hydra resolved it on each rank: ${now:} may differ)
        from moe.parallel.reduce import broadcast_object

        tc = dataclasses.replace(tc, out_dir=broadcast_object(tc.out_dir, state))
    try:
        # every rank reads the token cache (a first build is safe to race: it is published atomically)
        data = load_data(tc.data, progress=tc.logger.progress and main)
        if tc.parallel.pp_size > 1:  # DeepSpeed's pipeline engine runs the stages (same fit/close interface)
            from moe.parallel.pipeline import PipelineTrainer as Trainer
        trainer = Trainer(tc, data=data, state=state)
    except ConfigError as e:
        _fail(str(e))
    if main:
        print(data_line(data.meta), file=sys.stderr)
        print(f"run directory: {tc.out_dir}", file=sys.stderr)
    try:
        result = trainer.fit()
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


def train_main() -> None:
    """Console script ``moe-train`` (overrides as arguments, e.g. ``moe=gshard steps=100``)."""
    import hydra

    try:
        check_group_overrides(sys.argv[1:])
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
