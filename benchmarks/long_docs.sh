#!/usr/bin/env bash
# Packing long documents: base-train --long-docs split vs crop on the OpenStax shards
# (chapters of ~3,200 tokens), at the CPU demo's settings: depth 4, sequence 512,
# vocabulary 8192, 16 x 512 = 8,192 tokens a step, STEPS steps (400), val bpb at half
# time and at the end on the same val rows for both runs. Prints, per mode, the share of
# the dataset's tokens handed to packing that were trained on (overall and for the last
# finished epoch, if one finished) and val bpb at equal steps.
#
#   bash benchmarks/long_docs.sh                 # 400 steps each (~30 min a run on an AVX2 CPU)
#   STEPS=40 bash benchmarks/long_docs.sh        # a shortened run
#
# Both runs use the reference's Muon step (--no-muon-eq --no-muon-plus), so the figures
# compare packing only and do not move with the optimizer's defaults.
#
# Knobs: STEPS (400), MODES ("crop split"; the table reads both modes' logs, so one mode can
# be rerun alone), NANOCHAT_BASE_DIR (default: a fresh temporary directory; the
# tokenizer is trained once there and reused), NANOCHAT_VENV (.venv). Offline: uses
# ../shared/data beside the repository when it exists, else downloads as `nanochat
# download` does (set NANOCHAT_DATA_URL and NANOCHAT_DATA_SHARDS for another source).
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-400}
MODES=${MODES:-crop split}
PY=${NANOCHAT_VENV:-.venv}/bin/python
export NANOCHAT_BASE_DIR=${NANOCHAT_BASE_DIR:-$(mktemp -d)/nanochat-long-docs}
OUT=$NANOCHAT_BASE_DIR/long_docs_bench
mkdir -p "$OUT"
echo "base dir: $NANOCHAT_BASE_DIR; $STEPS steps per mode"
source benchmarks/lib/pretrain_setup.sh

MODEL=("${DEMO_MODEL[@]}" --no-muon-eq --no-muon-plus)
for mode in $MODES; do
    t0=$(date +%s)
    rm -rf "$NANOCHAT_BASE_DIR/base_checkpoints/long_docs_$mode"  # a fresh run (and metrics.jsonl) each time
    "$PY" -m nanochat base-train "${MODEL[@]}" --num-iterations "$STEPS" --warmup-steps $(( STEPS / 12 + 1 )) \
        --eval-every $(( STEPS / 2 > 0 ? STEPS / 2 : 1 )) --eval-tokens 65536 --sample-every 0 \
        --core-metric-every 0 --long-docs "$mode" --model-tag "long_docs_$mode" > "$OUT/$mode.log" 2>&1
    echo "$mode: $(( $(date +%s) - t0 )) s (log: $OUT/$mode.log)"
done

"$PY" - "$OUT" "$NANOCHAT_BASE_DIR" <<'PYEOF'
# Both checkpoints are scored on the same val rows, two ways: "whole chapters" packs 65,536
# val tokens with split (every page of a chapter); "openings" packs them the reference's
# way, as base-train and base-loss do (crop: with 512-token rows, the first page of each
# chapter), reading the val split once.
import json, sys
from pathlib import Path
from nanochat.checkpoint import load_model
from nanochat.common import build_runtime
from nanochat.dataloader import pretrain_batches
from nanochat.loss_eval import evaluate_bpb
from nanochat.tokenizer import get_token_bytes
out, base = Path(sys.argv[1]), Path(sys.argv[2])
runtime = build_runtime(None, base)
token_bytes = get_token_bytes(base, device=runtime.device)
print(f"{'mode':<6} {'tokens trained on':>18} {'last full epoch':>16} {'reader epoch':>13} {'whole chapters':>15} "
      f"{'openings':>9}   val bpb by step (as base-train logs it)")
for mode in ("crop", "split"):
    log = (out / f"{mode}.log").read_text()
    result = json.loads(log.split("result: ")[-1].splitlines()[0])
    records = [json.loads(l) for l in (base / "base_checkpoints" / f"long_docs_{mode}" / "metrics.jsonl").read_text().splitlines()]
    by_step = ", ".join(f"{r['step']}: {r['val_bpb']:.4f}" for r in records if "val_bpb" in r)
    model, tokenizer, _ = load_model("base", base, runtime.device, runtime.dtype, tag=f"long_docs_{mode}")
    model.eval()
    bpb = {}
    # whole chapters: a buffer smaller than the split, so no document is read twice here
    for name, kwargs in (("whole", dict(long_docs="split", buffer_size=64)), ("openings", dict(long_docs="crop", epochs=1))):
        val = pretrain_batches(tokenizer, 16, 512, "val", base_dir=base, device=runtime.device, **kwargs)
        try:
            bpb[name] = evaluate_bpb(model, val, 8, token_bytes)
        finally:
            val.close()
    last = result.get("data_last_epoch_used_fraction")
    last = "-" if last is None else f"{100 * last:.1f}%"
    print(f"{mode:<6} {100 * result['data_used_fraction']:>17.1f}% {last:>16} {result['data_epoch']:>13} "
          f"{bpb['whole']:>15.4f} {bpb['openings']:>9.4f}   {by_step}")
PYEOF
