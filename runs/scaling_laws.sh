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
#   NANOCHAT, TORCHRUN, PYTHON   the commands to run (default: nanochat, torchrun, python)
#
# Rerunning the same label skips the (budget, depth) pairs already in its CSV.
set -euo pipefail

LABEL="${LABEL:-$(date +%b%d | tr '[:upper:]' '[:lower:]')}"
read -r -a FLOPS <<< "${FLOPS:-1e18 2.15e18 4.64e18 1e19}"
read -r -a DEPTHS <<< "${DEPTHS:-8 10 12 14 16 18 20}"
NPROC="${NPROC:-8}"
EVAL_TOKENS="${EVAL_TOKENS:-$((100 * 524288))}"
CORE="${CORE:-1}"
CORE_MAX_PER_TASK="${CORE_MAX_PER_TASK:-}"
TRAIN_ARGS="${TRAIN_ARGS:-}"
NANOCHAT="${NANOCHAT:-nanochat}"
TORCHRUN="${TORCHRUN:-torchrun}"
PYTHON="${PYTHON:-python}"
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
RESULTS_DIR="${RESULTS_DIR:-$NANOCHAT_BASE_DIR/scaling_laws_${LABEL}}"
CSV="$RESULTS_DIR/results.csv"

log() { echo "[$(date '+%Y-%m-%d %H:%M:%S')] $*"; }

launch() {
    if [ "$NPROC" -gt 1 ]; then
        "$TORCHRUN" --standalone --nproc_per_node="$NPROC" -m nanochat "$@"
    else
        $NANOCHAT "$@"
    fi
}

# csv_fields <tag>: the CSV fields of a finished run, from the report sections base-train
# and base-eval write (checked to belong to <tag>)
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
    plan["model_config"]["n_embd"], plan["num_params"], plan["num_scaling_params"], f"{plan['flops_per_token']:.6g}",
    m["steps"], m["total_batch_size"], m["tokens"], f"{m['tokens'] / plan['num_scaling_params']:.2f}",
    f"{m['val_bpb']:.6f}", core, f"{m['train_time_s']:.1f}")))
PY
}

if [ ! -f "$NANOCHAT_BASE_DIR/tokenizer/tokenizer.pkl" ]; then
    echo "no tokenizer in $NANOCHAT_BASE_DIR/tokenizer: run 'nanochat download' and 'nanochat tok-train' first" >&2
    exit 2
fi

mkdir -p "$RESULTS_DIR"
[ -f "$CSV" ] || echo "flops_budget,depth,model_dim,num_params,num_scaling_params,flops_per_token,num_iterations,total_batch_size,tokens_trained,param_data_ratio,val_bpb,core,train_time_s,wall_time_s" > "$CSV"
log "scaling laws $LABEL: budgets ${FLOPS[*]} × depths ${DEPTHS[*]} on $NPROC process(es) -> $CSV"

for flops in "${FLOPS[@]}"; do
    for d in "${DEPTHS[@]}"; do
        if grep -q "^${flops},${d}," "$CSV"; then
            log "$flops FLOPs, d$d: already in $CSV, skipping"
            continue
        fi
        tag="scaling_${LABEL}_${flops}_d${d}"
        log "$flops FLOPs, d$d: training $tag"
        start=$(date +%s)
        # shellcheck disable=SC2086  # TRAIN_ARGS is a list of flags
        launch base-train --depth "$d" --target-flops "$flops" --model-tag "$tag" --eval-tokens "$EVAL_TOKENS" \
            --core-metric-every 0 --sample-every 0 --save-every 0 ${DEVICE_BATCH:+--device-batch-size "$DEVICE_BATCH"} \
            ${WANDB_RUN:+--run "${WANDB_RUN}_${tag}"} $TRAIN_ARGS 2>&1 | tee "$RESULTS_DIR/${tag}_train.log"
        if [ "$CORE" = "1" ]; then
            launch base-eval -g "$tag" --eval core ${CORE_MAX_PER_TASK:+--max-per-task "$CORE_MAX_PER_TASK"} \
                2>&1 | tee "$RESULTS_DIR/${tag}_core.log"
        fi
        wall=$(( $(date +%s) - start ))
        row="$flops,$d,$(csv_fields "$tag"),$wall"
        echo "$row" >> "$CSV"
        log "$flops FLOPs, d$d: $row"
    done
done

log "scaling laws $LABEL done: $CSV"
column -t -s, "$CSV" 2>/dev/null || cat "$CSV"
