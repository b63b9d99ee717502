#!/usr/bin/env bash
# The miniseries: one base model per depth, each trained to the same tokens:params ratio
# (so compute grows with size the compute-optimal way), then scored with CORE. One CSV
# row per depth: shape, parameters, horizon, val bits per byte, CORE, time.
#
#   bash runs/miniseries.sh [series]             # d12 .. d26 on 8 GPUs (days of GPU time)
#
# A toy on a CPU (a minute or two):
#
#   SERIES=toy DEPTHS="1 2" NPROC=1 RATIO=2 DEVICE_BATCH=8 CORE_MAX_PER_TASK=8 \
#   TRAIN_ARGS="--aspect-ratio 32 --head-dim 32 --max-seq-len 128 --window-pattern L \
#               --total-batch-size 2048 --eval-tokens 16384" bash runs/miniseries.sh
#
# Knobs (environment variables):
#   SERIES             name of the series; the run tags are <series>_d<depth> (default: today, e.g. jan11)
#   DEPTHS             depths to train (default: "12 14 16 18 20 22 24 26")
#   RATIO              training tokens per scaling parameter (default: 10.5)
#   NPROC              processes (GPUs) per run; 1 runs without torchrun (default: 8)
#   DEVICE_BATCH       sequences per device per micro-step (default: 32, 16 from d20, 8 from d28)
#   CORE_MAX_PER_TASK  CORE items per task, empty for all (default: all); CORE=0 skips CORE
#   TRAIN_ARGS         more base-train flags, e.g. toy shapes or --fp8
#   WANDB_RUN          prefix of wandb run names (default: none, no wandb)
#   SETUP=1            first download N_SHARDS shards (default 240) and train the tokenizer
#   NANOCHAT_BASE_DIR  data, tokenizer, checkpoints (default: ~/.cache/nanochat)
#   RESULTS_DIR        CSV and logs (default: $NANOCHAT_BASE_DIR/miniseries_<series>)
#   NANOCHAT, TORCHRUN the commands to run (default: nanochat, torchrun)
#
# Rerunning the same series skips the depths already in its CSV. The runs also log their
# sections to the report (report/*.json), as every base-train/base-eval does; the CSV is
# read from those sections with jq. The shared steps are in runs/lib/sweep.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/sweep.sh"

SERIES="${1:-${SERIES:-$(date +%b%d | tr '[:upper:]' '[:lower:]')}}"
read -r -a DEPTHS <<< "${DEPTHS:-12 14 16 18 20 22 24 26}"
RATIO="${RATIO:-10.5}"
sweep_defaults
RESULTS_DIR="${RESULTS_DIR:-$NANOCHAT_BASE_DIR/miniseries_${SERIES}}"
CSV="$RESULTS_DIR/results.csv"
SWEEP_FIELDS=(model_dim num_params num_scaling_params num_iterations total_batch_size tokens_trained
              param_data_ratio val_bpb core train_time_s)
sweep_require_jq

if [ "${SETUP:-0}" = "1" ]; then
    $NANOCHAT download -n "${N_SHARDS:-240}"
    $NANOCHAT tok-train
fi
sweep_require_tokenizer "run with SETUP=1, or 'nanochat download' and 'nanochat tok-train' first"
sweep_csv depth
log "miniseries $SERIES: depths ${DEPTHS[*]} at $RATIO tokens/param on $NPROC process(es) -> $CSV"

for d in "${DEPTHS[@]}"; do
    if sweep_has "$d"; then
        log "d$d: already in $CSV, skipping"
        continue
    fi
    if [ -n "${DEVICE_BATCH:-}" ]; then batch="$DEVICE_BATCH"
    elif [ "$d" -ge 28 ]; then batch=8
    elif [ "$d" -ge 20 ]; then batch=16
    else batch=32; fi
    sweep_run "$d" "${SERIES}_d${d}" "d$d" "${WANDB_RUN:+${WANDB_RUN}_d${d}}" \
        --depth "$d" --target-param-data-ratio "$RATIO" --device-batch-size "$batch"
done

log "miniseries $SERIES done: $CSV"
column -t -s, "$CSV" 2>/dev/null || cat "$CSV"
