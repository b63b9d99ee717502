"""
HumanEval: 164 Python functions to complete from a signature and docstring, graded by
running unit tests. https://huggingface.co/datasets/openai/openai_humaneval
"""
from __future__ import annotations

import re
from typing import Any

from nanochat.tasks.common import Conversation, Task
from nanochat.tasks.hub import load_hub_rows

REPO = "openai/openai_humaneval"
SUBSET = "openai_humaneval"

# ```python ... ``` or ``` ... ``` (also ```py); the first such block is the program
_FENCE_RE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:\n[ \t]*```|\Z)", re.DOTALL)


def extract_program(completion: str) -> str:
    """The code in a model's answer: the first fenced block if there is one (an unclosed
    fence runs to the end), else the whole answer."""
    match = _FENCE_RE.search(completion)
    return (match.group(1) if match else completion).strip("\n")


def leading_imports(prompt: str) -> str:
    """The import lines at the top of a HumanEval prompt (before the first definition)."""
    lines = []
    for line in prompt.splitlines():
        stripped = line.strip()
        if stripped.startswith(("import ", "from ")):
            lines.append(stripped)
        elif stripped and not stripped.startswith("#"):
            break
    return "\n".join(lines)


def build_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    """The script the sandbox runs: the candidate function, the tests, the check call.

    A chat model usually answers with the whole function; it then replaces the prompt
    (keeping the prompt's imports, which answers often leave out). An answer that does
    not define `entry_point` is taken as the body that continues the prompt."""
    code = extract_program(completion)
    defines_entry = re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", code, re.MULTILINE)
    head = leading_imports(prompt) + "\n\n" + code if defines_entry else prompt + code
    return f"{head}\n\n{test}\n\ncheck({entry_point})\n"


def humaneval_conversation(row: dict[str, Any]) -> Conversation:
    return {
        "messages": [
            {"role": "user", "content": row["prompt"]},
            {"role": "assistant", "content": f"{row['prompt']}\n{row['canonical_solution']}"},
        ],
        "entry_point": row["entry_point"],
        "test": row["test"],
        "task_id": row["task_id"],
    }


class HumanEval(Task):
    """`HumanEval()` (the single "test" split). Generative: `evaluate` runs the completed
    function against the task's tests in `nanochat.execution`'s sandbox."""

    eval_type = "generative"
    random_baseline = 0.0

    def __init__(self, split: str = "test", *, timeout: float = 5.0, base_dir=None,
                 mirror: str | None = None, **view):
        super().__init__(**view)
        if split != "test":
            raise ValueError(f"HumanEval has only the split 'test', got {split!r}")
        self.split = split
        self.timeout = timeout
        self.rows = load_hub_rows(REPO, SUBSET, split, base_dir=base_dir, mirror=mirror)

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> Conversation:
        return humaneval_conversation(self.rows[index])

    def evaluate(self, conversation: Conversation, completion: str) -> bool:
        from nanochat.execution import execute_code  # the sandbox; imported only when grading
        program = build_program(conversation["messages"][0]["content"], completion,
                                conversation["test"], conversation["entry_point"])
        return bool(execute_code(program, timeout=self.timeout).success)
