"""
The Task interface shared by every chat dataset, and the two ways to combine tasks.

A task is an indexable collection of conversations,
`{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...]}`,
plus, where it makes sense, a way to grade a model's answer (`evaluate`) and a scalar
reward for RL (`reward`). Assistant content is a string, or a list of parts
`{"type": "text" | "python" | "python_output", "text": str}` for tool use.

Every task takes `start`, `stop`, `step` keyword arguments: a cheap view of its rows,
like `rows[start:stop:step]` (e.g. `GSM8K(subset="main", split="test", stop=420)`).
`len(task)` and `task[i]` work on the view; `get_example(i)` takes an index into the
underlying rows.
"""
from __future__ import annotations

import bisect
import random
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

Conversation = dict[str, Any]

# The letters multiple-choice answers are bound to, in order.
MC_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class Task:
    """Base class: subclasses implement `num_examples()` and `get_example(index)`.

    Class attributes:
      eval_type       "categorical" (the answer is one of the conversation's `letters`,
                      scored by comparing the model's logits over those letters) or
                      "generative" (the model samples a completion that `evaluate` grades).
      random_baseline accuracy of guessing at random; ChatCORE subtracts it so that
                      chance scores 0 (0.25 for four-way multiple choice, 0 when an answer
                      has to be written out).
    """

    eval_type: str = "generative"
    random_baseline: float = 0.0

    def __init__(self, start: int = 0, stop: int | None = None, step: int = 1):
        for name, value in (("start", start), ("step", step)) + ((("stop", stop),) if stop is not None else ()):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                raise ValueError(f"{type(self).__name__}: {name} must be an integer, got {value!r}")
        if start < 0:
            raise ValueError(f"{type(self).__name__}: start must be >= 0, got {start}")
        if stop is not None and stop < start:
            raise ValueError(f"{type(self).__name__}: stop ({stop}) must be >= start ({start})")
        if step < 1:
            raise ValueError(f"{type(self).__name__}: step must be >= 1, got {step}")
        self.start, self.stop, self.step = int(start), (None if stop is None else int(stop)), int(step)

    # -- what subclasses provide ---------------------------------------------------

    def num_examples(self) -> int:
        """Number of underlying rows (before start/stop/step)."""
        raise NotImplementedError

    def get_example(self, index: int) -> Conversation:
        """The conversation at `index` of the underlying rows."""
        raise NotImplementedError

    def evaluate(self, conversation: Conversation, completion: str) -> bool:
        """Whether `completion` (the model's assistant turn) answers `conversation` correctly."""
        raise NotImplementedError(f"{type(self).__name__} has no evaluation")

    def reward(self, conversation: Conversation, completion: str) -> float:
        """RL reward of a sampled completion: 1.0 when `evaluate` says it is right."""
        return float(self.evaluate(conversation, completion))

    # -- the view ------------------------------------------------------------------

    def __len__(self) -> int:
        total = self.num_examples()
        stop = total if self.stop is None else min(self.stop, total)
        span = max(stop - self.start, 0)
        return -(-span // self.step)  # ceil(span / step)

    def __getitem__(self, index: int) -> Conversation:
        if not isinstance(index, (int, np.integer)) or isinstance(index, bool):
            raise TypeError(f"{type(self).__name__} indices must be integers, got {type(index).__name__}")
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"{type(self).__name__} index {index} out of range for {n} examples")
        return self.get_example(self.start + int(index) * self.step)

    def __iter__(self) -> Iterator[Conversation]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(len={len(self)})"


def _check_tasks(kind: str, tasks: Sequence[Task]) -> list[Task]:
    tasks = list(tasks)
    if not tasks:
        raise ValueError(f"{kind} needs at least one task")
    for t in tasks:
        if not isinstance(t, Task):
            raise ValueError(f"{kind} takes Task objects, got {type(t).__name__}")
    return tasks


class TaskSequence(Task):
    """Tasks one after the other (a curriculum): all of the first, then all of the second..."""

    def __init__(self, tasks: Sequence[Task], **view):
        super().__init__(**view)
        self.tasks = _check_tasks("TaskSequence", tasks)
        # offsets[k] = index of the first example of task k; offsets[-1] = total
        self.offsets = [0]
        for t in self.tasks:
            self.offsets.append(self.offsets[-1] + len(t))

    def num_examples(self) -> int:
        return self.offsets[-1]

    def get_example(self, index: int) -> Conversation:
        assert 0 <= index < self.offsets[-1], f"index {index} out of range"
        k = bisect.bisect_right(self.offsets, index) - 1
        return self.tasks[k][index - self.offsets[k]]


class TaskMixture(Task):
    """All examples of all tasks, in one fixed pseudo-random order.

    Each (task, example) pair appears exactly once; to oversample a task, list it twice
    (its examples then appear twice each). The order is `random.Random(seed).shuffle`
    of the pairs listed task by task, the same permutation the reference nanochat
    uses, so mixtures built from the same tasks give the same order everywhere.
    The order is kept as one int64 array (8 bytes per example), not as Python tuples.
    """

    def __init__(self, tasks: Sequence[Task], seed: int = 42, **view):
        super().__init__(**view)
        self.tasks = _check_tasks("TaskMixture", tasks)
        self.seed = seed
        self.lengths = [len(t) for t in self.tasks]
        self.offsets = np.cumsum([0] + self.lengths)  # (num_tasks + 1,)
        total = int(self.offsets[-1])
        # random.shuffle's permutation depends only on the length and the generator, so
        # shuffling flat indices gives the order the reference gets by shuffling pairs.
        order = list(range(total))
        random.Random(seed).shuffle(order)
        self.order = np.asarray(order, dtype=np.int64)  # (total,) flat index into the concatenation

    def num_examples(self) -> int:
        return len(self.order)

    def locate(self, index: int) -> tuple[int, int]:
        """(task number, index within that task) of mixture example `index`."""
        flat = int(self.order[index])
        k = int(np.searchsorted(self.offsets, flat, side="right")) - 1
        return k, flat - int(self.offsets[k])

    def get_example(self, index: int) -> Conversation:
        assert 0 <= index < len(self.order), f"index {index} out of range"
        k, local = self.locate(index)
        return self.tasks[k][local]


def render_mc(question: str, letters: Sequence[str], choices: Sequence[str]) -> str:
    """The user turn of a multiple-choice question.

    Each choice is followed by its letter ("- Paris=A"), not preceded by it: small
    models bind the letter to the choice better this way. No space separates "=" from
    the letter because the tokenizer gives "A" and " A" different ids, and the
    assistant's answer is the bare letter; prompt and answer must use the same token.
    """
    if len(letters) != len(choices):
        raise ValueError(f"{len(letters)} letters for {len(choices)} choices")
    lines = [f"Multiple Choice question: {question}"]
    lines += [f"- {choice}={letter}" for letter, choice in zip(letters, choices)]
    return "\n".join(lines) + "\n\nRespond only with the letter of the correct answer."


def check_mc_answer(conversation: Conversation, completion: str) -> bool:
    """Categorical grading: the completion (stripped) equals the reference letter."""
    answer = conversation["messages"][-1]["content"]
    return isinstance(completion, str) and completion.strip() == answer
