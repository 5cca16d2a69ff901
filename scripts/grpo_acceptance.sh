#!/usr/bin/env bash
# The acceptance run of issue 32 ("it learns"): GRPO with LoRA on the built-in arithmetic task (one-digit
# + − ×, the few-shot prompt: the 270M base model answers after "A:", right ~10 % of the time greedily,
# often copying a number of the examples), fixed seed, on the embedded 270M, rollouts on the quantized
# engine, MINUTES of training steps plus the greedy evaluations on 200 held-out problems (before, every
# 20 steps, after). One-digit + − × has 300 distinct problems: the 200 held out are distinct and none of
# them is trained on (tasks.split_held_out), so training draws from the other 100. Copies the curves and
# the JSON summary to docs/ and prints the wall time, CPU time and peak RSS of the run (GNU time).
#
#   scripts/grpo_acceptance.sh [OUT]        (default OUT: runs/grpo-acceptance)
#   MINUTES=30 scripts/grpo_acceptance.sh    (another budget of training steps; default 50)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/grpo-acceptance}
MINUTES=${MINUTES:-50}
PY=${PYTHON:-python}
mkdir -p "$(dirname "$OUT")"
/usr/bin/time -v -o "$OUT.time" env PYTHONPATH=src "$PY" -m gemma3 rl grpo --task arithmetic --prompt-style fewshot \
    --digits 1 --ops "+-*" --seed 0 --steps 1000 --max-minutes "$MINUTES" --prompts 4 --group 8 --max-tokens 4 \
    --temperature 1.0 --lr 2e-4 --beta 0.02 --lora-rank 8 --train-size 2000 --eval-size 200 \
    --eval-every 20 --threads 2 --quiet --out "$OUT" --json | tee "$OUT.json"
cp "$OUT/rewards.png" docs/rl_grpo_rewards.png
cp "$OUT.json" docs/rl_grpo_acceptance.json
grep -E "Elapsed \(wall clock\)|User time|System time|Maximum resident set size" "$OUT.time"
