"""moe-dash: the run readers, the server's API, and (browser marker) the page in real Chromium."""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.request
from pathlib import Path

import pytest

from moe.dash.cli import main as dash_main
from moe.dash.data import collapses, config_diff, find_runs, read_run, snapshot
from moe.dash.server import make_server, page, serve_in_thread
from moe.training.loop import Trainer
from tests.conftest import tiny_config

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def _collapsed_run(path: Path, steps=(10, 20, 30)) -> Path:
    """A run whose block-1 router sends 80% of the tokens to expert 0 from step 20 on."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"moe": {"name": "switch", "num_experts": 4}, "optim": {"lr": 0.01}}))
    recs = [{"step": 0, "params/total": 1000, "params/active_non_embedding": 400}]
    for s in steps:
        fr = [0.25] * 4 if s < 20 else [0.8, 0.1, 0.05, 0.05]
        cv = 0.0 if s < 20 else 1.2
        recs.append(
            {
                "step": s,
                "train/loss": 5.0 - s / 100,
                "perf/tokens_per_s": 1000.0,
                "perf/mfu": 0.5 if s < 30 else 1.5,
                "perf/step_time_s": 0.1,
                "moe/layer_1/cv": cv,
                "moe/layer_1/dropped_frac": 0.1,
                **{f"moe/layer_1/frac_e{i}": f for i, f in enumerate(fr)},
            }
        )
    (path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    return path


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory, tiny_data):
    """Two real short runs (BASE, which cannot collapse, and dense) and one collapsed run written by hand."""
    root = tmp_path_factory.mktemp("runs")
    for moe in ("base", "dense"):
        Trainer(tiny_config(root / f"tiny-{moe}", moe, steps=12, eval_every=6), data=tiny_data).fit()
    _collapsed_run(root / "collapsed")
    cfg = json.loads((root / "tiny-base" / "config.json").read_text())
    cfg["moe"].update(name="switch", num_experts=4)
    (root / "collapsed" / "config.json").write_text(json.dumps(cfg))  # as if trained with another router
    return root


def test_reader_finds_runs_series_and_layers(runs_dir):
    assert [p.name for p in find_runs(runs_dir)] == ["collapsed", "tiny-base", "tiny-dense"]
    r = read_run(runs_dir / "tiny-base")
    assert r["status"] == "finished" and r["last_step"] == 12
    assert [p[0] for p in r["series"]["train/loss"]] == list(range(1, 13))
    assert [p[0] for p in r["series"]["val/loss"]] == [6, 12]
    assert sorted(r["layers"]) == ["0", "1"]  # tiny_config: both blocks are MoE
    for L in r["layers"].values():
        assert len(L["steps"]) == 12 and all(len(f) == 4 and abs(sum(f) - 1) < 1e-6 for f in L["frac"])
        assert L["max_frac"] == [max(f) for f in L["frac"]]
    assert r["config"]["moe.name"] == "base" and r["config"]["moe.num_experts"] == 4
    assert read_run(runs_dir / "tiny-dense")["layers"] == {}


def test_config_diff_lists_only_what_differs(runs_dir):
    runs = [read_run(p) for p in find_runs(runs_dir) if p.name.startswith("tiny")]
    diff = config_diff(runs)
    assert "moe.name" in diff and "moe.num_experts" in diff
    assert "model.d_model" not in diff and "seed" not in diff  # the same in both
    assert not any(k.startswith("logger.") or k == "out_dir" for k in diff)
    without_config = dict(runs[0], config={})  # an old run with no config.json: compared with nothing
    assert config_diff([without_config, runs[1]]) == []


def test_collapse_is_flagged_with_the_step_it_began(runs_dir):
    (alert,) = collapses(read_run(runs_dir / "collapsed"))
    assert alert["layer"] == 1 and alert["since"] == 20 and alert["step"] == 30
    assert "80%" in alert["reason"] and "CV 1.20" in alert["reason"]
    assert collapses(read_run(runs_dir / "tiny-base")) == []
    snap = snapshot(runs_dir)
    assert [a["run"] for a in snap["alerts"]] == ["collapsed"]


def test_a_half_written_line_is_skipped(tmp_path):
    run = _collapsed_run(tmp_path / "r", steps=(10,))
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 20, "train/lo')  # the trainer is mid-write
    assert read_run(run)["series"]["train/loss"] == [[10, 4.9]]


def test_a_sweep_lands_under_runs_where_the_dashboard_finds_it(tmp_path):
    """Issue 16: `moe-train -m ...` wrote to multirun/, which `moe-dash runs` did not show."""
    from omegaconf import OmegaConf

    from moe.cli.config import CONF_DIR

    sweep_dir = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "config.yaml"))["hydra"]["sweep"]["dir"]  # unresolved
    assert sweep_dir.startswith("runs/"), sweep_dir
    runs = tmp_path / "runs"
    for d in (
        runs / "switch-e8",
        runs / "multirun" / "2026-12-05_01-02-03" / "0-dense-e1",
        runs / "multirun" / "2026-12-05_01-02-03" / "1-switch-e8",
    ):
        d.mkdir(parents=True)
        (d / "metrics.jsonl").write_text(json.dumps({"step": 1, "train/loss": 1.0}) + "\n")
    names = [p.name for p in find_runs(runs)]
    assert sorted(names) == ["0-dense-e1", "1-switch-e8", "switch-e8"]


@pytest.mark.skipif(shutil.which("node") is None, reason="needs Node.js to run the page's formatting function")
def test_counts_in_the_runs_table_are_formatted_alike():
    """Issue 16: the runs table showed tokens/s as 915.36 for one run and 3.1k for another."""
    import re
    import subprocess

    js = (Path(__file__).resolve().parent.parent / "moe" / "dash" / "static" / "dash.js").read_text()
    fn = re.search(r"const fmtCount = \(v\) => \{.*?\n  \};", js, re.S).group(0)
    values = [915.36, 3123.0, 12.3456, 0.5, 1_250_000, None]
    out = subprocess.run(
        ["node", "-e", fn + f"; console.log(JSON.stringify({json.dumps(values)}.map(fmtCount)))"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(out.stdout) == ["915", "3.1k", "12.3", "0.5", "1.3M", "–"]


def test_server_api_and_page_use_no_external_resources(runs_dir):
    httpd = make_server(runs_dir, port=0)
    serve_in_thread(httpd)
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        html = urllib.request.urlopen(base + "/").read().decode()
        assert (
            "/static/dash.js" in html
            and "http://" not in html.replace("http://www.w3.org", "")
            and "https://" not in html
        )
        js = urllib.request.urlopen(base + "/static/dash.js").read().decode()
        assert 'fetch("/api/snapshot"' in js and "https://" not in js
        snap = json.loads(urllib.request.urlopen(base + "/api/snapshot").read())
        assert [r["name"] for r in snap["runs"]] == ["collapsed", "tiny-base", "tiny-dense"]
        v1 = json.loads(urllib.request.urlopen(base + "/api/version").read())["version"]
        time.sleep(0.01)
        with open(runs_dir / "collapsed" / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": 31, "train/loss": 4.6}) + "\n")
        v2 = json.loads(urllib.request.urlopen(base + "/api/version").read())["version"]
        assert v1 != v2  # the page refetches only when a run's files change
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(base + "/static/../../etc/passwd")
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert dash_main([str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moe-dash: error:") and "not a folder" in err and "\n" not in err
    assert dash_main([str(tmp_path), "--export", str(tmp_path / "x.html")]) == 1  # no runs under it
    assert "no run directories" in capsys.readouterr().err
    httpd = make_server(tmp_path, port=0)
    try:
        assert dash_main([str(tmp_path), "--port", str(httpd.server_address[1])]) == 2
        assert "is in use" in capsys.readouterr().err
    finally:
        httpd.server_close()


def test_export_inlines_everything(runs_dir, tmp_path):
    out = tmp_path / "dash.html"
    assert dash_main([str(runs_dir), "--export", str(out)]) == 0
    html = out.read_text()
    assert "<script src=" not in html and "<link" not in html  # one file: style, script and data inline
    assert '"tiny-base"' in html and "function heatmap" in html
    assert (
        "</script"
        not in page(refresh_s=0, inline_data={"x": "</script><b>"})
        .split("window.MOE_DASH", 1)[1]
        .split("</script>", 1)[0]
    )


# -- in a real browser -------------------------------------------------------------------------


@pytest.fixture
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        if os.environ.get("CI"):  # .ci/run installs them (make browser, then make test): never a silent skip there
            pytest.fail("chromium/chromedriver missing in CI: `make browser` should have installed them")
        pytest.skip("needs Debian's chromium and chromium-driver (`make browser` installs them, as root; .ci/run does)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1800"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def _wait(driver, cond, timeout=20.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        v = driver.execute_script(cond)
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for: {cond}")


def _check_rendered(driver, shots: Path, name: str):
    _wait(driver, "return document.body.dataset.ready === '1'")
    q = driver.execute_script
    assert q("return document.querySelectorAll('#runs-table tbody tr').length") == 3
    overlay = q(
        "return [...document.querySelectorAll('#overlay-charts svg.line-chart')].map(s => "
        "[s.closest('.chart').dataset.chart, +s.dataset.points])"
    )
    assert dict(overlay).keys() == {"train-loss", "val-loss", "tokens-per-s", "mfu"}
    assert all(n > 0 for _, n in overlay)
    assert dict(overlay)["val-loss"] == 2 + 2  # two evals for each real run; the collapsed one has none
    heat = q(
        "return [...document.querySelectorAll('svg.heatmap')].map(s => [+s.dataset.cells, "
        "s.querySelectorAll('rect.cell').length, +s.dataset.experts])"
    )
    assert len(heat) == 2 + 1  # tiny-base has 2 MoE blocks, collapsed has 1, dense none
    assert all(cells == rects > 0 and experts == 4 for cells, rects, experts in heat)
    alert = q(
        "const a = document.getElementById('collapse-alert'); return a && [a.textContent, "
        "a.getBoundingClientRect().top]"
    )
    assert alert and "collapsed, block 1" in alert[0] and "80%" in alert[0]
    assert alert[1] < 150  # first thing under the header: where the eye lands
    assert q("return document.querySelectorAll('.chart.collapsed').length") == 2  # its heatmap and its load chart
    warn = q("const w = document.getElementById('mfu-warning'); return w && w.textContent")
    assert warn and "collapsed" in warn and "tiny-base" not in warn  # MFU 150%: its peak was measured under load
    errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
    assert not errors, errors
    path = shots / f"{name}.png"
    driver.save_screenshot(str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.browser
def test_dashboard_in_chromium_renders_and_refreshes(runs_dir, browser, tmp_path):
    shots = Path(os.environ.get("MOE_DASH_SCREENSHOTS", tmp_path))
    httpd = make_server(runs_dir, port=0, refresh_s=0.3)
    serve_in_thread(httpd)
    try:
        browser.get(f"http://127.0.0.1:{httpd.server_address[1]}/")
        _check_rendered(browser, shots, "dashboard")
        renders = int(browser.execute_script("return document.body.dataset.renders"))
        with open(runs_dir / "tiny-base" / "metrics.jsonl", "a") as f:  # the run goes on
            f.write(json.dumps({"step": 13, "train/loss": 3.21, "perf/tokens_per_s": 1.0}) + "\n")
        _wait(browser, f"return +document.body.dataset.renders > {renders}")
        row = browser.execute_script("return document.querySelector('tr[data-run=\"tiny-base\"]').textContent")
        assert "13" in row and "3.2100" in row
        browser.find_element("css selector", 'tr[data-run="collapsed"]').click()  # hide a run from the charts
        assert browser.execute_script("return document.querySelectorAll('svg.heatmap').length") == 2
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.browser
def test_exported_page_renders_without_a_server(runs_dir, browser, tmp_path):
    out = tmp_path / "dash.html"
    assert dash_main([str(runs_dir), "--export", str(out)]) == 0
    browser.get(out.as_uri())
    _check_rendered(browser, tmp_path, "export")


@pytest.fixture(scope="module")
def bias_run(tmp_path_factory, tiny_data):
    """A real short run of the deepseek layer: it logs loss-free balancing's expert bias."""
    root = tmp_path_factory.mktemp("bias-runs")
    Trainer(tiny_config(root / "tiny-deepseek", "deepseek", steps=8, eval_every=4), data=tiny_data).fit()
    return root


def test_reader_keeps_the_expert_bias_per_step(bias_run):
    run = read_run(bias_run / "tiny-deepseek")
    L = run["layers"]["0"]
    assert len(L["bias"]) == len(L["steps"]) == 8 and all(len(b) == 8 for b in L["bias"])  # 8 fine-grained experts
    assert L["bias"][0] == [0.0] * 8 and any(v != 0 for v in L["bias"][-1])  # step 1 routed with the zero bias
    assert read_run(_collapsed_run(bias_run / "no-bias"))["layers"]["1"]["bias"] == [None, None, None]


@pytest.mark.browser
def test_the_expert_bias_is_drawn_beside_the_load(bias_run, browser, tmp_path):
    out = tmp_path / "dash.html"
    assert dash_main([str(bias_run), "--export", str(out)]) == 0
    browser.get(out.as_uri())
    _wait(browser, "return document.body.dataset.ready === '1'")
    charts = browser.execute_script(
        "return [...document.querySelectorAll('[data-chart^=\"bias-\"] svg.heatmap')].map(s => "
        "[+s.dataset.experts, +s.dataset.columns, s.querySelectorAll('rect.cell').length, "
        "s.querySelector('rect.cell title').textContent])"
    )
    assert len(charts) == 2  # both blocks of the run
    for experts, cols, cells, tip in charts:
        assert experts == 8 and cells == experts * cols and "bias" in tip
    errors = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
    assert not errors, errors
    browser.save_screenshot(str(Path(os.environ.get("MOE_DASH_SCREENSHOTS", tmp_path)) / "bias.png"))
