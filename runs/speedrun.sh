#!/usr/bin/env bash
# The "$100 speedrun": a GPT-2-grade chat model from scratch on one 8×H100 node, in
# about three hours, tokenizer to report card. Every step is a `nanochat` command.
#
#   bash runs/speedrun.sh
#   WANDB_RUN=speedrun screen -L -Logfile speedrun.log -S speedrun bash runs/speedrun.sh
#   SMOKE=1 bash runs/speedrun.sh      # the same stages and flags at toy size on a CPU (~2 min, 2 cores)
#
# Knobs (environment): NPROC (GPUs, default 8), DEPTH (default 24), DEVICE_BATCH (16),
# NANOCHAT_BASE_DIR (outputs, default ~/.cache/nanochat), WANDB_RUN (wandb run name),
# WITH_RL=1 (add RL on GSM8K), REPORT_OUT (where the report card is copied, default
# ./report.md).
#
# SMOKE=1 checks the recipe rather than training a model: 2 CPU processes under torchrun
# (gloo), a depth-2 model, a few steps per stage, RL included, no fp8, the local data mirror
# in ../shared/data when there is one, and the report card left in the base dir. It installs no GPU extra and reuses
# $NANOCHAT_VENV (default .venv). The test suite runs it, so the stage order and flags
# below cannot rot unnoticed.
set -euo pipefail
cd "$(dirname "$0")/.."

export OMP_NUM_THREADS=1
SMOKE=${SMOKE:-0}
if [ "$SMOKE" = 1 ]; then
    export NANOCHAT_BASE_DIR=${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat-smoke}
    NPROC=${NPROC:-2}
    DEPTH=${DEPTH:-2}
    DEVICE_BATCH=${DEVICE_BATCH:-4}
    WITH_RL=${WITH_RL:-1}
    REPORT_OUT=${REPORT_OUT:-$NANOCHAT_BASE_DIR/report.md}
else
    export NANOCHAT_BASE_DIR=${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}
    NPROC=${NPROC:-8}
    DEPTH=${DEPTH:-24}
    DEVICE_BATCH=${DEVICE_BATCH:-16}
    WITH_RL=${WITH_RL:-0}
    REPORT_OUT=${REPORT_OUT:-report.md}
fi
RUN_FLAGS=()
[ -n "${WANDB_RUN:-}" ] && RUN_FLAGS=(--run "$WANDB_RUN")
TORCHRUN=(torchrun --standalone --nproc_per_node="$NPROC" -m nanochat)

# --- environment -------------------------------------------------------------------------------
if [ "$SMOKE" = 1 ]; then
    source runs/setup_env.sh serve,report   # the CPU build; no GPU extra
    source runs/lib/local_mirror.sh         # offline: ../shared/data, when present
else
    # a venv with the CUDA build of PyTorch (pip picks it on Linux)
    [ -x .venv/bin/python ] || python3 -m venv .venv
    .venv/bin/pip install -q -e ".[serve,report,wandb,gpu]"  # gpu: FA3 kernels + fp8
    source .venv/bin/activate
    SFT_MIXTURE=()
    IDENTITY=()
fi

# Sizes. The full run uses each stage's defaults; SMOKE shrinks every stage to a few
# steps and items (and trains for a number of steps, not a data ratio), so both runs go
# through the same stages with the same flags.
if [ "$SMOKE" = 1 ]; then
    TOK_CHARS=2000000 VOCAB=2048 SHARDS_TOK=2 SHARDS_TRAIN=3
    HORIZON=(--num-iterations 4)
    SMOKE_BASE=(--max-seq-len 256 --total-batch-size $(( DEVICE_BATCH * 256 * NPROC ))
                --eval-every 2 --eval-tokens 4096 --core-metric-every -1 --sample-every -1)
    SMOKE_BASE_EVAL=(--max-per-task 4 --split-tokens 4096)
    SMOKE_BASE_LOSS=(--split-tokens 4096 --max-tokens 8)
    SMOKE_SFT=(--num-iterations 3 --max-seq-len 256 --total-batch-size $(( DEVICE_BATCH * 256 * NPROC ))
               --eval-every 2 --eval-tokens 4096 --chatcore-every -1)
    SMOKE_CHAT_EVAL=(-x 4 --max-new-tokens 16)
    SMOKE_RL=(--num-steps 2 --examples-per-step 2 --num-samples 2 --device-batch-size 2 --max-new-tokens 16
              --eval-every -1)
    FP8=()
else
    TOK_CHARS=2000000000 VOCAB=32768 SHARDS_TOK=8 SHARDS_TRAIN=170
    # A d24 trained slightly short of compute-optimal (8 tokens/param instead of 10.5) is
    # enough to pass GPT-2's CORE score.
    HORIZON=(--target-param-data-ratio 8)
    SMOKE_BASE=() SMOKE_BASE_EVAL=() SMOKE_BASE_LOSS=() SMOKE_SFT=() SMOKE_CHAT_EVAL=() SMOKE_RL=()
    FP8=(--fp8)  # fp8 matmuls on H100 shave off more time
fi

nanochat report --reset

# --- data and tokenizer ---------------------------------------------------------------------
# ~8 shards (about 2B characters) are enough for the tokenizer; pretraining a d24 needs
# about 170, which download in the background while the tokenizer trains.
nanochat download -n "$SHARDS_TOK"
nanochat download -n "$SHARDS_TRAIN" &
DOWNLOAD_PID=$!
nanochat tok-train --max-chars "$TOK_CHARS" --vocab-size "$VOCAB"
nanochat tok-eval

# --- pretraining ----------------------------------------------------------------------------
wait "$DOWNLOAD_PID"
"${TORCHRUN[@]}" base-train --depth "$DEPTH" "${HORIZON[@]}" \
    --device-batch-size "$DEVICE_BATCH" "${FP8[@]}" "${SMOKE_BASE[@]}" "${RUN_FLAGS[@]}"
"${TORCHRUN[@]}" base-eval --device-batch-size "$DEVICE_BATCH" "${SMOKE_BASE_EVAL[@]}"
"${TORCHRUN[@]}" base-loss --device-batch-size "$DEVICE_BATCH" "${SMOKE_BASE_LOSS[@]}"

# --- teaching it to chat --------------------------------------------------------------------
"${TORCHRUN[@]}" sft --device-batch-size "$DEVICE_BATCH" "${SFT_MIXTURE[@]}" "${IDENTITY[@]}" \
    "${SMOKE_SFT[@]}" "${RUN_FLAGS[@]}"
"${TORCHRUN[@]}" chat-eval -i sft "${SMOKE_CHAT_EVAL[@]}"

# Optional: RL on GSM8K (about +a few points of GSM8K; ~1.5 h on 8×H100).
if [ "$WITH_RL" = 1 ]; then
    "${TORCHRUN[@]}" rl "${SMOKE_RL[@]}" "${RUN_FLAGS[@]}"
    "${TORCHRUN[@]}" chat-eval -i rl -a GSM8K "${SMOKE_CHAT_EVAL[@]}"
fi

# --- report card ----------------------------------------------------------------------------
nanochat report -o "$REPORT_OUT"
echo "Talk to it:  nanochat chat    or    nanochat serve  (then open http://127.0.0.1:8000)"
