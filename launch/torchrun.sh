#!/usr/bin/env bash
# Launch a jinpan training command with torchrun, on one node or many.
#
# One node, 8 processes:
#   launch/torchrun.sh --nproc-per-node 8 -- pretrain --config configs/pretrain/llama7b_stage1.yaml
# Two nodes (run on each node, same endpoint; node ranks 0 and 1):
#   launch/torchrun.sh --nnodes 2 --node-rank 0 --nproc-per-node 8 --rdzv-endpoint node0:29500 -- pretrain --config ...
#   launch/torchrun.sh --nnodes 2 --node-rank 1 --nproc-per-node 8 --rdzv-endpoint node0:29500 -- pretrain --config ...
#
# Everything after `--` is passed to `python -m megatron_jinpan` (default command: pretrain).
set -euo pipefail

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
NPROC_PER_NODE=${NPROC_PER_NODE:-1}
RDZV_ENDPOINT=${RDZV_ENDPOINT:-127.0.0.1:29500}
RDZV_ID=${RDZV_ID:-jinpan}
PYTHON=${PYTHON:-python}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --nnodes) NNODES=$2; shift 2 ;;
    --node-rank) NODE_RANK=$2; shift 2 ;;
    --nproc-per-node) NPROC_PER_NODE=$2; shift 2 ;;
    --rdzv-endpoint) RDZV_ENDPOINT=$2; shift 2 ;;
    --rdzv-id) RDZV_ID=$2; shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) break ;;
  esac
done
[[ $# -gt 0 ]] || set -- pretrain

# CPU runs: share the cores between the local processes.
if ! "$PYTHON" -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then  # device-ok
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC_PER_NODE > 0 ? $(nproc) / NPROC_PER_NODE : 1 ))}
fi

MASTER_ADDR=${RDZV_ENDPOINT%:*}
MASTER_PORT=${RDZV_ENDPOINT##*:}
status=0
if [[ "$NNODES" == "1" ]]; then
  "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC_PER_NODE" -m megatron_jinpan "$@" \
    || status=$?
else
  # Static rendezvous: node ranks are fixed (Slurm gives them), the endpoint is node 0.
  "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node-rank "$NODE_RANK" \
    --nproc-per-node "$NPROC_PER_NODE" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
    -m megatron_jinpan "$@" || status=$?
fi
if [[ $status -ne 0 ]]; then
  # torchrun's "Root Cause" summary above names the failed rank; the rank printed its (pp, dp, tp).
  echo "launch/torchrun.sh: training failed (exit $status); torchrun stopped the other ranks." >&2
  "$PYTHON" -m megatron_jinpan.training.failure "$@" || true
fi
exit $status
