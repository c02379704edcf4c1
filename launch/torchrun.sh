#!/usr/bin/env bash
# Multi-node moe-train under torchrun: run this once on every node, same arguments, its own
# NODE_RANK.  The rest of the command line goes to moe-train (parallel=ddp is added first, so
# a parallel.* override of yours wins).  Example, 2 nodes x 4 processes, experts over 4 ranks:
#
#   # on node0 (10.0.0.1):
#   NNODES=2 NODE_RANK=0 NPROC_PER_NODE=4 MASTER_ADDR=10.0.0.1 \
#     launch/torchrun.sh parallel.ep_size=4 moe.num_experts=16 out_dir=/shared/runs/e16 hydra.run.dir=/shared/runs/e16
#   # on node1: the same line with NODE_RANK=1
#
# Environment (defaults in brackets):
#   NNODES [1]            nodes taking part
#   NODE_RANK [0]         this node's index, 0 .. NNODES-1 (node 0 hosts the rendezvous)
#   NPROC_PER_NODE [1]    processes on this node: one per GPU, or per share of the CPU cores
#                         (on CPU also pass threads=<cores / NPROC_PER_NODE>)
#   MASTER_ADDR [127.0.0.1]  address of node 0 that every node can reach
#   MASTER_PORT [29500]   a free TCP port on node 0
#   RDZV [static]         static: torchrun's --master_addr/--master_port/--node_rank rendezvous;
#                         c10d: elastic rendezvous at MASTER_ADDR:MASTER_PORT (node ranks
#                         assigned by torchrun, NODE_RANK unused), job id RDZV_ID [moe]
#   TORCHRUN [torchrun]   the torchrun executable;  MOE_TRAIN [moe-train] the trainer
# out_dir must be on a filesystem every node sees: rank 0 writes the checkpoint, all ranks read it.
set -euo pipefail

NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
NPROC_PER_NODE="${NPROC_PER_NODE:-1}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
RDZV="${RDZV:-static}"
TORCHRUN="${TORCHRUN:-torchrun}"
MOE_TRAIN="${MOE_TRAIN:-moe-train}"

case "$RDZV" in
  static)
    rdzv=(--node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT") ;;
  c10d)
    rdzv=(--rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "${RDZV_ID:-moe}") ;;
  *)
    echo "launch/torchrun.sh: RDZV=$RDZV: use static or c10d" >&2; exit 2 ;;
esac

echo "launch/torchrun.sh: node $NODE_RANK of $NNODES, $NPROC_PER_NODE process(es), rendezvous $RDZV at $MASTER_ADDR:$MASTER_PORT" >&2
exec "$TORCHRUN" --nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE" "${rdzv[@]}" \
  --max_restarts 0 --no-python "$MOE_TRAIN" parallel=ddp "$@"
