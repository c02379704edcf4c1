#!/usr/bin/env bash
# A whole swarm on this machine, over 127.0.0.1: a DHT root (moe-join), 2 expert servers
# (moe-join --serve) and 2 collaborative trainer peers (moe-join --train: hivemind.Optimizer,
# as in DeDLOC) training the run's model together for STEPS collaborative steps; everything
# is stopped cleanly at the end, on Ctrl-C, or on error.
#
#   launch/swarm_local.sh                         # 200 collaborative steps of experiment=smoke, grid 4x4
#   STEPS=20 launch/swarm_local.sh logger=none    # extra arguments: config overrides for the trainers
#   NETEM=rtt=50ms,rate=100mbit,loss=0.1% SYNC=diloco STEPS=10 launch/swarm_local.sh
#                                                 # servers and trainers behind emulated wide-area links,
#                                                 # the trainers on DiLoCo (10 rounds of INNER_STEPS)
#
# Settings (environment): STEPS (200), GRID ("4 4"), K (k_best, 2), TARGET (sequences per
# collaborative step over both trainers, 32), MATCHMAKING (seconds to gather an averaging round,
# 4), OUT (the run directory, default runs/swarm-local: trainer0/ and trainer1/ hold each
# trainer's metrics.jsonl), LOGS (the peers' logs, default $OUT/peers), D_MODEL/D_FF (64/128:
# model=tiny, which experiment=smoke uses), EXPIRATION (seconds a stopped server's experts stay
# declared, 30), START_TIMEOUT (seconds to wait for each peer, 120), SYNC (the trainers' sync:
# every-step or diloco; with diloco STEPS counts rounds of INNER_STEPS local steps, default 20),
# NETEM (empty: plain loopback; else every server and trainer listens behind its own link of the
# user-space relay, moe-netem --link "$NETEM", e.g. rtt=50ms,rate=100mbit,loss=0.1%: the others
# reach it through the link; the relays' logs are $LOGS/netem-*.log).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -x "$here/.venv/bin/python" ]; then py="$here/.venv/bin/python"; else py="${PYTHON:-python}"; fi
join=("$py" -m moe.cli.join)

STEPS="${STEPS:-200}"
GRID="${GRID:-4 4}"
K="${K:-2}"
TARGET="${TARGET:-32}"
MATCHMAKING="${MATCHMAKING:-4}"
OUT="${OUT:-runs/swarm-local}"
LOGS="${LOGS:-$OUT/peers}"
D_MODEL="${D_MODEL:-64}"
D_FF="${D_FF:-128}"
EXPIRATION="${EXPIRATION:-30}"
START_TIMEOUT="${START_TIMEOUT:-120}"
SYNC="${SYNC:-every-step}"
INNER_STEPS="${INNER_STEPS:-20}"
NETEM="${NETEM:-}"

read -r -a dims <<< "$GRID"
E=1; for g in "${dims[@]}"; do E=$((E * g)); done
per=$(( (E + 1) / 2 ))            # the 2 servers split the grid
mkdir -p "$LOGS"

pids=()
cleanup() {
  local code=$?
  trap - EXIT INT TERM
  for pid in "${pids[@]}"; do kill -INT "$pid" 2>/dev/null || true; done   # moe-join leaves cleanly on SIGINT
  for _ in $(seq 1 120); do                                                  # at most 60 s
    alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.5
  done
  for pid in "${pids[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      echo "swarm_local: peer $pid did not stop in 60 s; killing its process group" >&2
      kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    fi
  done
  wait 2>/dev/null || true
  exit "$code"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# wait_for FILE PATTERN PID: the first line of FILE matching PATTERN, bounded by START_TIMEOUT
wait_for() {
  local file=$1 pattern=$2 pid=$3 t=0
  while [ "$t" -lt $((START_TIMEOUT * 7)) ]; do   # 3.5 x START_TIMEOUT: the peer's own limit (and two retries) comes first
    if line=$(grep -m1 -- "$pattern" "$file" 2>/dev/null); then echo "$line"; return 0; fi
    if ! kill -0 "$pid" 2>/dev/null; then echo "swarm_local: peer $pid exited; see $file" >&2; return 1; fi
    sleep 0.5; t=$((t + 1))
  done
  echo "swarm_local: no '$pattern' in $file after $((START_TIMEOUT * 7 / 2)) s" >&2
  return 1
}

# net_flags NAME: with NETEM, start a relay for peer NAME and set net=(the moe-join flags that put
# the peer behind it: listen on a free port, announce the relay's); without NETEM, net=()
net=(); relays=()
net_flags() {
  net=()
  [ -n "$NETEM" ] || return 0
  local name=$1 real link
  real=$("$py" -c 'from moe.parallel.ports import free_port; print(free_port())')
  setsid "$py" -m moe.swarm.netem --to "127.0.0.1:$real" --link "$NETEM" > "$LOGS/netem-$name.log" 2>&1 &
  pids+=($!); relays+=($!)
  link=$(wait_for "$LOGS/netem-$name.log" "moe-netem: " "${pids[-1]}" | awk '{print $2}' | cut -d: -f2)
  net=(--port "$real" --announce "/ip4/127.0.0.1/tcp/$link")
}
if [ -n "$NETEM" ]; then "$py" -c "from moe.swarm.netem import LinkSpec; LinkSpec.parse('$NETEM')" || exit 2; fi
if [ "$SYNC" = diloco ]; then
  sync=(--sync diloco --inner-steps "$INNER_STEPS"); schedule=$((STEPS * INNER_STEPS))
elif [ "$SYNC" = every-step ]; then
  sync=(--target-batch-size "$TARGET"); schedule=$STEPS
else
  echo "swarm_local: SYNC=$SYNC: every-step or diloco" >&2; exit 2
fi

# each peer in a process group of its own (setsid): the fallback kill reaches its helpers
setsid "${join[@]}" --prefix ffn --grid "${dims[@]}" --status-every 30 > "$LOGS/root.log" 2>&1 &
pids+=($!); peers=($!)
root=$(wait_for "$LOGS/root.log" "moe-join: address " "${pids[0]}" | awk '{print $3}')
echo "swarm_local: DHT root at $root" >&2

for i in 0 1; do
  first=$((i * per)); n=$(( E - first < per ? E - first : per ))
  net_flags "server$i"
  setsid "${join[@]}" --initial-peers "$root" --serve "$n" --first "$first" --prefix ffn --grid "${dims[@]}" "${net[@]}" \
    --d-model "$D_MODEL" --d-ff "$D_FF" --expiration "$EXPIRATION" --update-period "$(( EXPIRATION / 2 > 0 ? EXPIRATION / 2 : 1 ))" \
    --status-every 30 --start-timeout "$START_TIMEOUT" > "$LOGS/server$i.log" 2>&1 &
  pids+=($!); peers+=($!)
  wait_for "$LOGS/server$i.log" "moe-join: serving " "${pids[-1]}" >&2
done

trainers=()
for i in 0 1; do
  net_flags "trainer$i"
  setsid "${join[@]}" --initial-peers "$root" "${net[@]}" --train --steps "$STEPS" "${sync[@]}" --matchmaking-time "$MATCHMAKING" \
    --prefix ffn --grid "${dims[@]}" --d-model "$D_MODEL" --d-ff "$D_FF" --out "$OUT/trainer$i" --status-every 10 \
    experiment=smoke moe.swarm.k_best="$K" moe.top_k="$K" steps="$schedule" "$@" > "$LOGS/trainer$i.log" 2>&1 &
  pids+=($!); peers+=($!); trainers+=($!)
done
echo "${peers[*]}" > "$LOGS/pids"   # the peers (each leads its process group), for checks
echo "${relays[*]}" > "$LOGS/relay_pids"
for i in 0 1; do wait_for "$LOGS/trainer$i.log" "moe-join: training as" "${trainers[$i]}" >&2; done
echo "swarm_local: 2 trainer peers training $STEPS collaborative steps in $OUT/trainer0, $OUT/trainer1" >&2

# the trainers leave by themselves after STEPS collaborative steps (bounded here all the same)
limit=$(( STEPS * 60 + 600 )); t=0; code=0
for i in 0 1; do
  while kill -0 "${trainers[$i]}" 2>/dev/null; do
    if [ "$t" -ge "$limit" ]; then echo "swarm_local: the trainers did not finish in $limit s; stopping" >&2; exit 1; fi
    sleep 1; t=$((t + 1))
  done
  wait "${trainers[$i]}" || { code=$?; echo "swarm_local: trainer $i exited with $code; see $LOGS/trainer$i.log" >&2; }
done
[ "$code" = 0 ] || exit "$code"
echo "swarm_local: training finished; stopping the peers" >&2
