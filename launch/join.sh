#!/usr/bin/env bash
# Join a swarm (or start one) to serve experts, train collaboratively, or both: a thin wrapper
# over `moe-join`.
#   launch/join.sh                                          # the first peer: prints the join lines
#   launch/join.sh --initial-peers /ip4/.../p2p/Qm... --serve 8 --grid 8 8 --d-model 256
#   launch/join.sh --initial-peers /ip4/.../p2p/Qm... --train --target-batch-size 256 --grid 8 8 --d-model 256
# Everything after the script name goes to moe-join (see `moe-join --help`).  Listens on
# 127.0.0.1 unless --host/--announce is given; NAT mapping off unless --nat.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if command -v moe-join >/dev/null 2>&1; then
  exec moe-join "$@"
elif [ -x "$here/.venv/bin/python" ]; then
  exec "$here/.venv/bin/python" -m moe.cli.join "$@"
else
  exec python -m moe.cli.join "$@"
fi
