#!/usr/bin/env bash
# The two-stage SFT recipe end to end at tiny scale, on CPU:
#   bash launch/sft_two_stage.sh                 # extra key=value arguments go to both stages
# 0. demo corpus + instruction sets (jinpan data demo); the demo pretraining checkpoint runs/demo
#    (configs/pretrain/demo.yaml, trained first on 2 processes when absent);
# 1. the pretrained model's held-out exact-match (jinpan sft --eval-only), ~0;
# 2. stage 1: open instructions (general:finance 4:1, some noisy answers) + pretraining text, dp=2 ZeRO-1;
# 3. stage 2: the high-quality set from stage 1's weights, tp=2 + sp;
# then eval loss on held-out answer tokens and held-out exact-match of greedy answers per stage.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=runs/sft_tiny
jinpan() { "$PYTHON" -m megatron_jinpan "$@"; }
start=$(date +%s)

jinpan data demo --output data/demo
if [ ! -f runs/demo/checkpoints/latest ]; then
  echo "== no demo pretraining checkpoint: training configs/pretrain/demo.yaml (tp=2, 2 processes) =="
  jinpan pretrain --config configs/pretrain/demo.yaml --nproc 2 parallel.pp=1 log.progress=false
fi
mkdir -p "$OUT"
sft_start=$(date +%s)

echo "== the pretrained model on the held-out questions =="
jinpan sft --config configs/sft/tiny_stage1.yaml --eval-only --checkpoint runs/demo --nproc 2 \
  run_dir="$OUT/pretrained" "$@"

echo "== stage 1: open instructions + pretraining text (dp=2, ZeRO-1) =="
jinpan sft --config configs/sft/tiny_stage1.yaml --nproc 2 "$@"

echo "== stage 2: high-quality instructions (tp=2, sp) =="
jinpan sft --config configs/sft/tiny_stage2.yaml --nproc 2 "$@"

"$PYTHON" - "$OUT" "$start" "$sft_start" <<'PY'
import json, sys, time
out, start, sft_start = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
pre = json.load(open(f"{out}/pretrained/eval.json"))
print(f"pretrained (runs/demo): eval_loss_sft {pre['eval_loss_sft']:.3f}, "
      f"held-out exact-match {pre['eval_exact_match']:.1%} (contains {pre['eval_contains']:.1%})")
for stage in ("stage1", "stage2"):
    lines = [json.loads(l) for l in open(f"{out}/{stage}/metrics.jsonl")]
    train = [l for l in lines if l.get("loss") is not None]
    evals = [l for l in lines if "eval_exact_match" in l]
    curve = " -> ".join(f"{l['eval_loss_sft']:.3f}" for l in evals)
    last = evals[-1]
    print(f"{stage}: train loss {train[0]['loss']:.3f} -> {train[-1]['loss']:.3f} over {len(train)} steps; "
          f"eval_loss_sft {curve}; eval_loss_zh_finance {last['eval_loss_zh_finance']:.3f}; "
          f"held-out exact-match {last['eval_exact_match']:.1%} (contains {last['eval_contains']:.1%})")
now = time.time()
print(f"SFT time: {now - sft_start:.0f} s (total with data/pretraining: {now - start:.0f} s)")
PY
