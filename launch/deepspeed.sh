#!/usr/bin/env bash
# moe-train under DeepSpeed's launcher (parallel=deepspeed: the engine with ZeRO 0/1/2, data +
# expert parallelism, pipeline stages).  With a hostfile, either run it once on the first node
# and the launcher reaches the other hosts itself (over ssh, through pdsh by default), or - no
# ssh between nodes - run it on every node with that node's NODE_RANK (as with torchrun).  The
# rest of the command line goes to moe-train (parallel=deepspeed is added first, so your
# parallel.* overrides win).
#
#   # one machine, 2 processes (on CPU --num_gpus is the process count):
#   NUM_GPUS=2 launch/deepspeed.sh parallel.zero_stage=1 parallel.ep_size=2 experiment=smoke threads=1
#   # 2 nodes x 8 GPUs; hostfile lines are "HOST slots=N":
#   printf 'node0 slots=8\nnode1 slots=8\n' > hostfile
#   HOSTFILE=hostfile MASTER_ADDR=node0 launch/deepspeed.sh parallel.ep_size=8 parallel.zero_stage=2 \
#     moe.num_experts=64 out_dir=/shared/runs/e64 hydra.run.dir=/shared/runs/e64
#   # the same without ssh: on node0 NODE_RANK=0, on node1 NODE_RANK=1, same hostfile and arguments
#   HOSTFILE=hostfile MASTER_ADDR=node0 NODE_RANK=1 launch/deepspeed.sh parallel.ep_size=8 ...
#
# Environment (defaults in brackets):
#   HOSTFILE []           DeepSpeed hostfile ("HOST slots=N" per line); empty: this machine only
#   NUM_GPUS [1]          processes on this machine when there is no hostfile (GPUs, or CPU shares:
#                         then also pass threads=<cores / NUM_GPUS>)
#   MASTER_ADDR [127.0.0.1 / the hostfile's first host]  address every node can reach
#   MASTER_PORT [29500]   a free TCP port there
#   NODE_RANK []          set: this node's index in the hostfile, launched here only (--no_ssh)
#   LAUNCHER [pdsh]       how the launcher reaches other hosts: pdsh, openmpi, mvapich, slurm, ...
#   DEEPSPEED [deepspeed] the launcher;  MOE_TRAIN [moe-train] the trainer (resolved to a path)
# out_dir must be on a filesystem every node sees: rank 0 writes the checkpoint, all ranks read it.
# --no_local_rank: the launcher would otherwise append --local_rank=N, which Hydra rejects.
set -euo pipefail

HOSTFILE="${HOSTFILE:-}"
NODE_RANK="${NODE_RANK:-}"
NUM_GPUS="${NUM_GPUS:-1}"
MASTER_PORT="${MASTER_PORT:-29500}"
LAUNCHER="${LAUNCHER:-pdsh}"
DEEPSPEED="${DEEPSPEED:-deepspeed}"
MOE_TRAIN="${MOE_TRAIN:-moe-train}"

if ! command -v "$DEEPSPEED" >/dev/null; then
  echo "launch/deepspeed.sh: $DEEPSPEED not found: pip install -e '.[deepspeed]' (or set DEEPSPEED=/path/to/deepspeed)" >&2; exit 2
fi
train="$(command -v "$MOE_TRAIN" || true)"
if [ -z "$train" ]; then
  echo "launch/deepspeed.sh: $MOE_TRAIN not found on PATH: activate the environment moe is installed in" >&2; exit 2
fi
case "$NUM_GPUS" in ''|*[!0-9]*|0) echo "launch/deepspeed.sh: NUM_GPUS=$NUM_GPUS must be a positive integer" >&2; exit 2 ;; esac

if [ -n "$HOSTFILE" ]; then
  if [ ! -s "$HOSTFILE" ]; then echo "launch/deepspeed.sh: HOSTFILE=$HOSTFILE does not exist or is empty" >&2; exit 2; fi
  if grep -Ev '^[[:space:]]*(#|$)' "$HOSTFILE" | grep -Evq '^[^[:space:]]+[[:space:]]+slots=[0-9]+[[:space:]]*$'; then
    echo "launch/deepspeed.sh: HOSTFILE=$HOSTFILE: every line must read 'HOST slots=N'" >&2; exit 2
  fi
  first="$(grep -Ev '^[[:space:]]*(#|$)' "$HOSTFILE" | head -n1 | awk '{print $1}')"
  MASTER_ADDR="${MASTER_ADDR:-$first}"
  if [ -n "$NODE_RANK" ]; then
    case "$NODE_RANK" in *[!0-9]*) echo "launch/deepspeed.sh: NODE_RANK=$NODE_RANK must be a node index (0, 1, ...)" >&2; exit 2 ;; esac
    hosts=(--hostfile "$HOSTFILE" --no_ssh --node_rank "$NODE_RANK")
    echo "launch/deepspeed.sh: node $NODE_RANK of the hosts in $HOSTFILE (no ssh), master $MASTER_ADDR:$MASTER_PORT" >&2
  else
    hosts=(--hostfile "$HOSTFILE" --launcher "$LAUNCHER")
    echo "launch/deepspeed.sh: hosts from $HOSTFILE (reached with $LAUNCHER), master $MASTER_ADDR:$MASTER_PORT" >&2
  fi
else
  MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
  hosts=(--num_gpus "$NUM_GPUS")
  echo "launch/deepspeed.sh: this machine, $NUM_GPUS process(es), master $MASTER_ADDR:$MASTER_PORT" >&2
fi

exec "$DEEPSPEED" "${hosts[@]}" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --no_local_rank \
  "$train" parallel=deepspeed "$@"
