#!/usr/bin/env bash
# The CPU demo: the whole pipeline at toy size within a time budget (DEMO_MINUTES, default
# 20) on whatever CPU runs it. Tokenizer → pretraining → base evals → SFT → chat evals → a
# little RL → chat → report. Training LLMs wants GPUs; this run shows every stage working
# end to end, and ends with a tiny model that writes English-looking text, not a smart one.
#
#   bash runs/runcpu.sh
#   DEMO_MINUTES=60 bash runs/runcpu.sh     # a longer budget buys more training steps
#
# How the budget is spent: after the tokenizer, one pretraining step of the demo model is
# timed on this machine (`nanochat bench-train`), the evaluations are charged what they
# cost in step-times plus a few seconds of start-up per command, and the rest of the budget
# is split 4:1 between pretraining and SFT steps. The plan is printed before training starts.
# A CPU with native bf16 runs a step ~2.5x faster than an fp32-only (AVX2) one, so it
# gets ~2.5x the steps in the same budget.
#
# Knobs (environment): DEMO_MINUTES (20), DEPTH (4), STEPS and SFT_STEPS (override the
# plan), RL_STEPS (4), DEMO_PLAN_ONLY=1 (stop after printing the plan), NANOCHAT_BASE_DIR
# (default ~/.cache/nanochat-cpu), WANDB_RUN.
# Offline: set NANOCHAT_DATA_URL (+ NANOCHAT_DATA_SHARDS), NANOCHAT_HF_MIRROR,
# NANOCHAT_EVAL_BUNDLE_URL and TIKTOKEN_CACHE_DIR; when ../shared/data exists beside the
# repository (as on the project's own machines) it is used for all of them.
set -euo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)

export NANOCHAT_BASE_DIR=${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat-cpu}
DEMO_MINUTES=${DEMO_MINUTES:-20}
DEPTH=${DEPTH:-4}
RL_STEPS=${RL_STEPS:-4}
RUN_FLAGS=()
[ -n "${WANDB_RUN:-}" ] && RUN_FLAGS=(--run "$WANDB_RUN")
# the demo model: 512-token rows, 16 per step, 8,192 tokens a step, vocabulary 8192
MODEL=(--depth "$DEPTH" --head-dim 64 --window-pattern L --max-seq-len 512 --device-batch-size 16)

elapsed() { echo $(( $(date +%s) - START )); }
stage() {  # stage NAME COMMAND...: run it and say how long it took
    local name=$1 t0
    shift
    t0=$(date +%s)
    "$@"
    echo "[demo] $name took $(( $(date +%s) - t0 )) s (total $(elapsed) s of $(( DEMO_MINUTES * 60 )) s)"
}

source runs/setup_env.sh serve,report

# --- offline mirrors ------------------------------------------------------------------------
source runs/lib/local_mirror.sh

nanochat report --reset

# --- tokenizer ------------------------------------------------------------------------------
stage download nanochat download -n 8
stage tok-train nanochat tok-train --vocab-size 8192
stage tok-eval nanochat tok-eval

# --- the plan: how many steps fit the budget on this machine --------------------------------
# one timed step (after a warm-up step) of exactly the model and batch base-train will run
STEP_MS=$(nanochat bench-train "${MODEL[@]}" --vocab-size 8192 --steps 2 --warmup-steps 1 --log-level WARNING \
    | tail -1 | grep -o '"ms_per_step_median": [0-9.]*' | grep -o '[0-9.]*$')
# what everything but the training steps costs, measured on an AVX2 machine (2026-12-07):
# 379 s at 4.8 s a step, of which ~80 s is start-up (11 commands) and the rest (CORE, bpb,
# chat-eval's generations, RL's rollouts, the stages' own evaluations) scales with the model's
# speed like a step does: ~62 step-times
PLAN=$(awk -v budget=$(( DEMO_MINUTES * 60 )) -v spent="$(elapsed)" -v step_ms="$STEP_MS" 'BEGIN {
    step = step_ms / 1000; fixed = 62 * step + 80
    train = budget - spent - fixed
    pre = int(0.8 * train / step); sft = int(0.2 * train / step)
    if (pre < 20) pre = 20; if (sft < 10) sft = 10
    printf "%d %d %.2f %d", pre, sft, step, fixed }')
read -r PLAN_STEPS PLAN_SFT STEP_S FIXED_S <<< "$PLAN"
STEPS=${STEPS:-$PLAN_STEPS}
SFT_STEPS=${SFT_STEPS:-$PLAN_SFT}
EVAL_EVERY=$(( STEPS / 2 > 0 ? STEPS / 2 : 1 ))
cat <<EOF
[demo] plan for a ${DEMO_MINUTES}-minute budget ($(elapsed) s spent on setup and the tokenizer):
[demo]   one pretraining step of the d${DEPTH} model (8,192 tokens) takes ${STEP_S} s here
[demo]   evaluations and start-up, estimated: ${FIXED_S} s
[demo]   pretraining: ${STEPS} steps (~$(awk -v n="$STEPS" -v s="$STEP_S" 'BEGIN{printf "%d", n * s}') s), SFT: ${SFT_STEPS} steps, RL: ${RL_STEPS} steps
EOF
if [ "${DEMO_PLAN_ONLY:-0}" = 1 ]; then exit 0; fi

# --- pretraining: a small model, sequences of 512, bf16 where the CPU has it -----------------
stage base-train nanochat base-train "${MODEL[@]}" --total-batch-size 8192 --num-iterations "$STEPS" \
    --warmup-steps $(( STEPS / 12 + 1 )) --eval-every "$EVAL_EVERY" --eval-tokens 65536 --sample-every "$STEPS" \
    --core-metric-every 0 "${RUN_FLAGS[@]}"
stage base-loss nanochat base-loss --device-batch-size 16 --split-tokens 65536
stage base-eval nanochat base-eval --eval core --max-per-task 16 --batch-size 16

# --- chat: SFT, evaluation, a few RL steps --------------------------------------------------
stage sft nanochat sft --num-iterations "$SFT_STEPS" --device-batch-size 16 --total-batch-size 8192 \
    --eval-every $(( SFT_STEPS / 2 > 0 ? SFT_STEPS / 2 : 1 )) --eval-tokens 32768 --chatcore-every 0 \
    "${SFT_MIXTURE[@]}" "${IDENTITY[@]}" "${RUN_FLAGS[@]}"
stage chat-eval-sft nanochat chat-eval -i sft -x 20 --max-new-tokens 96
stage rl nanochat rl --num-steps "$RL_STEPS" --examples-per-step 4 --num-samples 4 --device-batch-size 4 \
    --max-new-tokens 96 --eval-every 0 --eval-examples 16 "${RUN_FLAGS[@]}"
stage chat-eval-rl nanochat chat-eval -i rl -a GSM8K -x 20 --max-new-tokens 96

# --- talk to it, then the report card ------------------------------------------------------
stage chat nanochat chat -i sft -p "What is the capital of France?" -t 0
stage report nanochat report
TOTAL=$(elapsed)
echo "CPU demo finished in $(( TOTAL / 60 )) min $(( TOTAL % 60 )) s (budget ${DEMO_MINUTES} min); see report.md"
