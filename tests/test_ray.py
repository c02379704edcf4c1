"""parallel=ray: Ray Train's TorchTrainer runs the ranks, moe-train is the driver.

Fast (no Ray started): config and resource errors are one line, raised before Ray starts; the
report hooks turn each logged step into one report on every rank (rank 0 attaching the
checkpoint); a worker's ConfigError / TrainingDiverged comes out of Ray's wrapper as itself;
launch/ray_cluster.sh builds the documented ``ray`` commands (a stand-in ``ray`` prints them).

Slow (real Ray on 127.0.0.1, one private Ray for the in-process tests of this module, ~1-2 min
a run on a busy 2-core machine):

- 2 workers train 20 steps of the tiny model on a folder of text files: the loss falls, rank 0
  alone writes metrics.jsonl (each step once) and the checkpoint, Ray's last reported metrics
  are the run's last step (train and val) and its checkpoint holds checkpoint.pt; the same
  command with more steps resumes at step 20 on both ranks.
- EP=2 on 2 Ray workers == one process with the double batch (as tests/test_parallel_train.py
  checks under its own process group): the same losses and the same final weights.
- a NaN loss on the workers ends fit_on_ray with TrainingDiverged itself.
- ``moe-train parallel=ray ...`` as a subprocess (the command in conf/parallel/ray.yaml): exit
  0, the summary once; again with another model in the same run directory: exit 2 and the one
  line naming the changed config, no traceback.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import stat
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import torch

from moe.config import ConfigError, DataConfig, OptimConfig, ParallelConfig
from moe.parallel.ray_train import (
    RAY_DIR,
    RAY_RUN_NAME,
    RayReporter,
    check_cluster,
    check_ray_run,
    fit_on_ray,
    train_on_ray,
    worker_error,
)
from moe.training import checkpoint as ckpt
from moe.training.loop import TrainingDiverged
from tests.conftest import SMOKE_OVERRIDES, launch_env, tiny_config

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "launch" / "ray_cluster.sh"
BIN = Path(sys.executable).parent
OUR_FRAMES = f'File "{ROOT / "moe"}'  # a traceback through this package's code
RUN_TIMEOUT = 600  # seconds for one Ray run (start-up, workers, 20 steps) on a busy machine


def _ray_cfg(out_dir, *, workers: int = 2, ep: int = 1, **over):
    c = tiny_config(out_dir, "switch", **over)
    return dataclasses.replace(c, parallel=ParallelConfig(backend="ray", num_workers=workers, ep_size=ep))


# ---------------------------------------------------------------------------------------------
# before Ray starts: one line each


@pytest.mark.parametrize(
    "over, match",
    [
        (dict(workers=3, ep=2), r"parallel\.ep_size=2 does not divide parallel\.num_workers=3"),
        (dict(workers=4), r"parallel\.num_workers\*cpus_per_worker=4\*1=4 CPUs but this machine has 2; lower"),
    ],
)
def test_layout_errors_are_one_line(tmp_path, over, match):
    workers = over.pop("workers")
    tc = _ray_cfg(tmp_path, workers=workers, **over)
    with pytest.raises(ConfigError, match=match) as e:
        check_ray_run(tc, {}, cpu_count=2)
    assert "\n" not in str(e.value)


def test_bad_ray_address_and_device_mismatches(tmp_path):
    tc = _ray_cfg(tmp_path)
    with pytest.raises(
        ConfigError, match=r"parallel\.ray_address='http://x'; use local .*, auto .* or ray://HEAD:10001"
    ):
        check_ray_run(dataclasses.replace(tc, parallel=dataclasses.replace(tc.parallel, ray_address="http://x")), {})
    with pytest.raises(ConfigError, match=r"parallel\.use_gpu=true with device=cpu"):
        check_ray_run(
            dataclasses.replace(tc, device="cpu", parallel=dataclasses.replace(tc.parallel, use_gpu=True)), {}
        )
    with pytest.raises(
        ConfigError, match=r"parallel\.use_gpu=true with parallel\.num_workers=2 but this machine has 0 GPU"
    ):
        check_ray_run(
            dataclasses.replace(tc, parallel=dataclasses.replace(tc.parallel, use_gpu=True)),
            {},
            cpu_count=8,
            gpu_count=0,
        )
    with pytest.raises(ConfigError, match=r"fit_on_ray runs parallel=ray only"):
        check_ray_run(dataclasses.replace(tc, parallel=ParallelConfig()), {})
    check_ray_run(tc, {}, cpu_count=2)  # the good config passes
    check_ray_run(
        dataclasses.replace(tc, parallel=dataclasses.replace(tc.parallel, ray_address="auto", num_workers=64)),
        {},
        cpu_count=2,
    )  # a cluster's CPUs are checked once connected


def test_an_address_where_nothing_listens_is_one_line_before_ray_starts():
    """parallel.ray_address=HOST:PORT with no Ray head there: a ConfigError within seconds
    (Ray itself retries the head for many minutes), and Ray was never initialised."""
    import ray

    from moe.parallel.ports import free_port
    from moe.parallel.ray_train import _connected, unreachable

    port = free_port()  # free: nothing listens on it
    assert unreachable(f"127.0.0.1:{port}") is not None and unreachable("auto") is None
    import socket

    with socket.socket() as listening:  # something that answers: no complaint
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        assert unreachable(f"ray://127.0.0.1:{listening.getsockname()[1]}") is None
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=f"parallel.ray_address=127.0.0.1:{port}: nothing answers there"):
        with _connected(ParallelConfig(backend="ray", ray_address=f"127.0.0.1:{port}")):
            pass
    assert time.monotonic() - t0 < 30 and not ray.is_initialized()


def test_ray_under_torchrun_is_refused_before_ray_starts(tmp_path, monkeypatch):
    tc = _ray_cfg(tmp_path)
    with pytest.raises(
        ConfigError,
        match=r"parallel\.backend=ray but this process is one of WORLD_SIZE=2 .*run moe-train "
        r"parallel=ray as one process",
    ):
        check_ray_run(tc, {"WORLD_SIZE": "2", "RANK": "0"})
    import ray

    was_up = ray.is_initialized()  # (this module's slow tests share one Ray)
    monkeypatch.setenv("WORLD_SIZE", "2")
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=r"WORLD_SIZE=2"):
        fit_on_ray(tc)
    assert time.monotonic() - t0 < 10
    assert ray.is_initialized() == was_up  # no Ray was started


def test_cluster_resources_are_checked():
    p = ParallelConfig(backend="ray", num_workers=4, cpus_per_worker=2, ray_address="auto")
    check_cluster(p, {"CPU": 8.0}, [{"CPU": 4.0}, {"CPU": 4.0}])
    with pytest.raises(ConfigError, match=r"parallel\.num_workers\*cpus_per_worker=8 CPUs but the Ray cluster has 6"):
        check_cluster(p, {"CPU": 6.0}, [{"CPU": 6.0}])
    with pytest.raises(ConfigError, match=r"parallel\.cpus_per_worker=2: no node of the Ray cluster has that much"):
        check_cluster(p, {"CPU": 8.0}, [{"CPU": 1.0}] * 8)
    gpu = dataclasses.replace(p, use_gpu=True)
    with pytest.raises(ConfigError, match=r"the Ray cluster has 2 GPU"):
        check_cluster(gpu, {"CPU": 8.0, "GPU": 2.0}, [{"CPU": 8.0, "GPU": 2.0}])


# ---------------------------------------------------------------------------------------------
# the report hooks and the error unwrapping, without Ray


def _record(into: list, rank: int, seen_files: list):
    def report(metrics, checkpoint=None):
        into.append((rank, metrics, checkpoint))
        if checkpoint is not None:  # what Ray would copy, while it may
            seen_files.append(sorted(p.name for p in Path(checkpoint).iterdir()))

    return report


def test_reporter_makes_one_report_per_logged_step_with_the_checkpoint_on_rank_0(tmp_path):
    ck = tmp_path / "checkpoint.pt"
    ck.write_bytes(b"weights")
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    reports, files = [], []
    ranks = [RayReporter(r == 0, _record(reports, r, files), lambda d: d) for r in range(2)]
    for rep in ranks:  # the trainer's calls at steps 1 (log), 2 (log, eval, checkpoint), 3 (log), end
        rep.on_log(1, {"train/loss": 3.0})
        rep.on_log(2, {"train/loss": 2.0})
        rep.on_log(2, {"val/loss": 2.5})
        rep.on_checkpoint(2, ck)
        rep.on_log(3, {"train/loss": 1.5})
        rep.on_checkpoint(4, ck)  # a checkpoint at a step that logged nothing
        rep.flush()  # nothing held: no report
    for r in range(2):
        mine = [(m, c) for rank, m, c in reports if rank == r]
        assert [m for m, _ in mine] == [
            {"train/loss": 3.0, "step": 1},
            {"train/loss": 2.0, "val/loss": 2.5, "step": 2},
            {"train/loss": 1.5, "step": 3},
            {"step": 4},
        ]
        with_ckpt = [i for i, (_, c) in enumerate(mine) if c is not None]
        assert with_ckpt == ([1, 3] if r == 0 else [])  # rank 0 alone attaches it, every rank reports
    assert files == [["checkpoint.pt"], ["checkpoint.pt"]]  # only the checkpoint, not the run directory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "metrics.jsonl"]  # staging removed
    assert ck.read_bytes() == b"weights"


def test_worker_errors_come_out_as_themselves():
    from ray.train import WorkerGroupError

    bad = ConfigError("data: the val split has 3 tokens")
    e = WorkerGroupError("rank 0 failed", {1: RuntimeError("gloo: connection closed"), 0: bad})
    assert worker_error(e) is bad
    div = TrainingDiverged("training diverged at step 2")
    assert worker_error(WorkerGroupError("x", {0: div, 1: div})) is div
    other = ValueError("boom")
    assert worker_error(WorkerGroupError("x", {1: RuntimeError("peer"), 0: other})) is other
    plain = RuntimeError("controller failed")
    assert worker_error(plain) is plain


# ---------------------------------------------------------------------------------------------
# launch/ray_cluster.sh with a stand-in `ray` that prints its arguments


def _fake_ray(tmp_path: Path) -> Path:
    fake = tmp_path / "ray"
    fake.write_text('#!/usr/bin/env bash\necho "ray $*"\n')
    fake.chmod(0o755)
    return fake


def test_cluster_script_builds_the_documented_commands(tmp_path):
    text = SCRIPT.read_text()
    assert text.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in text
    assert os.stat(SCRIPT).st_mode & stat.S_IXUSR
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, timeout=30).returncode == 0
    env = {**os.environ, "RAY": str(_fake_ray(tmp_path))}

    def run(*args, **extra):
        return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=30, env={**env, **extra})

    p = run("head")
    assert (
        p.returncode == 0
        and p.stdout.split() == "ray start --head --port 6379 --dashboard-host 127.0.0.1 --dashboard-port 8265".split()
    )
    p = run("worker", "10.0.0.1", RAY_START_ARGS="--num-cpus 8")
    assert p.returncode == 0 and p.stdout.split() == "ray start --address 10.0.0.1:6379 --num-cpus 8".split()
    p = run("submit", "10.0.0.1", "4", "parallel.ep_size=2", "out_dir=/shared/r")
    assert p.returncode == 0, p.stderr
    assert (
        p.stdout.split()
        == (
            "ray job submit --address http://10.0.0.1:8265 --working-dir . -- moe-train parallel=ray "
            "parallel.ray_address=auto parallel.num_workers=4 parallel.ep_size=2 out_dir=/shared/r"
        ).split()
    )
    for bad, why in [
        ((), "usage:"),
        (("submit", "10.0.0.1", "0"), "NUM_WORKERS=0"),
        (("submit", "10.0.0.1:6379", "2"), "without a port"),
        (("worker",), "usage:"),
        (("launch",), "unknown command"),
        (("head",), "PORT=x"),
    ]:
        p = run(*bad, **({"PORT": "x"} if bad == ("head",) else {}))
        assert p.returncode == 2 and why in p.stderr and not p.stdout, (bad, p.stderr)


# ---------------------------------------------------------------------------------------------
# real Ray


def _text_dir(root: Path, n: int = 24) -> Path:
    """A folder of text files: the standard library's first modules, as .txt."""
    root.mkdir(parents=True)
    src = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("[a-f]*.py"))[:n]
    for f in src:
        (root / (f.stem + ".txt")).write_text(f.read_text(encoding="utf-8"), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def ray_local():
    """One private Ray (127.0.0.1) for this module's in-process runs; fit_on_ray uses it."""
    from moe.parallel.ray_train import local_ray

    with local_ray(ParallelConfig(backend="ray", num_workers=2)):
        yield


def _ray_checkpoints(out_dir: Path) -> list[Path]:
    """Ray's copies of the checkpoint (beside them: Ray's checkpoint_manager_snapshot.json)."""
    return sorted(p for p in (out_dir / RAY_DIR / RAY_RUN_NAME).glob("checkpoint_*") if p.is_dir())


def _metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_two_workers_train_report_checkpoint_and_resume(ray_local, tmp_path):
    data = DataConfig(path=str(_text_dir(tmp_path / "corpus")), tokenizer="byte", cache_dir=str(tmp_path / "cache"))
    tc = _ray_cfg(tmp_path / "run", steps=20, eval_every=10, ckpt_every=10, data=data)
    run, result = train_on_ray(tc)
    out = tmp_path / "run"
    rows = _metrics(out / "metrics.jsonl")
    train = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train] == list(range(1, 21))  # each step once: rank 0 alone writes
    assert [r["step"] for r in rows if "val/loss" in r] == [10, 20]
    assert train[-1]["train/loss"] < train[0]["train/loss"] - 1.0  # it learns
    assert (
        run.step == 20
        and run.train_loss == pytest.approx(train[-1]["train/loss"])
        and run.checkpoint == (out / "checkpoint.pt").resolve()
    )
    assert ckpt.load(out / "checkpoint.pt")["step"] == 20
    # what Ray got: the last step's metrics, train and val, and the checkpoint with them
    assert result.metrics["step"] == 20
    assert result.metrics["train/loss"] == pytest.approx(run.train_loss) and result.metrics[
        "val/loss"
    ] == pytest.approx(run.val_loss)
    ray_ckpts = _ray_checkpoints(out)
    assert len(ray_ckpts) == 1 and Path(result.checkpoint.path).resolve() == ray_ckpts[0].resolve()  # the latest kept
    assert [p.name for p in ray_ckpts[0].iterdir()] == ["checkpoint.pt"]
    assert ckpt.load(ray_ckpts[0] / "checkpoint.pt")["step"] == 20
    assert not list(out.glob(".ray-checkpoint-*"))  # staging directories removed

    # the same run with more steps goes on from step 20 on both ranks
    run2, result2 = train_on_ray(dataclasses.replace(tc, steps=24))
    assert [h["step"] for h in run2.history] == [21, 22, 23, 24]
    assert result2.metrics["step"] == 24 and ckpt.load(out / "checkpoint.pt")["step"] == 24
    assert len(_ray_checkpoints(out)) == 1 and ckpt.load(_ray_checkpoints(out)[0] / "checkpoint.pt")["step"] == 24
    assert [r["step"] for r in _metrics(out / "metrics.jsonl") if "train/loss" in r] == list(range(1, 25))


def _fit_ep2_on_ray(cfg, tmp_path) -> dict:
    """Train ``cfg`` (out_dir ``tmp_path/ep``) on two Ray workers with the experts split over
    them; its history, step and the weights of the checkpoint it wrote."""
    cfg = dataclasses.replace(
        cfg,
        parallel=ParallelConfig(backend="ray", num_workers=2, ep_size=2),
        data=dataclasses.replace(cfg.data, cache_dir=str(tmp_path / "cache")),
    )
    run = fit_on_ray(cfg)
    return {"history": run.history, "step": run.step, "model": ckpt.load(tmp_path / "ep" / "checkpoint.pt")["model"]}


@pytest.mark.slow
def test_ep2_on_ray_equals_one_process_with_the_double_batch(ray_local, tmp_path, tiny_data):
    from tests.test_parallel_train import NO_AUX, B, _assert_same_run, _cfg, _clipped, _reference

    over = {"dropless": True, "aux_loss_weight": 0.0}
    par = _fit_ep2_on_ray(_clipped(_cfg(tmp_path / "ep", "switch", **over)), tmp_path)
    ref = _reference(_clipped(_cfg(tmp_path / "ref", "switch", batch_size=2 * B, **over)), tiny_data)
    assert ckpt.load(tmp_path / "ep" / "checkpoint.pt")["layout"] == {"world_size": 2, "dp_size": 2, "ep_size": 2}
    _assert_same_run(par, ref, keys=NO_AUX)


@pytest.mark.slow
def test_ep2_on_ray_with_the_modern_layer_equals_one_process(ray_local, tmp_path, tiny_data):
    """llama blocks and the deepseek layer (bias, shared and fine-grained experts, groups) on
    two Ray workers: the one-process run, the bias in the checkpoint the same."""
    from tests.test_modern_moe import _modern
    from tests.test_parallel_train import NO_AUX, B, _assert_same_run, _cfg, _reference

    par = _fit_ep2_on_ray(_modern(_cfg(tmp_path / "ep", "deepseek")), tmp_path)
    ref = _reference(_modern(_cfg(tmp_path / "ref", "deepseek", batch_size=2 * B)), tiny_data)
    _assert_same_run(par, ref, keys=NO_AUX)
    biases = [k for k in ref["model"] if k.endswith("expert_bias_E")]
    assert biases and all(torch.equal(par["model"][k], ref["model"][k]) for k in biases)


@pytest.mark.slow
def test_divergence_on_the_workers_is_training_diverged_in_the_driver(ray_local, tmp_path):
    tc = _ray_cfg(tmp_path, steps=6, optim=OptimConfig(lr=1e30, warmup_steps=0, grad_clip=0.0))
    tc = dataclasses.replace(tc, data=dataclasses.replace(tc.data, cache_dir=str(tmp_path / "cache")))
    with pytest.raises(TrainingDiverged, match=r"training diverged at step 2"):
        fit_on_ray(tc)


def _launch_command() -> list[str]:
    from tests.conftest import conf_command

    return conf_command("parallel/ray.yaml", "moe-train parallel=ray parallel.num_workers")


@pytest.mark.slow
def test_moe_train_parallel_ray_end_to_end(tmp_path):
    cmd = _launch_command()
    assert cmd[:3] == ["moe-train", "parallel=ray", "parallel.num_workers=2"]
    exe = shutil.which("moe-train", path=str(BIN))
    assert exe, "moe-train not installed next to the interpreter"
    run = tmp_path / "run"
    args = [
        exe,
        *cmd[1:],
        *SMOKE_OVERRIDES,
        f"out_dir={run}",
        f"hydra.run.dir={run}",
    ]
    env = launch_env(tmp_path, str(BIN))
    p = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert p.returncode == 0, p.stderr[-4000:]
    assert p.stdout.count("done: 4 steps") == 1 and f"checkpoint  {(run / 'checkpoint.pt').resolve()}" in p.stdout
    rows = _metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4]
    assert len([r for r in rows if r.get("type") == "summary"]) == 1
    assert ckpt.load(run / "checkpoint.pt")["step"] == 4
    assert len(_ray_checkpoints(run)) == 1
    assert OUR_FRAMES not in p.stderr, p.stderr[-4000:]  # (Ray's own threads may print one at shutdown)

    # another model in the same run directory: the workers' ConfigError, as the usual one line
    p = subprocess.run(
        [*args, "model.d_model=32"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT
    )
    assert p.returncode == 2, p.stderr[-4000:]
    last = p.stderr.strip().splitlines()[-1]
    assert (
        last.startswith("moe-train: error: ")
        and "holds a checkpoint of another config (model.d_model: 64 -> 32" in last
    ), p.stderr[-4000:]
    assert OUR_FRAMES not in p.stderr, p.stderr[-4000:]  # no worker traceback before the line


def _sh(*cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, check=check)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_head_that_advertises_an_address_out_of_reach_is_one_line_within_a_minute():
    """Issue 19: a driver that reaches a head's GCS, but not the address the head advertises
    for its node, retried for ten minutes.  Here a head in a network namespace answers at
    10.77.0.2 (a veth this machine routes to) and advertises 10.78.0.2 (a veth inside the
    namespace, no route from here): moe-train must fail in one line naming 10.78.0.2."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 (ip netns) to give a Ray head an address this machine cannot reach")
    ray_exe = shutil.which("ray", path=str(BIN))
    assert ray_exe, "ray not installed next to the interpreter"
    ns = f"moeray{os.getpid() % 100000}"
    host_if, ns_if = f"mh{os.getpid() % 100000}", f"mn{os.getpid() % 100000}"
    if _sh("ip", "netns", "add", ns, check=False).returncode != 0:
        pytest.skip("cannot create a network namespace here (ip netns add failed)")
    import tempfile

    temp = tempfile.mkdtemp(prefix="moeray")  # short: Ray's socket paths must fit in 107 bytes
    try:
        _sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if, "netns", ns)
        _sh("ip", "addr", "add", "10.77.0.1/24", "dev", host_if)
        _sh("ip", "link", "set", host_if, "up")
        for cmd in (
            ("addr", "add", "10.77.0.2/24", "dev", ns_if),
            ("link", "set", ns_if, "up"),
            ("link", "set", "lo", "up"),
            ("link", "add", "va", "type", "veth", "peer", "name", "vb"),  # both ends inside: no route from here
            ("addr", "add", "10.78.0.2/24", "dev", "va"),
            ("link", "set", "va", "up"),
            ("link", "set", "vb", "up"),
        ):
            _sh("ip", "-n", ns, *cmd)
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        head = subprocess.run(
            [
                "ip",
                *("netns", "exec", ns, ray_exe, "start", "--head", "--node-ip-address=10.78.0.2", "--port=6390"),
                *("--num-cpus=1", "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"),
            ],
            capture_output=True,
            text=True,
            timeout=180,
            env=env,
        )
        assert head.returncode == 0, head.stderr[-3000:]
        from moe.parallel.ray_train import unreachable

        assert unreachable("10.77.0.2:6390") is None  # the GCS answers here, but the node is out of reach:
        # what moe-train does, in a fresh process (this one may hold Ray state of other tests)
        code = (
            "from moe.config import ConfigError, ParallelConfig\n"
            "from moe.parallel.ray_train import _connected\n"
            "import ray\n"
            "try:\n"
            "    with _connected(ParallelConfig(backend='ray', ray_address='10.77.0.2:6390')):\n"
            "        pass\n"
            "except ConfigError as e:\n"
            "    print('CONFIGERROR', e, ray.is_initialized())\n"
        )
        t0 = time.monotonic()
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
        assert time.monotonic() - t0 < 60, p.stderr[-2000:]
        line = next((ln for ln in p.stdout.splitlines() if ln.startswith("CONFIGERROR")), None)
        assert line is not None, (p.stdout[-2000:], p.stderr[-2000:])
        assert "parallel.ray_address=10.77.0.2:6390: the head answers" in line and "10.78.0.2" in line, line
        assert line.endswith("False")  # Ray was never initialised
    finally:
        _sh("ip", "netns", "exec", ns, ray_exe, "stop", "--force", check=False, timeout=120)
        _sh("ip", "netns", "del", ns, check=False)
        _sh("ip", "link", "del", host_if, check=False)
        shutil.rmtree(temp, ignore_errors=True)
