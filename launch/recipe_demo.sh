#!/usr/bin/env bash
# The whole recipe at tiny scale, then one report comparing its stages:
#   bash launch/recipe_demo.sh            # writes runs/recipe/report.md (+ compare.png, per-stage reports)
# 1. continued pretraining: tokenizer extension, stage 1 (embeddings), stage 2 (all)  (launch/cpt_two_stage.sh)
# 2. SFT stage 1 and 2                                                               (launch/sft_two_stage.sh)
# 3. reward model from the SFT model (configs/reward/tiny.yaml); 4. PPO when configs/ppo/tiny.yaml exists
# 5. every stage evaluated with `jinpan eval`: held-out perplexity per domain, the demo exam (C-Eval style),
#    exact match on held-out SFT questions, and a reward-model-judged win rate against the reference answers;
#    `jinpan eval compare` puts the stages side by side.
# Stages already trained (their checkpoints/latest exists) are not trained again; EVAL_LIMIT bounds the
# questions per evaluation (default 40).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=runs/recipe
LIMIT=${EVAL_LIMIT:-40}
jinpan() { "$PYTHON" -m megatron_jinpan "$@"; }
trained() { [ -f "$1/checkpoints/latest" ]; }
start=$(date +%s)

jinpan data demo --output data/demo
trained runs/cpt_tiny/stage2 || bash launch/cpt_two_stage.sh
trained runs/sft_tiny/stage2 || bash launch/sft_two_stage.sh
trained runs/reward_tiny || jinpan reward --config configs/reward/tiny.yaml --nproc 2 checkpoint.load=runs/sft_tiny/stage2
PPO_DIR=""
if [ -f configs/ppo/tiny.yaml ]; then
  PPO_DIR=$("$PYTHON" -c "import yaml; print(yaml.safe_load(open('configs/ppo/tiny.yaml'))['run_dir'])")
  trained "$PPO_DIR" || trained "$PPO_DIR/actor" || jinpan ppo --config configs/ppo/tiny.yaml --nproc 2
fi
mkdir -p "$OUT"

# name=checkpoint of every stage, in recipe order
stages=(cpt_base=runs/cpt_tiny/stage0 cpt_stage1=runs/cpt_tiny/stage1 cpt_stage2=runs/cpt_tiny/stage2
        sft_base=runs/demo sft_stage1=runs/sft_tiny/stage1 sft_stage2=runs/sft_tiny/stage2)
if [ -n "$PPO_DIR" ]; then
  if trained "$PPO_DIR/actor"; then stages+=(ppo="$PPO_DIR/actor"); elif trained "$PPO_DIR"; then stages+=(ppo="$PPO_DIR"); fi
fi

names=()
for entry in "${stages[@]}"; do
  name=${entry%%=*}; ckpt=${entry#*=}
  trained "$ckpt" || { echo "skip $name: $ckpt has no checkpoint"; continue; }
  names+=("$name")
  echo "== evaluating $name ($ckpt) =="
  # per-domain perplexity of the held-out corpus, tokenized with the stage's own tokenizer
  jinpan eval ppl --checkpoint "$ckpt" --output "$OUT/$name/ppl" \
    --data zh_finance=data/demo/corpus/zh-finance_valid.jsonl --data zh_general=data/demo/corpus/zh-general_valid.jsonl \
    --data en_finance=data/demo/corpus/en-finance_valid.jsonl --data en_general=data/demo/corpus/en-general_valid.jsonl \
    --seq-len 128 --global-batch 8 --micro-batch 4 --eval-iters 8 > /dev/null
  jinpan eval mcq --checkpoint "$ckpt" --exam data/demo/eval/exam --exam-name demo_exam --num_fewshot 2 \
    --limit "$LIMIT" --output_path "$OUT/$name/mcq" > /dev/null
  case $name in
    sft_*|ppo)
      jinpan eval generate --checkpoint "$ckpt" --input data/demo/sft/heldout.jsonl --template plain --limit "$LIMIT" \
        --max-new-tokens 24 --output "$OUT/$name/generate" > /dev/null
      if trained runs/reward_tiny; then
        jinpan eval judge --answers "$OUT/$name/generate/answers.jsonl" --reward-checkpoint runs/reward_tiny \
          --output "$OUT/$name/judge" > /dev/null
      fi ;;
  esac
done

dirs=(); for n in "${names[@]}"; do dirs+=("$OUT/$n"); done
jinpan eval compare "${dirs[@]}" --names "$(IFS=,; echo "${names[*]}")" --output "$OUT" > /dev/null
{
  echo "# Recipe demo: every stage on the same evaluations"
  echo
  echo "Stages: ${names[*]}. ppl/* is per token of each stage's own tokenizer (the CPT stages use the"
  echo "extended tokenizer, so compare them with each other and the SFT stages with each other);"
  echo "acc/demo_exam is the 2-shot C-Eval-style demo exam; generate/* is held-out SFT questions;"
  echo "judge/* is the reward model's verdict of the stage's answer against the reference answer."
  echo "Plot: compare.png. Total time: $(( $(date +%s) - start )) s."
  echo
  tail -n +2 "$OUT/compare.md"
} > "$OUT/report.md"
cat "$OUT/report.md"
