"""
ARC (AI2 Reasoning Challenge): grade-school science questions with 3 to 5 choices.
https://huggingface.co/datasets/allenai/ai2_arc  (subsets ARC-Easy, ARC-Challenge)
"""
from __future__ import annotations

from typing import Any

from nanochat.errors import UserError
from nanochat.tasks.common import MC_LETTERS, Conversation, Task, check_mc_answer, render_mc
from nanochat.tasks.hub import load_hub_rows

REPO = "allenai/ai2_arc"
SUBSETS = ("ARC-Easy", "ARC-Challenge")
SPLITS = ("train", "validation", "test")


def arc_conversation(row: dict[str, Any]) -> Conversation:
    """One ARC row -> a multiple-choice conversation whose answer is a letter.

    About 4% of ARC rows label their choices "1", "2", "3", "4" instead of letters; those
    labels are mapped to A, B, C, D (answer key included) so that every multiple-choice
    task asks for a letter, as the model is trained to give.
    """
    labels = list(row["choices"]["label"])
    texts = list(row["choices"]["text"])
    key = row["answerKey"]
    if key not in labels:
        raise UserError(f"ARC row {row.get('id')!r}: answer {key!r} is not one of the labels {labels}")
    letters = list(MC_LETTERS[:len(labels)])
    answer = letters[labels.index(key)]
    return {
        "messages": [
            {"role": "user", "content": render_mc(row["question"], letters, texts)},
            {"role": "assistant", "content": answer},
        ],
        "letters": letters,  # chat-eval restricts the model's choice to these
    }


class ARC(Task):
    """`ARC(subset="ARC-Easy" | "ARC-Challenge", split="train" | "validation" | "test")`."""

    eval_type = "categorical"
    random_baseline = 0.25

    def __init__(self, subset: str, split: str, *, base_dir=None, mirror: str | None = None, **view):
        super().__init__(**view)
        if subset not in SUBSETS:
            raise ValueError(f"ARC subset must be one of {SUBSETS}, got {subset!r}")
        if split not in SPLITS:
            raise ValueError(f"ARC split must be one of {SPLITS}, got {split!r}")
        self.subset, self.split = subset, split
        self.rows = load_hub_rows(REPO, subset, split, base_dir=base_dir, mirror=mirror)

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> Conversation:
        return arc_conversation(self.rows[index])

    def evaluate(self, conversation: Conversation, completion: str) -> bool:
        return check_mc_answer(conversation, completion)
