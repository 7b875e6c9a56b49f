#!/usr/bin/env bash
# Preference training on the demo preference set, CPU only: a pairwise reward model, then DPO.
#   bash launch/reward_demo.sh                       # both stages, one process each
#   STAGES=reward bash launch/reward_demo.sh         # only the reward model
#   SFT=runs/sft_tiny/stage2 bash launch/reward_demo.sh   # start both from the tiny SFT model
#   NPROC=4 bash launch/reward_demo.sh parallel.tp=2 parallel.pp=2   # extra key=value overrides
# Prints the held-out pairwise accuracy of the reward model, and DPO's held-out reward accuracy and
# chosen-minus-rejected margin (first -> last evaluation).
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${NPROC:-1}
# One OpenMP thread per process: on a shared (oversubscribed) CPU, spinning OpenMP threads made a step
# of this demo ~90x slower (55 s instead of 0.6 s measured); on an idle machine it costs little.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PYTHON=${PYTHON:-python}
STAGES=${STAGES:-"reward dpo"}
LOAD=()
if [ -n "${SFT:-}" ]; then LOAD=("checkpoint.load=$SFT"); fi
"$PYTHON" -m megatron_jinpan data demo --output data/demo > /dev/null

summary() {  # $1 = run dir, $2 = stage name
  "$PYTHON" - "$1" "$2" <<'PY'
import json, sys
run, stage = sys.argv[1], sys.argv[2]
lines = [json.loads(l) for l in open(f"{run}/metrics.jsonl")]
evals = [l for l in lines if "eval_accuracy" in l]
train = [l for l in lines if l.get("loss") is not None]
print(f"== {stage}: {run}/metrics.jsonl, {len(train)} steps, loss {train[0]['loss']:.3f} -> {train[-1]['loss']:.3f}, "
      f"{sum(l['step_time_s'] for l in train):.0f} s of steps")
sets = sorted(k[len("eval_accuracy_"):] for k in evals[-1] if k.startswith("eval_accuracy_"))
for l in evals:
    per_set = "  ".join(f"{s} {l['eval_accuracy_' + s]:.3f}" for s in sets)
    print(f"   step {l['step']:4d}  held-out accuracy {per_set}  margin {l['eval_reward_margin']:+.4f}"
          f"  chosen {l['eval_reward_chosen']:+.4f}  rejected {l['eval_reward_rejected']:+.4f}")
final = ", ".join(f"{s} {evals[-1]['eval_accuracy_' + s]:.1%}" for s in sets)
print(f"   final held-out accuracy: {final}"
      + (f"; margin 0 (step 0, policy = reference) -> {evals[-1]['eval_reward_margin']:+.4f}" if stage == "dpo" else ""))
PY
}

for stage in $STAGES; do
  start=$(date +%s)
  "$PYTHON" -m megatron_jinpan "$stage" --config "configs/$stage/tiny.yaml" --nproc "$NPROC" \
    checkpoint.resume=never "${LOAD[@]}" "$@"
  summary "runs/${stage}_tiny" "$stage"
  echo "   wall time: $(( $(date +%s) - start )) s"
  if [ "$stage" = reward ]; then  # the whole held-out set through `reward score`, by kind of rejected answer
    rm -f runs/reward_tiny/valid_scored.jsonl
    "$PYTHON" -m megatron_jinpan reward score --checkpoint runs/reward_tiny --input data/demo/prefs/valid.jsonl \
      --output runs/reward_tiny/valid_scored.jsonl --tokenizer data/demo/tokenizer.model > /dev/null
    "$PYTHON" - <<'PY'
import collections, json
acc = collections.defaultdict(list)
for line in open("runs/reward_tiny/valid_scored.jsonl"):
    d = json.loads(line)
    ok = d["reward_chosen"] > d["reward_rejected"]
    acc["all"].append(ok)
    acc[d["kind"]].append(ok)
print("   held-out accuracy by rejected kind (reward score): "
      + ", ".join(f"{k} {sum(v) / len(v):.1%} ({len(v)})" for k, v in sorted(acc.items())))
PY
  fi
done
