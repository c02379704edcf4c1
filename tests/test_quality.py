"""moe-bench quality: the equal-compute comparison's arithmetic, its report, and a smoke run."""

from __future__ import annotations

import dataclasses
import json
import math
import random

import pytest

from moe.bench.cli import main as bench_main
from moe.bench.quality.arms import Arm, expert_only, parse_arm
from moe.bench.quality.curves import RunCurves, load_run, steps_to_reach, summarize
from moe.bench.quality.final_eval import paired_gaps
from moe.bench.quality.report import NOTES_MARKER, bar_checks, kept_notes, render
from moe.cli.config import compose as _compose


def _naive_reach(steps, losses, target, grid=20000):
    """Walk the piecewise-linear curve on a fine grid: the first x where it is <= target."""
    lo, hi = steps[0], steps[-1]
    for i in range(grid + 1):
        x = lo + (hi - lo) * i / grid
        for (s0, l0), (s1, l1) in zip(zip(steps, losses), zip(steps[1:], losses[1:])):
            if s0 <= x <= s1:
                y = l0 + (l1 - l0) * (x - s0) / (s1 - s0)
                break
        if y <= target:
            return x
    return None


def test_steps_to_reach_matches_a_fine_grid_walk():
    rng = random.Random(0)
    for _ in range(30):
        steps = list(range(0, 1001, 50))
        losses, v = [], 4.0
        for _ in steps:
            v += rng.uniform(-0.3, 0.08)  # mostly falling, with bumps
            losses.append(v)
        target = rng.uniform(min(losses) - 0.2, max(losses))
        got, want = steps_to_reach(steps, losses, target), _naive_reach(steps, losses, target)
        if want is None:
            assert got is None
        else:
            assert got == pytest.approx(want, abs=(steps[-1] - steps[0]) / 20000 + 1e-9)


def test_steps_to_reach_edges():
    assert steps_to_reach([0, 10], [2.0, 1.0], 3.0) == 0.0  # already there at the first eval
    assert steps_to_reach([0, 10], [2.0, 1.0], 0.5) is None  # never
    assert steps_to_reach([0, 10, 20], [2.0, 1.0, 0.0], 1.5) == pytest.approx(5.0)


def _write_metrics(path, records):
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")


def test_load_run_reads_curves_time_and_cv(tmp_path):
    recs = [
        {"step": 0, "params/total": 100, "params/active_non_embedding": 40},
        {
            "step": 10,
            "perf/step_time_s": 0.5,
            "perf/tokens_per_s": 1000.0,
            "moe/layer_1/cv": 0.2,
            "moe/layer_3/cv": 0.4,
            "train/loss": 3.0,
        },
        {"step": 10, "val/loss": 2.5},
        {
            "step": 30,
            "perf/step_time_s": 0.25,
            "perf/tokens_per_s": 2000.0,
            "moe/layer_1/cv": 0.1,
            "moe/layer_3/cv": None,
            "train/loss": 2.0,
        },
        {"step": 30, "val/loss": 2.0},
        {"step": 30, "val/loss": 1.9},  # the final eval at the same step replaces the periodic one
        {"type": "summary", "final/val_loss": 1.9},
    ]
    _write_metrics(tmp_path / "r", recs)
    rc = load_run(tmp_path / "r", "x")
    assert rc.val_steps == [10, 30] and rc.val_loss == [2.5, 1.9]
    assert rc.train_time_s == pytest.approx([5.0, 10.0])  # 10 steps x 0.5 s, then 20 x 0.25 s
    assert rc.time_at(20) == pytest.approx(7.5)
    assert rc.cv == pytest.approx([0.3, 0.1])  # a null cv is left out of the layer mean
    assert rc.params == {"total": 100, "active_non_embedding": 40}
    assert rc.final["final/val_loss"] == 1.9
    with pytest.raises(FileNotFoundError, match="metrics"):
        load_run(tmp_path / "missing")


def test_last_step_skips_the_summary_record(tmp_path):
    from moe.bench.quality.progress import last_step as _last_step

    _write_metrics(
        tmp_path / "r", [{"step": 0}, {"step": 1500, "val/loss": 1.2}, {"type": "summary", "final/val_loss": 1.2}]
    )
    assert _last_step(tmp_path / "r" / "metrics.jsonl") == 1500  # a finished arm counts as done from the start
    (tmp_path / "r" / "metrics.jsonl").write_text('{"step": 7}\n{"step": 8, "trunc')  # a record being written
    assert _last_step(tmp_path / "r" / "metrics.jsonl") == 7
    assert _last_step(tmp_path / "missing.jsonl") == 0


def test_a_part_trained_arm_starts_from_its_checkpoint_step(tmp_path):
    # The trainer drops the records logged after the checkpoint when it resumes, so the last
    # logged step (375) would make the progress bar run backwards to 250.
    from moe.bench.quality.progress import start_step as _start_step
    from moe.training import checkpoint as ckpt

    run = tmp_path / "r"
    _write_metrics(run, [{"step": 250}, {"step": 375}])
    assert _start_step(run, 1500) == 0  # no checkpoint yet: it starts over
    ckpt.save_atomic({"step": 250, "model": {}}, run / "checkpoint.pt")
    assert _start_step(run, 1500) == 250
    _write_metrics(run, [{"step": 1500}, {"type": "summary", "final/val_loss": 1.2}])
    assert _start_step(run, 1500) == 1500  # finished
    (run / "checkpoint.pt").write_bytes(b"torn")
    _write_metrics(run, [{"step": 375}])
    assert _start_step(run, 1500) == 0


def test_the_bar_ignores_records_the_trainer_is_about_to_drop(tmp_path):
    # Until moe-train rewrites metrics.jsonl, its stale tail (375) must not show: the bar
    # would jump to 375 and back to the checkpoint's 250 (or to 0 for a run started over).
    from moe.bench.quality.progress import file_sig as _file_sig
    from moe.bench.quality.progress import steps_done as _steps_done
    from moe.training.sinks import truncate_jsonl as _truncate_jsonl

    run = tmp_path / "r"
    path = run / "metrics.jsonl"
    _write_metrics(run, [{"step": 250}, {"step": 375}])
    stale = _file_sig(path)
    assert _steps_done(run, 250, stale, 1500) == 250  # launched, trainer not yet started
    _truncate_jsonl(path, 250)  # what the trainer does on resume
    assert _steps_done(run, 250, stale, 1500) == 250
    with path.open("a") as f:
        f.write('{"step": 275}\n')
    assert _steps_done(run, 250, stale, 1500) == 275
    _write_metrics(run, [{"step": 200}])  # a run that never checkpointed: it starts over
    stale = _file_sig(path)
    assert _steps_done(run, 0, stale, 1500) == 0
    path.unlink()  # what the trainer does on a fresh start
    assert _steps_done(run, 0, stale, 1500) == 0
    _write_metrics(run, [{"step": 25}])
    assert _steps_done(run, 0, stale, 1500) == 25
    assert _steps_done(tmp_path / "new", 0, None, 1500) == 0  # a new arm, no file yet


def test_the_setup_names_the_experts_learning_rate(tmp_path):
    import dataclasses

    from moe.bench.quality.report import schedule as _schedule
    from tests.conftest import tiny_config

    dense, switch = tiny_config(tmp_path, "dense"), tiny_config(tmp_path, "switch")
    assert _schedule([dense, switch]).startswith(f"AdamW lr {dense.optim.lr:g}, ")
    switch = dataclasses.replace(switch, optim=dataclasses.replace(switch.optim, expert_lr_scale=0.5))
    assert _schedule([dense, switch]).startswith(f"AdamW lr {dense.optim.lr:g} (the experts' 0.5x that), ")


def _curve(name, losses, every=100, cv=math.nan):
    steps = [every * (i + 1) for i in range(len(losses))]
    return RunCurves(
        name,
        val_steps=steps,
        val_loss=losses,
        train_steps=steps,
        train_time_s=[0.1 * s for s in steps],
        tokens_per_s=[1000.0] * len(steps),
        cv=[cv] * len(steps),
        params={"total": 10, "active_non_embedding": 5},
    )


def test_summarize_and_the_bar():
    dense = _curve("dense", [3.0, 2.5, 2.2, 2.0])
    switch = _curve("switch-8", [2.8, 2.0, 1.8, 1.7], cv=0.1)  # reaches 2.0 at step 200: 0.5x
    gshard = _curve("gshard-8", [3.0, 2.6, 2.3, 2.05], cv=0.2)  # never reaches, loses at equal steps
    rows = summarize([dense, switch, gshard])
    by = {r["arm"]: r for r in rows}
    assert by["dense"]["steps_ratio"] == 1.0
    assert by["switch-8"]["steps_to_baseline"] == pytest.approx(200.0) and by["switch-8"][
        "steps_ratio"
    ] == pytest.approx(0.5)
    assert by["switch-8"]["time_to_baseline_s"] == pytest.approx(20.0)
    assert by["gshard-8"]["steps_to_baseline"] is None and by["gshard-8"]["mean_cv"] == pytest.approx(0.2)
    # the gap to dense half way (step 200: 2.0 - 2.5) and at dense's last step (1.7 - 2.0)
    assert by["switch-8"]["gap_mid"] == pytest.approx(-0.5) and by["switch-8"]["gap_end"] == pytest.approx(-0.3)
    assert by["gshard-8"]["gap_mid"] == pytest.approx(0.1) and by["gshard-8"]["gap_end"] == pytest.approx(0.05)
    assert by["dense"]["gap_mid"] == 0.0
    odd = summarize([_curve("dense", [3.0, 2.5, 2.2], every=100), _curve("switch-8", [2.9, 2.3, 2.1], every=100)])
    assert odd[1]["gap_mid"] == pytest.approx((2.9 + 2.3) / 2 - (3.0 + 2.5) / 2)  # step 150: between two evals
    checks = {claim.split(" ")[0]: met for claim, met, _ in bar_checks(rows)}
    assert checks == {"Switch-8": True, "GShard-8": False, "an": False}  # issue 17's needs the paired eval
    by["switch-8"]["final_eval"] = {"batches": 256, "gap": -0.03, "gap_se": 0.005}
    (claim, met, evidence) = bar_checks(rows)[-1]
    assert "0.7x" in claim and met and "best: switch-8 at 0.50x of dense's steps" in evidence
    by["switch-8"]["final_eval"] = {"batches": 256, "gap": -0.003, "gap_se": 0.005}  # within the noise
    assert bar_checks(rows)[-1][1] is False


def test_an_upcycled_arm_counts_steps_from_the_start_against_dense_continued(tmp_path):
    """upcycle-8@200 trained 200 more steps after the dense run of 200: its curve starts at
    step 200, and it is measured against dense@200 (dense continued), not dense."""

    def write(name, steps, losses):
        d = tmp_path / name
        d.mkdir()
        recs = [{"step": s, "val/loss": v, "perf/step_time_s": 0.1} for s, v in zip(steps, losses)]
        (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
        return d

    up = load_run(write("up", [100, 200], [2.2, 1.9]), "upcycle-8@200", offset=200)
    cont = load_run(write("cont", [100, 200], [2.3, 2.0]), "dense@200", offset=200)
    dense = _curve("dense", [3.0, 2.5, 2.2, 2.1])
    assert up.val_steps == [300, 400] and up.train_steps == [300, 400] and up.time_at(400) == pytest.approx(20.0)
    rows = {
        r["arm"]: r
        for r in summarize([dense, cont, up], baselines={"upcycle-8@200": "dense@200", "dense@200": "dense"})
    }
    assert rows["upcycle-8@200"]["baseline"] == "dense@200"
    # dense@200 ends at 2.0 (step 400); upcycled reaches 2.0 at 300 + 100 * (2.2 - 2.0) / 0.3
    assert rows["upcycle-8@200"]["steps_to_baseline"] == pytest.approx(300 + 100 * 0.2 / 0.3)
    assert rows["upcycle-8@200"]["steps_ratio"] == pytest.approx((300 + 100 * 0.2 / 0.3) / 400)
    assert rows["dense@200"]["baseline"] == "dense" and rows["dense@200"]["steps_to_baseline"] == pytest.approx(
        300 + 100 * 0.2 / 0.3
    )
    gaps = paired_gaps(
        {"dense": [2.0, 2.0], "dense@200": [1.9, 1.8], "upcycle-8@200": [1.8, 1.75]},
        baselines={"upcycle-8@200": "dense@200", "dense@200": "dense"},
    )
    assert gaps["upcycle-8@200"]["gap"] == pytest.approx(-0.075) and gaps["dense@200"]["gap"] == pytest.approx(-0.15)


def test_parse_begun_arms():
    a = parse_arm("upcycle-8@500")
    assert (a.name, a.baseline, a.source.name) == ("upcycle-8@500", "dense@500", "dense-500")
    assert a.schedule_overrides(1500, "/r") == ["steps=1000", "init_from=/r/quality-dense-e1-500steps"]
    assert a.source.schedule_overrides(1500, "/r") == ["steps=500"]
    assert parse_arm("dense@500").baseline == "dense"
    assert "moe.route_scale=2.0" in a.overrides(768) and "moe.granularity=2" in a.overrides(768)
    for bad in ("upcycle-8", "switch-8@", "switch-8@0", "dense@x"):
        with pytest.raises(ValueError):
            parse_arm(bad)
    with pytest.raises(ValueError, match="between 0 and steps"):
        parse_arm("dense@1500").schedule_overrides(1500, "/r")


def test_paired_gaps_against_statistics():
    import statistics

    rng = random.Random(1)
    dense = [rng.uniform(1.0, 2.0) for _ in range(50)]  # batch difficulty varies a lot ...
    moe = [d - 0.01 + rng.gauss(0, 0.005) for d in dense]  # ... the gap little
    got = paired_gaps({"dense": dense, "switch-8": moe, "short": moe[:10]})
    diffs = [a - b for a, b in zip(moe, dense)]
    assert got["switch-8"]["gap"] == pytest.approx(statistics.fmean(diffs))
    assert got["switch-8"]["gap_se"] == pytest.approx(statistics.stdev(diffs) / math.sqrt(50))
    assert got["switch-8"]["gap_se"] < 0.1 * statistics.stdev(dense) / math.sqrt(
        50
    )  # the pairing removed the difficulty
    assert got["switch-8"]["batches_ahead"] == sum(d < 0 for d in diffs)
    assert got["switch-8"]["val_loss"] == pytest.approx(statistics.fmean(moe))
    assert got["dense"]["gap"] is None and got["short"]["gap"] is None  # not paired: other batches
    # the bar reads the paired gap: ahead by more than 2 SE is met, ahead within it is not
    rows = summarize([_curve("dense", [3.0, 2.0]), _curve("gshard-8", [2.9, 1.9]), _curve("base-8", [2.9, 1.9])])
    rows[1]["final_eval"] = {"batches": 50, "gap": -0.01, "gap_se": 0.002}
    rows[2]["final_eval"] = {"batches": 50, "gap": -0.003, "gap_se": 0.002}
    checks = {claim.split(" ")[0]: (met, ev) for claim, met, ev in bar_checks(rows)}
    assert checks["GShard-8"][0] is True and checks["BASE-8"][0] is False and "within the noise" in checks["BASE-8"][1]


def test_render_keeps_the_hand_written_notes(tmp_path):
    rows = summarize([_curve("dense", [3.0, 2.0]), _curve("base-8", [2.9, 1.9], cv=0.0)])
    setup = {
        "command": "moe-bench quality",
        "commit": "abc",
        "seed": 1,
        "date": "d",
        "machine": "m",
        "model": "m",
        "tokens_per_step": 2048,
        "steps": 200,
        "schedule": "s",
        "data": "d",
        "jobs": 2,
        "threads": 1,
    }
    out = tmp_path / "results.md"
    out.write_text(render(rows, setup=setup, plots={}) + "We tried a lower aux weight.\n")
    text = render(rows, setup=setup, plots={"p": "x.png"}, notes=kept_notes(out))
    assert text.count(NOTES_MARKER) == 1 and text.rstrip().endswith("We tried a lower aux weight.")
    assert (
        "| base-8 | 200 | 1.9000 |" in text
        and "| -0.1000 / -0.1000 |" in text
        and "met: BASE-8 beats dense" in text
        and "![p](x.png)" in text
    )


def test_arms_keep_dense_flops():
    assert Arm("dense").overrides(768) == ["moe=dense", "optim.expert_lr_scale=1"]
    assert Arm("switch", 8).overrides(768) == ["moe=switch", "moe.num_experts=8"]
    assert parse_arm("gshard-16").overrides(768) == ["moe=gshard", "moe.num_experts=16", "moe.expert_d_ff=384"]
    with pytest.raises(ValueError, match="not divisible"):
        parse_arm("gshard-8").overrides(767)
    for bad in ("switch", "topk-8", "base-1", "dense-8", "deepseek"):
        with pytest.raises(ValueError, match="not an arm"):
            parse_arm(bad)


def test_router_and_expert_overrides_skip_the_dense_arm():
    for o in (
        "moe.capacity_factor=2.0",
        "++moe.dropless=true",
        "moe.aux_loss_weight=0.001",
        "optim.expert_lr_scale=0.5",
    ):
        assert expert_only(o), o
    for o in ("moe.init_scale=0.1", "optim.lr=1e-3", "model.d_ff=512", "steps=3000", "moe=switch"):
        assert not expert_only(o), o


def test_smoke_comparison_end_to_end(tmp_path, capsys):
    """Four real (tiny) moe-train runs, two at a time, then the report and its plots."""
    out = tmp_path / "results.md"
    argv = [
        "quality",
        "--smoke",
        "--arms",
        "dense,switch-8,gshard-8,base-8",
        "--runs-dir",
        str(tmp_path / "runs"),
        "--out",
        str(out),
    ]
    assert bench_main(argv) == 0
    rows = {r["arm"]: r for r in json.loads(out.with_suffix(".json").read_text())["rows"]}
    assert set(rows) == {"dense", "switch-8", "gshard-8", "base-8"}
    d_model, moe_layers = 32, 1  # SMOKE_OVERRIDES: 2 blocks, MoE every 2
    for arm in ("switch-8", "gshard-8", "base-8"):  # equal FLOPs: active params differ by the router alone
        assert rows[arm]["active_params"] - rows["dense"]["active_params"] == 8 * d_model * moe_layers
        assert rows[arm]["total_params"] > rows["dense"]["total_params"]
        assert rows[arm]["mean_cv"] is not None and rows[arm]["steps"] == 12
    assert rows["base-8"]["mean_cv"] == pytest.approx(0.0, abs=1e-9)  # BASE balances exactly
    peaks = {
        json.loads((tmp_path / "runs" / f"quality-{a}" / "config.json").read_text())["peak_flops"]
        for a in ("dense-e1", "switch-e8", "gshard-e8", "base-e8")
    }
    assert len(peaks) == 1 and peaks.pop() > 0  # one peak, measured before the arms, for every arm's MFU
    assert all(math.isfinite(r["final_val_loss"]) for r in rows.values())
    # the final checkpoints on 4 val batches (--smoke), paired with dense; the first 2 batches are the training evals'
    assert all(r["final_eval"]["batches"] == 4 for r in rows.values())
    assert rows["dense"]["final_eval"]["gap"] is None and all(
        rows[a]["final_eval"]["gap"] is not None for a in ("switch-8", "gshard-8", "base-8")
    )
    cached = json.loads((tmp_path / "runs" / "quality-switch-e8" / "final_eval.json").read_text())
    assert cached["step"] == 12 and len(cached["losses"]) == 4
    assert rows["switch-8"]["final_eval"]["val_loss"] == pytest.approx(sum(cached["losses"]) / 4)
    for arm, run in (
        ("dense", "dense-e1"),
        ("switch-8", "switch-e8"),
        ("base-8", "base-e8"),
    ):  # reloaded model == the trained one
        first = json.loads((tmp_path / "runs" / f"quality-{run}" / "final_eval.json").read_text())["losses"][:2]
        assert rows[arm]["final_val_loss"] == pytest.approx(sum(first) / 2, rel=1e-6), arm
    text = out.read_text()
    assert "## The final checkpoints on 4 val batches" in text
    for png in ("val_loss_vs_steps.png", "val_loss_vs_time.png", "val_loss_gap_vs_steps.png", "load_cv.png"):
        assert (tmp_path / "results_plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"results_plots/{png}" in text
    out.write_text(text + "hand-written note\n")
    metrics = {a: (tmp_path / "runs" / f"quality-{a}" / "metrics.jsonl").read_text() for a in ("dense-e1", "switch-e8")}
    assert bench_main(argv) == 0  # finished arms are not launched again: their metrics stay as they were
    assert {a: (tmp_path / "runs" / f"quality-{a}" / "metrics.jsonl").read_text() for a in metrics} == metrics
    assert (
        "- Trained by earlier invocations with this config (their run dirs' config.json "
        "match it): dense, switch-8, gshard-8, base-8." in out.read_text()
    )
    capsys.readouterr()
    # ... unless the overrides changed: one line, nothing run.  Overrides may sit on either side
    # of the options (argparse alone would refuse the second group).
    assert bench_main(argv[:1] + ["moe.aux_loss_weight=0.5"] + argv[1:] + ["seed=1337"]) == 2
    err = capsys.readouterr().err
    assert (
        "arm switch-8: " in err
        and "holds a checkpoint of another config (moe.aux_loss_weight:" in err
        and "matmul peak" not in err
    )
    with pytest.raises(SystemExit):
        bench_main(argv + ["--no-such-option"])
    assert "unrecognized arguments: --no-such-option" in capsys.readouterr().err
    # an expert-only override leaves dense as it was: the first arm refused is switch-8
    scale = _compose(["experiment=quality"]).optim.expert_lr_scale
    assert bench_main(argv + [f"optim.expert_lr_scale={scale / 2}"]) == 2
    err = capsys.readouterr().err
    assert (
        "arm switch-8: " in err and f"(optim.expert_lr_scale: {scale!r} -> {scale / 2!r})" in err and "dense" not in err
    )
    # moe-train would resume with another schedule or length; an arm of a comparison may not
    lr = _compose(["experiment=quality"]).optim.lr
    assert bench_main(argv + [f"optim.lr={lr / 2}"]) == 2
    assert f"was trained with another schedule (optim.lr: {lr!r} -> {lr / 2!r})" in capsys.readouterr().err
    assert bench_main(argv + ["steps=24"]) == 2
    assert "was trained with another schedule (steps: 12 -> 24)" in capsys.readouterr().err
    assert bench_main(argv + ["--report-only"]) == 0  # finished arms are read, not re-trained
    assert out.read_text().rstrip().endswith("hand-written note")
    assert (
        "- Arms ran 2 at a time" in text and "- Trained by earlier invocations" not in text
    )  # the first run trained them all
    assert "- Trained by earlier invocations with this config" in out.read_text()
    assert "| dense |" in capsys.readouterr().out


def test_the_deepseek_arm_matches_dense_flops_with_its_shared_expert():
    """deepseek-8: 32 experts split 4 ways, 4 routed + 1 shared of d_ff/5 (rounded down):
    active FFN width 5 x 153 = 765 of dense's 768; the arm's model has no more active
    parameters than dense's beyond the router, and not 1% fewer."""
    from moe.cli.config import compose
    from moe.model.transformer import TransformerLM, count_parameters

    ov = parse_arm("deepseek-8").overrides(768)
    assert ov == [
        "moe=deepseek",
        "moe.num_experts=8",
        "moe.top_k=1",
        "moe.granularity=4",
        "moe.num_shared_experts=1",
        "moe.expert_d_ff=612",
    ]

    def active(overrides):
        cfg = compose(["experiment=quality", *overrides, "out_dir=/dev/null"])
        model_cfg = dataclasses.replace(cfg.model, vocab_size=256)
        return count_parameters(TransformerLM(model_cfg, cfg.moe))["active_non_embedding"], cfg

    dense, _ = active(Arm("dense").overrides(768))
    ds, cfg = active(ov)
    router = 2 * 32 * 192  # 2 MoE blocks, 32 routed experts, d_model 192
    assert cfg.moe.routed_experts == 32 and cfg.moe.routed_top_k == 4
    assert 0.99 * dense <= ds - router <= dense


def test_the_data_line_says_what_the_arms_trained_on():
    from moe.bench.quality.run import data_description
    from moe.config import DataConfig

    assert data_description(DataConfig(tokenizer="byte")) == "byte tokenizer, the embedded stdlib corpus"
    assert (
        data_description(DataConfig(path="/corpora/prose", vocab_size=4096, max_files=30))
        == "bpe tokenizer (vocab 4096), files under /corpora/prose, first 30 files"
    )


def test_smoke_upcycled_and_deepseek_arms_end_to_end(tmp_path, capsys):
    """The dense source of 4 steps trains first, then dense@4 and upcycle-8@4 begin from its
    checkpoint (8 more steps each) beside deepseek-8 from scratch; the report measures the
    upcycled arm against dense@4."""
    out = tmp_path / "results.md"
    argv = ["quality", "--smoke", "--arms", "dense,dense@4,upcycle-8@4,deepseek-8"]
    argv += ["--runs-dir", str(tmp_path / "runs"), "--out", str(out), "--no-plots"]
    assert bench_main(argv) == 0
    runs = tmp_path / "runs"
    src = json.loads((runs / "quality-dense-e1-4steps" / "config.json").read_text())
    up = json.loads((runs / "quality-upcycle-e8-from4" / "config.json").read_text())
    assert src["steps"] == 4 and up["steps"] == 8 and up["init_from"] == str(runs / "quality-dense-e1-4steps")
    log = (runs / "logs" / "quality-upcycle-e8-from4.log").read_text()
    assert "step 0 computes the dense model's function" in log
    rows = {r["arm"]: r for r in json.loads(out.with_suffix(".json").read_text())["rows"]}
    assert set(rows) == {"dense", "dense@4", "upcycle-8@4", "deepseek-8"}  # the source is not an arm of the table
    assert rows["upcycle-8@4"]["baseline"] == "dense@4" and rows["upcycle-8@4"]["steps"] == 12
    assert rows["upcycle-8@4"]["final_eval"]["gap"] is not None
    text = out.read_text()
    assert "Arms named `<arm>@S` (S = 4)" in text and "steps to its baseline's final val loss" in text


def test_progress_reads_the_step_past_a_record_longer_than_its_first_read(tmp_path):
    """A run with many experts logs expert-load records longer than 8 KiB; the progress bar
    read step 0 from such a tail (the bar stood still while the arm trained)."""
    from moe.bench.quality.progress import finished, last_step

    m = tmp_path / "metrics.jsonl"
    big = {"step": 350, "type": "expert_load", "load": {str(i): [0.015625] * 64 for i in range(40)}}
    m.write_text(json.dumps({"step": 300, "train/loss": 2.0}) + "\n" + json.dumps(big) + "\n")
    assert len(m.read_bytes()) > 2 * 8192
    assert last_step(m) == 350
    with m.open("a") as f:
        f.write(json.dumps({"type": "summary", "final/val_loss": 1.0}) + "\n")
    assert finished(tmp_path, 350) and not finished(tmp_path, 400)
