"""
GSM8K: grade-school math word problems whose worked solutions use a calculator.
https://huggingface.co/datasets/openai/gsm8k  (subsets "main", "socratic"; splits train/test)

A solution reads like "... 12/60 = $<<12/60=0.2>>0.2 per minute ... #### 10": each
`<<expr=result>>` is a calculator call, and the final answer follows "####". The
calls become tool-use parts of the assistant message, so the model learns to emit
`<|python_start|>12/60<|python_end|>` and to read the tool's output after it.
"""
from __future__ import annotations

import re
from typing import Any

from nanochat.tasks.common import Conversation, Task
from nanochat.tasks.hub import load_hub_rows

REPO = "openai/gsm8k"
SUBSETS = ("main", "socratic")
SPLITS = ("train", "test")

_CALL_RE = re.compile(r"(<<[^>]+>>)")
# the number after "####", as OpenAI's grade-school-math reference code extracts it
_ANSWER_RE = re.compile(r"#### (\-?[0-9\.\,]+)")


def extract_answer(text: str) -> str | None:
    """The final answer after "####" with thousands separators (and a full stop that
    ends the sentence) removed, or None when there is none."""
    match = _ANSWER_RE.search(text)
    if match is None:
        return None
    return match.group(1).strip().replace(",", "").rstrip(".") or None


def answers_match(predicted: str | None, reference: str | None) -> bool:
    """Same string, or the same number ("18" and "18.00")."""
    if predicted is None or reference is None:
        return False
    if predicted == reference:
        return True
    try:
        return float(predicted) == float(reference)
    except ValueError:
        return False


def solution_parts(answer: str) -> list[dict[str, str]]:
    """A GSM8K solution -> assistant content parts: text, then for every `<<expr=result>>`
    a {"type": "python", "text": expr} and a {"type": "python_output", "text": result}.
    The expression is everything before the last "="; a call without "=" has an empty
    output. Empty text between adjacent calls is dropped (it renders to no tokens)."""
    parts: list[dict[str, str]] = []
    for piece in _CALL_RE.split(answer):
        if piece.startswith("<<") and piece.endswith(">>"):
            expr, _, result = piece[2:-2].rpartition("=")
            if not _:  # no "=" at all: rpartition puts everything in `result`
                expr, result = result, ""
            parts.append({"type": "python", "text": expr})
            parts.append({"type": "python_output", "text": result})
        elif piece:
            parts.append({"type": "text", "text": piece})
    return parts


def gsm8k_conversation(row: dict[str, Any]) -> Conversation:
    return {
        "messages": [
            {"role": "user", "content": row["question"]},
            {"role": "assistant", "content": solution_parts(row["answer"])},
        ],
    }


def reference_answer(conversation: Conversation) -> str | None:
    """The "####" answer of a conversation's last assistant message (string or parts)."""
    message = conversation["messages"][-1]
    assert message["role"] == "assistant", "the last message must be the assistant's"
    content = message["content"]
    text = content if isinstance(content, str) else "".join(
        p["text"] for p in content if p["type"] == "text")
    return extract_answer(text)


class GSM8K(Task):
    """`GSM8K(subset="main", split="train" | "test")`. Generative: `evaluate` compares the
    number after "####" in the completion with the reference answer."""

    eval_type = "generative"
    random_baseline = 0.0

    def __init__(self, subset: str = "main", split: str = "train", *, base_dir=None,
                 mirror: str | None = None, **view):
        super().__init__(**view)
        if subset not in SUBSETS:
            raise ValueError(f"GSM8K subset must be one of {SUBSETS}, got {subset!r}")
        if split not in SPLITS:
            raise ValueError(f"GSM8K split must be one of {SPLITS}, got {split!r}")
        self.subset, self.split = subset, split
        self.rows = load_hub_rows(REPO, subset, split, base_dir=base_dir, mirror=mirror)

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> Conversation:
        return gsm8k_conversation(self.rows[index])

    def evaluate(self, conversation: Conversation, completion: str) -> bool:
        if not isinstance(completion, str):
            raise TypeError(f"GSM8K grades a completion string, got {type(completion).__name__}")
        return answers_match(extract_answer(completion), reference_answer(conversation))
