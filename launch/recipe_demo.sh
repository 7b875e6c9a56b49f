#!/usr/bin/env bash
# The whole recipe at tiny scale, then one report comparing its stages:
#   bash launch/recipe_demo.sh            # writes runs/recipe/report.md (+ compare.png, per-stage reports)
#   FRESH=1 bash launch/recipe_demo.sh    # delete the recipe's run dirs first: every stage trained again
# 1. continued pretraining: English base, tokenizer extension, stage 1 (embeddings), stage 2 (all)
#                                                                                    (launch/cpt_two_stage.sh)
# 2. SFT stage 1 and 2 from the demo pretraining checkpoint runs/demo               (launch/sft_two_stage.sh)
# 3. reward model (configs/reward/tiny.yaml) and the two PPO runs, rule reward (GRPO) and RM reward (PPO+GAE)
#                                                                                    (launch/rlhf_demo.sh)
# 4. every stage evaluated with `jinpan eval`: held-out perplexity per domain, the demo exam (C-Eval style,
#    2-shot), exact match on held-out SFT questions, and a reward-model-judged win rate against the
#    reference answers; `jinpan eval compare` puts the stages side by side.
# Stages already trained (their checkpoints/latest exists) are not trained again. runs/demo (the demo
# pretraining the SFT starts from) is kept by FRESH=1: the recipe's own base is the CPT stage 0.
# Eval sizes (cut to fit the 30-minute budget on a shared 2-core CPU): EXAM_LIMIT questions per exam subject
# (default 20, 5 subjects), QA_LIMIT held-out questions (default 200 = all), PPL_ITERS batches of 8 x 128
# tokens per domain (default 4).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=runs/recipe
EXAM_LIMIT=${EXAM_LIMIT:-20}
QA_LIMIT=${QA_LIMIT:-200}
PPL_ITERS=${PPL_ITERS:-4}
# One OpenMP thread per process, as launch/rlhf_demo.sh: spinning threads on a shared CPU cost far more.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
jinpan() { "$PYTHON" -m megatron_jinpan "$@"; }
trained() { [ -f "$1/checkpoints/latest" ]; }

if [ "${FRESH:-0}" = 1 ]; then
  rm -rf runs/cpt_tiny runs/sft_tiny runs/reward_tiny runs/ppo_tiny "$OUT"
fi
mkdir -p "$OUT"
: > "$OUT/times.tsv"
: > "$OUT/load.txt"
# The machine may be shared: sample the 1-minute load average while the recipe runs, for the report.
( while true; do echo "$(date +%s) $(cut -d' ' -f1 /proc/loadavg)" >> "$OUT/load.txt"; sleep 20; done ) &
sampler=$!
trap 'kill "$sampler" 2>/dev/null || true' EXIT
start=$(date +%s)
# timed NAME CMD...: run CMD, append "NAME<TAB>seconds" to times.tsv
timed() { local name=$1 t; shift; t=$(date +%s); "$@"; printf '%s\t%s\n' "$name" "$(( $(date +%s) - t ))" >> "$OUT/times.tsv"; }

timed data jinpan data demo --output data/demo
trained runs/cpt_tiny/stage2 || timed cpt bash launch/cpt_two_stage.sh
trained runs/sft_tiny/stage2 || timed sft bash launch/sft_two_stage.sh
{ trained runs/ppo_tiny/rule && trained runs/ppo_tiny/rm; } || timed rm_ppo bash launch/rlhf_demo.sh

# name=checkpoint of every stage, in recipe order
stages=(cpt_base=runs/cpt_tiny/stage0 cpt_stage1=runs/cpt_tiny/stage1 cpt_stage2=runs/cpt_tiny/stage2
        sft_base=runs/demo sft_stage1=runs/sft_tiny/stage1 sft_stage2=runs/sft_tiny/stage2
        ppo_rule=runs/ppo_tiny/rule ppo_rm=runs/ppo_tiny/rm)

# Every evaluation in one process, through the CLI's own entry (`jinpan eval ...` arguments, one rank):
# the interpreter, torch and lm-eval are imported once instead of 30 times.
"$PYTHON" - "$OUT" "$EXAM_LIMIT" "$QA_LIMIT" "$PPL_ITERS" "${stages[@]}" <<'PY'
import os
import sys
import time

from megatron_jinpan.cli import main

out, exam_limit, qa_limit, ppl_iters, *stages = sys.argv[1:]
domains = ["zh_finance=data/demo/corpus/zh-finance_valid.jsonl", "zh_general=data/demo/corpus/zh-general_valid.jsonl",
           "en_finance=data/demo/corpus/en-finance_valid.jsonl", "en_general=data/demo/corpus/en-general_valid.jsonl"]
reward = "runs/reward_tiny"
names = []
for entry in stages:
    name, ckpt = entry.split("=", 1)
    if not os.path.isfile(f"{ckpt}/checkpoints/latest"):
        print(f"skip {name}: {ckpt} has no checkpoint")
        continue
    names.append(name)
    print(f"== evaluating {name} ({ckpt}) ==", flush=True)
    t, o = time.time(), f"{out}/{name}"
    # per-domain perplexity of the held-out corpus, tokenized with the stage's own tokenizer
    args = ["eval", "ppl", "--checkpoint", ckpt, "--output", f"{o}/ppl", "--seq-len", "128", "--global-batch", "8",
            "--micro-batch", "4", "--eval-iters", ppl_iters]
    for d in domains:
        args += ["--data", d]
    calls = [args, ["eval", "mcq", "--checkpoint", ckpt, "--exam", "data/demo/eval/exam", "--exam-name", "demo_exam",
                    "--num_fewshot", "2", "--limit", exam_limit, "--output_path", f"{o}/mcq"]]
    if name.startswith(("sft", "ppo")):
        calls.append(["eval", "generate", "--checkpoint", ckpt, "--input", "data/demo/sft/heldout.jsonl",
                      "--template", "plain", "--limit", qa_limit, "--max-new-tokens", "12", "--output", f"{o}/generate"])
        if os.path.isfile(f"{reward}/checkpoints/latest"):
            calls.append(["eval", "judge", "--answers", f"{o}/generate/answers.jsonl", "--reward-checkpoint", reward,
                          "--output", f"{o}/judge"])
    for call in calls:
        if main(call) != 0:
            sys.exit(f"jinpan {' '.join(call)} failed")
    with open(f"{out}/times.tsv", "a") as f:
        f.write(f"eval_{name}\t{time.time() - t:.0f}\n")
with open(f"{out}/stages.txt", "w") as f:
    f.write(" ".join(names) + "\n")
PY
read -r -a names < "$OUT/stages.txt"
dirs=(); for n in "${names[@]}"; do dirs+=("$OUT/$n"); done
timed compare jinpan eval compare "${dirs[@]}" --names "$(IFS=,; echo "${names[*]}")" --output "$OUT" > /dev/null
end=$(date +%s)
echo "$end $(cut -d' ' -f1 /proc/loadavg)" >> "$OUT/load.txt"

"$PYTHON" - "$OUT" "$start" "$end" > "$OUT/report.md" <<'PY'
import json
import os
import sys

out, start, end = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
times = [line.rstrip("\n").split("\t") for line in open(f"{out}/times.tsv") if line.strip()]
loads = [float(line.split()[1]) for line in open(f"{out}/load.txt") if line.strip()]
runs = {"cpt stage 0 (English base)": "runs/cpt_tiny/stage0", "cpt stage 1": "runs/cpt_tiny/stage1",
        "cpt stage 2": "runs/cpt_tiny/stage2", "demo pretraining (SFT base)": "runs/demo",
        "sft stage 1": "runs/sft_tiny/stage1", "sft stage 2": "runs/sft_tiny/stage2",
        "reward model": "runs/reward_tiny", "ppo rule (GRPO)": "runs/ppo_tiny/rule", "ppo rm (PPO+GAE)": "runs/ppo_tiny/rm"}

print("# Recipe demo: every stage on the same evaluations\n")
print(f"Total wall time {end - start} s ({(end - start) / 60:.1f} min); 1-minute load average over the run "
      f"(sampled every 20 s, {os.cpu_count()} CPUs): mean {sum(loads) / len(loads):.1f}, min {min(loads):.1f}, "
      f"max {max(loads):.1f}.\n")
print("ppl/* is per token of each stage's own tokenizer (cpt_base: the English tokenizer, so its Chinese")
print("perplexity is per English-tokenizer piece; cpt_stage1/2: the extended tokenizer; sft_*/ppo_*: the demo")
print("tokenizer): compare the CPT stages with each other and the SFT/PPO stages with each other.")
print("acc/demo_exam is the 2-shot C-Eval-style demo exam (4 options: chance is 0.25); generate/* is greedy")
print("answers (at most 12 tokens, as the SFT configs' eval) to held-out SFT questions; judge/* is the reward model's verdict of the stage's answer against")
print("the reference answer (both orders; tie-adjusted win rate = (W + T/2) / N). Plot: compare.png.\n")
print("| step | wall s |\n|---|---|")
for name, secs in times:
    print(f"| {name} | {secs} |")
print("\nTraining runs (wall: run config written -> last checkpoint; steps: sum of step_time_s):\n")
print("| run | dir | steps | step time s | wall s | trained in this call |\n|---|---|---|---|---|---|")
for label, d in runs.items():
    if not os.path.isfile(f"{d}/metrics.jsonl"):
        continue
    rows = [json.loads(line) for line in open(f"{d}/metrics.jsonl") if line.strip()]
    steps = [r for r in rows if "step_time_s" in r]
    latest = f"{d}/checkpoints/latest"
    began = os.path.getmtime(f"{d}/config.yaml")
    wall = os.path.getmtime(latest) - began if os.path.exists(latest) else float("nan")
    print(f"| {label} | {d} | {len(steps)} | {sum(r['step_time_s'] for r in steps):.0f} | {wall:.0f} | "
          f"{'yes' if began >= start else 'no (reused)'} |")
reward = "runs/reward_tiny/metrics.jsonl"
if os.path.isfile(reward):
    last = [json.loads(line) for line in open(reward) if "eval_accuracy_prefs" in line][-1]
    print(f"\nReward model (the judge): held-out pair accuracy {last['eval_accuracy_prefs']:.3f} on new pairs in the "
          f"training templates, {last['eval_accuracy_prefs_shift']:.3f} on the SFT demo's held-out phrasings.")
print()
print("".join(open(f"{out}/compare.md").readlines()[1:]))
PY
cat "$OUT/report.md"
