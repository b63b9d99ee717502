#!/usr/bin/env bash
# Scaling laws: for each compute budget (FLOPs), train one base model per depth on exactly
# that budget (the horizon follows: steps = budget / (FLOPs per token × batch)), and record
# val bits per byte and CORE. Per budget, the depth with the lowest loss is the
# compute-optimal size; fitting those optima across budgets gives the scaling law.
#
#   bash runs/scaling_laws.sh                    # 4 budgets 1e18 .. 1e19 × d8 .. d20 on 8 GPUs
#
# A toy on a CPU (a couple of minutes):
#
#   LABEL=toy FLOPS="5e10 1.5e11" DEPTHS="1 2" NPROC=1 CORE=0 EVAL_TOKENS=16384 DEVICE_BATCH=16 \
#   TRAIN_ARGS="--aspect-ratio 32 --head-dim 32 --max-seq-len 128 --window-pattern L --total-batch-size 2048" \
#   bash runs/scaling_laws.sh
#
# Knobs (environment variables):
#   LABEL              name of the sweep; run tags are scaling_<label>_<flops>_d<depth> (default: today)
#   FLOPS              compute budgets in FLOPs (default: "1e18 2.15e18 4.64e18 1e19")
#   DEPTHS             depths tried at every budget (default: "8 10 12 14 16 18 20")
#   NPROC              processes (GPUs) per run; 1 runs without torchrun (default: 8)
#   DEVICE_BATCH       sequences per device per micro-step (default: base-train's)
#   EVAL_TOKENS        val tokens of the final bpb measurement (default: 100 × 524288, for low noise)
#   CORE=0             skip CORE; CORE_MAX_PER_TASK caps its items per task (default: all)
#   TRAIN_ARGS         more base-train flags, e.g. toy shapes
#   WANDB_RUN          prefix of wandb run names (default: none, no wandb)
#   NANOCHAT_BASE_DIR  data, tokenizer, checkpoints (default: ~/.cache/nanochat)
#   RESULTS_DIR        CSV and logs (default: $NANOCHAT_BASE_DIR/scaling_laws_<label>)
#   NANOCHAT, TORCHRUN the commands to run (default: nanochat, torchrun)
#
# Rerunning the same label skips the (budget, depth) pairs already in its CSV. The CSV is
# read from the report sections (report/*.json) with jq; the shared steps are in
# runs/lib/sweep.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/sweep.sh"

LABEL="${LABEL:-$(date +%b%d | tr '[:upper:]' '[:lower:]')}"
read -r -a FLOPS <<< "${FLOPS:-1e18 2.15e18 4.64e18 1e19}"
read -r -a DEPTHS <<< "${DEPTHS:-8 10 12 14 16 18 20}"
EVAL_TOKENS="${EVAL_TOKENS:-$((100 * 524288))}"
sweep_defaults
RESULTS_DIR="${RESULTS_DIR:-$NANOCHAT_BASE_DIR/scaling_laws_${LABEL}}"
CSV="$RESULTS_DIR/results.csv"
SWEEP_FIELDS=(model_dim num_params num_scaling_params flops_per_token num_iterations total_batch_size
              tokens_trained param_data_ratio val_bpb core train_time_s)
sweep_require_jq
sweep_require_tokenizer "run 'nanochat download' and 'nanochat tok-train' first"
sweep_csv flops_budget,depth
log "scaling laws $LABEL: budgets ${FLOPS[*]} × depths ${DEPTHS[*]} on $NPROC process(es) -> $CSV"

for flops in "${FLOPS[@]}"; do
    for d in "${DEPTHS[@]}"; do
        if sweep_has "$flops,$d"; then
            log "$flops FLOPs, d$d: already in $CSV, skipping"
            continue
        fi
        tag="scaling_${LABEL}_${flops}_d${d}"
        sweep_run "$flops,$d" "$tag" "$flops FLOPs, d$d" "${WANDB_RUN:+${WANDB_RUN}_${tag}}" \
            --depth "$d" --target-flops "$flops" --eval-tokens "$EVAL_TOKENS" \
            ${DEVICE_BATCH:+--device-batch-size "$DEVICE_BATCH"}
    done
done

log "scaling laws $LABEL done: $CSV"
column -t -s, "$CSV" 2>/dev/null || cat "$CSV"
