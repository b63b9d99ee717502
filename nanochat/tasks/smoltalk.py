"""
SmolTalk (the "smol" cut): general multi-turn conversations sized for small models.
https://huggingface.co/datasets/HuggingFaceTB/smol-smoltalk  (train ~460K, test ~24K rows)

Each row holds `messages`: a list of {"role", "content"}, an optional system message
first, then user and assistant turns alternating.
"""
from __future__ import annotations

from typing import Any

from nanochat.errors import UserError
from nanochat.tasks.common import Conversation, Task
from nanochat.tasks.hub import load_hub_rows

REPO = "HuggingFaceTB/smol-smoltalk"
SUBSET = "default"
SPLITS = ("train", "test")


def smoltalk_conversation(row: dict[str, Any], where: str = "SmolTalk row") -> Conversation:
    """Check one row's messages and return them as a conversation (a leading system
    message is kept; the tokenizer folds it into the first user turn)."""
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: 'messages' must be a non-empty list")
    turns = messages[1:] if messages[0].get("role") == "system" else messages
    if len(turns) < 2:
        raise UserError(f"{where}: needs at least a user and an assistant message, has {len(turns)}")
    offset = len(messages) - len(turns)
    for i, message in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if message.get("role") != expected:
            raise UserError(f"{where}: message {i + offset} has role {message.get('role')!r}, expected {expected!r}")
        if not isinstance(message.get("content"), str):
            raise UserError(f"{where}: message {i + offset} content must be a string")
    return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}


class SmolTalk(Task):
    """`SmolTalk(split="train" | "test")`. Training data only: no evaluation."""

    def __init__(self, split: str = "train", *, base_dir=None, mirror: str | None = None, **view):
        super().__init__(**view)
        if split not in SPLITS:
            raise ValueError(f"SmolTalk split must be one of {SPLITS}, got {split!r}")
        self.split = split
        self.rows = load_hub_rows(REPO, SUBSET, split, base_dir=base_dir, mirror=mirror)

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> Conversation:
        return smoltalk_conversation(self.rows[index], where=f"SmolTalk {self.split} row {index}")
