"""
MMLU: four-way multiple-choice questions over 57 subjects.
https://huggingface.co/datasets/cais/mmlu

Subsets:
  "all"              every subject; splits "test" (14,042), "validation", "dev", "auxiliary_train"
  "auxiliary_train"  ~100K multiple-choice questions drawn from ARC, MCTest, OBQA and RACE
                     (split "train"); used to teach the multiple-choice format
  <subject>          one of `SUBJECTS` (e.g. "college_biology"): the rows of "all" of that subject
"""
from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from nanochat.errors import UserError
from nanochat.tasks.common import Conversation, Task, check_mc_answer, render_mc
from nanochat.tasks.hub import Rows, load_hub_table

REPO = "cais/mmlu"
LETTERS = ("A", "B", "C", "D")
SUBJECTS = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge",
    "college_biology", "college_chemistry", "college_computer_science", "college_mathematics",
    "college_medicine", "college_physics", "computer_security", "conceptual_physics",
    "econometrics", "electrical_engineering", "elementary_mathematics", "formal_logic",
    "global_facts", "high_school_biology", "high_school_chemistry",
    "high_school_computer_science", "high_school_european_history", "high_school_geography",
    "high_school_government_and_politics", "high_school_macroeconomics",
    "high_school_mathematics", "high_school_microeconomics", "high_school_physics",
    "high_school_psychology", "high_school_statistics", "high_school_us_history",
    "high_school_world_history", "human_aging", "human_sexuality", "international_law",
    "jurisprudence", "logical_fallacies", "machine_learning", "management", "marketing",
    "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition",
    "philosophy", "prehistory", "professional_accounting", "professional_law",
    "professional_medicine", "professional_psychology", "public_relations",
    "security_studies", "sociology", "us_foreign_policy", "virology", "world_religions",
)
ALL_SPLITS = ("test", "validation", "dev", "auxiliary_train")
SUBJECT_SPLITS = ("test", "validation", "dev")


def _unwrap_train_column(table: pa.Table) -> pa.Table:
    """The "auxiliary_train" subset nests each row in a struct column named "train"."""
    if table.column_names == ["train"] and pa.types.is_struct(table.schema.field("train").type):
        struct = table.column("train").combine_chunks()
        return pa.Table.from_arrays(struct.flatten(), names=[f.name for f in struct.type])
    return table


def mmlu_conversation(row: dict[str, Any]) -> Conversation:
    """One MMLU row (question, choices[4], answer index, subject) -> a conversation."""
    choices = list(row["choices"])
    if len(choices) != 4 or not 0 <= row["answer"] < 4:
        raise UserError(f"MMLU row has {len(choices)} choices and answer {row['answer']}; expected 4 and 0..3")
    return {
        "messages": [
            {"role": "user", "content": render_mc(row["question"], LETTERS, choices)},
            {"role": "assistant", "content": LETTERS[row["answer"]]},
        ],
        "subject": row.get("subject", ""),  # for per-subject metrics
        "letters": list(LETTERS),
    }


class MMLU(Task):
    """`MMLU(subset="all", split="test")`, `MMLU(subset="auxiliary_train", split="train")`,
    `MMLU(subset="college_biology", split="test")`."""

    eval_type = "categorical"
    random_baseline = 0.25
    letters = LETTERS

    def __init__(self, subset: str, split: str, *, base_dir=None, mirror: str | None = None, **view):
        super().__init__(**view)
        if subset == "all":
            if split not in ALL_SPLITS:
                raise ValueError(f"MMLU subset 'all' has splits {ALL_SPLITS}, got {split!r}")
        elif subset == "auxiliary_train":
            if split != "train":
                raise ValueError(f"MMLU subset 'auxiliary_train' has only the split 'train', got {split!r}")
        elif subset in SUBJECTS:
            if split not in SUBJECT_SPLITS:
                raise ValueError(f"MMLU subject {subset!r} has splits {SUBJECT_SPLITS}, got {split!r}")
        else:
            raise ValueError(f"MMLU subset must be 'all', 'auxiliary_train' or a subject name "
                             f"(e.g. 'college_biology'; see nanochat.tasks.mmlu.SUBJECTS), got {subset!r}")
        self.subset, self.split = subset, split
        source = "all" if subset in SUBJECTS else subset
        table = _unwrap_train_column(load_hub_table(REPO, source, split, base_dir=base_dir, mirror=mirror))
        if subset in SUBJECTS:
            # a subject's own hub subset holds exactly these rows, in this order
            table = table.filter(pc.equal(table.column("subject"), subset))
        self.rows = Rows(table).shuffled(42)

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> Conversation:
        return mmlu_conversation(self.rows[index])

    def evaluate(self, conversation: Conversation, completion: str) -> bool:
        return check_mc_answer(conversation, completion)
