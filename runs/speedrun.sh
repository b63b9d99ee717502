#!/usr/bin/env bash
# The "$100 speedrun": a GPT-2-grade chat model from scratch on one 8×H100 node, in
# about three hours, tokenizer to report card. Every step is a `nanochat` command.
#
#   bash runs/speedrun.sh
#   WANDB_RUN=speedrun screen -L -Logfile speedrun.log -S speedrun bash runs/speedrun.sh
#
# Knobs (environment): NPROC (GPUs, default 8), DEPTH (default 24), DEVICE_BATCH (16),
# NANOCHAT_BASE_DIR (outputs, default ~/.cache/nanochat), WANDB_RUN (wandb run name).
set -euo pipefail
cd "$(dirname "$0")/.."

export OMP_NUM_THREADS=1
export NANOCHAT_BASE_DIR=${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}
NPROC=${NPROC:-8}
DEPTH=${DEPTH:-24}
DEVICE_BATCH=${DEVICE_BATCH:-16}
RUN_FLAGS=()
[ -n "${WANDB_RUN:-}" ] && RUN_FLAGS=(--run "$WANDB_RUN")
TORCHRUN=(torchrun --standalone --nproc_per_node="$NPROC" -m nanochat)

# --- environment: a venv with the CUDA build of PyTorch (pip picks it on Linux) ---------
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q -e ".[serve,report,wandb,gpu]"  # gpu: FA3 kernels + fp8
source .venv/bin/activate

nanochat report --reset

# --- data and tokenizer ---------------------------------------------------------------------
# ~8 shards (about 2B characters) are enough for the tokenizer; pretraining a d24 needs
# about 170, which download in the background while the tokenizer trains.
nanochat download -n 8
nanochat download -n 170 &
DOWNLOAD_PID=$!
nanochat tok-train --max-chars 2000000000 --vocab-size 32768
nanochat tok-eval

# --- pretraining ----------------------------------------------------------------------------
wait "$DOWNLOAD_PID"
# A d24 trained slightly short of compute-optimal (8 tokens/param instead of 10.5) is
# enough to pass GPT-2's CORE score; fp8 matmuls on H100 shave off more time.
"${TORCHRUN[@]}" base-train --depth "$DEPTH" --target-param-data-ratio 8 \
    --device-batch-size "$DEVICE_BATCH" --fp8 "${RUN_FLAGS[@]}"
"${TORCHRUN[@]}" base-eval --device-batch-size "$DEVICE_BATCH"
"${TORCHRUN[@]}" base-loss --device-batch-size "$DEVICE_BATCH"

# --- teaching it to chat --------------------------------------------------------------------
"${TORCHRUN[@]}" sft --device-batch-size "$DEVICE_BATCH" "${RUN_FLAGS[@]}"
"${TORCHRUN[@]}" chat-eval -i sft

# Optional: RL on GSM8K (about +a few points of GSM8K; ~1.5 h on 8×H100).
if [ "${WITH_RL:-0}" = 1 ]; then
    "${TORCHRUN[@]}" rl "${RUN_FLAGS[@]}"
    "${TORCHRUN[@]}" chat-eval -i rl -a GSM8K
fi

# --- report card ----------------------------------------------------------------------------
nanochat report
echo "Talk to it:  nanochat chat    or    nanochat serve  (then open http://127.0.0.1:8000)"
