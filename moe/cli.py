"""``moe-train``: the Hydra entry point.  The only module that sees a ``DictConfig``.

Config problems end the command with one line on stderr naming the key and the fix, exit
code 2, before any data is read or any worker starts.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from moe.config import ConfigError, TrainConfig, from_dict, validate

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def _fail(msg: str, code: int = 2) -> None:
    print(f"moe-train: error: {msg}", file=sys.stderr)
    sys.exit(code)


def check_group_overrides(args: list[str], conf_dir: Path = CONF_DIR) -> None:
    """``moe=foo`` for a group without a foo.yaml: one line listing what exists.

    (Hydra's own message for this is a multi-line block; we catch it first.)
    """
    for a in args:
        if a.startswith("-") or "=" not in a:
            continue
        key, value = a.split("=", 1)
        key = key.lstrip("+~")
        group = conf_dir / key
        if "." in key or "/" in key or not group.is_dir() or not value:
            continue
        if not (group / f"{value}.yaml").exists():
            options = sorted(p.stem for p in group.glob("*.yaml"))
            raise ConfigError(f"{key}={value}: there is no {key} config named {value!r}; choose one of {', '.join(options)}")


def config_from_hydra(cfg) -> TrainConfig:
    """DictConfig -> validated TrainConfig (resolving interpolations)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

    try:
        data = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as e:
        raise ConfigError(f"{e.full_key} is required here (it is ??? in the config); set it, e.g. {e.full_key}=...") from None
    except OmegaConfBaseException as e:
        raise ConfigError(str(e).splitlines()[0]) from None
    data.pop("hydra", None)
    tc = from_dict(TrainConfig, data)
    validate(tc)
    return tc


def _run(cfg) -> None:
    from moe.data import load_data
    from moe.train import Trainer, TrainingDiverged, format_summary

    try:
        tc = config_from_hydra(cfg)
        data = load_data(tc.data, progress=tc.logger.progress)
        trainer = Trainer(tc, data=data)
    except ConfigError as e:
        _fail(str(e))
    print(f"run directory: {tc.out_dir}", file=sys.stderr)
    try:
        result = trainer.fit()
    except TrainingDiverged as e:
        _fail(str(e), code=1)
    except KeyboardInterrupt:
        sys.exit(130)
    print(format_summary(result))


def train_main() -> None:
    """Console script ``moe-train`` (overrides as arguments, e.g. ``moe=gshard steps=100``)."""
    import hydra

    try:
        check_group_overrides(sys.argv[1:])
    except ConfigError as e:
        _fail(str(e))
    main = hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="config")(_run)
    main()


if __name__ == "__main__":
    train_main()
