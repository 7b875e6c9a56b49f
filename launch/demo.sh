#!/usr/bin/env bash
# `make demo`: build the demo corpus + tokenizer (once), then train the tiny model with
# real tensor x pipeline x data parallelism on local CPU processes (gloo).
#   NPROC=8 bash launch/demo.sh            # tp=2 x pp=2 x dp=2
#   bash launch/demo.sh train.steps=200    # extra key=value overrides
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${NPROC:-4}
PYTHON=${PYTHON:-python}
"$PYTHON" -m megatron_jinpan data demo --output data/demo
echo "== training configs/pretrain/demo.yaml on $NPROC processes (tp=2, pp=2, dp=$((NPROC / 4))) =="
"$PYTHON" -m megatron_jinpan pretrain --config configs/pretrain/demo.yaml --nproc "$NPROC" "$@"
"$PYTHON" - <<'PY'
import json
lines = [json.loads(l) for l in open("runs/demo/metrics.jsonl")]
train = [l for l in lines if l.get("loss") is not None]
evals = [l for l in lines if "eval_loss" in l]
print(f"metrics: runs/demo/metrics.jsonl ({len(train)} steps)")
print(f"loss {train[0]['loss']:.3f} (step 1) -> {train[-1]['loss']:.3f} (step {train[-1]['step']}); "
      f"{train[-1]['tokens_per_s']:.0f} tokens/s")
if evals:
    print("held-out: " + ", ".join(f"{k}={v:.3f}" for k, v in evals[-1].items() if k.startswith("eval_loss")))
PY
