"""``moe-dash``: the local dashboard, its standalone export, and the W&B workspace builder.

moe-dash [RUNS_DIR]                    serve http://127.0.0.1:8765 over every run under RUNS_DIR (default runs/)
moe-dash RUNS_DIR --export dash.html   one self-contained HTML file, no server
moe-dash wandb RUN_DIR --dry-run       the W&B workspace it would build (see docs/dashboard.md)
"""

from __future__ import annotations

import argparse
import errno
import sys
from pathlib import Path

from moe.dash.data import find_runs
from moe.dash.server import export, make_server
from moe.dash.wandb_panels import add_wandb_parser, run_wandb


def _fail(msg: str, code: int = 2) -> int:
    print(f"moe-dash: error: {msg}", file=sys.stderr)
    return code


def _dash_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moe-dash", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("runs_dir", nargs="?", default="runs", help="a run directory, or a folder of them (default: runs)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8765, help="port (0: any free port)")
    p.add_argument(
        "--refresh", type=float, default=5.0, help="seconds between the page's checks for new metrics (0: never)"
    )
    p.add_argument(
        "--cv-threshold", type=float, default=1.0, help="flag a layer whose expert-load CV is above this (default 1.0)"
    )
    p.add_argument("--export", metavar="FILE.html", default="", help="write a standalone page and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["wandb"]:
        p = argparse.ArgumentParser(prog="moe-dash")
        add_wandb_parser(p.add_subparsers(dest="what", required=True))
        return run_wandb(p.parse_args(argv))
    args = _dash_parser().parse_args(argv)
    root = Path(args.runs_dir)
    if not root.is_dir():
        return _fail(
            f"{root} is not a folder; give the runs folder (moe-train writes runs/<run_name>) or a run directory"
        )
    if args.refresh < 0 or args.cv_threshold <= 0:
        return _fail("--refresh must be >= 0 and --cv-threshold > 0")
    n = len(find_runs(root))
    if args.export:
        out = export(root, Path(args.export), cv_threshold=args.cv_threshold)
        print(f"wrote {out} ({n} run{'s' if n != 1 else ''} from {root})")
        return 0 if n else _fail(f"no run directories (folders with metrics.jsonl) under {root}", 1)
    try:
        httpd = make_server(
            root, host=args.host, port=args.port, refresh_s=args.refresh, cv_threshold=args.cv_threshold
        )
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            return _fail(
                f"port {args.port} on {args.host} is in use; pick another with --port (or --port 0 for any free one)"
            )
        return _fail(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}")
    host, port = httpd.server_address[:2]
    print(
        f"moe-dash: {n} run{'s' if n != 1 else ''} under {root.resolve()}"
        + ("" if n else " (none yet: the page fills in when a run starts)")
    )
    print(f"moe-dash: serving http://{host}:{port}/  (Ctrl-C stops)", flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        print("\nmoe-dash: stopped")
    finally:
        httpd.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
