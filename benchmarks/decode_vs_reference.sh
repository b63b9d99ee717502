#!/usr/bin/env bash
# Decode speed of our Engine next to the reference nanochat's, on one checkpoint, same
# machine, same settings (prompt, decode steps, sampling, threads).
#
#   NANOCHAT_BASE_DIR=~/.cache/nanochat-cpu bash benchmarks/decode_vs_reference.sh [-i base] [BATCH ...]
#
# Needs a checkpoint (and its tokenizer) under $NANOCHAT_BASE_DIR, ../shared/reference
# beside the repository, and the project's venv (runs/setup_env.sh). Knobs: PROMPT_LEN
# (256), DECODE_TOKENS (64), TOP_K (50), TEMPERATURE (1.0), THREADS (2), ROUNDS (3: the
# two engines run in turn, ROUNDS times each; the medians are compared, and so is each
# round's pair), COMPILE (1: ours decodes through its compiled step, `bench-infer --compile`;
# the compiling happens before the timed runs).
set -euo pipefail
cd "$(dirname "$0")/.."
SOURCE=base
if [ "${1:-}" = "-i" ]; then SOURCE=$2; shift 2; fi
BATCHES=("${@:-1 16}")
read -r -a BATCHES <<< "${BATCHES[*]}"
: "${NANOCHAT_BASE_DIR:?set NANOCHAT_BASE_DIR to the base dir that holds the checkpoint}"
PROMPT_LEN=${PROMPT_LEN:-256} DECODE_TOKENS=${DECODE_TOKENS:-64} TOP_K=${TOP_K:-50}
TEMPERATURE=${TEMPERATURE:-1.0} THREADS=${THREADS:-2} ROUNDS=${ROUNDS:-3} COMPILE=${COMPILE:-0}
EXTRA=()
if [ "$COMPILE" = 1 ]; then EXTRA=(--compile); fi
REF=$(cd .. && pwd)/shared/reference
PY=${NANOCHAT_VENV:-.venv}/bin/python
OUT=$(mktemp -d)
bash "$REF/run.sh" nanochat.common >/dev/null 2>&1 || true   # builds the reference venv and tree once
REF_TREE=${NANOCHAT_REF_TREE:-/tmp/nanochat-ref-tree}
REF_PY=${NANOCHAT_REF_VENV:-/tmp/nanochat-ref-venv}/bin/python
SCRIPT=$(pwd)/benchmarks/reference_decode.py
for round in $(seq "$ROUNDS"); do
    "$PY" -m nanochat bench-infer -i "$SOURCE" --batch-sizes "${BATCHES[@]}" --prompt-len "$PROMPT_LEN" \
        --decode-tokens "$DECODE_TOKENS" --top-k "$TOP_K" --temperature "$TEMPERATURE" --threads "$THREADS" \
        --positions 64 --repeats 3 --log-level WARNING "${EXTRA[@]}" | tail -1 >> "$OUT/ours.jsonl"
    (cd "$REF_TREE" && PYTHONPATH=. "$REF_PY" "$SCRIPT" --source "$SOURCE" --batch-sizes "${BATCHES[@]}" \
        --prompt-len "$PROMPT_LEN" --decode-tokens "$DECODE_TOKENS" --top-k "$TOP_K" \
        --temperature "$TEMPERATURE" --threads "$THREADS" 2>/dev/null | tail -1) >> "$OUT/reference.jsonl"
done
"$PY" - "$OUT" <<'PYEOF'
import json, statistics, sys
out = sys.argv[1]
ours = [json.loads(l) for l in open(f"{out}/ours.jsonl")]
ref = [json.loads(l) for l in open(f"{out}/reference.jsonl")]
print(f"decode tok/s, median of {len(ours)} rounds (ours: {ours[0]['model']}, {ours[0]['dtype']}, "
      f"{ours[0]['torch_threads']} threads{', compiled' if ours[0].get('compile') else ''}; "
      f"{ours[0]['processor']})")
# each round runs ours then the reference back to back, so the ratio within a round is less
# exposed to a shared machine's slow minutes than the ratio of the two medians
print(f"{'batch':>5}  {'ours':>9}  {'reference':>9}  {'ours/ref':>8}  {'per round: median (min-max)':>28}")
for i, row in enumerate(ours[0]["batches"]):
    a = statistics.median(r["batches"][i]["tokens_per_s"] for r in ours)
    b = statistics.median(r["batches"][i]["tokens_per_s"] for r in ref)
    paired = [o["batches"][i]["tokens_per_s"] / r["batches"][i]["tokens_per_s"] for o, r in zip(ours, ref)]
    spread = f"{statistics.median(paired):.2f}x ({min(paired):.2f}-{max(paired):.2f})"
    print(f"{row['batch']:>5}  {a:>9.1f}  {b:>9.1f}  {a / b:>7.2f}x  {spread:>28}")
PYEOF
