"""Configuration: every bad value fails before training with one line naming the key and the fix,
every config file in conf/ composes and builds, and dict <-> dataclass round-trips.

The in-process cases go through exactly what ``moe-train`` does with its arguments
(``check_group_overrides`` -> Hydra compose of the real conf/ -> ``config_from_hydra``); a few
run the real console script to check the user sees one ``moe-train: error:`` line, exit code 2.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from moe.cli.config import CONF_DIR, check_group_overrides, config_from_hydra
from moe.config import (
    SWARM_KEYS,
    ConfigError,
    DataConfig,
    LoggerConfig,
    ModelConfig,
    MoEConfig,
    OptimConfig,
    ParallelConfig,
    TrainConfig,
    check_key,
    from_dict,
    to_dict,
    validate,
    validate_launch,
)

GROUPS = ("model", "moe", "data", "optim", "logger", "parallel", "experiment")


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.fixture
def hydra_conf():
    """The real conf/ for Hydra's compose API (initialised once per test, cleared after)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        yield


@pytest.fixture
def load(hydra_conf, tmp_path):
    """What moe-train does with its arguments, minus Hydra's run directory: -> TrainConfig."""

    def _load(overrides: list[str]) -> TrainConfig:
        check_group_overrides(overrides)
        cfg = compose("config", overrides=[*overrides, f"out_dir={tmp_path / 'run'}"])
        return config_from_hydra(cfg)

    return _load


# ---------------------------------------------------------------------------------------------
# bad values: one line, naming the key, saying what to do

# (id, overrides, key the message must name, fragment saying what to do).  "{tmp}" -> tmp_path.
BAD = [
    ("top_k>num_experts", ["moe=topk", "moe.top_k=9"], "moe.top_k", "lower moe.top_k or raise moe.num_experts"),
    ("capacity_factor=0", ["moe.capacity_factor=0"], "moe.capacity_factor", "must be > 0"),
    ("capacity_factor<0", ["moe.capacity_factor=-0.5"], "moe.capacity_factor", "moe.dropless=true"),
    ("eval_capacity_factor=0", ["moe.eval_capacity_factor=0"], "moe.eval_capacity_factor", "must be > 0"),
    ("expert_d_ff<0", ["moe.expert_d_ff=-1"], "moe.expert_d_ff", "must be >= 0"),
    ("num_experts=0", ["moe=topk", "moe.num_experts=0"], "moe.num_experts", "must be >= 1"),
    ("top_k=0", ["moe=topk", "moe.top_k=0"], "moe.top_k", "must be >= 1"),
    (
        "unknown_moe_name",
        ["moe.name=expert_choice"],
        "moe.name",
        "use one of dense, switch, gshard, topk, deepseek, base",
    ),
    ("switch_top_k=2", ["moe=switch", "moe.top_k=2"], "moe.top_k", "use moe=topk"),
    # moe=hivemind (issue 4)
    (
        "hivemind_k_best>grid",
        ["moe=hivemind", "moe.swarm.grid=[2,2]", "moe.num_experts=4", "moe.swarm.k_best=5", "moe.top_k=5"],
        "moe.swarm.k_best",
        "lower moe.swarm.k_best or enlarge moe.swarm.grid",
    ),
    (
        "hivemind_k_min>k_best",
        ["moe=hivemind", "moe.swarm.k_min=5"],
        "moe.swarm.k_min",
        "must be in [1, moe.swarm.k_best=4]",
    ),
    ("hivemind_grid_0", ["moe=hivemind", "moe.swarm.grid=[0,8]"], "moe.swarm.grid", "non-empty list of positive ints"),
    (
        "hivemind_expert_lr_scale",
        ["moe=hivemind", "optim.expert_lr_scale=0.5"],
        "optim.expert_lr_scale",
        "train on their servers",
    ),
    ("hivemind_num_experts", ["moe=hivemind", "moe.swarm.grid=[4,4]"], "moe.num_experts", "set moe.num_experts=16 too"),
    (
        "hivemind_peer_syntax",
        ["moe=hivemind", "moe.swarm.initial_peers=['127.0.0.1:31337']"],
        "moe.swarm.initial_peers[0]",
        "copy the whole address a peer prints",
    ),
    (
        "hivemind_peer_no_id",
        ["moe=hivemind", "moe.swarm.initial_peers=['/ip4/127.0.0.1/tcp/31337']"],
        "moe.swarm.initial_peers[0]",
        "no /p2p/<peer id> part",
    ),
    (
        "hivemind_timeout",
        ["moe=hivemind", "moe.swarm.forward_timeout=-1"],
        "moe.swarm.forward_timeout",
        "finite number of seconds",
    ),
    ("hivemind_prefix", ["moe=hivemind", "moe.swarm.uid_prefix=a.b"], "moe.swarm.uid_prefix", "no dots"),
    ("hivemind_ddp", ["moe=hivemind", "parallel=ddp"], "moe=hivemind", "use parallel=single"),
    ("gshard_top_k=1", ["moe=gshard", "moe.top_k=1"], "moe.top_k", "use moe=topk"),
    ("base_top_k=2", ["moe=base", "moe.top_k=2"], "moe.top_k", "set moe.top_k=1"),
    ("expert_dropout=1", ["moe.expert_dropout=1.0"], "moe.expert_dropout", "[0, 1)"),
    ("jitter_eps=1", ["moe.jitter_eps=1"], "moe.jitter_eps", "[0, 1)"),
    ("router_dtype_bf16", ["moe.router_dtype=bfloat16"], "moe.router_dtype", "set moe.router_dtype=float32"),
    ("aux_loss_weight<0", ["moe.aux_loss_weight=-0.1"], "moe.aux_loss_weight", ">= 0"),
    ("d_model%n_heads", ["model.d_model=100", "model.n_heads=3"], "model.d_model", "pick n_heads dividing d_model"),
    ("n_heads=0", ["model.n_heads=0"], "model.n_heads", ">= 1"),
    ("n_layers=0", ["model.n_layers=0"], "model.n_layers", ">= 1"),
    ("seq_len<2", ["model.seq_len=1"], "model.seq_len", ">= 2"),
    ("moe_every>n_layers", ["model.moe_every=5"], "model.moe_every", "lower moe_every or use moe=dense"),
    ("activation", ["model.activation=tanh"], "model.activation", "gelu, relu, silu or swiglu"),
    ("dropout=1", ["model.dropout=1"], "model.dropout", "[0, 1)"),
    ("data.path_missing", ["data.path={tmp}/no/such/corpus.txt"], "data.path", "point it at a text file"),
    ("data=files_without_path", ["data=files"], "data.path", "set it, e.g. data.path="),
    ("tokenizer", ["data.tokenizer=sentencepiece"], "data.tokenizer", "use bpe or byte"),
    ("bpe_vocab_too_small", ["data.vocab_size=100"], "data.vocab_size", "[257, 65535]"),
    ("val_fraction>1", ["data.val_fraction=1.5"], "data.val_fraction", "(0, 1)"),
    ("val_fraction=0", ["data.val_fraction=0"], "data.val_fraction", "(0, 1)"),
    ("on_bad_file", ["data.on_bad_file=ignore"], "data.on_bad_file", "use error or skip"),
    ("extensions_not_list", ["data.extensions=.py"], "data.extensions", "expected a list"),
    ("lr=0", ["optim.lr=0"], "optim.lr", "positive number"),
    ("lr<0", ["optim.lr=-1e-3"], "optim.lr", "positive number"),
    ("lr=nan", ["optim.lr=nan"], "optim.lr", "positive number"),
    ("warmup>steps", ["steps=10", "optim.warmup_steps=20"], "optim.warmup_steps", "lower the warmup or train longer"),
    ("grad_clip<0", ["optim.grad_clip=-1"], "optim.grad_clip", "0 disables clipping"),
    ("beta2=1", ["optim.beta2=1.0"], "optim.beta2", "[0, 1)"),
    ("expert_lr_scale<0", ["optim.expert_lr_scale=-0.5"], "optim.expert_lr_scale", "a number >= 0"),
    (
        "expert_lr_scale_dense",
        ["moe=dense", "optim.expert_lr_scale=0.5"],
        "optim.expert_lr_scale",
        "a dense model has no experts",
    ),
    ("wandb_mode", ["logger.wandb_mode=bogus"], "logger.wandb_mode", "use offline, online or disabled"),
    ("log_every=0", ["logger.log_every=0"], "logger.log_every", ">= 1"),
    ("parallel.backend", ["parallel.backend=mpi"], "parallel.backend", "parallel=single"),
    ("ep_size=0", ["parallel=ddp", "parallel.ep_size=0"], "parallel.ep_size", ">= 1"),
    (
        "ep_size_vs_num_experts",
        ["parallel=ddp", "moe.num_experts=8", "parallel.ep_size=3"],
        "parallel.ep_size",
        "pick an ep_size dividing num_experts",
    ),
    ("ep_size>1_single", ["parallel.ep_size=2"], "parallel.ep_size", "use parallel=ddp and launch with `torchrun"),
    (
        "ep_size>1_dense",
        ["parallel=ddp", "moe=dense", "parallel.ep_size=2"],
        "parallel.ep_size",
        "set parallel.ep_size=1",
    ),
    ("dist_backend", ["parallel=ddp", "parallel.dist_backend=mpi"], "parallel.dist_backend", "use auto"),
    ("timeout_s=0", ["parallel=ddp", "parallel.timeout_s=0"], "parallel.timeout_s", "positive number of seconds"),
    ("zero_stage=3", ["parallel=deepspeed", "parallel.zero_stage=3"], "parallel.zero_stage", "use 0, 1 or 2"),
    (
        "zero_stage_with_ddp",
        ["parallel=ddp", "parallel.zero_stage=1"],
        "parallel.zero_stage",
        "needs parallel=deepspeed",
    ),
    ("pp_size_with_ddp", ["parallel=ddp", "parallel.pp_size=2"], "parallel.pp_size", "needs parallel=deepspeed"),
    (
        "pp_size>n_layers",
        ["parallel=deepspeed", "model.n_layers=2", "parallel.pp_size=3"],
        "parallel.pp_size",
        "every pipeline stage needs at least one block",
    ),
    (
        "pp_with_zero2",
        ["parallel=deepspeed", "parallel.pp_size=2", "parallel.zero_stage=2"],
        "parallel.zero_stage",
        "set parallel.zero_stage=1",
    ),
    ("bucket_mb<0", ["parallel=ddp", "parallel.bucket_mb=-1"], "parallel.bucket_mb", "must be >= 0"),
    ("num_workers=0", ["parallel=ray", "parallel.num_workers=0"], "parallel.num_workers", ">= 1"),
    (
        "ray_workers_vs_ep",
        ["parallel=ray", "parallel.num_workers=3", "parallel.ep_size=2"],
        "parallel.ep_size",
        "run a multiple of 2 workers",
    ),
    ("ray_address", ["parallel=ray", "parallel.ray_address=somewhere"], "parallel.ray_address", "use local"),
    ("batch_size=0", ["batch_size=0"], "batch_size", ">= 1"),
    ("steps=0", ["steps=0", "optim.warmup_steps=0"], "steps", ">= 1"),
    ("steps=abc", ["steps=abc"], "steps", "expected an integer"),
    ("steps=1.5", ["steps=1.5"], "steps", "expected an integer"),
    ("d_model=abc", ["model.d_model=abc"], "model.d_model", "expected an integer"),
    ("dropless=maybe", ["moe.dropless=maybe"], "moe.dropless", "expected true or false"),
    ("device=tpu", ["device=tpu"], "device", "use auto, cpu, cuda, cuda:N or mps"),
    ("dtype=fp8", ["dtype=fp8"], "dtype", "use auto, float32 or bfloat16"),
    ("dtype=float16", ["dtype=float16"], "dtype", "use dtype=bfloat16"),
    # keys that do not exist, however the user writes them (Hydra itself would print a block)
    ("unknown_key", ["model.foo=1"], "model.foo", "known keys: activation, block, d_ff, d_model"),
    ("unknown_key_append", ["+model.foo=1"], "model.foo", "known keys: activation, block, d_ff, d_model"),
    ("unknown_key_typo", ["model.dmodel=128"], "model.dmodel", "did you mean model.d_model?"),
    ("unknown_top_level", ["learning_rate=0.1"], "learning_rate", "known keys: batch_size"),
    ("key_below_a_value", ["model.d_model.x=1"], "model.d_model.x", "set it directly (model.d_model=...)"),
    ("bad_interpolation", ["run_name=${nope}"], "run_name", "fix the ${...} reference"),
    (
        "unknown_group_option",
        ["moe=expert_choice"],
        "moe=expert_choice",
        "choose one of base, deepseek, dense, gshard, hivemind, switch, topk",
    ),
]
if not torch.cuda.is_available():
    BAD.append(("cuda_without_cuda", ["device=cuda"], "device", "use device=auto or device=cpu"))
    BAD.append(
        (
            "nccl_without_cuda",
            ["parallel=ddp", "parallel.dist_backend=nccl"],
            "parallel.dist_backend",
            "use parallel.dist_backend=auto",
        )
    )

# The launch against the config (moe-train checks it before joining a process group):
# (id, overrides, torchrun's environment, key, fix).
TORCHRUN_ENV = {"RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
BAD_LAUNCH = [
    (
        "ddp_without_torchrun",
        ["parallel=ddp"],
        {},
        "parallel.backend",
        "launch with `torchrun --nproc_per_node N --no-python moe-train parallel=ddp",
    ),
    (
        "ddp_without_master",
        ["parallel=ddp"],
        {"WORLD_SIZE": "2", "RANK": "0"},
        "parallel.backend",
        "MASTER_ADDR, MASTER_PORT not set",
    ),
    (
        "world_vs_ep_size",
        ["parallel=ddp", "parallel.ep_size=2"],
        {**TORCHRUN_ENV, "WORLD_SIZE": "3"},
        "parallel.ep_size",
        "start a multiple of 2 processes",
    ),
    (
        "world_vs_ep_size_4",
        ["parallel=ddp", "moe.num_experts=8", "parallel.ep_size=4"],
        {**TORCHRUN_ENV, "WORLD_SIZE": "2"},
        "parallel.ep_size",
        "set parallel.ep_size to a divisor of 2",
    ),
    (
        "single_under_torchrun",
        ["parallel=single"],
        {**TORCHRUN_ENV, "WORLD_SIZE": "2"},
        "parallel.backend",
        "add parallel=ddp",
    ),
    (
        "deepspeed_without_launcher",
        ["parallel=deepspeed"],
        {},
        "parallel.backend",
        "launch with `deepspeed --num_gpus N --no_local_rank",
    ),
    (
        "world_vs_ep_pp",
        ["parallel=deepspeed", "parallel.pp_size=2", "parallel.ep_size=2"],
        {**TORCHRUN_ENV, "WORLD_SIZE": "2"},
        "parallel.ep_size*pp_size",
        "start a multiple of 4 processes",
    ),
    (
        "ray_under_torchrun",
        ["parallel=ray"],
        {**TORCHRUN_ENV, "WORLD_SIZE": "2"},
        "parallel.backend",
        "Ray starts the workers",
    ),
]


def test_a_missing_backend_package_names_the_pip_extra(load, monkeypatch):
    """parallel=deepspeed without deepspeed installed: one line naming the extra, before any worker."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name.split(".")[0] == "deepspeed" else real(name, *a)
    )
    with pytest.raises(ConfigError) as ei:
        load(["parallel=deepspeed"])
    msg = str(ei.value)
    assert msg.startswith("parallel.backend=deepspeed") and "pip install -e '.[deepspeed]'" in msg and "\n" not in msg


@pytest.mark.parametrize("overrides,env,key,fix", [b[1:] for b in BAD_LAUNCH], ids=[b[0] for b in BAD_LAUNCH])
def test_bad_launch_is_one_clear_line(load, overrides, env, key, fix):
    tc = load(overrides)
    with pytest.raises(ConfigError) as ei:
        validate_launch(tc, env)
    msg = str(ei.value)
    assert msg.strip() and "\n" not in msg, f"not one line: {msg!r}"
    assert msg.startswith(key), f"does not lead with {key}: {msg!r}"
    assert fix in msg, f"does not say what to do ({fix!r}): {msg!r}"


def test_good_launches_pass(load):
    validate_launch(load([]), {})
    validate_launch(load([]), {"WORLD_SIZE": "1"})
    validate_launch(load(["parallel=ddp", "parallel.ep_size=2"]), {**TORCHRUN_ENV, "WORLD_SIZE": "4"})
    validate_launch(load(["parallel=ddp", "moe=dense"]), {**TORCHRUN_ENV, "WORLD_SIZE": "3"})


@pytest.mark.parametrize("overrides,key,fix", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_value_is_one_clear_line(load, tmp_path, overrides, key, fix):
    overrides = [o.replace("{tmp}", str(tmp_path)) for o in overrides]
    with pytest.raises(ConfigError) as ei:
        load(overrides)
    msg = str(ei.value)
    assert msg.strip() and "\n" not in msg and "\r" not in msg, f"not one line: {msg!r}"
    assert msg.startswith(key), f"does not lead with {key}: {msg!r}"
    assert fix in msg, f"does not say what to do ({fix!r}): {msg!r}"
    assert ei.value.__cause__ is None or isinstance(ei.value.__cause__, ConfigError)
    assert ei.value.__suppress_context__ or ei.value.__context__ is None  # no chained Hydra/OmegaConf block


def test_enough_distinct_cases():
    assert len({b[0] for b in BAD}) == len(BAD) >= 18
    assert len({b[2] for b in BAD}) >= 15  # distinct keys named


def test_good_overrides_pass(load, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("hello\n")
    tc = load(
        [
            "moe=topk",
            "moe.top_k=3",
            "moe.num_experts=16",
            "model=tiny",
            "data=files",
            f"data.path={corpus}",
            "data.tokenizer=byte",
            "optim.lr=3e-4",
            "steps=50",
            "optim.warmup_steps=50",
            "experiment=smoke",
        ]
    )
    assert (tc.moe.name, tc.moe.top_k, tc.moe.num_experts) == ("topk", 3, 16)
    assert tc.data.path == str(corpus) and tc.data.tokenizer == "byte"
    assert tc.model.d_model == 64 and tc.batch_size == 8  # from experiment=smoke ...
    assert tc.steps == 50  # ... but a key set on the command line wins over the experiment
    assert tc.out_dir == str(tmp_path / "run")


# ---------------------------------------------------------------------------------------------
# group options


@pytest.mark.parametrize(
    "arg,group",
    [
        ("moe=foo", "moe"),
        ("model=huge", "model"),
        ("data=hf", "data"),
        ("optim=sgd", "optim"),
        ("logger=tensorboard", "logger"),
        ("parallel=mpi", "parallel"),
        ("experiment=nope", "experiment"),
        ("+experiment=nope", "experiment"),
        ("moe=switch,foo", "moe"),
        ("model=null", "model"),
        ("experiment=null", "experiment"),
    ],  # Hydra: a ValueError traceback
)
def test_unknown_group_option_lists_the_options(arg, group):
    with pytest.raises(ConfigError) as ei:
        check_group_overrides(["steps=10", arg])
    msg = str(ei.value)
    assert "\n" not in msg
    bad = arg.split("=", 1)[1].split(",")[-1]
    assert msg.startswith(f"{group}={bad}: there is no {group} config named {bad!r}; choose one of ")
    assert msg.endswith(", ".join(_options(group)))


@pytest.mark.parametrize(
    "args",
    [
        ["moe=gshard", "model=tiny", "experiment=smoke"],
        ["-m", "moe=switch,gshard,topk", "moe.num_experts=4,8"],
        ["--cfg", "job", "moe=base"],
        ["hydra.run.dir=/tmp/x", "hydra/job_logging=disabled"],
        ["+model.d_model=64", "~experiment"],
        ["data.extensions=[.py,.txt]", "run_name=${moe.name}"],
        ["model"],
    ],  # `model` (no =) is Hydra's parse error, not ours
)
def test_valid_overrides_pass_the_pre_check(args):
    check_group_overrides(args)


def test_check_key():
    check_key("moe.top_k")
    check_key("steps")
    check_key("data.extensions")
    with pytest.raises(ConfigError, match=r"^moe\.topk: unknown key \(did you mean moe\.top_k\?\); known keys: "):
        check_key("moe.topk")
    with pytest.raises(ConfigError, match=r"^optimizer: unknown key"):
        check_key("optimizer.lr")


# ---------------------------------------------------------------------------------------------
# the real console script: one line on stderr, exit code 2, nothing trained


def _moe_train() -> list[str]:
    exe = shutil.which("moe-train", path=str(Path(sys.executable).parent)) or shutil.which("moe-train")
    return [exe] if exe else [sys.executable, "-m", "moe.cli.train"]


@pytest.mark.parametrize(
    "args,key",
    [
        (["moe=foo"], "moe=foo"),
        (["moe=topk", "moe.top_k=9"], "moe.top_k"),
        (["model.d_model=100", "model.n_heads=3"], "model.d_model"),
        (["model.foo=1"], "model.foo"),  # Hydra's own "Could not override" block without the pre-check
        (["run_name=${nope}"], "run_name"),  # caught before Hydra makes the run dir (which interpolates run_name)
        (["moe.top_k=[1,2"], "moe.top_k=[1,2"),  # Hydra's override parser
        (["parallel=ddp", "optim.warmup_steps=1"], "parallel.backend"),
    ],  # ddp without torchrun: before any process group
    ids=[
        "unknown-group-option",
        "top_k>num_experts",
        "d_model%n_heads",
        "unknown-key",
        "bad-interpolation",
        "unparsable",
        "ddp-without-torchrun",
    ],
)
def test_moe_train_fails_with_one_line(tmp_path, args, key):
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "WORLD_SIZE", "RANK")}
    env["WANDB_MODE"] = "offline"
    p = subprocess.run(
        [*_moe_train(), *args, "steps=2", "logger=none"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith(f"moe-train: error: {key}"), lines[0]
    assert "run directory:" not in p.stderr and not p.stdout.strip()
    assert not list(tmp_path.rglob("checkpoint*")) and not list(tmp_path.rglob("metrics.jsonl"))
    assert not list(tmp_path.iterdir()), "a rejected command wrote files"  # issue 16: no runs/<name>/.hydra, no cli.log


# ---------------------------------------------------------------------------------------------
# every config file composes, converts and builds


def _group_override(group: str, option: str, tmp_path: Path) -> list[str]:
    ov = [f"{group}={option}"]
    if group == "data" and option == "files":
        corpus = tmp_path / "corpus.txt"
        corpus.write_text("def f(x):\n    return x\n")
        ov.append(f"data.path={corpus}")
    return ov


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_config_file_composes_and_validates(load, tmp_path, group, option):
    tc = load(_group_override(group, option, tmp_path))
    assert isinstance(tc, TrainConfig)
    if group == "moe":
        assert tc.moe.name == option
    elif group == "model":
        assert tc.model.d_model % tc.model.n_heads == 0
    elif group == "data":
        assert (tc.data.path != "") == (option == "files")
    elif group == "optim":
        from moe.training.optim import build_optimizer

        model = torch.nn.Linear(4, 4)
        opt = build_optimizer(model, tc)
        model(torch.ones(2, 4)).sum().backward()
        opt.step()
    elif group == "logger":
        from moe.training.sinks import MetricsLogger

        with MetricsLogger(tmp_path / "log", dataclasses.replace(tc.logger, wandb=False), run_config=to_dict(tc)) as lg:
            lg.log(1, {"train/loss": 1.0})
        assert json.loads((tmp_path / "log" / "metrics.jsonl").read_text().splitlines()[0])["train/loss"] == 1.0
    elif group == "experiment":
        if option == "smoke":
            assert tc.steps < 100 and tc.model.n_layers <= 2  # smoke runs are small
        elif option == "quality":  # issue 6: every arm costs what the dense FFN costs
            assert tc.moe.expert_d_ff == 0 and tc.eval_every > 0
    assert from_dict(TrainConfig, to_dict(tc)) == tc


# model=base (84M parameters) takes ~10 s per build on a busy 2-core CPU: the slow set.
# moe=hivemind needs a running swarm to build (tests/test_swarm_join.py builds and trains it).
PAIRS = [
    pytest.param(m, e, marks=[pytest.mark.slow] if m == "base" else [], id=f"{m}-{e}")
    for m in _options("model")
    for e in _options("moe")
    if e != "hivemind"
]


@pytest.mark.parametrize("model_opt,moe_opt", PAIRS)
def test_every_model_moe_pair_builds_and_runs_forward(load, model_opt, moe_opt):
    from moe.model.transformer import TransformerLM

    tc = load([f"model={model_opt}", f"moe={moe_opt}"])
    torch.manual_seed(0)
    model = TransformerLM(dataclasses.replace(tc.model, vocab_size=64), tc.moe)
    idx = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        out = model(idx, idx)
    assert out.logits.shape == (1, 8, 64)
    assert all(math.isfinite(float(x)) for x in (out.lm_loss, out.aux_loss, out.z_loss))
    n_sparse = len(model.moe_layers())
    assert n_sparse == (0 if moe_opt == "dense" else tc.model.n_layers // tc.model.moe_every)


def test_smoke_experiment_builds_and_runs_forward(load):
    from moe.model.transformer import TransformerLM

    tc = load(["experiment=smoke", "moe=gshard"])
    assert tc.run_name == "smoke-gshard" and tc.model.n_layers == 2
    model = TransformerLM(dataclasses.replace(tc.model, vocab_size=256), tc.moe)
    with torch.no_grad():
        out = model(torch.randint(0, 256, (2, 8)), torch.randint(0, 256, (2, 8)))
    assert out.logits.shape == (2, 8, 256) and torch.isfinite(out.lm_loss)


def test_yaml_keys_match_the_dataclasses():
    """A key added to a dataclass but not to its YAML files (or the reverse) is caught here."""
    from omegaconf import OmegaConf

    classes = {
        "model": ModelConfig,
        "moe": MoEConfig,
        "data": DataConfig,
        "optim": OptimConfig,
        "logger": LoggerConfig,
        "parallel": ParallelConfig,
    }
    for group, cls in classes.items():
        want = {f.name for f in dataclasses.fields(cls)}
        for option in _options(group):
            loaded = OmegaConf.load(CONF_DIR / group / f"{option}.yaml")
            keys = set(loaded)
            if group == "moe" and option != "hivemind":  # the swarm node lives in hivemind.yaml only
                keys |= {"swarm"}
            if group == "moe" and option == "hivemind":
                swarm_keys = set(loaded.swarm)
                assert swarm_keys == set(SWARM_KEYS), (
                    f"conf/moe/hivemind.yaml swarm: missing {set(SWARM_KEYS) - swarm_keys}, extra "
                    f"{swarm_keys - set(SWARM_KEYS)}"
                )
            assert keys == want, f"conf/{group}/{option}.yaml: missing {want - keys}, extra {keys - want}"


# ---------------------------------------------------------------------------------------------
# dict <-> dataclass


def test_round_trip_defaults_and_a_changed_config():
    cfg = TrainConfig()
    validate(cfg)
    assert from_dict(TrainConfig, to_dict(cfg)) == cfg
    cfg = dataclasses.replace(
        cfg, moe=MoEConfig(name="topk", top_k=3, num_experts=16), data=DataConfig(extensions=[".c"]), steps=7
    )
    back = from_dict(TrainConfig, to_dict(cfg))
    assert back == cfg and back.moe.top_k == 3 and back.data.extensions == [".c"]


def test_from_dict_fills_missing_keys_with_defaults():
    assert from_dict(TrainConfig, {"moe": {"top_k": 1}}) == TrainConfig()


@pytest.mark.parametrize(
    "data,match",
    [
        (
            {"moe": {"topk": 2}},
            r"^moe\.topk: unknown key \(did you mean moe\.top_k\?\); known keys: aux_loss_type, aux_loss_weight, ",
        ),
        ({"model": {"d_model": 64, "heads": 4}}, r"^model\.heads: unknown key"),
        ({"optimizer": {}}, r"^optimizer: unknown key \(did you mean optim\?\)"),
        ({"moe": {"num_experts": "8"}}, r"^moe\.num_experts: expected an integer, got '8'"),
        ({"moe": {"num_experts": True}}, r"^moe\.num_experts: expected an integer"),
        ({"data": {"extensions": [".py", 3.5, []]}}, r"^data\.extensions\[2\]: expected a string"),
        ({"logger": 1}, r"^logger: expected a group of keys"),
        ({"resume": "yes"}, r"^resume: expected true or false"),
    ],
)
def test_from_dict_names_the_dotted_path(data, match):
    with pytest.raises(ConfigError, match=match) as ei:
        from_dict(TrainConfig, data)
    assert "\n" not in str(ei.value)
