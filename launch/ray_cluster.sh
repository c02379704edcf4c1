#!/usr/bin/env bash
# moe-train on a Ray cluster: start the head, join the other nodes, submit the run as a Ray job.
# Example, 2 nodes x 4 GPUs, experts over 4 ranks (so the all-to-all stays inside a node):
#
#   # on the head node (10.0.0.1):
#   launch/ray_cluster.sh head
#   # on every other node:
#   launch/ray_cluster.sh worker 10.0.0.1
#   # on the head node, from the repository root (the job gets this directory as its code):
#   launch/ray_cluster.sh submit 10.0.0.1 8 parallel.use_gpu=true parallel.ep_size=4 moe.num_experts=16 \
#     out_dir=/shared/runs/e16 hydra.run.dir=/shared/runs/e16
#   # when done, on every node:
#   launch/ray_cluster.sh stop
#
# Commands:
#   head                  ray start --head --port $PORT (the job server listens on $DASHBOARD_HOST:$DASHBOARD_PORT)
#   worker HEAD           ray start --address HEAD:$PORT
#   submit HEAD N [ARGS]  ray job submit --address http://HEAD:$DASHBOARD_PORT --working-dir . --
#                           moe-train parallel=ray parallel.ray_address=auto parallel.num_workers=N ARGS
#                         (one rank per worker: N workers in all, each cpus_per_worker CPUs, one GPU with use_gpu)
#   stop                  ray stop (this node)
# Environment (defaults in brackets):
#   PORT [6379]           the head's GCS port, reachable from every node
#   DASHBOARD_PORT [8265] the head's job server;  DASHBOARD_HOST [127.0.0.1]: it listens only on the
#                         head itself (submit there, or through an ssh tunnel); 0.0.0.0 on a trusted network only
#   RAY_START_ARGS []     more `ray start` arguments, e.g. "--num-cpus 8 --num-gpus 4"
#   RAY [ray]             the ray executable;  MOE_TRAIN [moe-train] the trainer in the job
# The job server needs Ray's dashboard on the head: pip install "ray[default]" there.  out_dir
# must be an absolute path on a filesystem every node sees: rank 0 writes the checkpoint and
# every rank reads it to resume (Ray's copy goes to out_dir/ray).  See docs/parallel.md, "Ray".
set -euo pipefail

PORT="${PORT:-6379}"
DASHBOARD_PORT="${DASHBOARD_PORT:-8265}"
DASHBOARD_HOST="${DASHBOARD_HOST:-127.0.0.1}"
RAY_START_ARGS="${RAY_START_ARGS:-}"
RAY="${RAY:-ray}"
MOE_TRAIN="${MOE_TRAIN:-moe-train}"

usage() {
  echo "usage: launch/ray_cluster.sh head | worker HEAD | submit HEAD NUM_WORKERS [moe-train args...] | stop" >&2
  echo "  (see the comment at the top of launch/ray_cluster.sh)" >&2
  exit 2
}
need_host() {
  [[ -n "${1:-}" && "$1" != -* && "$1" != *:* ]] || { echo "launch/ray_cluster.sh: HEAD must be the head node's address, without a port (got '${1:-}')" >&2; exit 2; }
}
is_port() { [[ "$2" =~ ^[0-9]+$ ]] || { echo "launch/ray_cluster.sh: $1=$2 is not a port number" >&2; exit 2; }; }

is_port PORT "$PORT"
is_port DASHBOARD_PORT "$DASHBOARD_PORT"
read -r -a extra <<< "$RAY_START_ARGS"

[ $# -ge 1 ] || usage
cmd="$1"; shift
case "$cmd" in
  head)
    [ $# -eq 0 ] || usage
    exec "$RAY" start --head --port "$PORT" --dashboard-host "$DASHBOARD_HOST" --dashboard-port "$DASHBOARD_PORT" ${extra[@]+"${extra[@]}"} ;;
  worker)
    [ $# -eq 1 ] || usage
    need_host "$1"
    exec "$RAY" start --address "$1:$PORT" ${extra[@]+"${extra[@]}"} ;;
  submit)
    [ $# -ge 2 ] || usage
    need_host "$1"
    [[ "$2" =~ ^[1-9][0-9]*$ ]] || { echo "launch/ray_cluster.sh: NUM_WORKERS=$2 must be a positive integer" >&2; exit 2; }
    head="$1"; n="$2"; shift 2
    echo "launch/ray_cluster.sh: submitting $n Ray Train workers to http://$head:$DASHBOARD_PORT" >&2
    exec "$RAY" job submit --address "http://$head:$DASHBOARD_PORT" --working-dir . -- \
      "$MOE_TRAIN" parallel=ray parallel.ray_address=auto parallel.num_workers="$n" "$@" ;;
  stop)
    [ $# -eq 0 ] || usage
    exec "$RAY" stop ;;
  -h|--help|help)
    usage ;;
  *)
    echo "launch/ray_cluster.sh: unknown command '$cmd'" >&2; usage ;;
esac
