"""The ``deepspeed`` backend: DeepSpeed's real engine (ZeRO stages 0, 1, 2) around our model,
on 2 real gloo processes, against one process.

What "equal" means (fp32, ``rtol = atol = 1e-5`` on losses, gradient norms and every
parameter after 3 steps, as in tests/test_parallel_train.py):

- **ZeRO-0, 1 and 2 at EP=2 == one process with the double batch** (dropless switch, no
  balancing loss) and **== one process with grad_accum=2** (capacity, balancing and z-loss),
  with clipping active: the engine reduces the experts within their expert-data-parallel
  group, every stage clips by the norm of the whole gradient.  Since each equals the one
  process, ZeRO-1 and ZeRO-2 equal ZeRO-0.
- **grad_accum under the engine**: ZeRO-2 with 2 micro-batches per rank == one process with
  batch 2b and grad_accum 2.
- **Checkpoints at every stage are the one-process format**: a ZeRO-2, EP=2 run saved after 2
  steps resumes under ``parallel=single`` (one process) and the next step matches the ZeRO-2
  run's own third step; and a ZeRO-1 run resumes its own checkpoint (AdamW moments pushed
  back into the partitions) and matches the uninterrupted run.
- The ``deepspeed`` launcher end to end (2 processes, ``--num_gpus 2 --no_local_rank``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")

from moe.config import ParallelConfig  # noqa: E402
from moe.parallel.ports import free_port  # noqa: E402
from moe.training.loop import Trainer  # noqa: E402
from tests.conftest import SMOKE_OVERRIDES, conf_command, launch_env, rank_trainer  # noqa: E402
from tests.test_parallel_train import (
    B,
    _assert_same_run,
    _assert_states_close,
    _cfg,
    _clipped,
    _metrics,
    _reference,
)


def _ds(cfg, stage: int, ep: int = 2):
    return dataclasses.replace(cfg, parallel=ParallelConfig(backend="deepspeed", ep_size=ep, zero_stage=stage))


def _join_deepspeed(rank: int) -> None:
    """Hand the worker's process group to deepspeed.comm (what moe.parallel.ds.start does after
    joining the group), with the variable the launcher would set; once per worker."""
    import deepspeed

    os.environ.setdefault("LOCAL_RANK", str(rank))
    from moe.parallel.ds import skip_shm_comm_build

    skip_shm_comm_build()
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)


def case_ds_fit(rank, states, *, cfg, data, stop_after=None, resume_from=None):
    _join_deepspeed(rank)
    if resume_from is not None and rank == 0:
        os.makedirs(cfg.out_dir, exist_ok=True)
        shutil.copy(resume_from, Path(cfg.out_dir) / "checkpoint.pt")
    if resume_from is not None:
        torch.distributed.barrier()
    t = rank_trainer(cfg, data, states[cfg.parallel.ep_size])
    info = {
        "engine": type(t.backend.ds.engine).__name__,
        "optimizer_class": type(t.backend.ds.optimizer).__name__,
        "moe": t.backend.ds.engine.has_moe_layers,
    }
    res = t.fit(stop_after=stop_after)
    final = t.backend.state_dict()
    if rank != 0:
        return None
    return {"history": res.history, "model": final["model"], "optimizer": final["optimizer"], "step": res.step, **info}


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_zero_stages_with_ep2_equal_one_process_with_the_double_batch(pair, tmp_path, tiny_data, stage):
    over = {"dropless": True, "aux_loss_weight": 0.0, "z_loss_weight": 0.001}
    par = pair.run(
        case_ds_fit, cfg=_clipped(_ds(_cfg(tmp_path / "ds", "switch", world=2, **over), stage)), data=tiny_data
    )[0]
    ref = _reference(_clipped(_cfg(tmp_path / "ref", "switch", batch_size=2 * B, **over)), tiny_data)
    assert par["engine"] == "DeepSpeedEngine" and par["moe"]  # the real engine, with its expert paths on
    assert par["optimizer_class"] == ("AdamW" if stage == 0 else "DeepSpeedZeroOptimizer")
    assert ref["history"][0]["train/grad_norm"] > 0.05 * 2  # the clipping is active
    _assert_same_run(par, ref, keys=("train/loss", "train/z_loss", "train/grad_norm"))
    # the checkpoint's optimizer state is the one-process run's, whatever the stage
    for i, st in ref["optimizer"]["state"].items():
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(par["optimizer"]["state"][i][k], st[k], rtol=1e-4, atol=1e-7)
        assert float(par["optimizer"]["state"][i]["step"]) == float(st["step"])
    rows = [r for r in _metrics(tmp_path / "ds" / "metrics.jsonl") if "train/loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]  # rank 0 alone logged


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_zero_with_capacity_aux_loss_equals_one_process_with_grad_accum(pair, tmp_path, tiny_data, stage):
    over = {"capacity_factor": 0.75, "min_capacity": 0, "aux_loss_weight": 0.1, "z_loss_weight": 0.001}
    par = pair.run(
        case_ds_fit, cfg=_clipped(_ds(_cfg(tmp_path / "ds", "switch", world=2, **over), stage)), data=tiny_data
    )[0]
    ref = _reference(_clipped(_cfg(tmp_path / "ref", "switch", grad_accum=2, **over)), tiny_data)
    _assert_same_run(par, ref)


@pytest.mark.slow
def test_zero1_with_an_expert_lr_scale_equals_one_process(pair, tmp_path, tiny_data):
    # The scaled expert groups survive DeepSpeed's split into shared and expert groups and
    # ZeRO's flattening: 3 steps match the one-process run at the same scale (whose experts
    # move at the scale: tests/test_train.py), not at scale 1.
    over = {"dropless": True, "aux_loss_weight": 0.0, "z_loss_weight": 0.0}

    def scaled(cfg):
        return dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, expert_lr_scale=0.25))

    par = pair.run(case_ds_fit, cfg=scaled(_ds(_cfg(tmp_path / "ds", "switch", world=2, **over), 1)), data=tiny_data)[0]
    ref = _reference(scaled(_cfg(tmp_path / "ref", "switch", batch_size=2 * B, **over)), tiny_data)
    _assert_same_run(par, ref, keys=("train/loss", "train/grad_norm"))


@pytest.mark.slow
def test_zero2_grad_accum_equals_one_process(pair, tmp_path, tiny_data):
    over = {"dropless": True, "aux_loss_weight": 0.0, "z_loss_weight": 0.0}
    par = pair.run(
        case_ds_fit, cfg=_ds(_cfg(tmp_path / "ds", "switch", world=2, grad_accum=2, **over), 2), data=tiny_data
    )[0]
    ref = _reference(_cfg(tmp_path / "ref", "switch", batch_size=2 * B, grad_accum=2, **over), tiny_data)
    _assert_same_run(par, ref, keys=("train/loss", "train/grad_norm"))


@pytest.mark.slow
def test_zero2_checkpoint_resumes_in_one_process_and_zero1_resumes_itself(pair, tmp_path, tiny_data):
    over = {"dropless": True, "aux_loss_weight": 0.0, "z_loss_weight": 0.001}
    # ZeRO-2, EP=2: 2 steps and a checkpoint, then its own third step
    cfg2 = _clipped(_ds(_cfg(tmp_path / "z2", "switch", world=2, **over), 2))
    pair.run(case_ds_fit, cfg=cfg2, data=tiny_data, stop_after=2)
    saved = tmp_path / "z2-step2.pt"
    shutil.copy(tmp_path / "z2" / "checkpoint.pt", saved)
    full = pair.run(case_ds_fit, cfg=cfg2, data=tiny_data)[0]  # resumes at 2 (ZeRO-2 from its own file), runs step 3
    assert full["step"] == 3 and [h["step"] for h in full["history"]] == [3]
    # the same file under parallel=single, batch 2b: step 3 matches
    one = _clipped(_cfg(tmp_path / "one", "switch", batch_size=2 * B, **over))
    os.makedirs(one.out_dir)
    shutil.copy(saved, Path(one.out_dir) / "checkpoint.pt")
    t = Trainer(one, data=tiny_data)
    res = t.fit()
    assert res.step == 3
    _assert_same_run(
        {"history": res.history, "model": t.model.state_dict(), "step": res.step},
        full,
        keys=("train/loss", "train/grad_norm"),
    )
    # ZeRO-1 resumed from the ZeRO-2 file == ZeRO-2's continuation (moments pushed into its partitions)
    z1 = pair.run(
        case_ds_fit,
        cfg=_clipped(_ds(_cfg(tmp_path / "z1", "switch", world=2, **over), 1)),
        data=tiny_data,
        resume_from=saved,
    )[0]
    _assert_same_run(z1, full, keys=("train/loss", "train/grad_norm"))
    _assert_states_close(z1["model"], full["model"])


def _launch_command() -> list[str]:
    return conf_command("parallel/deepspeed.yaml", "deepspeed --num_gpus")


@pytest.mark.slow
def test_deepspeed_launcher_trains_two_processes(tmp_path):
    """The command of conf/parallel/deepspeed.yaml (2 ranks, ZeRO-1) with EP=2, a few steps."""
    cmd = _launch_command()
    assert cmd[:5] == ["deepspeed", "--num_gpus", "2", "--no_local_rank", "$(which"] and "parallel=deepspeed" in cmd
    bin_dir = str(Path(sys.executable).parent)
    launcher, exe = shutil.which("deepspeed", path=bin_dir), shutil.which("moe-train", path=bin_dir)
    assert launcher and exe, "deepspeed / moe-train not installed next to the interpreter"
    rest = cmd[cmd.index("moe-train)") + 1 :]
    args = [launcher, *cmd[1:4], "--master_addr", "127.0.0.1", "--master_port", str(free_port()), exe, *rest]
    args += [
        "parallel.ep_size=2",
        *SMOKE_OVERRIDES,
        "threads=1",
    ]
    env = launch_env(tmp_path, bin_dir)
    p = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    run = tmp_path / "runs" / "smoke-switch"
    rows = _metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4]  # rank 0 alone wrote
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert all(math.isfinite(x) for x in losses)
    assert p.stdout.count("done: 4 steps") == 1
    state = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert state["step"] == 4 and state["layout"]["ep_size"] == 2
    assert state["model"]["blocks.0.ffn.experts.w1_EDF"].shape[0] == 4  # the whole model, gathered
    assert "ShareMemComm" not in p.stdout + p.stderr  # the shm op was not built


@pytest.mark.slow
def test_zero1_with_ep2_and_the_modern_layer_equals_one_process(pair, tmp_path, tiny_data):
    """llama blocks, fine-grained + shared experts, sigmoid gates, the loss-free bias, grouped
    routing (moe.model, ``deepseek``) under DeepSpeed's engine: the one-process run, and the
    bias the same."""
    from tests.test_modern_moe import _modern

    par = pair.run(case_ds_fit, cfg=_ds(_modern(_cfg(tmp_path / "ds", "deepseek", world=2)), 1), data=tiny_data)[0]
    ref = _reference(_modern(_cfg(tmp_path / "ref", "deepseek", batch_size=2 * B)), tiny_data)
    assert par["engine"] == "DeepSpeedEngine" and par["moe"]
    _assert_same_run(par, ref, keys=("train/loss", "train/z_loss", "train/grad_norm"))
    biases = [k for k in ref["model"] if k.endswith("expert_bias_E")]
    assert biases and all(torch.equal(par["model"][k], ref["model"][k]) for k in biases)
    # the ZeRO-1, EP=2 run's checkpoint exports, and transformers computes what the run's model does
    from transformers import AutoModelForCausalLM

    from moe.inference.export import export_run
    from moe.inference.load import load_run

    assert export_run(tmp_path / "ds", tmp_path / "hf")["architecture"] == "Glm4MoeForCausalLM"
    run = load_run(tmp_path / "ds", device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(1, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, run.model(x).logits, rtol=0, atol=5e-5)
