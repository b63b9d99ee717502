"""Chat datasets (SFT mixtures, chat evaluation, RL) behind one small `Task` interface.

    from nanochat.tasks import ARC, GSM8K, MMLU, TaskMixture
    train = TaskMixture([GSM8K(subset="main", split="train"), MMLU(subset="auxiliary_train", split="train")])
    conversation = train[0]      # {"messages": [...]}

Hub-backed tasks take `base_dir=` (default $NANOCHAT_BASE_DIR) and `mirror=` (default
$NANOCHAT_HF_MIRROR, else the real hub); see `nanochat.tasks.hub`.
SFT mixtures written as specs ("gsm8k:4", "jsonl:/path.jsonl") are built by
`nanochat.tasks.mixture`.
"""
from nanochat.tasks.arc import ARC
from nanochat.tasks.common import Task, TaskMixture, TaskSequence, render_mc
from nanochat.tasks.customjson import CustomJSON
from nanochat.tasks.gsm8k import GSM8K
from nanochat.tasks.hub import hub_parquet, load_hub_rows, load_hub_table
from nanochat.tasks.humaneval import HumanEval
from nanochat.tasks.mmlu import MMLU
from nanochat.tasks.smoltalk import SmolTalk
from nanochat.tasks.spellingbee import SimpleSpelling, SpellingBee

__all__ = [
    "Task", "TaskMixture", "TaskSequence", "render_mc",
    "ARC", "MMLU", "GSM8K", "HumanEval", "SmolTalk", "SpellingBee", "SimpleSpelling", "CustomJSON",
    "hub_parquet", "load_hub_table", "load_hub_rows",
]
