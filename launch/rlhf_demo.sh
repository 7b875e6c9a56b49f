#!/usr/bin/env bash
# RLHF at tiny scale on CPU: demo pretraining checkpoint -> SFT -> reward model -> PPO.
#   bash launch/rlhf_demo.sh                      # reuses runs/demo, runs/sft_tiny/stage2, runs/reward_tiny if present
#   NPROC=4 bash launch/rlhf_demo.sh parallel.tp=2 parallel.pp=2     # extra key=value go to both PPO runs
# Two PPO runs from the SFT model, both on the same engine/layout:
#   rule: reward = demo_answer (rule-checked: right number for arithmetic / reading prompts), range [0, 1]
#   rm:   reward = the tiny reward model's normalised score, KL to the reference reported
# Prints the reward at the start and end of each run (mean of the first / last 5 steps) and the KL.
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${NPROC:-2}
# One OpenMP thread per process: on a shared (oversubscribed) CPU spinning OpenMP threads slow steps
# by orders of magnitude (docs/reward.md); on an idle machine it costs little.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PYTHON=${PYTHON:-python}
jinpan() { "$PYTHON" -m megatron_jinpan "$@"; }
trained() { [ -f "$1/checkpoints/latest" ]; }

jinpan data demo --output data/demo > /dev/null
trained runs/demo || bash launch/demo.sh
trained runs/sft_tiny/stage2 || bash launch/sft_two_stage.sh
# The reward model: configs/reward/tiny.yaml, a narrow tiny (4 x 128) trained from scratch on the demo
# preference pairs (~4 min, docs/reward.md); PPO builds it (and the critic started from it) in its own shape.
trained runs/reward_tiny || jinpan reward --config configs/reward/tiny.yaml

# PPO prompts, first user turns of the SFT stage-2 set (rule-checkable; a reading record's later turns
# ask other questions):
#   prompts.jsonl        arithmetic and reading, 883 prompts (for your own runs);
#   sums8/sums16.jsonl   the first 8 / 16 distinct one-digit sums, in the set's order (not chosen by how
#                        the model does): the rule run / the RM run. Sampled at temperature 1 the SFT model
#                        gets a sum right about 1 time in 3, and each prompt comes back every step (every
#                        2 steps), so what the update reinforces is asked again; over more distinct sums the
#                        rollout reward plateaus lower in the same budget (docs/ppo.md).
"$PYTHON" - <<'PY'
import json, os
os.makedirs("data/demo/ppo", exist_ok=True)
prompts, sums = [], []
for line in open("data/demo/sft/stage2.jsonl", encoding="utf-8"):
    rec = json.loads(line)
    if rec.get("task") not in ("arithmetic", "reading"):
        continue
    user = next(m["content"] for m in rec["messages"] if m["role"] == "user")
    prompts.append(user)
    if rec["task"] == "arithmetic" and user not in sums:
        sums.append(user)
for name, rows in (("prompts", prompts), ("sums8", sums[:8]), ("sums16", sums[:16])):
    with open(f"data/demo/ppo/{name}.jsonl", "w", encoding="utf-8") as out:
        out.writelines(json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for p in rows)
    print(f"data/demo/ppo/{name}.jsonl: {len(rows)} prompts")
PY

ppo_start=$(date +%s)
start=$ppo_start
jinpan ppo --config configs/ppo/tiny.yaml --nproc "$NPROC" run_dir=runs/ppo_tiny/rule "$@"
echo "   rule run: $(( $(date +%s) - start )) s"
start=$(date +%s)
jinpan ppo --config configs/ppo/tiny_rm.yaml --nproc "$NPROC" run_dir=runs/ppo_tiny/rm "$@"
echo "   rm run: $(( $(date +%s) - start )) s; PPO part $(( $(date +%s) - ppo_start )) s"

"$PYTHON" - <<'PY'
import json
import os

def mean(rows, key):
    return sum(r[key] for r in rows) / len(rows)

for name, key in (("rule", "score_rule"), ("rm", "score_rm")):
    lines = [json.loads(l) for l in open(f"runs/ppo_tiny/{name}/metrics.jsonl")]
    first, last = lines[:5], lines[-5:]
    r0, r1 = mean(first, key), mean(last, key)
    print(f"== ppo {name} ({lines[0].get('kl_coef', 0):g} kl_coef): {len(lines)} steps, {key} {lines[0][key]:.3f} at step 1, "
          f"{r0:.3f} -> {r1:.3f} (mean of the first -> last 5 steps); KL to the reference {mean(first, 'kl'):.3f} -> "
          f"{mean(last, 'kl'):.3f} (max {max(l['kl'] for l in lines):.3f}); response_len {mean(first, 'response_len'):.1f} -> "
          f"{mean(last, 'response_len'):.1f}; entropy {mean(first, 'entropy'):.3f} -> {mean(last, 'entropy'):.3f}; "
          f"{sum(l['step_time_s'] for l in lines):.0f} s of steps, gen {mean(lines, 'gen_tokens_per_s'):.0f} tok/s, "
          f"max |logp gen - train| {max(l['logprob_diff_max'] for l in lines):.1e}; load average {os.getloadavg()[0]:.1f}")
    if name == "rule":  # demo_answer scores 0 or 1: the range is 1
        start = lines[0][key]  # step 1's rollouts come from the SFT weights (every prompt, 8 samples each)
        rise = r1 - start
        print(f"   rule reward rise = {rise:.0%} of its range [0, 1] from the SFT start ({start:.3f}, step 1) to the "
              f"mean of the last 5 steps ({r1:.3f}); goal >= 50%: {'met' if rise >= 0.5 else 'NOT met'}; "
              f"from the mean of the first 5 steps: {r1 - r0:.0%}")
    else:
        kl_last = mean(last, "kl")
        print(f"   RM score {'rose' if r1 > r0 else 'did NOT rise'} by {r1 - r0:+.3f} (normalised units, first -> last 5 "
              f"steps); KL to the reference at the end {kl_last:.3f} nats per response, i.e. a penalty of "
              f"{lines[-1].get('kl_coef', 0) * kl_last:.3f} reward units")
PY
