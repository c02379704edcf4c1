"""The trainer end to end: every expert layer learns, resume is bit-exact, checkpoints survive
crashes, a diverging loss stops the run cleanly."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from moe.config import ConfigError, LoggerConfig, MoEConfig, to_dict
from moe.model.transformer import ModelOutput
from moe.training import checkpoint as ckpt
from moe.training.checkpoint import CheckpointError
from moe.training.loop import Trainer, TrainingDiverged
from moe.training.optim import lr_at
from moe.training.report import format_summary
from tests.conftest import tiny_config


def _losses(history):
    return [h["train/loss"] for h in history]


@pytest.mark.parametrize("moe", ["dense", "switch", "gshard", "topk", "base"])
def test_each_layer_trains_30_steps_and_the_loss_falls(tmp_path, tiny_data, moe):
    result = Trainer(tiny_config(tmp_path, moe), data=tiny_data).fit()
    losses = _losses(result.history)
    assert len(losses) == 30
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.75 * first, f"{moe}: loss went from {first:.3f} to {last:.3f}"
    assert torch.isfinite(torch.tensor(result.val_loss))
    if moe != "dense":
        assert set(result.layer_load) == {0, 1}
        for ld in result.layer_load.values():
            assert len(ld["frac"]) == 4 and abs(sum(ld["frac"]) - 1) < 1e-6
    if moe == "base":  # exact balance in training: every expert a quarter of the tokens
        for ld in result.layer_load.values():
            assert ld["cv"] == pytest.approx(0.0, abs=1e-9)


def test_metrics_jsonl_has_every_section(tmp_path, tiny_data):
    cfg = tiny_config(
        tmp_path,
        "switch",
        steps=10,
        eval_every=5,
        logger=dataclasses.replace(tiny_config(tmp_path).logger, log_every=5),
    )
    Trainer(cfg, data=tiny_data).fit()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    keys = set().union(*rows)
    for k in [
        "train/loss",
        "train/aux_loss",
        "train/lr",
        "perf/tokens_per_s",
        "perf/step_time_s",
        "perf/mfu",
        "val/loss",
        "moe/layer_0/cv",
        "moe/layer_0/entropy",
        "moe/layer_0/max_over_mean",
        "moe/layer_0/dropped_frac",
        "moe/layer_0/aux_loss",
        "moe/layer_0/z_loss",
        "moe/layer_1/frac_e3",
        "perf/peak_flops",
    ]:
        assert k in keys, k
    summary = [r for r in rows if r.get("type") == "summary"]
    assert len(summary) == 1 and summary[0]["final/step"] == 10


def test_lr_schedule_warmup_then_cosine(tmp_path):
    cfg = tiny_config(tmp_path, steps=101)
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=1.0, warmup_steps=10, min_lr_ratio=0.1))
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.55)  # halfway down the cosine: (1 + 0.1) / 2
    assert lr_at(100, cfg) == pytest.approx(0.1)  # the last step trained is steps - 1
    lrs = [lr_at(s, cfg) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_resume_follows_a_changed_learning_rate(tmp_path, tiny_data):
    Trainer(tiny_config(tmp_path, steps=10, ckpt_every=5), data=tiny_data).fit(stop_after=5)
    cfg = tiny_config(tmp_path, steps=10, ckpt_every=5)
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=1e-4))
    res = Trainer(cfg, data=tiny_data).fit()
    assert res.history[0]["train/lr"] == pytest.approx(lr_at(5, cfg))


def test_resume_refuses_another_config_with_one_line(tmp_path, tiny_data):
    Trainer(tiny_config(tmp_path, "switch", steps=6), data=tiny_data).fit()
    with pytest.raises(ConfigError, match=r"moe\.dropless: False -> True.*run_name=") as e:
        Trainer(
            dataclasses.replace(
                tiny_config(tmp_path, "switch", steps=6), moe=MoEConfig(name="switch", num_experts=4, dropless=True)
            ),
            data=tiny_data,
        ).fit()
    assert "\n" not in str(e.value)
    # resume=false starts over instead
    res = Trainer(
        dataclasses.replace(
            tiny_config(tmp_path, "switch", steps=6),
            resume=False,
            moe=MoEConfig(name="switch", num_experts=4, dropless=True),
        ),
        data=tiny_data,
    ).fit()
    assert res.step == 6 and len(res.history) == 6


def test_a_checkpoint_from_before_a_config_key_existed_resumes_while_the_key_is_at_its_default(tmp_path):
    """Keys a newer version added (absent from the saved config) block a resume only when set
    away from their default."""
    from moe.training.checkpoint import check_resumable

    current = to_dict(tiny_config(tmp_path, "switch"))
    saved = json.loads(json.dumps(current))
    for k in ("forward_timeout", "grid", "host_maddrs"):  # as a checkpoint written before the swarm keys
        del saved["moe"]["swarm"][k]
    check_resumable(saved, current, tmp_path)
    changed = json.loads(json.dumps(current))
    changed["moe"]["swarm"]["forward_timeout"] = 5.0
    with pytest.raises(ConfigError, match=r"moe\.swarm\.forward_timeout: None -> 5\.0"):
        check_resumable(saved, changed, tmp_path)
    changed = json.loads(json.dumps(current))
    changed["moe"]["not_a_key"] = 1  # unknown to this version: not a default, still a difference
    with pytest.raises(ConfigError, match=r"moe\.not_a_key: None -> 1"):
        check_resumable(saved, changed, tmp_path)


def test_a_checkpoint_with_the_swarm_keys_directly_under_moe_resumes(tmp_path, tiny_data):
    """Checkpoints written before the swarm's keys moved to moe.swarm (moe.grid, ...): the saved
    config is read in today's layout, so the run resumes; a changed swarm key still blocks it."""
    from moe.config import SWARM_KEYS
    from moe.training.checkpoint import check_resumable

    cfg = tiny_config(tmp_path, "switch", steps=6, ckpt_every=3)
    Trainer(cfg, data=tiny_data).fit(stop_after=3)
    state = ckpt.load(tmp_path / "checkpoint.pt")
    old = state["config"]["moe"]
    old.update(old.pop("swarm"))  # the layout before the move
    assert set(SWARM_KEYS) <= set(old) and "swarm" not in old
    ckpt.save_atomic(state, tmp_path / "checkpoint.pt")
    res = Trainer(cfg, data=tiny_data).fit()
    assert res.step == 6 and [h["step"] for h in res.history] == [4, 5, 6]
    changed = to_dict(cfg)
    changed["moe"]["swarm"]["k_min"] = 2
    with pytest.raises(ConfigError, match=r"moe\.swarm\.k_min: 1 -> 2"):
        check_resumable(state["config"], changed, tmp_path)


def _expert_lr(cfg, scale):
    return dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, expert_lr_scale=scale))


@pytest.mark.parametrize("moe", ["switch", "gshard"])
def test_expert_lr_scale_scales_the_experts_first_step_and_nothing_else(tmp_path, tiny_data, moe):
    """Oracle: Adam's first step from the same weights and the same gradient is linear in the
    learning rate (lr x (m/sqrt(v) + weight decay x w)), so at scale 0.5 every expert weight
    moves exactly half as far as at scale 1, and every other weight exactly as far."""
    from moe.model.experts import expert_parameters

    moved = {}
    for scale in (1.0, 0.5):
        cfg = _expert_lr(tiny_config(tmp_path / str(scale), moe, steps=1), scale)
        t = Trainer(dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, warmup_steps=0)), data=tiny_data)
        before = {k: v.clone() for k, v in t.model.state_dict().items()}
        t.fit()
        moved[scale] = {k: t.model.state_dict()[k] - before[k] for k in before}
        experts = {n for n, _ in expert_parameters(t.model)}
        groups = t.backend.optimizer.param_groups
        if scale == 1:
            assert len(groups) == 2  # the checkpoint layout it always had: decay, no decay
        else:  # the expert weights, and only they, are in the scaled groups
            scaled = {id(p) for g in groups if g["lr_scale"] == scale for p in g["params"]}
            assert scaled == {id(p) for _, p in expert_parameters(t.model)}
    assert experts and any(n for n in moved[1.0] if n not in experts)
    for name, d in moved[1.0].items():
        if not d.abs().max() > 0:
            continue  # a weight the first step did not touch (none at the scale either)
        want = 0.5 * d if name in experts else d
        torch.testing.assert_close(moved[0.5][name], want, rtol=1e-5, atol=1e-9, msg=lambda m: f"{name}: {m}")


def test_expert_lr_scale_follows_the_schedule_and_zero_freezes_the_experts(tmp_path, tiny_data):
    from moe.model.experts import expert_parameters

    cfg = _expert_lr(tiny_config(tmp_path, "switch", steps=8), 0.0)
    t = Trainer(cfg, data=tiny_data)
    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    t.fit()
    experts = {n for n, _ in expert_parameters(t.model)}
    for n, p in t.model.named_parameters():
        if n in experts:
            assert torch.equal(p, before[n]), n
        elif p.dim() >= 2:
            assert not torch.equal(p, before[n]), n
    for g in t.backend.optimizer.param_groups:  # the last step's learning rate, times the group's scale
        assert g["lr"] == pytest.approx(lr_at(7, cfg) * g["lr_scale"])


def test_resume_takes_the_new_weight_decay_and_betas(tmp_path, tiny_data):
    # optim.* may change on resume; the checkpoint's optimizer groups must not bring the old back
    Trainer(tiny_config(tmp_path, "switch", steps=6, ckpt_every=3), data=tiny_data).fit(stop_after=3)
    cfg = tiny_config(tmp_path, "switch", steps=6, ckpt_every=3)
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, weight_decay=0.5, beta2=0.99, eps=1e-6))
    t = Trainer(cfg, data=tiny_data)
    t.fit()
    assert [(g["weight_decay"], g["betas"], g["eps"]) for g in t.backend.optimizer.param_groups] == [
        (0.5, (0.9, 0.99), 1e-6),
        (0.0, (0.9, 0.99), 1e-6),
    ]


def test_resume_refuses_another_expert_lr_scale(tmp_path, tiny_data):
    # The rest of optim may change on resume; this one may not: it changes the optimizer's groups.
    Trainer(tiny_config(tmp_path, "switch", steps=6, ckpt_every=3), data=tiny_data).fit(stop_after=3)
    with pytest.raises(ConfigError, match=r"optim\.expert_lr_scale: 1\.0 -> 0\.5"):
        Trainer(_expert_lr(tiny_config(tmp_path, "switch", steps=6, ckpt_every=3), 0.5), data=tiny_data).fit()


def test_resume_drops_metrics_logged_after_the_checkpoint(tmp_path, tiny_data):
    Trainer(tiny_config(tmp_path, steps=10, ckpt_every=4), data=tiny_data).fit(stop_after=6)  # ckpt at 4, logged to 6
    # simulate the crash: put the step-4 checkpoint back (fit(stop_after) saved at 6)
    Trainer(tiny_config(tmp_path / "x", steps=10, ckpt_every=4), data=tiny_data).fit(stop_after=4)
    shutil.copy(tmp_path / "x" / "checkpoint.pt", tmp_path / "checkpoint.pt")
    Trainer(tiny_config(tmp_path, steps=10, ckpt_every=4), data=tiny_data).fit()
    steps = [
        json.loads(line)["step"]
        for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
        if "train/loss" in line
    ]
    assert steps == list(range(1, 11))


def test_a_fresh_start_drops_metrics_of_a_run_that_never_checkpointed(tmp_path, tiny_data):
    """Killed before its first checkpoint, a run starts again from step 0: its old records go."""
    (tmp_path / "metrics.jsonl").write_text('{"step": 7, "train/loss": 99.0}\n')
    Trainer(tiny_config(tmp_path, steps=6), data=tiny_data).fit()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(r.get("train/loss") != 99.0 for r in records)
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2, 3, 4, 5, 6]


def test_expert_d_ff_sets_the_experts_hidden_size(tmp_path, tiny_data):
    cfg = tiny_config(tmp_path, "gshard")
    cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, expert_d_ff=64))
    t = Trainer(cfg, data=tiny_data)
    experts = t.model.blocks[0].ffn.experts
    assert tuple(experts.w1_EDF.shape) == (4, 64, 64) and tuple(experts.w2_EFD.shape) == (4, 64, 64)
    dense = Trainer(
        tiny_config(tmp_path / "d", "dense"), data=tiny_data
    )  # top-2 at d_ff/2: dense's active FFN params + the router
    assert t.params["active_non_embedding"] - dense.params["active_non_embedding"] == 2 * 4 * 64


def test_infinite_gradient_stops_before_the_weights_change(tmp_path, tiny_data):
    trainer = Trainer(tiny_config(tmp_path, steps=10, ckpt_every=3), data=tiny_data)
    trainer.fit(stop_after=3)
    trainer = Trainer(tiny_config(tmp_path, steps=10, ckpt_every=3), data=tiny_data)
    trainer.model.tok_emb.weight.register_hook(lambda g: g * float("inf"))
    with pytest.raises(TrainingDiverged, match=r"step 4: .*grad norm (inf|nan).*last good checkpoint"):
        trainer.fit()
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert ckpt.load(tmp_path / "checkpoint.pt")["step"] == 3


def test_a_val_split_shorter_than_a_sequence_is_a_config_error(tmp_path, tiny_data):
    short = dataclasses.replace(tiny_data, val=tiny_data.val[:10])
    with pytest.raises(ConfigError, match=r"val split has 10 tokens.*model\.seq_len"):
        Trainer(tiny_config(tmp_path), data=short)


@pytest.mark.parametrize("moe", ["gshard", "base"])
def test_resume_is_bit_exact(tmp_path, tiny_data, moe):
    """20 steps straight == 10 steps, 'crash', resume for 10: every loss bit-identical.

    GShard with random routing, jitter and dropout uses the RNG every step, so this also
    proves the RNG state travels in the checkpoint."""

    def cfg(d):
        c = tiny_config(d, moe, steps=20, ckpt_every=10, eval_every=10)
        return dataclasses.replace(
            c,
            model=dataclasses.replace(c.model, dropout=0.1),
            moe=dataclasses.replace(c.moe, jitter_eps=0.05 if moe != "base" else 0.0, expert_dropout=0.1),
        )

    straight = Trainer(cfg(tmp_path / "a"), data=tiny_data).fit()
    first = Trainer(cfg(tmp_path / "b"), data=tiny_data).fit(stop_after=10)
    assert first.step == 10 and (tmp_path / "b" / "checkpoint.pt").exists()
    resumed_trainer = Trainer(cfg(tmp_path / "b"), data=tiny_data)
    resumed = resumed_trainer.fit()
    assert resumed.step == 20
    a, b = _losses(straight.history), _losses(first.history) + _losses(resumed.history)
    assert a == b  # exact float equality, not approx
    assert straight.val_loss == resumed.val_loss
    sa = ckpt.load(tmp_path / "a" / "checkpoint.pt")["model"]
    sb = ckpt.load(tmp_path / "b" / "checkpoint.pt")["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, tiny_data, monkeypatch):
    trainer = Trainer(tiny_config(tmp_path, steps=6, ckpt_every=3), data=tiny_data)
    trainer.fit(stop_after=3)
    before = ckpt.load(tmp_path / "checkpoint.pt")
    assert before["step"] == 3

    real_save = torch.save

    def torn_save(obj, f, *a, **k):  # write half a checkpoint, then die
        real_save(obj, f, *a, **k)
        f.truncate(f.tell() // 2)
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ckpt.torch, "save", torn_save)
    trainer2 = Trainer(tiny_config(tmp_path, steps=6, ckpt_every=3), data=tiny_data)
    with pytest.raises(OSError, match="simulated"):
        trainer2.fit()
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    after = ckpt.load(tmp_path / "checkpoint.pt")
    assert after["step"] == 3
    assert all(torch.equal(before["model"][k], after["model"][k]) for k in before["model"])
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path, tiny_data, monkeypatch):
    trainer = Trainer(tiny_config(tmp_path, steps=10, ckpt_every=4), data=tiny_data)
    real_forward = trainer.backend.forward

    def poisoned(split, index, *args):
        out = real_forward(split, index, *args)
        if split == "train" and trainer.step == 6:
            return ModelOutput(out.logits, out.lm_loss * float("nan"), out.aux_loss, out.z_loss, out.layer_aux)
        return out

    monkeypatch.setattr(trainer.backend, "forward", poisoned)
    with pytest.raises(TrainingDiverged, match=r"diverged at step 7: lm loss nan.*last good checkpoint") as e:
        trainer.fit()
    assert "\n" not in str(e.value)
    assert ckpt.load(tmp_path / "checkpoint.pt")["step"] == 4


def test_gradient_accumulation_matches_a_bigger_batch(tmp_path, tiny_data):
    """2 micro-batches of 4 are the two halves of the step's batch of 8; the loss reported is
    the mean of the micro-batch losses, and the step count advances once per optimizer step."""
    cfg = tiny_config(tmp_path, "dense", steps=6, grad_accum=2, batch_size=4)
    t = Trainer(cfg, data=tiny_data)
    res = t.fit()
    assert res.step == 6 and len(res.history) == 6
    # the same micro-batches through a fresh copy of the initial model give the first logged loss
    t0 = Trainer(dataclasses.replace(cfg, out_dir=str(tmp_path / "fresh")), data=tiny_data)
    with torch.no_grad():
        manual = sum(t0.backend.forward("train", 0, micro).lm_loss.item() for micro in range(2)) / 2
    assert res.history[0]["train/loss"] == pytest.approx(manual, rel=1e-6)
    # ... and the micro-batches are the halves of one batch of 8 (so a dense run equals batch_size=8)
    big = Trainer(dataclasses.replace(cfg, grad_accum=1, batch_size=8, out_dir=str(tmp_path / "big")), data=tiny_data)
    with torch.no_grad():
        assert big.backend.forward("train", 0).lm_loss.item() == pytest.approx(manual, rel=1e-5)
    halves = [tiny_data.get_batch("train", 0, 4, 64, cfg.seed, shard=m, num_shards=2)[0] for m in range(2)]
    assert torch.equal(torch.cat(halves), tiny_data.get_batch("train", 0, 8, 64, cfg.seed)[0])


def _snapshot(run_dir: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every file under ``run_dir``: (size, mtime, bytes)."""
    return {
        str(f.relative_to(run_dir)): (f.stat().st_size, f.stat().st_mtime_ns, f.read_bytes())
        for f in sorted(run_dir.rglob("*"))
        if f.is_file()
    }


def test_a_finished_run_run_again_reports_its_result_and_writes_nothing(tmp_path, tiny_data, capsys):
    """Issue 16: re-running a finished run rewrote the checkpoint, appended to metrics.jsonl and
    opened a second W&B directory; now it reports the run's result and touches no file."""
    cfg = tiny_config(
        tmp_path,
        steps=5,
        eval_every=5,
        logger=LoggerConfig(wandb=True, wandb_mode="offline", progress=False, console=False, log_every=1),
    )
    first = Trainer(cfg, data=tiny_data).fit()
    before = _snapshot(tmp_path)
    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 1
    capsys.readouterr()
    again = Trainer(cfg, data=tiny_data).fit()
    assert _snapshot(tmp_path) == before  # no file written, appended, touched or added
    assert again.step == 5 and len(again.history) == 0
    assert again.val_loss == pytest.approx(first.val_loss) and again.train_loss == pytest.approx(first.train_loss)
    assert again.wandb_dir == first.wandb_dir  # the run's own W&B directory, not a new one
    err = capsys.readouterr().err
    assert (
        "already finished its 5 steps; nothing was trained or written" in err
        and "steps=10" in err
        and "resume=false" in err
    )
    text = format_summary(again)
    assert "val loss" in text and "checkpoint" in text


def test_mfu_names_its_peak_and_never_exceeds_100_percent(tmp_path, tiny_data, capsys):
    """Issue 16: a peak measured on a busy machine gave MFU 209%.  A peak below what the model
    achieves is named and MFU shows 100%; the summary says where the peak came from."""
    low = Trainer(tiny_config(tmp_path, steps=6, peak_flops=1.0), data=tiny_data).fit()  # 1 FLOP/s: far too low
    assert all(h["perf/mfu"] <= 1.0 for h in low.history) and low.history[-1]["perf/mfu"] == 1.0
    err = capsys.readouterr().err
    assert "above the peak of 0.0" in err and "moe-bench peak" in err and err.count("above the peak") == 1
    assert "of 0.0 GFLOP/s per process (given as peak_flops=)" in format_summary(low)
    ok = Trainer(tiny_config(tmp_path / "ok", steps=6, peak_flops=1e15), data=tiny_data).fit()
    assert 0 < ok.history[-1]["perf/mfu"] < 1.0 and "above the peak" not in capsys.readouterr().err


def test_the_peak_is_measured_once_per_machine_and_kept(tmp_path, monkeypatch):
    from moe.training import flops

    calls = []
    monkeypatch.setattr(flops, "measure_machine_peak", lambda device, dtype: calls.append(1) or 5e10)
    first = flops.machine_peak("cpu", cache_dir=tmp_path)
    second = flops.machine_peak("cpu", cache_dir=tmp_path)
    assert first.flops == second.flops == 5e10 and len(calls) == 1  # measured once, then read
    assert "measured" in second.source and str(tmp_path / "peak_flops.json") in second.source
    kept = json.loads((tmp_path / "peak_flops.json").read_text())
    (key,) = kept
    assert (
        "cpu" in key and "float32" in key and f"{torch.get_num_threads()} threads" in key and torch.__version__ in key
    )
    assert flops.machine_peak("cpu", cache_dir=tmp_path, remeasure=True).flops == 5e10 and len(calls) == 2


def test_the_kept_peak_is_the_best_of_several_trials(monkeypatch):
    """A busy moment lowers one trial, not the best of them."""
    from moe.training import flops

    rates = iter([3e10, 9e10, 2e10, 8e10])
    monkeypatch.setattr(flops, "measure_peak_flops", lambda *a, **k: next(rates))
    assert flops.measure_machine_peak(torch.device("cpu"), trials=4, pause=0) == 9e10


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_a_corrupt_checkpoint_is_one_line_and_left_untouched(tmp_path, tiny_data, damage):
    cfg = tiny_config(tmp_path, steps=6, ckpt_every=3)
    Trainer(cfg, data=tiny_data).fit(stop_after=3)
    path = tmp_path / "checkpoint.pt"
    data = b"" if damage == "empty" else path.read_bytes()[: path.stat().st_size // 2]
    path.write_bytes(data)
    with pytest.raises(CheckpointError) as e:
        Trainer(cfg, data=tiny_data).fit()
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "resume=false" in msg and "move the file" in msg
    assert ("empty" if damage == "empty" else "truncated") in msg
    assert path.read_bytes() == data  # left as it was


def test_a_killed_saves_temporary_is_removed_at_the_next_start(tmp_path, tiny_data, capsys):
    """A kill during a save leaves ``.checkpoint.pt.tmp-<host>-<pid>``; the next start removes
    the ones whose writer is gone (this host, a dead pid, either naming), not a live writer's
    or another host's."""
    import socket

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        host = socket.gethostname()
        tmp_path.mkdir(exist_ok=True)
        gone = [
            tmp_path / f".checkpoint.pt.tmp-{host}-{dead.pid}",
            tmp_path / f".checkpoint.pt.tmp-{dead.pid}",  # the older naming
            tmp_path / f".config.json.tmp-{host}-{dead.pid}",
        ]
        kept = [
            tmp_path / f".checkpoint.pt.tmp-{host}-{live.pid}",
            tmp_path / f".checkpoint.pt.tmp-another-host-{dead.pid}",
            tmp_path / "notes.tmp-1",
        ]
        for f in gone + kept:
            f.write_bytes(b"half a checkpoint")
        Trainer(tiny_config(tmp_path, steps=6), data=tiny_data).fit()
        assert not any(f.exists() for f in gone) and all(f.exists() for f in kept)
        assert capsys.readouterr().err.count("left by a save that was killed") == 3
    finally:
        live.kill()
        live.wait()


def test_every_checkpoint_opens_with_weights_only_and_an_older_one_still_resumes(tmp_path, tiny_data):
    """Issue 16: checkpoints needed weights_only=False (the numpy RNG state as an array).  Now
    plain ``torch.load(weights_only=True)`` opens them; one written the older way (numpy array)
    still resumes, bit-exactly."""
    cfg = tiny_config(tmp_path / "a", "gshard", steps=6, ckpt_every=3)
    straight = Trainer(cfg, data=tiny_data).fit()
    state = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)  # no error: tensors, numbers, strings only
    assert state["step"] == 6 and isinstance(state["rng"]["numpy"][1], torch.Tensor)
    b = dataclasses.replace(cfg, out_dir=str(tmp_path / "b"))
    Trainer(b, data=tiny_data).fit(stop_after=3)
    old = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    kind, keys, pos, has_gauss, gauss = old["rng"]["numpy"]
    old["rng"]["numpy"] = (kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss)  # as older versions wrote it
    torch.save(old, tmp_path / "b" / "checkpoint.pt")
    with pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)  # torch's default refuses the array ...
    resumed = Trainer(b, data=tiny_data).fit()  # ... ours allows numpy arrays, nothing else
    assert [h["train/loss"] for h in resumed.history] == [h["train/loss"] for h in straight.history[3:]]


def test_a_diverging_base_run_takes_the_divergence_path(tmp_path, tiny_data):
    """Issue 16: a NaN reaching BASE's auction raised ``ValueError: scores_TE must be finite``;
    any non-finite value in the forward now ends the run as the other layers' do."""
    trainer = Trainer(tiny_config(tmp_path, "base", steps=10, ckpt_every=4), data=tiny_data)
    real_forward = trainer.backend.forward

    def poisoned(split, index, *args):
        if split == "train" and trainer.step == 5:
            with torch.no_grad():
                trainer.model.blocks[0].ffn.router.weight_ED.fill_(float("nan"))
        return real_forward(split, index, *args)

    trainer.backend.forward = poisoned
    with pytest.raises(TrainingDiverged, match=r"diverged at step 6: lm loss nan.*last good checkpoint") as e:
        trainer.fit()
    assert "\n" not in str(e.value)
    assert ckpt.load(tmp_path / "checkpoint.pt")["step"] == 4


@pytest.mark.slow
def test_moe_train_console_script_end_to_end(tmp_path):
    """The real `moe-train` with Hydra, W&B offline, progress bar and the final summary."""
    exe = shutil.which("moe-train", path=str(Path(sys.executable).parent)) or shutil.which("moe-train")
    assert exe, "moe-train console script not installed (pip install -e .)"
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"), WANDB_MODE="offline")
    p = subprocess.run(
        [exe, "experiment=smoke", "steps=20", "moe=gshard"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    run = tmp_path / "runs" / "smoke-gshard"
    assert "val loss" in p.stdout and "tokens/s" in p.stdout and "MFU" in p.stdout
    assert "block 0: cv" in p.stdout and str(run / "checkpoint.pt") in p.stdout
    assert (run / "checkpoint.pt").exists() and (run / "metrics.jsonl").exists()
    assert list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert (run / ".hydra" / "config.yaml").exists()
    assert "train" in p.stderr and "step" in p.stderr  # the progress bar
    assert "data: stdlib, 40 files" in p.stderr and "train / " in p.stderr


def test_ctrl_c_checkpoints_at_the_end_of_the_step_and_resumes_bit_exactly(tmp_path, tiny_data, monkeypatch):
    import signal

    straight = Trainer(tiny_config(tmp_path / "a", "gshard", steps=8), data=tiny_data).fit()
    real_step = Trainer.train_step

    def step_then_ctrl_c(self, load):
        out = real_step(self, load)
        if self.step == 3:  # Ctrl-C arrives while step 3 is in flight... (delivered here)
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(Trainer, "train_step", step_then_ctrl_c)
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)  # CI may run with SIGINT ignored
    try:
        with pytest.raises(KeyboardInterrupt):
            Trainer(tiny_config(tmp_path / "b", "gshard", steps=8), data=tiny_data).fit()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    finally:
        signal.signal(signal.SIGINT, outer)
    assert ckpt.load(tmp_path / "b" / "checkpoint.pt")["step"] == 3
    monkeypatch.setattr(Trainer, "train_step", real_step)
    resumed = Trainer(tiny_config(tmp_path / "b", "gshard", steps=8), data=tiny_data).fit()
    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    losses_b = [r["train/loss"] for r in rows if "train/loss" in r]
    assert losses_b == _losses(straight.history) and resumed.step == 8


def test_ctrl_c_handling_leaves_an_ignored_sigint_alone(tmp_path, tiny_data):
    import signal

    outer = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as under nohup
    try:
        Trainer(
            tiny_config(tmp_path, steps=2, optim=dataclasses.replace(tiny_config(tmp_path).optim, warmup_steps=1)),
            data=tiny_data,
        ).fit()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, outer)
