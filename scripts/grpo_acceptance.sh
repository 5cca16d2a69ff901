#!/usr/bin/env bash
# The acceptance run of issue 32 ("it learns"): GRPO with LoRA on the built-in arithmetic task (two-digit
# + and −, the few-shot prompt: the 270M base model answers after "A:" but is often wrong), fixed seed,
# on the embedded 270M, rollouts on the quantized engine, at most 55 minutes of training steps plus the
# greedy evaluations on 200 held-out problems (before, every 20 steps, after). Copies the curves and the
# JSON summary to docs/ and prints the wall time, CPU time and peak RSS of the run (GNU time).
#
#   scripts/grpo_acceptance.sh [OUT]        (default OUT: runs/grpo-acceptance)
#   MINUTES=33 scripts/grpo_acceptance.sh    (a shorter budget of training steps; default 55)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/grpo-acceptance}
MINUTES=${MINUTES:-55}
PY=${PYTHON:-python}
mkdir -p "$(dirname "$OUT")"
/usr/bin/time -v -o "$OUT.time" env PYTHONPATH=src "$PY" -m gemma3 rl grpo --task arithmetic --prompt-style fewshot \
    --digits 2 --ops +- --seed 0 --steps 1000 --max-minutes "$MINUTES" --prompts 4 --group 8 --max-tokens 6 \
    --temperature 1.0 --lr 5e-4 --beta 0.02 --lora-rank 8 --train-size 2000 --eval-size 200 \
    --eval-every 20 --threads 2 --quiet --out "$OUT" --json | tee "$OUT.json"
cp "$OUT/rewards.png" docs/rl_grpo_rewards.png
cp "$OUT.json" docs/rl_grpo_acceptance.json
grep -E "Elapsed \(wall clock\)|User time|System time|Maximum resident set size" "$OUT.time"
