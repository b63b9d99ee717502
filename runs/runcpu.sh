#!/usr/bin/env bash
# The CPU demo: the whole pipeline at toy size, in about 7 minutes on a 2-core CPU
# (raise STEPS for a better model: pretraining is ~0.75 s a step there).
# Tokenizer → pretraining → base evals → SFT → chat evals → a little RL → chat → report.
# Training LLMs wants GPUs; this run shows every stage working end to end, and ends
# with a tiny model that writes English-looking text, not a smart one.
#
#   bash runs/runcpu.sh
#
# Knobs (environment): DEPTH (4), STEPS (pretraining steps), SFT_STEPS, RL_STEPS,
# NANOCHAT_BASE_DIR (default ~/.cache/nanochat-cpu), WANDB_RUN.
# Offline: set NANOCHAT_DATA_URL (+ NANOCHAT_DATA_SHARDS), NANOCHAT_HF_MIRROR,
# NANOCHAT_EVAL_BUNDLE_URL and TIKTOKEN_CACHE_DIR; when ../shared/data exists beside the
# repository (as on the project's own machines) it is used for all of them.
set -euo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)

export NANOCHAT_BASE_DIR=${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat-cpu}
DEPTH=${DEPTH:-4}
STEPS=${STEPS:-250}
SFT_STEPS=${SFT_STEPS:-80}
RL_STEPS=${RL_STEPS:-4}
RUN_FLAGS=()
[ -n "${WANDB_RUN:-}" ] && RUN_FLAGS=(--run "$WANDB_RUN")

source runs/setup_env.sh serve,report

# --- offline mirrors ------------------------------------------------------------------------
SHARED=$(cd .. && pwd)/shared/data
SFT_MIXTURE=()
IDENTITY=()
if [ -z "${NANOCHAT_DATA_URL:-}" ] && [ -d "$SHARED/pretrain_openstax/base_data" ]; then
    echo "using the local data mirror in $SHARED"
    export NANOCHAT_DATA_URL="file://$SHARED/pretrain_openstax/base_data" NANOCHAT_DATA_SHARDS=6
    export NANOCHAT_HF_MIRROR=${NANOCHAT_HF_MIRROR:-file://$SHARED/hf_schema}
    export NANOCHAT_EVAL_BUNDLE_URL=${NANOCHAT_EVAL_BUNDLE_URL:-file://$SHARED/core_eval/eval_bundle}
    export TIKTOKEN_CACHE_DIR=${TIKTOKEN_CACHE_DIR:-$SHARED/tiktoken/cache}
    export NANOCHAT_WORDS_URL=${NANOCHAT_WORDS_URL:-file://$SHARED/words/words_alpha.txt}
    IDENTITY=(--identity-url "file://$SHARED/chat_sft/identity_conversations.jsonl")
    # SmolTalk and MMLU's auxiliary_train are not in the mirror: a mixture without them
    SFT_MIXTURE=(--mixture identity:2 gsm8k arc-easy simple-spelling spelling)
fi

nanochat report --reset

# --- tokenizer ------------------------------------------------------------------------------
nanochat download -n 8
nanochat tok-train --vocab-size 8192
nanochat tok-eval

# --- pretraining: a small model, sequences of 512, bf16 where the CPU has it -----------------
nanochat base-train --depth "$DEPTH" --head-dim 64 --window-pattern L --max-seq-len 512 \
    --device-batch-size 16 --total-batch-size 8192 --num-iterations "$STEPS" --warmup-steps 20 \
    --eval-every 100 --eval-tokens 65536 --sample-every 150 --core-metric-every 0 "${RUN_FLAGS[@]}"
nanochat base-loss --device-batch-size 16 --split-tokens 65536
nanochat base-eval --eval core --max-per-task 16 --batch-size 16

# --- chat: SFT, evaluation, a few RL steps --------------------------------------------------
nanochat sft --num-iterations "$SFT_STEPS" --device-batch-size 16 --total-batch-size 8192 \
    --eval-every 40 --eval-tokens 32768 --chatcore-every 0 "${SFT_MIXTURE[@]}" "${IDENTITY[@]}" "${RUN_FLAGS[@]}"
nanochat chat-eval -i sft -x 20 --max-new-tokens 96
nanochat rl --num-steps "$RL_STEPS" --examples-per-step 4 --num-samples 4 --device-batch-size 4 \
    --max-new-tokens 96 --eval-every 0 --eval-examples 16 "${RUN_FLAGS[@]}"
nanochat chat-eval -i rl -a GSM8K -x 20 --max-new-tokens 96

# --- talk to it, then the report card ------------------------------------------------------
nanochat chat -i sft -p "What is the capital of France?" -t 0
nanochat report
echo "CPU demo finished in $(( ($(date +%s) - START) / 60 )) minutes; see report.md"
