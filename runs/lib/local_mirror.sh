#!/usr/bin/env bash
# Sourced by the recipes: when ../shared/data sits beside the repository (an offline
# machine with the project's data kept for it) and no data source is set, point every
# download at it. Sets SFT_MIXTURE and IDENTITY (bash arrays) for `nanochat sft`: empty
# means the stage's defaults.
SHARED=$(cd .. && pwd)/shared/data
SFT_MIXTURE=()
IDENTITY=()
if [ -z "${NANOCHAT_DATA_URL:-}" ] && [ -d "$SHARED/pretrain_openstax/base_data" ]; then
    echo "using the local data mirror in $SHARED"
    export NANOCHAT_DATA_URL="file://$SHARED/pretrain_openstax/base_data" NANOCHAT_DATA_SHARDS=6
    export NANOCHAT_HF_MIRROR=${NANOCHAT_HF_MIRROR:-file://$SHARED/hf_schema}
    export NANOCHAT_EVAL_BUNDLE_URL=${NANOCHAT_EVAL_BUNDLE_URL:-file://$SHARED/core_eval/eval_bundle}
    export TIKTOKEN_CACHE_DIR=${TIKTOKEN_CACHE_DIR:-$SHARED/tiktoken/cache}
    export NANOCHAT_WORDS_URL=${NANOCHAT_WORDS_URL:-file://$SHARED/words/words_alpha.txt}
    IDENTITY=(--identity-url "file://$SHARED/chat_sft/identity_conversations.jsonl")
    # SmolTalk and MMLU's auxiliary_train are not in the mirror: a mixture without them
    SFT_MIXTURE=(--mixture identity:2 gsm8k arc-easy simple-spelling spelling)
fi
