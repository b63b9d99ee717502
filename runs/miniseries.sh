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
#   NANOCHAT, TORCHRUN, PYTHON   the commands to run (default: nanochat, torchrun, python)
#
# Rerunning the same series skips the depths already in its CSV. The runs also log their
# sections to the report (report/*.json), as every base-train/base-eval does.
set -euo pipefail

SERIES="${1:-${SERIES:-$(date +%b%d | tr '[:upper:]' '[:lower:]')}}"
read -r -a DEPTHS <<< "${DEPTHS:-12 14 16 18 20 22 24 26}"
RATIO="${RATIO:-10.5}"
NPROC="${NPROC:-8}"
CORE="${CORE:-1}"
CORE_MAX_PER_TASK="${CORE_MAX_PER_TASK:-}"
TRAIN_ARGS="${TRAIN_ARGS:-}"
NANOCHAT="${NANOCHAT:-nanochat}"
TORCHRUN="${TORCHRUN:-torchrun}"
PYTHON="${PYTHON:-python}"
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
RESULTS_DIR="${RESULTS_DIR:-$NANOCHAT_BASE_DIR/miniseries_${SERIES}}"
CSV="$RESULTS_DIR/results.csv"

log() { echo "[$(date '+%Y-%m-%d %H:%M:%S')] $*"; }

# launch <subcommand> [flags...]: one process, or NPROC of them under torchrun
launch() {
    if [ "$NPROC" -gt 1 ]; then
        "$TORCHRUN" --standalone --nproc_per_node="$NPROC" -m nanochat "$@"
    else
        $NANOCHAT "$@"
    fi
}

# csv_fields <tag>: the CSV fields of a finished run, read from the report sections that
# base-train and base-eval write (checked to belong to <tag>)
csv_fields() {
    "$PYTHON" - "$1" "$CORE" <<'PY'
import json, os, sys
tag, want_core = sys.argv[1], sys.argv[2] == "1"
report = os.path.join(os.environ["NANOCHAT_BASE_DIR"], "report")
train = json.load(open(os.path.join(report, "base-model-training.json")))["data"]
if train["config"]["model_tag"] != tag:
    sys.exit(f"report/base-model-training.json is for {train['config']['model_tag']}, not {tag}: did the run fail?")
plan, m = train["plan"], train["metrics"]
core = ""
if want_core:
    ev = json.load(open(os.path.join(report, "base-model-evaluation.json")))["data"]
    if f" {tag} " not in f" {ev.get('model', '')} ":
        sys.exit(f"report/base-model-evaluation.json is for {ev.get('model')!r}, not {tag}")
    core = f"{ev['CORE metric']:.6f}"
print(",".join(str(x) for x in (
    plan["model_config"]["n_embd"], plan["num_params"], plan["num_scaling_params"], m["steps"],
    m["total_batch_size"], m["tokens"], f"{m['tokens'] / plan['num_scaling_params']:.2f}",
    f"{m['val_bpb']:.6f}", core, f"{m['train_time_s']:.1f}")))
PY
}

if [ "${SETUP:-0}" = "1" ]; then
    $NANOCHAT download -n "${N_SHARDS:-240}"
    $NANOCHAT tok-train
fi
if [ ! -f "$NANOCHAT_BASE_DIR/tokenizer/tokenizer.pkl" ]; then
    echo "no tokenizer in $NANOCHAT_BASE_DIR/tokenizer: run with SETUP=1, or 'nanochat download' and 'nanochat tok-train' first" >&2
    exit 2
fi

mkdir -p "$RESULTS_DIR"
[ -f "$CSV" ] || echo "depth,model_dim,num_params,num_scaling_params,num_iterations,total_batch_size,tokens_trained,param_data_ratio,val_bpb,core,train_time_s,wall_time_s" > "$CSV"
log "miniseries $SERIES: depths ${DEPTHS[*]} at $RATIO tokens/param on $NPROC process(es) -> $CSV"

for d in "${DEPTHS[@]}"; do
    if grep -q "^${d}," "$CSV"; then
        log "d$d: already in $CSV, skipping"
        continue
    fi
    tag="${SERIES}_d${d}"
    if [ -n "${DEVICE_BATCH:-}" ]; then batch="$DEVICE_BATCH"
    elif [ "$d" -ge 28 ]; then batch=8
    elif [ "$d" -ge 20 ]; then batch=16
    else batch=32; fi
    log "d$d: training $tag"
    start=$(date +%s)
    # shellcheck disable=SC2086  # TRAIN_ARGS is a list of flags
    launch base-train --depth "$d" --target-param-data-ratio "$RATIO" --model-tag "$tag" \
        --device-batch-size "$batch" --core-metric-every 0 --sample-every 0 --save-every 0 \
        ${WANDB_RUN:+--run "${WANDB_RUN}_d${d}"} $TRAIN_ARGS 2>&1 | tee "$RESULTS_DIR/${tag}_train.log"
    if [ "$CORE" = "1" ]; then
        log "d$d: CORE"
        launch base-eval -g "$tag" --eval core ${CORE_MAX_PER_TASK:+--max-per-task "$CORE_MAX_PER_TASK"} \
            2>&1 | tee "$RESULTS_DIR/${tag}_core.log"
    fi
    wall=$(( $(date +%s) - start ))
    row="$d,$(csv_fields "$tag"),$wall"
    echo "$row" >> "$CSV"
    log "d$d: $row"
done

log "miniseries $SERIES done: $CSV"
column -t -s, "$CSV" 2>/dev/null || cat "$CSV"
