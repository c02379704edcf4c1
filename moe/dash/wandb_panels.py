"""``moe-dash wandb``: a W&B workspace (and optionally a report) laid out for MoE training runs.

Three steps, only the last of which talks to W&B:

1. :func:`scan_run` reads a run directory's ``metrics.jsonl``: which metric keys were logged,
   which blocks are MoE layers and how many experts each has.
2. :func:`panel_plan` turns that into plain data: a list of :class:`Section` s of
   :class:`Panel` s (title, type, metric keys), shown by ``--dry-run`` as text or JSON.
3. :func:`build_workspace` / :func:`build_report` convert the plan into ``wandb_workspaces``
   objects (no network); :func:`run_wandb` saves them (network and an API key).

Sections: "Loss" (train/val loss), "Load balance" (per-layer cv, max/mean, dropped fraction,
normalised entropy, aux loss; per MoE layer the expert load of the latest eval as a bar chart
and the per-expert fractions over time; the cumulative ``moe/expert_load`` table) and
"Throughput" (tokens/s, MFU, step time).  Only keys the run logged get a panel, so a dense run
has no load-balance section.  Panel types: ``line``, ``stacked_area`` (lines stacked to 1),
``bar`` (a ``wandb.plot.bar`` chart, read from its ``<key>_table``) and ``table`` (a logged
``wandb.Table``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import netrc
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

PROG = "moe-dash wandb"
DEFAULT_PROJECT = "moe"
PANEL_TYPES = ("line", "stacked_area", "bar", "table")

LOSS = (("Loss", ("train/loss", "val/loss")),)
# (stat under moe/layer_<i>/, panel title): one panel per stat, a line per MoE layer.
BALANCE = (
    ("cv", "Expert-load CV (std / mean)"),
    ("max_over_mean", "Busiest expert / mean load"),
    ("dropped_frac", "Dropped fraction (over capacity)"),
    ("entropy_norm", "Routing entropy / ln E"),
    ("aux_loss", "Load-balancing aux loss"),
    ("bias_range", "Expert bias spread (loss-free balancing: max - min)"),
)
THROUGHPUT = (
    ("Tokens / s", ("perf/tokens_per_s",)),
    ("MFU", ("perf/mfu",)),
    ("Step time (s)", ("perf/step_time_s",)),
)
LOAD_TABLE = "moe/expert_load"  # MetricsLogger.log_expert_load's cumulative table

_LAYER_KEY = re.compile(r"^moe/layer_(\d+)/(.+)$")
_FRAC = re.compile(r"^frac_e(\d+)$")


@dataclass(frozen=True)
class Panel:
    """One chart: ``type`` is one of :data:`PANEL_TYPES`; ``keys`` the W&B keys it reads."""

    title: str
    type: str
    keys: tuple[str, ...]


@dataclass(frozen=True)
class Section:
    name: str
    panels: tuple[Panel, ...]


@dataclass(frozen=True)
class RunKeys:
    """What a run logged: ``keys`` of its metric records, ``experts`` per MoE block
    (from ``frac_e<j>`` keys or ``expert_load`` records) and whether it logged the expert-load
    records (and so, with W&B on, the bar charts and the table)."""

    run_dir: Path
    keys: frozenset[str]
    experts: dict[int, int]
    has_expert_load: bool


class PanelError(ValueError):
    """A run directory the plan cannot be built from (one line, names the path)."""


def scan_run(run_dir: str | Path) -> RunKeys:
    """The metric keys and MoE layers of ``run_dir/metrics.jsonl`` (torn lines are skipped)."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise PanelError(
            f"{path} does not exist; give a run directory (moe-train writes runs/<run_name>/metrics.jsonl)"
        )
    keys: set[str] = set()
    experts: dict[int, int] = {}
    has_load = False
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(rec, dict) or rec.get("type") == "summary":
            continue
        if rec.get("type") == "expert_load":
            if isinstance(rec.get("load"), dict):
                has_load = True
                for i, fr in rec["load"].items():
                    if str(i).isdigit() and isinstance(fr, list):
                        experts[int(i)] = max(experts.get(int(i), 0), len(fr))
            continue
        keys.update(k for k in rec if k not in ("step", "time", "type"))
    for k in keys:
        m = _LAYER_KEY.match(k)
        f = _FRAC.match(m.group(2)) if m else None
        if f:
            experts[int(m.group(1))] = max(experts.get(int(m.group(1)), 0), int(f.group(1)) + 1)
    if not keys and not has_load:
        raise PanelError(f"{path} holds no metric records yet; wait for the first log interval")
    return RunKeys(run_dir, frozenset(keys), dict(sorted(experts.items())), has_load)


def panel_plan(run: RunKeys) -> list[Section]:
    """The workspace's sections and panels for ``run``; only keys the run logged are used."""

    def present(keys) -> tuple[str, ...]:
        return tuple(k for k in keys if k in run.keys)

    sections = []
    loss = [Panel(t, "line", present(ks)) for t, ks in LOSS if present(ks)]
    if loss:
        sections.append(Section("Loss", tuple(loss)))

    layers = list(run.experts)
    balance = []
    for stat, title in BALANCE:
        ks = present(f"moe/layer_{i}/{stat}" for i in layers)
        if ks:
            balance.append(Panel(title, "line", ks))
    for i in layers:
        if run.has_expert_load:
            balance.append(Panel(f"Expert load, block {i} (latest eval)", "bar", (f"moe/layer_{i}/expert_load_table",)))
        fracs = present(f"moe/layer_{i}/frac_e{j}" for j in range(run.experts[i]))
        if fracs:
            balance.append(Panel(f"Expert load over time, block {i}", "stacked_area", fracs))
        biases = present(f"moe/layer_{i}/bias_e{j}" for j in range(run.experts[i]))
        if biases:
            balance.append(Panel(f"Expert bias over time, block {i} (loss-free balancing)", "line", biases))
    if run.has_expert_load:
        balance.append(Panel("Expert load, every eval (table)", "table", (LOAD_TABLE,)))
    if balance:
        sections.append(Section("Load balance", tuple(balance)))

    throughput = [Panel(t, "line", present(ks)) for t, ks in THROUGHPUT if present(ks)]
    if throughput:
        sections.append(Section("Throughput", tuple(throughput)))
    return sections


def plan_dict(plan: list[Section]) -> list[dict[str, Any]]:
    """The plan as JSON-ready data: ``[{"name", "panels": [{"title", "type", "keys"}]}]``."""
    return [
        {"name": s.name, "panels": [{**dataclasses.asdict(p), "keys": list(p.keys)} for p in s.panels]} for s in plan
    ]


# -- wandb_workspaces objects (built without network; saved by run_wandb) -----------------------


def _wr_panel(p: Panel) -> Any:
    import wandb_workspaces.reports.v2 as wr

    if p.type == "line":
        return wr.LinePlot(title=p.title, x="Step", y=list(p.keys))
    if p.type == "stacked_area":
        return wr.LinePlot(title=p.title, x="Step", y=list(p.keys), plot_type="stacked-area", range_y=(0, 1))
    if p.type == "bar":  # what wandb.plot.bar logs: a Vega chart over the table <key>_table
        (table,) = p.keys
        return wr.CustomChart(
            query={"summaryTable": {"tableKey": table}},
            chart_name="wandb/bar/v0",
            chart_fields={"label": "expert", "value": "fraction"},
            chart_strings={"title": p.title},
        )
    if p.type == "table":
        (table,) = p.keys
        return wr.WeavePanelSummaryTable(table_name=table)
    raise ValueError(f"panel {p.title!r}: unknown type {p.type!r}; choose one of {', '.join(PANEL_TYPES)}")


def build_workspace(plan: list[Section], *, entity: str, project: str, name: str) -> Any:
    """A ``wandb_workspaces.workspaces.Workspace`` with the plan's sections (not saved)."""
    import wandb_workspaces.workspaces as ws

    return ws.Workspace(
        entity=entity,
        project=project,
        name=name,
        sections=[ws.Section(name=s.name, panels=[_wr_panel(p) for p in s.panels], is_open=True) for s in plan],
    )


def build_report(plan: list[Section], *, entity: str, project: str, title: str, description: str = "") -> Any:
    """A ``wandb_workspaces.reports.v2.Report``: per section a heading and a panel grid over
    the project's runs (not saved)."""
    import wandb_workspaces.reports.v2 as wr

    blocks: list[Any] = []
    for s in plan:
        blocks.append(wr.H2(s.name))
        blocks.append(
            wr.PanelGrid(runsets=[wr.Runset(entity=entity, project=project)], panels=[_wr_panel(p) for p in s.panels])
        )
    return wr.Report(entity=entity, project=project, title=title, description=description, blocks=blocks)


# -- the CLI ------------------------------------------------------------------------------------


def add_wandb_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``wandb`` subcommand (its ``func`` default is :func:`run_wandb`)."""
    p = subparsers.add_parser(
        "wandb",
        help="build a W&B workspace (and report) for MoE runs",
        description="Build a W&B workspace with Loss, Load balance and Throughput sections, laid out "
        "from a run directory's metrics.jsonl (its MoE layers and experts).  Needs `wandb login` "
        "unless --dry-run.",
    )
    p.add_argument(
        "run_dir", metavar="RUN_DIR", type=Path, help="a run directory with metrics.jsonl, e.g. runs/switch-e8"
    )
    p.add_argument(
        "--entity",
        default=None,
        help="W&B entity (user or team); default: the run's logger.wandb_entity, else your default entity",
    )
    p.add_argument(
        "--project",
        default=None,
        help=f"W&B project; default: the run's logger.wandb_project, else {DEFAULT_PROJECT!r}",
    )
    p.add_argument("--report", action="store_true", help="also build a report with the same panels")
    p.add_argument("--dry-run", action="store_true", help="print what would be created; no network, no API key")
    p.add_argument("--json", action="store_true", help="with --dry-run: print it as JSON")
    p.set_defaults(func=run_wandb)
    return p


def _fail(msg: str, code: int = 2) -> int:
    print(f"{PROG}: error: {msg}", file=sys.stderr)
    return code


def _run_logger_config(run_dir: Path) -> dict[str, Any]:
    """The run's ``logger`` config from ``config.json`` (the trainer's) or ``.hydra/config.yaml``."""
    import yaml  # PyYAML comes with hydra-core

    cfg: Any = None
    try:  # an unreadable config is no error here: the defaults apply
        if (run_dir / "config.json").is_file():
            cfg = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
        elif (run_dir / ".hydra" / "config.yaml").is_file():
            cfg = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):  # ValueError: bad JSON or bad UTF-8
        return {}
    logger = cfg.get("logger") if isinstance(cfg, dict) else None
    return logger if isinstance(logger, dict) else {}


def _plain_str(v: Any) -> str:
    """A config string, or "" for a missing value or an unresolved ``${...}`` interpolation."""
    return v if isinstance(v, str) and "${" not in v else ""


# The hosts `wandb login` writes a netrc entry for by default (wandb 0.31: CoreWeave Forge,
# whose API is api.wandb.ai behind it).
_DEFAULT_WANDB_HOSTS = ("api.forge.coreweave.com", "api.wandb.ai")


def has_api_key() -> bool:
    """Whether W&B has credentials here: ``WANDB_API_KEY`` (or ``WANDB_IDENTITY_TOKEN_FILE``),
    or a netrc entry with a key for the W&B host (``WANDB_BASE_URL``'s, else the default
    ones): what ``wandb login`` writes.  No network."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    base = os.environ.get("WANDB_BASE_URL")
    hosts = (urlsplit(base).hostname,) if base else _DEFAULT_WANDB_HOSTS
    path = Path(os.environ["NETRC"]).expanduser() if os.environ.get("NETRC") else Path("~/.netrc").expanduser()
    try:
        entries = netrc.netrc(str(path))
    except (OSError, netrc.NetrcParseError):
        return False
    return any((auth := entries.authenticators(h)) and auth[2] for h in hosts if h)


def _short(keys: tuple[str, ...]) -> str:
    if len(keys) <= 3:
        return ", ".join(keys)
    return f"{keys[0]} .. {keys[-1]} ({len(keys)} keys)"


def format_plan(
    plan: list[Section], run: RunKeys, *, entity: str | None, project: str, name: str, report: str | None
) -> str:
    """The dry run's text: where it would go, the layers found, then each section's panels."""
    where = f"{entity or '<your default entity>'}/{project}"
    layers = ", ".join(f"{i} ({e} experts)" for i, e in run.experts.items()) or "none (a dense run)"
    lines = [f'workspace "{name}" in {where}', f"  from {run.run_dir / 'metrics.jsonl'}: MoE blocks {layers}"]
    width = max((len(p.title) for s in plan for p in s.panels), default=0)
    for s in plan:
        lines.append(f"  {s.name}")
        lines += [f"    {p.type:<12} {p.title:<{width}}  {_short(p.keys)}" for p in s.panels]
    if report:
        lines.append(f'report "{report}" in {where}: the same sections, over the project\'s runs')
    return "\n".join(lines)


def run_wandb(args: argparse.Namespace) -> int:
    """``moe-dash wandb``: print the plan (``--dry-run``) or save the workspace (and report).
    Returns the exit code: 0 done, 2 bad input or no API key, 1 W&B refused or unreachable."""
    if args.json and not args.dry_run:
        return _fail("--json prints the plan of a --dry-run; add --dry-run")
    try:
        run = scan_run(args.run_dir)
    except PanelError as e:
        return _fail(str(e))
    plan = panel_plan(run)
    if not plan:
        return _fail(
            f"{run.run_dir / 'metrics.jsonl'} has none of the loss, load or throughput keys this workspace charts"
        )
    logger_cfg = _run_logger_config(run.run_dir)
    project = args.project or _plain_str(logger_cfg.get("wandb_project")) or DEFAULT_PROJECT
    entity = args.entity or _plain_str(logger_cfg.get("wandb_entity")) or None
    name = f"MoE training: {run.run_dir.resolve().name}"
    report_title = name if args.report else None

    if args.dry_run:
        if args.json:
            out = {
                "run_dir": str(run.run_dir),
                "entity": entity,
                "project": project,
                "moe_layers": {str(i): e for i, e in run.experts.items()},
                "workspace": {"name": name, "sections": plan_dict(plan)},
                "report": {"title": report_title} if report_title else None,
            }
            print(json.dumps(out, indent=2))
        else:
            print(format_plan(plan, run, entity=entity, project=project, name=name, report=report_title))
            print("dry run: nothing sent; drop --dry-run to create it (needs `wandb login`)")
        return 0

    if not has_api_key():
        return _fail(
            "no W&B API key (WANDB_API_KEY or ~/.netrc); run `wandb login` first, or add "
            "--dry-run to see the plan offline"
        )
    try:
        import wandb
        import wandb_workspaces  # noqa: F401
    except ImportError as e:
        return _fail(f"{e.name or e} is not installed; pip install 'moe[dashboard]'")
    try:
        entity = entity or wandb.Api().default_entity
        if not entity:
            return _fail("W&B has no default entity for this key; pass --entity USER_OR_TEAM")
        w = build_workspace(plan, entity=entity, project=project, name=name).save()
        print(f"workspace: {w.url}")
        if report_title:
            r = build_report(
                plan,
                entity=entity,
                project=project,
                title=report_title,
                description=f"Loss, load balance and throughput, laid out from {run.run_dir / 'metrics.jsonl'} by "
                "moe-dash wandb.",
            ).save()
            print(f"report: {r.url}")
    except Exception as e:  # wandb raises many types (CommError, HTTPError, timeouts); one line, not a traceback
        first = (str(e).strip().splitlines() or [""])[0]
        return _fail(
            f"W&B did not accept the workspace for {entity}/{project} ({type(e).__name__}: "
            f"{first}); check the entity and project, or `wandb login --relogin`",
            1,
        )
    return 0
