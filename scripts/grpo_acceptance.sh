#!/usr/bin/env bash
# The acceptance run of issue 32 ("it learns"): GRPO with LoRA on the built-in arithmetic task, fixed
# seed, on the embedded 270M, rollouts on the quantized engine, at most 60 minutes of training plus
# the greedy evaluations on 200 held-out problems (before, every 25 steps, after). Copies the curves to
# docs/ and prints the peak RSS of the run (GNU time).
#
#   scripts/grpo_acceptance.sh [OUT]        (default OUT: runs/grpo-acceptance)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/grpo-acceptance}
PY=${PYTHON:-python}
mkdir -p "$(dirname "$OUT")"
/usr/bin/time -v -o "$OUT.time" env PYTHONPATH=src "$PY" -m gemma3 rl grpo --task arithmetic --seed 0 \
    --steps 1000 --max-minutes 55 --prompts 4 --group 8 --max-tokens 6 --temperature 1.0 \
    --lr 2e-4 --beta 0.04 --lora-rank 8 --format-weight 0.2 --train-size 2000 --eval-size 200 \
    --eval-every 25 --threads 2 --out "$OUT" --json | tee "$OUT.json"
cp "$OUT/rewards.png" docs/rl_grpo_rewards.png
grep "Maximum resident set size" "$OUT.time"
