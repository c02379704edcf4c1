"""Hydra at the edge: compose ``moe/conf`` with a command's overrides into a validated
:class:`~moe.config.TrainConfig`, with every Hydra/OmegaConf problem as one line.

The entry points (``moe-train``, ``moe-join --train``, ``moe-bench quality``) are the only code
that sees a ``DictConfig``; everything they call takes the typed config.
"""

from __future__ import annotations

from pathlib import Path

from moe.config import ConfigError, TrainConfig, check_key, from_dict, validate

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"  # moe/conf: shipped inside the package


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
                    raise ConfigError(
                        f"{key}={v}: there is no {key} config named {v!r}; choose one of {', '.join(options)}"
                    )
            continue
        check_key(key)


def one_line(e: BaseException) -> str:
    """A Hydra / OmegaConf error (often several lines and a hint block) as one line naming the key."""
    from hydra.errors import OverrideParseException
    from omegaconf.errors import InterpolationResolutionError

    noise = (
        "full_key:",
        "object_type=",
        "reference_type=",
        "See https://",
        "Set the environment variable HYDRA_FULL_ERROR",
    )
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
        raise ConfigError(
            f"{e.full_key} is required here (it is ??? in the config); set it, e.g. {e.full_key}=..."
        ) from None
    except OmegaConfBaseException as e:
        raise ConfigError(one_line(e)) from None
    data.pop("hydra", None)
    tc = from_dict(TrainConfig, data)
    validate(tc)
    return tc


def compose(overrides: list[str], *, job_name: str = "moe") -> TrainConfig:
    """``moe/conf/config.yaml`` with ``overrides`` (as on moe-train's command line), composed
    by Hydra's compose API and validated; a bad override is a one-line ConfigError.  Without an
    ``out_dir=`` override the run directory is moe-train's, ``runs/<run_name>``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    check_group_overrides(overrides)
    if not any(o.lstrip("+").startswith("out_dir=") for o in overrides):
        overrides = [*overrides, "out_dir=runs/${run_name}"]  # what moe-train's hydra.run.dir gives
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None, job_name=job_name):
            cfg = hydra_compose("config", overrides=overrides)
    except ConfigError:
        raise
    except Exception as e:  # Hydra's own errors (an unknown group, a bad override): one line
        raise ConfigError(one_line(e)) from None
    finally:
        GlobalHydra.instance().clear()
    return config_from_hydra(cfg)
