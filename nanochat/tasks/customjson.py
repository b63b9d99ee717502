"""
Your own conversations from a JSONL file, e.g. the identity conversations that teach the
model who it is.

Format: one conversation per line, a JSON list of messages
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
(an object {"messages": [...]} on a line is accepted too). Roles alternate user,
assistant, user, ... starting with the user (an optional "system" message may come
first); at least one user and one assistant message; every content is a non-empty
string. Blank lines are skipped. Every malformed line is reported with the file name
and line number, all at once.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from nanochat.errors import MissingInputError, UserError
from nanochat.tasks.common import Conversation, Task

IDENTITY_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/identity_conversations.jsonl"
MAX_REPORTED = 20  # problems listed in one error; the rest are counted


def conversation_problem(value: Any) -> str | None:
    """What is wrong with one parsed line, or None if it is a valid conversation."""
    if isinstance(value, dict) and "messages" in value:
        value = value["messages"]
    if not isinstance(value, list):
        return f"expected a JSON list of messages, got {type(value).__name__}"
    if not value:
        return "the conversation is empty"
    first = 1 if isinstance(value[0], dict) and value[0].get("role") == "system" else 0
    if len(value) - first < 2:
        return f"a conversation needs at least a user and an assistant message, got {len(value) - first}"
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            return f"message {i} must be an object with 'role' and 'content', got {type(message).__name__}"
        for key in ("role", "content"):
            if key not in message:
                return f"message {i} has no {key!r}"
        expected = "system" if i < first else ("user" if (i - first) % 2 == 0 else "assistant")
        if message["role"] != expected:
            if message["role"] not in ("system", "user", "assistant"):
                return f"message {i} has unknown role {message['role']!r} (use 'user' or 'assistant')"
            return (f"message {i} has role {message['role']!r} but should be {expected!r} "
                    f"(roles alternate user, assistant, ... starting with user)")
        if not isinstance(message["content"], str):
            return f"message {i} content must be a string, got {type(message['content']).__name__}"
        if not message["content"].strip():
            return f"message {i} content is empty"
    return None


def read_conversations(path: str | os.PathLike) -> list[list[dict[str, str]]]:
    """Parse and check a conversations JSONL file; raise one ValueError listing every bad line."""
    path = Path(path).expanduser()
    if not path.is_file():
        hint = ""
        if path.name == "identity_conversations.jsonl":
            hint = f" Download the reference identity conversations with: curl -L -o {path} {IDENTITY_URL}"
        raise MissingInputError(f"conversations file {path} does not exist.{hint}")
    conversations, problems = [], []
    with open(path, encoding="utf-8-sig") as f:  # -sig: tolerate a byte-order mark
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})")
                continue
            problem = conversation_problem(value)
            if problem is not None:
                problems.append(f"{path}:{lineno}: {problem}")
                continue
            messages = value["messages"] if isinstance(value, dict) else value
            conversations.append([{"role": m["role"], "content": m["content"]} for m in messages])
    if problems:
        shown = problems[:MAX_REPORTED]
        more = f"\n... and {len(problems) - MAX_REPORTED} more" if len(problems) > MAX_REPORTED else ""
        raise UserError(f"{len(problems)} malformed conversation(s) in {path} "
                        f"(each line must be a JSON list of alternating user/assistant messages):\n"
                        + "\n".join(shown) + more)
    if not conversations:
        raise UserError(f"{path} contains no conversations (one JSON list of messages per line)")
    return conversations


class CustomJSON(Task):
    """`CustomJSON(filepath="identity_conversations.jsonl")`: conversations from a JSONL file."""

    def __init__(self, filepath: str | os.PathLike, **view):
        super().__init__(**view)
        self.filepath = Path(filepath)
        self.conversations = read_conversations(self.filepath)

    def num_examples(self) -> int:
        return len(self.conversations)

    def get_example(self, index: int) -> Conversation:
        return {"messages": [dict(m) for m in self.conversations[index]]}  # copies: callers may edit
