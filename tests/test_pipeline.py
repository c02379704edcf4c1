"""Pipeline parallelism (``moe.parallel.pipeline``): DeepSpeed's pipeline engine over 2 real gloo
processes (one stage each, 127.0.0.1, one torch thread) against one process.

- **PP=2 == one process with grad_accum=M** (M = the pipeline's micro-batches per step):
  micro-batch m of the pipeline is micro-batch m of the one-process run, so the losses
  (lm, balancing, z), the gradient norm and every weight after 3 steps agree; switch with
  capacity (tokens dropped), balancing loss, z-loss and clipping active (so a norm that missed
  a stage, or counted the tied embedding twice, would change every update).  Two layouts:
  both stages with MoE blocks and tied embeddings; and a first stage without MoE blocks
  (``moe_every=2``: it only passes the loss accumulator on) with an untied head.
- **The MoE losses reach the first stage's router**: its gradient (summed over the
  micro-batches by a hook, before clipping) equals the one-process model's, and it differs
  between ``aux_loss_weight=1`` and ``0``.
- **PP=2 x DP=2 on 4 processes == one process with grad_accum=2M** (slow).
- **Ctrl-C on one stage** stops every stage after the same step, checkpointed there, and the
  run resumes from it (slow).
- The ``deepspeed`` launcher end to end with ``parallel.pp_size=2`` (slow).

Tolerance: fp32, ``rtol = atol = 1e-5`` (the stages and the one process add the same numbers;
only the tied embedding's gradient is summed in another order, by an all-reduce).
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

pytest.importorskip("deepspeed")

from moe.config import ConfigError, ParallelConfig  # noqa: E402
from moe.inference.load import load_run
from moe.model.transformer import TransformerLM  # noqa: E402
from moe.parallel.ports import free_port  # noqa: E402
from moe.training.loop import Trainer  # noqa: E402
from tests.conftest import SMOKE_OVERRIDES, launch_env, rank_trainer, tiny_config  # noqa: E402
from tests.test_expert_parallel import WorkerPair  # noqa: E402
from tests.test_parallel_train import fit_with_ctrl_c_on_rank_1  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-5)
M = 2  # micro-batches per step (= pp_size: the pipeline fills)
B = 4  # sequences per micro-batch


def _cfg(out_dir, *, pp: int, steps: int = 3, zero: int = 0, **over):
    """tiny_config's switch (RNG-free routing), capacity that drops tokens, balancing and
    z-loss, clipping far below the norm; ``pp`` > 1: parallel=deepspeed with pp stages."""
    c = tiny_config(out_dir, "switch", steps=steps, batch_size=B, grad_accum=M)
    moe_over = {k[4:]: over.pop(k) for k in list(over) if k.startswith("moe_")}
    model_over = {k[6:]: over.pop(k) for k in list(over) if k.startswith("model_")}
    optim_over = {k[6:]: over.pop(k) for k in list(over) if k.startswith("optim_")}
    moe = dataclasses.replace(
        c.moe,
        **{
            "jitter_eps": 0.0,
            "capacity_factor": 0.75,
            "min_capacity": 0,
            "aux_loss_weight": 0.1,
            "z_loss_weight": 0.001,
            **moe_over,
        },
    )
    par = ParallelConfig(backend="deepspeed", pp_size=pp, zero_stage=zero) if pp > 1 else ParallelConfig()
    optim = dataclasses.replace(c.optim, **{"warmup_steps": 1, "grad_clip": 0.05, **optim_over})
    return dataclasses.replace(
        c, moe=moe, model=dataclasses.replace(c.model, **model_over), parallel=par, optim=optim, **over
    )


# ---------------------------------------------------------------------------------------------
# run inside the workers


def _join_deepspeed(rank: int) -> None:
    """What moe.parallel.ds.start does after joining the group (the worker has joined)."""
    import deepspeed

    from moe.parallel.ds import skip_shm_comm_build

    os.environ.setdefault("LOCAL_RANK", str(rank))
    skip_shm_comm_build()
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)


def case_fit(rank, states, *, cfg, data):
    from moe.parallel.pipeline import stage_state_dict

    _join_deepspeed(rank)
    t = rank_trainer(cfg, data, states[1])
    res = t.fit()
    return {
        "history": None if res is None else res.history,
        "stage": t.backend.stage,
        "weights": {k: v.clone() for k, v in stage_state_dict(t.backend.module).items()},
        "step": t.step,
    }


def case_ctrl_c_on_the_last_stage(rank, states, *, cfg, data):
    """Rank 1 (the last stage) alone gets Ctrl-C during step 2: both stages stop after step 3
    (the flag rides on the step's loss all-reduce) and checkpoint there."""
    _join_deepspeed(rank)
    return fit_with_ctrl_c_on_rank_1(Trainer, lambda: rank_trainer(cfg, data, states[1]), rank)


def case_first_router_grad(rank, states, *, cfg, data):
    """One step; the first stage returns block 0's router gradient summed over micro-batches."""
    from moe.parallel.pipeline import BlockLayer
    from moe.training.telemetry import LoadAccumulator

    _join_deepspeed(rank)
    t = rank_trainer(cfg, data, states[1])
    grads = []
    for layer in t.backend.module.modules():
        if isinstance(layer, BlockLayer) and layer.prefix == "blocks.0.":
            layer.inner.ffn.router.weight_ED.register_hook(lambda g: grads.append(g.detach().clone()))
    t.train_step(LoadAccumulator())
    return torch.stack(grads).sum(0) if grads else None


# ---------------------------------------------------------------------------------------------
# one-process references


def _reference(cfg, data):
    t = Trainer(cfg, data=data)
    res = t.fit()
    return {"history": res.history, "model": t.model.state_dict(), "step": res.step}


def _reference_router_grad(cfg, data) -> torch.Tensor:
    """TransformerLM forward + backward of step 0's micro-batches, as the trainer's first step."""
    model_cfg = dataclasses.replace(cfg.model, vocab_size=data.vocab_size)
    torch.manual_seed(cfg.seed)
    model = TransformerLM(model_cfg, cfg.moe)
    for m in range(M):
        x, y = data.get_batch("train", 0, B, model_cfg.seq_len, cfg.seed, shard=m, num_shards=M)
        (model(x, y).total_loss(cfg.moe) / M).backward()
    return model.blocks[0].ffn.router.weight_ED.grad


# ---------------------------------------------------------------------------------------------
# tests


LAYOUTS = {
    "moe-on-both-stages-tied": {},
    "dense-first-stage-untied-experts-at-half-lr": {
        "model_moe_every": 2,
        "model_tie_embeddings": False,
        "optim_expert_lr_scale": 0.5,
    },
    "zero1-stopped-after-2-steps-and-resumed": {"zero": 1},
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_pp2_equals_one_process_with_grad_accum(pair, tmp_path, tiny_data, layout):
    over = dict(LAYOUTS[layout])
    zero = over.pop("zero", 0)
    hist = []
    for steps in (2, 3) if zero else (3,):  # ZeRO-1: a DeepSpeed checkpoint at step 2 resumed to step 3
        got = pair.run(case_fit, cfg=_cfg(tmp_path / "pp", pp=2, steps=steps, zero=zero, **over), data=tiny_data)
        hist += got[0]["history"]
        assert got[1]["history"] is None  # rank 0 alone reports
    ref = _reference(_cfg(tmp_path / "ref", pp=1, **over), tiny_data)
    assert [g["stage"] for g in got] == [0, 1]
    assert [h["step"] for h in hist] == [h["step"] for h in ref["history"]] == [1, 2, 3]
    for hp, hr in zip(hist, ref["history"]):
        for k in ("train/loss", "train/aux_loss", "train/z_loss", "train/grad_norm"):
            assert hp[k] == pytest.approx(hr[k], rel=TOL["rtol"], abs=TOL["atol"]), (hp["step"], k, hp[k], hr[k])
        assert hr["train/grad_norm"] > 0.05 * 4  # clipping was active
    assert ref["history"][0]["train/aux_loss"] > 0
    # every weight, each from the stage holding it (the tied embedding from both: equal)
    first, last = got[0]["weights"], got[1]["weights"]
    if "tok_emb.weight" in last:
        torch.testing.assert_close(first["tok_emb.weight"], last["tok_emb.weight"], rtol=0, atol=0)
    merged = {**first, **last}
    want = {k: v for k, v in ref["model"].items() if not (k == "lm_head.weight" and "lm_head.weight" not in merged)}
    assert set(merged) == set(want)
    for k, v in want.items():
        torch.testing.assert_close(merged[k], v, **TOL, msg=lambda m: f"{k}: {m}")
    # the stages hold their own blocks only
    assert any(k.startswith("blocks.0.") for k in first) and not any(k.startswith("blocks.1.") for k in first)
    assert any(k.startswith("blocks.1.") for k in last) and not any(k.startswith("blocks.0.") for k in last)
    rows = [json.loads(line) for line in (tmp_path / "pp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3]
    assert [r["step"] for r in rows if "val/loss" in r] == ([2, 3] if zero else [3])  # the end of each run
    # the expert load of every MoE block, gathered from its stage, equals the one process's
    want_rows = [
        json.loads(line)
        for line in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()
        if "train/loss" in line
    ]
    load_keys = [k for k in want_rows[0] if k.startswith("moe/layer_")]
    n_moe = 2 if layout == "moe-on-both-stages-tied" or zero else 1
    assert len(load_keys) == n_moe * (7 + 4) and all(w["moe/layer_1/dropped_frac"] > 0 for w in want_rows)
    for g, w in zip([r for r in rows if "train/loss" in r], want_rows):
        for k in load_keys:
            assert g[k] == pytest.approx(w[k], rel=1e-6, abs=1e-9), k
    assert (tmp_path / "pp" / "global_step3").is_dir() and json.loads((tmp_path / "pp" / "pipeline.json").read_text())[
        "tag"
    ] == "global_step3"
    assert not (tmp_path / "pp" / "global_step2").exists()  # the older tag removed
    # moe-generate / moe-eval / moe-export read DeepSpeed's per-layer files back as one model
    run = load_run(tmp_path / "pp", device="cpu")
    assert run.step == 3
    for k, v in ref["model"].items():
        torch.testing.assert_close(run.model.state_dict()[k], v, **TOL, msg=lambda m: f"{k}: {m}")


@pytest.mark.slow
def test_pp2_dp2_on_four_processes_equals_one_process(tmp_path, tiny_data):
    """2 stages x 2 data-parallel replicas (rank = stage * 2 + replica): replica r's micro-batch
    m is shard 2m + r of the step's batch, so the one-process run has grad_accum = 2M."""
    four = WorkerPair(world=4)
    try:
        got = four.run(case_fit, cfg=_cfg(tmp_path / "pp", pp=2), data=tiny_data)
    finally:
        four.stop()
    ref = _reference(_cfg(tmp_path / "ref", pp=1, grad_accum=2 * M), tiny_data)
    assert [g["stage"] for g in got] == [0, 0, 1, 1]
    hist = got[0]["history"]
    assert [h["step"] for h in hist] == [h["step"] for h in ref["history"]] == [1, 2, 3]
    for hp, hr in zip(hist, ref["history"]):
        for k in ("train/loss", "train/aux_loss", "train/z_loss", "train/grad_norm"):
            assert hp[k] == pytest.approx(hr[k], rel=TOL["rtol"], abs=TOL["atol"]), (hp["step"], k, hp[k], hr[k])
    merged = {**got[0]["weights"], **got[2]["weights"]}
    for k, v in merged.items():
        torch.testing.assert_close(v, ref["model"][k], **TOL, msg=lambda m: f"{k}: {m}")
        torch.testing.assert_close(
            got[1 if k in got[1]["weights"] else 3]["weights"][k], v, rtol=0, atol=0
        )  # replicas agree


@pytest.mark.slow
def test_the_moe_losses_reach_the_first_stage_router(pair, tmp_path, tiny_data):
    grads = {}
    for w in (1.0, 0.0):
        cfg = _cfg(tmp_path / f"w{w}", pp=2, moe_aux_loss_weight=w, moe_z_loss_weight=0.0)
        got = pair.run(case_first_router_grad, cfg=cfg, data=tiny_data)
        assert got[1] is None  # block 0 lives on the first stage
        want = _reference_router_grad(dataclasses.replace(cfg, parallel=ParallelConfig()), tiny_data)
        torch.testing.assert_close(got[0], want, **TOL)
        grads[w] = got[0]
    diff = (grads[1.0] - grads[0.0]).norm()
    assert diff > 1e-2 * grads[0.0].norm(), (diff, grads[0.0].norm())  # the balancing loss moved it


@pytest.mark.slow
def test_ctrl_c_on_one_stage_stops_both_with_a_checkpoint_that_resumes(pair, tmp_path, tiny_data):
    cfg = _cfg(tmp_path, pp=2, steps=6, ckpt_every=0)
    assert pair.run(case_ctrl_c_on_the_last_stage, cfg=cfg, data=tiny_data) == [("interrupted", 3), ("interrupted", 3)]
    info = json.loads((tmp_path / "pipeline.json").read_text())
    assert info["tag"] == "global_step3" and info["step"] == 3
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3]  # the stop step is logged
    got = pair.run(case_fit, cfg=dataclasses.replace(cfg, steps=4, resume=True), data=tiny_data)
    assert [g["step"] for g in got] == [4, 4] and [h["step"] for h in got[0]["history"]] == [4]


def test_unsupported_layouts_are_one_line_config_errors(tmp_path):
    from moe.parallel.pipeline import check_pipeline_config

    cases = [
        (
            dict(parallel=ParallelConfig(backend="deepspeed", pp_size=2, ep_size=2)),
            r"parallel\.ep_size=2 with parallel\.pp_size=2",
        ),
        (dict(parallel=ParallelConfig(backend="deepspeed", pp_size=2, zero_stage=2)), r"parallel\.zero_stage=2"),
        (dict(parallel=ParallelConfig(backend="ddp", pp_size=2)), r"needs parallel=deepspeed"),
        (dict(dtype="bfloat16"), r"dtype=bfloat16"),
    ]
    for over, pattern in cases:
        cfg = dataclasses.replace(_cfg(tmp_path, pp=2), **over)
        with pytest.raises(ConfigError, match=pattern) as e:
            check_pipeline_config(cfg, world_size=4)
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="does not divide the world size 3"):
        check_pipeline_config(_cfg(tmp_path, pp=2), world_size=3)
    check_pipeline_config(_cfg(tmp_path, pp=2), world_size=4)  # fine


def test_layer_specs_cover_the_model_once():
    """The specs in forward order; the tied head is the token embedding's key."""
    from deepspeed.pipe import TiedLayerSpec

    from moe.parallel.pipeline import BlockLayer, FinalNorm, LMHead, PositionEmbedding, TokenEmbedding, pipeline_layers

    c = _cfg("unused", pp=2)
    model = dataclasses.replace(c.model, vocab_size=256, n_layers=3)
    specs = pipeline_layers(model, c.moe)
    assert [s.typename for s in specs] == [
        TokenEmbedding,
        PositionEmbedding,
        BlockLayer,
        BlockLayer,
        BlockLayer,
        FinalNorm,
        TokenEmbedding,
    ]
    assert (
        isinstance(specs[0], TiedLayerSpec) and isinstance(specs[-1], TiedLayerSpec) and specs[0].key == specs[-1].key
    )
    assert specs[-1].forward_fn is not None and specs[0].forward_fn is None
    untied = pipeline_layers(dataclasses.replace(model, tie_embeddings=False), c.moe)
    assert untied[-1].typename is LMHead and not any(isinstance(s, TiedLayerSpec) for s in untied)


# ---------------------------------------------------------------------------------------------
# the launcher, end to end


@pytest.mark.slow
def test_deepspeed_launcher_trains_two_pipeline_stages(tmp_path):
    bin_dir = str(Path(sys.executable).parent)
    launcher, exe = shutil.which("deepspeed", path=bin_dir), shutil.which("moe-train", path=bin_dir)
    assert launcher and exe, "deepspeed / moe-train not installed next to the interpreter"
    args = [
        launcher,
        "--num_gpus",
        "2",
        "--no_local_rank",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        exe,
        "parallel=deepspeed",
        "parallel.pp_size=2",
        "parallel.zero_stage=1",
        "experiment=smoke",
        *SMOKE_OVERRIDES,
        "grad_accum=2",
        "logger.progress=false",
        "threads=1",
    ]
    env = launch_env(tmp_path, bin_dir)
    p = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    run = tmp_path / "runs" / "smoke-switch"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4]  # rank 0 alone wrote
    assert all(math.isfinite(x) for x in losses) and all(r["perf/tokens_per_s"] > 0 for r in rows if "train/loss" in r)
    assert [r["step"] for r in rows if "val/loss" in r] == [2, 4]
    assert p.stdout.count("done: 4 steps") == 1
    assert "block 1: cv" in p.stdout  # the expert load of the last stage's block, gathered to rank 0
    assert (run / "latest").read_text().strip() == "global_step4"
    info = json.loads((run / "pipeline.json").read_text())
    assert (
        info["tag"] == "global_step4"
        and info["step"] == 4
        and info["layout"] == {"world_size": 2, "pp_size": 2, "dp_size": 1, "zero_stage": 1}
    )
    assert sorted(d.name for d in run.iterdir() if d.name.startswith("global_step")) == [
        "global_step4"
    ]  # older tags removed
    assert not (run / "checkpoint.pt").exists()
    assert "ShareMemComm" not in p.stdout + p.stderr
    assert "autograd kernel was not registered" not in p.stderr  # the tied weight's broadcast stays out of autograd


@pytest.mark.slow
def test_pp2_with_llama_blocks_and_the_modern_layer_equals_one_process(pair, tmp_path, tiny_data):
    """No learned positions on the first stage, RMSNorm on the last, each stage's expert bias
    updated from its own blocks' loads: the one-process run with grad_accum."""
    from tests.test_modern_moe import _modern

    def cfg(d, pp):
        c = _cfg(d, pp=pp)
        return _modern(
            dataclasses.replace(c, moe=dataclasses.replace(tiny_config(d, "deepseek").moe, z_loss_weight=0.001))
        )

    got = pair.run(case_fit, cfg=cfg(tmp_path / "pp", 2), data=tiny_data)
    ref = _reference(cfg(tmp_path / "ref", 1), tiny_data)
    for hp, hr in zip(got[0]["history"], ref["history"]):
        for k in ("train/loss", "train/aux_loss", "train/grad_norm"):
            assert hp[k] == pytest.approx(hr[k], rel=TOL["rtol"], abs=TOL["atol"]), (hp["step"], k)
    merged = {**got[0]["weights"], **got[1]["weights"]}
    want = {k: v for k, v in ref["model"].items() if k != "lm_head.weight"}  # tied: tok_emb's
    assert "pos_emb.weight" not in merged and set(merged) == set(want)
    for k, v in want.items():
        torch.testing.assert_close(merged[k], v, **TOL, msg=lambda m: f"{k}: {m}")
    assert ref["model"]["blocks.1.ffn.expert_bias_E"].abs().sum() > 0
    run = load_run(tmp_path / "pp", device="cpu")  # the expert bias comes back from the stage's file too
    for k, v in ref["model"].items():
        torch.testing.assert_close(run.model.state_dict()[k], v, **TOL, msg=lambda m: f"{k}: {m}")
