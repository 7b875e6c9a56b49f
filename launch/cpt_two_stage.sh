#!/usr/bin/env bash
# The continued-pretraining recipe end to end, at a size a laptop runs in a few minutes:
#   bash launch/cpt_two_stage.sh
# 0. demo corpus + an English base model (stands in for LLaMA: with real weights, start from
#    `jinpan convert hf-to-mj --input hf/llama-7b --output ckpt/llama-7b` instead);
# 1. extend the tokenizer with Chinese characters and resize the embeddings/LM head;
# 2. stage 1: embeddings + LM head only (pp=2), Chinese:English 3:1, finance share rising;
# 3. stage 2: all weights from stage 1's checkpoint (tp=2 + sp), finance share rising further.
# Extra key=value arguments are passed to every training stage (e.g. train.steps=10).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=runs/cpt_tiny
jinpan() { "$PYTHON" -m megatron_jinpan "$@"; }

jinpan data demo --output data/demo
mkdir -p "$OUT"

echo "== stage 0: English base model (dp=2) =="
jinpan pretrain --config configs/pretrain/tiny_stage0.yaml --nproc 2 "$@"

echo "== vocabulary extension: +Chinese characters, resize embeddings (new rows: mean of sub-token rows) =="
jinpan tokenizer extend --base data/demo/tokenizer_en.model --chars data/demo/zh_chars.txt \
  --output "$OUT/tokenizer_zh.model" --heldout data/demo/corpus/zh-finance_valid.jsonl
cmp -s "$OUT/tokenizer_zh.model" data/demo/tokenizer_ext.model \
  || { echo "extended tokenizer differs from the one data/demo/ext was tokenized with" >&2; exit 1; }
jinpan convert resize --input "$OUT/stage0" --tokenizer "$OUT/tokenizer_zh.model" \
  --base-tokenizer data/demo/tokenizer_en.model --init subtokens --output "$OUT/stage0_resized" --overwrite --no-progress

echo "== stage 1: embeddings + LM head only (pp=2) =="
jinpan pretrain --config configs/pretrain/tiny_stage1.yaml --nproc 2 "$@"

echo "== stage 2: all weights (tp=2, sp) =="
jinpan pretrain --config configs/pretrain/tiny_stage2.yaml --nproc 2 "$@"

"$PYTHON" - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
for stage in ("stage0", "stage1", "stage2"):
    lines = [json.loads(l) for l in open(f"{out}/{stage}/metrics.jsonl")]
    train = [l for l in lines if l.get("loss") is not None]
    evals = {k: round(v, 3) for k, v in lines[-1].items() if k.startswith("eval_loss")}
    print(f"{stage}: loss {train[0]['loss']:.3f} -> {train[-1]['loss']:.3f} over {len(train)} steps; {evals}")
PY
