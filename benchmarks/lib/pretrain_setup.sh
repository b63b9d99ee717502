#!/usr/bin/env bash
# Sourced by the pretraining benchmarks after they set PY (the venv's python) and
# NANOCHAT_BASE_DIR: offline data from ../shared/data when present (runs/lib/local_mirror.sh),
# 8 shards, a vocabulary-8192 tokenizer trained once per base dir, and the peak FLOP/s
# measured and cached now. (Measuring draws random matrices from the global RNG: done inside
# the first base-train of a base dir, it would start that run from other weights than the
# next one's.) Sets DEMO_MODEL, the CPU demo's model and batch flags.
source runs/lib/local_mirror.sh
"$PY" -m nanochat download -n 8 --log-level WARNING
[ -f "$NANOCHAT_BASE_DIR/tokenizer/tokenizer.pkl" ] || "$PY" -m nanochat tok-train --vocab-size 8192 --log-level WARNING
"$PY" -c "from nanochat.common import build_runtime, peak_flops; rt = build_runtime(None); peak_flops(rt.device, rt.dtype, cache_dir=rt.base_dir)"
DEMO_MODEL=(--depth 4 --head-dim 64 --window-pattern L --max-seq-len 512 --device-batch-size 16 --total-batch-size 8192)
