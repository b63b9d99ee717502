#!/usr/bin/env bash
# Upstream's Muon refinements, A/B at depth 4 on the CPU: base-train from the same initial
# weights with the reference's Muon step, with MuonEq row equilibration only, with Muon+
# renormalisation only, and with both (the default), at the CPU demo's settings (depth 4,
# sequence 512, vocabulary 8192, 8,192 tokens a step) for STEPS steps each. Prints val bpb
# at half time and at the end (the same val rows for every run), the last smoothed train
# loss and the median step time; then the horizon --target-param-data-ratio gives with
# upstream's default 12 against the reference's 10.5. Last line: JSON.
#
#   bash benchmarks/muon_variants.sh               # 160 steps per variant (~11 min each on an AVX2 CPU)
#   STEPS=40 bash benchmarks/muon_variants.sh      # a shortened run
#
# Knobs: STEPS (160), VARIANTS (default "reference eq plus both"), NANOCHAT_BASE_DIR
# (default: a fresh temporary directory; the tokenizer is trained once there and reused),
# NANOCHAT_VENV (.venv). Offline: uses ../shared/data beside the repository when it exists.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-160}
VARIANTS=${VARIANTS:-reference eq plus both}
PY=${NANOCHAT_VENV:-.venv}/bin/python
export NANOCHAT_BASE_DIR=${NANOCHAT_BASE_DIR:-$(mktemp -d)/nanochat-muon}
OUT=$NANOCHAT_BASE_DIR/muon_variants_bench
mkdir -p "$OUT"
echo "base dir: $NANOCHAT_BASE_DIR; $STEPS steps per variant: $VARIANTS"
source benchmarks/lib/pretrain_setup.sh

MODEL=("${DEMO_MODEL[@]}")
for variant in $VARIANTS; do
    case $variant in
        reference) flags=(--no-muon-eq --no-muon-plus) ;;
        eq) flags=(--muon-eq --no-muon-plus) ;;
        plus) flags=(--no-muon-eq --muon-plus) ;;
        both) flags=(--muon-eq --muon-plus) ;;
        *) echo "unknown variant $variant (reference, eq, plus, both)" >&2; exit 2 ;;
    esac
    t0=$(date +%s)
    rm -rf "$NANOCHAT_BASE_DIR/base_checkpoints/muon_$variant"  # a fresh run (and metrics.jsonl) each time
    "$PY" -m nanochat base-train "${MODEL[@]}" --num-iterations "$STEPS" --warmup-steps $(( STEPS / 12 + 1 )) \
        --eval-every $(( STEPS / 2 > 0 ? STEPS / 2 : 1 )) --eval-tokens 65536 --sample-every -1 \
        --core-metric-every -1 "${flags[@]}" --model-tag "muon_$variant" > "$OUT/$variant.log" 2>&1
    echo "$variant: $(( $(date +%s) - t0 )) s (log: $OUT/$variant.log)"
done

"$PY" - "$NANOCHAT_BASE_DIR" $VARIANTS <<'PYEOF'
import json, statistics, sys
from pathlib import Path
from nanochat.stages import base_train
from nanochat.tokenizer import get_tokenizer
base, variants = Path(sys.argv[1]), sys.argv[2:]
rows = {}
print(f"{'variant':<10} {'flags':<30} {'val bpb by step':<34} {'smooth loss':>11} {'ms/step':>8}")
for v in variants:
    recs = [json.loads(l) for l in (base / "base_checkpoints" / f"muon_{v}" / "metrics.jsonl").read_text().splitlines()]
    bpb = {r["step"]: r["val_bpb"] for r in recs if "val_bpb" in r}
    steps = [r for r in recs if "loss_ema" in r]
    ms = statistics.median(r["dt"] for r in steps[1:]) * 1000
    flags = {"reference": "--no-muon-eq --no-muon-plus", "eq": "--muon-eq --no-muon-plus",
             "plus": "--no-muon-eq --muon-plus", "both": "--muon-eq --muon-plus (default)"}[v]
    rows[v] = {"val_bpb": bpb, "smooth_loss": steps[-1]["loss_ema"], "ms_per_step": round(ms, 1)}
    by = ", ".join(f"{s}: {b:.4f}" for s, b in sorted(bpb.items()))
    print(f"{v:<10} {flags:<30} {by:<34} {steps[-1]['loss_ema']:>11.4f} {ms:>8.0f}")
# the horizon: tokens per scaling parameter, 12 (upstream, the default) vs 10.5 (reference)
vocab = get_tokenizer(base).get_vocab_size()
horizons = {}
for depth, extra in ((4, dict(head_dim=64, max_seq_len=512, window_pattern="L", total_batch_size=8192)), (20, {}), (24, {})):
    cfg = base_train.Config(depth=depth, device_batch_size=1, **extra)
    for ratio in (10.5, 12.0):
        cfg.target_param_data_ratio = ratio
        plan = base_train.make_plan(cfg, vocab if depth == 4 else 32768, 1 if depth == 4 else 8)
        horizons[f"d{depth}@{ratio}"] = {"tokens": plan.target_tokens, "steps": plan.num_iterations,
                                         "batch": plan.total_batch_size}
        print(f"horizon d{depth} ratio {ratio:>4}: {plan.target_tokens:>14,} tokens = {plan.num_iterations:>6,} steps "
              f"of {plan.total_batch_size:,}")
print(json.dumps({"steps": int(max(max(r["val_bpb"]) for r in rows.values())), "variants": rows, "horizons": horizons}))
PYEOF
