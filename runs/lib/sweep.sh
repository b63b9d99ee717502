# The parts runs/miniseries.sh and runs/scaling_laws.sh share: each trains one base model
# per point of a sweep, scores it with CORE, and appends one CSV row per run.
#
# Sourced, not run: it only defines functions. A recipe calls sweep_defaults, sets
#   RESULTS_DIR    folder of the CSV and the per-run logs
#   CSV            the results CSV
#   SWEEP_FIELDS   array of the run_fields columns each row holds (after its key)
# then calls sweep_require_jq, sweep_require_tokenizer, sweep_csv, and per point
# sweep_has / sweep_run.
# Needs jq: a run's numbers are read from the JSON report sections the stages write.

# sweep_defaults: the knobs both sweeps share, from the environment (see their headers)
sweep_defaults() {
    NPROC="${NPROC:-8}"
    CORE="${CORE:-1}"
    CORE_MAX_PER_TASK="${CORE_MAX_PER_TASK:-}"
    TRAIN_ARGS="${TRAIN_ARGS:-}"
    NANOCHAT="${NANOCHAT:-nanochat}"
    TORCHRUN="${TORCHRUN:-torchrun}"
    export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
}

log() { echo "[$(date '+%Y-%m-%d %H:%M:%S')] $*"; }

# launch <subcommand> [flags...]: one process, or NPROC of them under torchrun
launch() {
    if [ "$NPROC" -gt 1 ]; then
        "$TORCHRUN" --standalone --nproc_per_node="$NPROC" -m nanochat "$@"
    else
        $NANOCHAT "$@"
    fi
}

# sweep_require_jq: exit unless jq is installed (run_fields reads the results with it)
sweep_require_jq() {
    if ! command -v jq > /dev/null; then
        echo "jq not found: the sweep reads each run's results from JSON with it (e.g. apt-get install jq)" >&2
        exit 2
    fi
}

# sweep_require_tokenizer <hint>: exit unless the tokenizer is trained; <hint> says how
sweep_require_tokenizer() {
    if [ ! -f "$NANOCHAT_BASE_DIR/tokenizer/tokenizer.pkl" ]; then
        echo "no tokenizer in $NANOCHAT_BASE_DIR/tokenizer: $1" >&2
        exit 2
    fi
}

# sweep_csv <key columns>: create $CSV with its header (the key columns, SWEEP_FIELDS,
# wall_time_s) unless it exists: a rerun appends to it
sweep_csv() {
    mkdir -p "$RESULTS_DIR"
    [ -f "$CSV" ] || echo "$1,$(IFS=,; echo "${SWEEP_FIELDS[*]}"),wall_time_s" > "$CSV"
}

# sweep_has <key>: whether $CSV already holds the row of <key> (an earlier run's)
sweep_has() {
    grep -q "^$1," "$CSV"
}

# sweep_run <key> <tag> <label> <wandb name> [base-train flags...]: train the model <tag>
# (logged to $RESULTS_DIR/<tag>_train.log), score it with CORE unless CORE=0
# (<tag>_core.log), and append "<key>,<SWEEP_FIELDS>,<wall seconds>" to $CSV. <label>
# starts the progress lines; an empty <wandb name> means no wandb.
sweep_run() {
    local key=$1 tag=$2 label=$3 wandb=$4 start wall row
    shift 4
    log "$label: training $tag"
    start=$(date +%s)
    # shellcheck disable=SC2086  # TRAIN_ARGS is a list of flags
    launch base-train "$@" --model-tag "$tag" --core-metric-every 0 --sample-every 0 --save-every 0 \
        ${wandb:+--run "$wandb"} $TRAIN_ARGS 2>&1 | tee "$RESULTS_DIR/${tag}_train.log"
    if [ "$CORE" = "1" ]; then
        log "$label: CORE"
        launch base-eval -g "$tag" --eval core ${CORE_MAX_PER_TASK:+--max-per-task "$CORE_MAX_PER_TASK"} \
            2>&1 | tee "$RESULTS_DIR/${tag}_core.log"
    fi
    wall=$(( $(date +%s) - start ))
    row="$key,$(run_fields "$tag" "${SWEEP_FIELDS[@]}"),$wall"
    echo "$row" >> "$CSV"
    log "$label: $row"
}

# run_fields <tag> <column>...: the named fields of the finished run <tag>, comma-separated,
# from the report sections base-train and base-eval wrote (checked to belong to <tag>).
# Columns: model_dim num_params num_scaling_params flops_per_token num_iterations
# total_batch_size tokens_trained param_data_ratio val_bpb core train_time_s
# (core is empty when CORE=0).
run_fields() {
    local tag=$1 report="$NANOCHAT_BASE_DIR/report" trained model core=""
    shift
    trained=$(jq -r '.data.config.model_tag' "$report/base-model-training.json") || return 1
    if [ "$trained" != "$tag" ]; then
        echo "report/base-model-training.json is for $trained, not $tag: did the run fail?" >&2
        return 1
    fi
    if [ "$CORE" = "1" ]; then
        model=$(jq -r '.data.model // ""' "$report/base-model-evaluation.json") || return 1
        if [[ " $model " != *" $tag "* ]]; then
            echo "report/base-model-evaluation.json is for '$model', not $tag" >&2
            return 1
        fi
        core=$(jq -r '.data["CORE metric"] | numbers' "$report/base-model-evaluation.json") || return 1
        [ -n "$core" ] || { echo "report/base-model-evaluation.json has no CORE metric" >&2; return 1; }
    fi
    # jq picks the values (tab-separated, in column order), awk formats the decimals: both
    # hold numbers as doubles, so the rounding is the one of the values written; integers
    # pass through as text
    jq -r --arg core "$core" '
        def num($what): if type == "number" then . else error("\($what) is \(.), not a number") end;
        .data.plan as $p | .data.metrics as $m
        | {model_dim: $p.model_config.n_embd, num_params: $p.num_params,
           num_scaling_params: $p.num_scaling_params, flops_per_token: ($p.flops_per_token | num("flops_per_token")),
           num_iterations: $m.steps, total_batch_size: $m.total_batch_size, tokens_trained: $m.tokens,
           param_data_ratio: (($m.tokens | num("tokens")) / ($p.num_scaling_params | num("num_scaling_params"))),
           val_bpb: ($m.val_bpb | num("val_bpb")), core: $core, train_time_s: ($m.train_time_s | num("train_time_s"))}
          as $fields
        | [$ARGS.positional[] as $c | $fields[$c] // error("no value for the column \($c)")] | @tsv' \
        "$report/base-model-training.json" --args "$@" |
    awk -F'\t' -v columns="$*" '
        BEGIN { split(columns, name, " ") }
        {
            for (i = 1; i <= NF; i++) {
                f = $i
                if (name[i] == "val_bpb" || (name[i] == "core" && f != "")) f = sprintf("%.6f", f)
                else if (name[i] == "param_data_ratio") f = sprintf("%.2f", f)
                else if (name[i] == "flops_per_token") f = sprintf("%.6g", f)
                else if (name[i] == "train_time_s") f = sprintf("%.1f", f)
                printf "%s%s", f, (i < NF ? "," : "\n")
            }
        }'
}
