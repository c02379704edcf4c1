"""Expert load to metrics.jsonl and a real offline W&B run, and ``moe-dash wandb``: the panel
plan of a real run directory, the wandb_workspaces objects built from it with no network, and
the one-line error without an API key."""

from __future__ import annotations

import argparse
import dataclasses
import json
import socket
from pathlib import Path

import pytest

from moe.bench.quality.curves import load_run
from moe.config import LoggerConfig, to_dict
from moe.dash.wandb_panels import (
    Panel,
    RunKeys,
    add_wandb_parser,
    build_report,
    build_workspace,
    has_api_key,
    panel_plan,
    run_wandb,
    scan_run,
)
from moe.training.loop import Trainer
from tests.conftest import tiny_config
from tests.wandb_file import history, logged_table, offline_run, run_config

# wandb_workspaces 0.4.13 defines pydantic-v1-style validators: a DeprecationWarning on import.
pytestmark = pytest.mark.filterwarnings("ignore:Pydantic V1 style:DeprecationWarning")


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory, tiny_data):
    """10 steps of a 2-block Switch model (4 experts), logged every 5 steps, evaluated at 5 and
    at the end, with W&B offline."""
    run_dir = tmp_path_factory.mktemp("run")
    logger = LoggerConfig(
        wandb=True, wandb_mode="offline", wandb_project="moe-test-proj", progress=False, console=False, log_every=5
    )
    cfg = tiny_config(run_dir, "switch", steps=10, eval_every=5, logger=logger)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        result = Trainer(cfg, data=tiny_data).fit()
    wandb_dir, records = offline_run(run_dir)
    return run_dir, cfg, result, wandb_dir, records


def _jsonl(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _cli(*argv: str) -> int:
    p = argparse.ArgumentParser(prog="moe-dash")
    add_wandb_parser(p.add_subparsers(dest="what", required=True))
    return run_wandb(p.parse_args(["wandb", *argv]))


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("this must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# -- what training logs -------------------------------------------------------------------------


def test_expert_load_jsonl_has_one_record_per_eval(wandb_run):
    run_dir, _, result, _, _ = wandb_run
    recs = _jsonl(run_dir)
    loads = [r for r in recs if r.get("type") == "expert_load"]
    val_steps = [r["step"] for r in recs if "val/loss" in r]
    assert [r["step"] for r in loads] == val_steps == [5, 10]
    train = {r["step"]: r for r in recs if "train/loss" in r}
    for rec in loads:
        assert set(rec["load"]) == {"0", "1"} and isinstance(rec["time"], float)
        for i, fr in rec["load"].items():
            assert len(fr) == 4 and sum(fr) == pytest.approx(1.0)
            # the fractions of the log window that ended at this eval
            assert fr == [train[rec["step"]][f"moe/layer_{i}/frac_e{j}"] for j in range(4)]
    assert loads[-1]["load"]["1"] == result.layer_load[1]["frac"]
    # the existing jsonl reader skips the new records
    assert load_run(run_dir).val_steps == [5, 10]


def test_offline_wandb_run_has_the_full_config_and_the_load_tables(wandb_run):
    run_dir, cfg, _, wandb_dir, records = wandb_run
    config = run_config(records)
    assert config["moe"]["num_experts"] == 4
    assert {k: config[k] for k in to_dict(cfg)} == json.loads(json.dumps(to_dict(cfg)))  # the whole run config
    # the bar charts' Vega spec went into the config, as wandb.plot.bar does
    vis = config["_wandb"]["visualize"]
    assert {k for k in vis} == {"moe/layer_0/expert_load", "moe/layer_1/expert_load"}
    assert vis["moe/layer_0/expert_load"]["panel_config"]["panelDefId"] == "wandb/bar/v0"

    hist = history(records)
    for step in (5, 10):
        assert {
            "moe/expert_load",
            "moe/layer_0/expert_load_table",
            "moe/layer_1/expert_load_table",
            "val/loss",
            "train/loss",
        } <= hist[step]

    table = logged_table(wandb_dir, "moe/expert_load", 10)
    assert table["columns"] == ["step", "layer", "expert", "fraction"]
    assert len(table["data"]) == 2 * 2 * 4  # cumulative: 2 evals x 2 layers x 4 experts
    jsonl_load = {r["step"]: r["load"] for r in _jsonl(run_dir) if r.get("type") == "expert_load"}
    for step, layer, expert, frac in table["data"]:
        assert frac == pytest.approx(jsonl_load[step][str(layer)][expert])
    bars = logged_table(wandb_dir, "moe/layer_1/expert_load_table", 10)
    assert bars["columns"] == ["expert", "fraction"] and [e for e, _ in bars["data"]] == ["e0", "e1", "e2", "e3"]
    assert [f for _, f in bars["data"]] == pytest.approx(jsonl_load[10]["1"])


# -- moe-dash wandb -----------------------------------------------------------------------------


def test_dry_run_plan_of_a_real_run(wandb_run, capsys, no_network):
    run_dir, _, _, _, records = wandb_run
    assert _cli(str(run_dir), "--dry-run", "--json", "--report") == 0
    out = json.loads(capsys.readouterr().out)
    assert out["project"] == "moe-test-proj"  # from the run's config
    assert out["entity"] is None and out["moe_layers"] == {"0": 4, "1": 4}
    assert out["report"]["title"] == out["workspace"]["name"]
    sections = {s["name"]: s["panels"] for s in out["workspace"]["sections"]}
    assert list(sections) == ["Loss", "Load balance", "Throughput"]
    assert sections["Loss"] == [{"title": "Loss", "type": "line", "keys": ["train/loss", "val/loss"]}]
    assert sorted(k for p in sections["Throughput"] for k in p["keys"]) == [
        "perf/mfu",
        "perf/step_time_s",
        "perf/tokens_per_s",
    ]
    balance = sections["Load balance"]
    bars = [p["keys"] for p in balance if p["type"] == "bar"]
    assert bars == [["moe/layer_0/expert_load_table"], ["moe/layer_1/expert_load_table"]]  # one per MoE layer
    assert [p["keys"] for p in balance if p["type"] == "table"] == [["moe/expert_load"]]
    cv = next(p for p in balance if p["keys"][0].endswith("/cv"))
    assert cv["keys"] == ["moe/layer_0/cv", "moe/layer_1/cv"]
    stacked = [p["keys"] for p in balance if p["type"] == "stacked_area"]
    assert stacked[1] == [f"moe/layer_1/frac_e{j}" for j in range(4)]
    # every key the plan charts was logged to the W&B run
    logged = set().union(*history(records).values())
    planned = {k for panels in sections.values() for p in panels for k in p["keys"]}
    assert planned <= logged, planned - logged

    assert _cli(str(run_dir), "--dry-run", "--project", "other", "--entity", "team") == 0
    text = capsys.readouterr().out
    assert "in team/other" in text and "MoE blocks 0 (4 experts), 1 (4 experts)" in text
    for line in (
        "  Loss",
        "  Load balance",
        "  Throughput",
        "Expert load, block 1 (latest eval)",
        "perf/tokens_per_s",
        "dry run: nothing sent",
    ):
        assert line in text


def test_workspace_and_report_objects_build_with_no_network(wandb_run, no_network):
    pytest.importorskip("wandb_workspaces")
    import wandb_workspaces.reports.v2 as wr

    run_dir = wandb_run[0]
    plan = panel_plan(scan_run(run_dir))
    w = build_workspace(plan, entity="me", project="moe", name="MoE training: t")
    assert [s.name for s in w.sections] == ["Loss", "Load balance", "Throughput"]
    balance = w.sections[1].panels
    charts = [p for p in balance if isinstance(p, wr.CustomChart)]
    assert [c.query["summaryTable"]["tableKey"] for c in charts] == [
        "moe/layer_0/expert_load_table",
        "moe/layer_1/expert_load_table",
    ]
    assert all(c.chart_name == "wandb/bar/v0" for c in charts)
    assert [p.table_name for p in balance if isinstance(p, wr.WeavePanelSummaryTable)] == ["moe/expert_load"]
    assert w.sections[0].panels[0].y == ["train/loss", "val/loss"]
    # the spec W&B would receive serialises offline (saving is what needs the network)
    spec = w._to_model().model_dump_json(by_alias=True)
    assert "moe/layer_1/expert_load_table" in spec and "perf/mfu" in spec

    r = build_report(plan, entity="me", project="moe", title="MoE training: t")
    grids = [b for b in r.blocks if isinstance(b, wr.PanelGrid)]
    assert [b.text for b in r.blocks if isinstance(b, wr.H2)] == ["Loss", "Load balance", "Throughput"]
    assert [len(g.panels) for g in grids] == [len(s.panels) for s in plan]
    assert grids[0].runsets[0].project == "moe" and grids[0].runsets[0].entity == "me"


def test_missing_api_key_is_one_line_and_exit_2(wandb_run, tmp_path, monkeypatch, capsys, no_network):
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "NETRC", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    assert not has_api_key()
    assert _cli(str(wandb_run[0]), "--report") == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1
    assert err.startswith("moe-dash wandb: error: ") and "wandb login" in err and "--dry-run" in err

    # what `wandb login` writes counts as a key (so the check above is not always false)
    netrc = tmp_path / ".netrc"
    for host in ("api.forge.coreweave.com", "api.wandb.ai"):
        netrc.write_text(f"machine {host}\n  login user\n  password " + "x" * 40 + "\n")
        assert has_api_key(), host
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")  # a self-hosted server: its host only
    assert not has_api_key()
    netrc.write_text("machine wandb.example.org login user password " + "x" * 40 + "\n")
    assert has_api_key()
    netrc.unlink()
    monkeypatch.setenv("WANDB_API_KEY", "y" * 40)
    assert has_api_key()


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    assert _cli(str(tmp_path / "nope"), "--dry-run") == 2
    assert _cli(str(tmp_path), "--json") == 2  # --json goes with --dry-run
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(e.startswith("moe-dash wandb: error: ") for e in err)
    assert "nope/metrics.jsonl" in err[0] and "--dry-run" in err[1]


def test_plan_of_a_dense_run_and_project_from_hydra_config(tmp_path, capsys):
    """No MoE keys: no load-balance section; the project comes from .hydra/config.yaml."""
    recs = [
        {"step": 0, "time": 1.0, "params/total": 10},
        {"step": 5, "time": 2.0, "train/loss": 3.0, "perf/tokens_per_s": 100.0},
        "{torn line",
        {"step": 5, "time": 2.1, "val/loss": 3.1},
        {"type": "summary", "final/val_loss": 3.1},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in recs))
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text(
        "run_name: ${moe.name}\nlogger:\n  wandb_project: hydra-proj\n  wandb_entity: ${oc.env:X}\n"
    )
    run = scan_run(tmp_path)
    assert run.experts == {} and not run.has_expert_load
    plan = panel_plan(run)
    assert [s.name for s in plan] == ["Loss", "Throughput"]
    assert plan[1].panels == (Panel("Tokens / s", "line", ("perf/tokens_per_s",)),)
    assert _cli(str(tmp_path), "--dry-run", "--json") == 0
    out = json.loads(capsys.readouterr().out)
    assert out["project"] == "hydra-proj" and out["entity"] is None  # an interpolation is not an entity


def test_plan_orders_experts_numerically_and_skips_unlogged_stats():
    keys = {f"moe/layer_3/frac_e{j}" for j in range(12)} | {"moe/layer_3/cv", "train/loss"}
    plan = panel_plan(RunKeys(Path("r"), frozenset(keys), {3: 12}, has_expert_load=False))
    balance = dict((s.name, s.panels) for s in plan)["Load balance"]
    assert [p.type for p in balance] == [
        "line",
        "stacked_area",
    ]  # no dropped_frac etc., no bar without expert_load records
    assert balance[1].keys[-3:] == ("moe/layer_3/frac_e9", "moe/layer_3/frac_e10", "moe/layer_3/frac_e11")
    pytest.importorskip("wandb_workspaces")
    with pytest.raises(ValueError, match="unknown type 'pie'"):
        build_workspace(
            [dataclasses.replace(plan[0], panels=(Panel("x", "pie", ("a",)),))], entity="e", project="p", name="n"
        )


def test_plan_draws_the_expert_bias_where_a_run_logged_it():
    keys = {f"moe/layer_1/frac_e{j}" for j in range(4)} | {f"moe/layer_1/bias_e{j}" for j in range(4)}
    keys |= {"moe/layer_1/bias_range", "moe/layer_1/cv"}
    plan = panel_plan(RunKeys(Path("r"), frozenset(keys), {1: 4}, has_expert_load=False))
    balance = {p.title: p for p in dict((s.name, s.panels) for s in plan)["Load balance"]}
    bias = balance["Expert bias over time, block 1 (loss-free balancing)"]
    assert bias.type == "line" and bias.keys == tuple(f"moe/layer_1/bias_e{j}" for j in range(4))
    assert balance["Expert bias spread (loss-free balancing: max - min)"].keys == ("moe/layer_1/bias_range",)
    plain = panel_plan(RunKeys(Path("r"), frozenset(keys - {k for k in keys if "bias" in k}), {1: 4}, False))
    assert not any("bias" in p.title for s in plain for p in s.panels)
