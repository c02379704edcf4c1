"""The layout holds: the import contracts (floors, no cycles, one room per library), the lint and
format gate, no ``torch.distributed`` below the backends, docs that name every module, and a
wheel that installs and trains from anywhere."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# the floors that never talk to other processes (docs/architecture.md)
NO_DISTRIBUTED = ("moe/config.py", "moe/ops", "moe/model", "moe/training")


def _tool(name: str) -> str:
    exe = shutil.which(name, path=str(BIN))
    assert exe, f"{name} is not installed next to the interpreter (pip install -e '.[test]')"
    return exe


def test_import_contracts_hold():
    """pyproject.toml's import-linter contracts: floors, acyclic packages (imports inside
    functions count), hivemind only in the swarm, the engines only in the parallel backends."""
    p = subprocess.run([_tool("lint-imports"), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    assert "0 broken" in p.stdout


def test_ruff_lint_and_format_are_clean():
    ruff = _tool("ruff")
    lint = subprocess.run([ruff, "check", "moe", "tests"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert lint.returncode == 0, lint.stdout[-4000:]
    fmt = subprocess.run(
        [ruff, "format", "--check", "moe", "tests"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert fmt.returncode == 0, "run `ruff format moe tests`:\n" + fmt.stdout[-4000:]


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every module an file imports, at any depth (inside functions too)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out += [(node.lineno, node.module)] + [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return out


def test_the_model_and_the_harness_never_import_torch_distributed():
    """What import-linter cannot say (it sees ``torch``, not its submodules): the config, the
    kernels, the model and the training harness compute without process groups."""
    found = []
    for room in NO_DISTRIBUTED:
        for path in sorted((ROOT / room).rglob("*.py")) if (ROOT / room).is_dir() else [ROOT / room]:
            for line, mod in _imports(path):
                if mod == "torch.distributed" or mod.startswith("torch.distributed."):
                    found.append(f"{path.relative_to(ROOT)}:{line}: {mod}")
    assert not found, found
    # and the checker sees such an import where there is one
    assert any(m.startswith("torch.distributed") for _, m in _imports(ROOT / "moe" / "parallel" / "ddp.py"))


def test_architecture_doc_names_every_module():
    """docs/architecture.md's tree is where a newcomer looks for a room: every module is in it."""
    doc = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    missing = []
    for path in sorted((ROOT / "moe").rglob("*.py")):
        rel = path.relative_to(ROOT / "moe")
        if rel.name == "__init__.py":
            continue
        # by its path, or by its name in the row of its folder (moe/bench/quality/: `arms.py`, ...)
        if f"moe/{rel}" not in doc and not (f"moe/{rel.parent}/" in doc and f"`{rel.name}`" in doc):
            missing.append(str(rel))
    assert not missing, f"docs/architecture.md does not name {missing}"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_wheel_installs_and_trains_from_an_unrelated_directory(tmp_path):
    """Build the wheel from the tracked files, install it (not editable) into a fresh virtual
    environment, and run ``moe-train experiment=smoke`` from a folder that is not the
    repository: the configs ship inside the package.  The fresh environment takes its
    dependencies (torch, hydra, ...) from this one through a path file, so nothing is
    downloaded; ``moe`` itself comes from the wheel alone."""
    src = tmp_path / "src"
    tracked = subprocess.run(
        ["git", "ls-files", "moe", "pyproject.toml", "README.md"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    for rel in tracked.stdout.split():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, src / rel)
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(src), "-w", str(dist)],
        check=True,
        timeout=300,
    )
    (wheel,) = dist.glob("moe-*.whl")
    env_dir = tmp_path / "fresh"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    subprocess.run(
        [str(py), "-m", "pip", "install", "--no-deps", "-q", "--disable-pip-version-check", str(wheel)],
        check=True,
        timeout=300,
    )
    site = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    ours = subprocess.run(
        [sys.executable, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(site, "zz_deps_from_the_test_env.pth").write_text(
        ours + "\n"
    )  # appended after the fresh site: the wheel's moe wins
    where = tmp_path / "elsewhere"
    where.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HYDRA_FULL_ERROR")}
    env.update(WANDB_MODE="disabled", XDG_CACHE_HOME=str(tmp_path / "cache"))
    found = subprocess.run(
        [str(py), "-c", "import moe, moe.cli.config as c; print(moe.__file__); print(c.CONF_DIR)"],
        cwd=where,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    pkg, conf = found.stdout.split()
    assert Path(pkg).is_relative_to(env_dir) and Path(conf).is_relative_to(env_dir), (
        found.stdout
    )  # not the repository's
    p = subprocess.run(
        [
            str(env_dir / "bin" / "moe-train"),
            "experiment=smoke",
            "logger=none",
            "steps=6",
            "eval_every=3",
            "ckpt_every=3",
            "data.max_files=10",
            "peak_flops=1e11",
        ],
        cwd=where,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "done: 6 steps" in p.stdout
    assert (where / "runs" / "smoke-switch" / "checkpoint.pt").exists()  # the run directory is relative to where it ran
