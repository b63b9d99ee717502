"""The chat tasks on the real datasets (../shared/data/hf_schema served as a file:// mirror)."""
from __future__ import annotations

import json
import random
import re
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat.calculator import calculate
from nanochat.tasks import (ARC, GSM8K, MMLU, CustomJSON, HumanEval, SimpleSpelling, SmolTalk,
                            SpellingBee, Task, TaskMixture, TaskSequence, render_mc)
from nanochat.tasks.gsm8k import extract_answer, gsm8k_conversation
from nanochat.tasks.humaneval import build_program, extract_program
from nanochat.tasks.mmlu import _unwrap_train_column
from nanochat.tokenizer import validate_conversation


@pytest.fixture(scope="session")
def hub(shared_data, tmp_path_factory):
    """Keyword arguments that make hub tasks download from the shared data, once per session."""
    return {"base_dir": tmp_path_factory.mktemp("hub_base"), "mirror": f"file://{shared_data / 'hf_schema'}"}


@pytest.fixture(scope="session")
def words_file(shared_data):
    return shared_data / "words" / "words_alpha.txt"


def _mc_bindings(user_message: str) -> dict[str, str]:
    """letter -> choice text, parsed back from a rendered multiple-choice prompt."""
    return {m.group(2): m.group(1) for m in re.finditer(r"^- (.*)=([A-Z])$", user_message, re.MULTILINE)}


# -----------------------------------------------------------------------------
# Multiple choice

def test_arc_letters_bound_to_choices(hub, shared_data):
    task = ARC(subset="ARC-Challenge", split="validation", **hub)
    raw = pq.read_table(shared_data / "hf_schema/allenai--ai2_arc/ARC-Challenge/validation/00000.parquet").to_pylist()
    assert len(task) == len(raw)
    by_key = {(r["question"], tuple(r["choices"]["text"])): r for r in raw}
    numeric_seen = 0
    for i in range(len(task)):
        conv = task[i]
        validate_conversation(conv)
        user, answer = conv["messages"][0]["content"], conv["messages"][1]["content"]
        bindings = _mc_bindings(user)
        question = user.removeprefix("Multiple Choice question: ").split("\n- ", 1)[0]
        row = by_key[(question, tuple(bindings.values()))]
        assert list(bindings) == conv["letters"] == list("ABCDE"[:len(row["choices"]["text"])])
        # the letter of the answer is bound to the text of the right choice
        correct_text = row["choices"]["text"][row["choices"]["label"].index(row["answerKey"])]
        assert bindings[answer] == correct_text
        numeric_seen += row["choices"]["label"][0] == "1"
        assert user.endswith("\n\nRespond only with the letter of the correct answer.")
    assert numeric_seen > 0  # rows labelled 1..4 were mapped to letters too


def test_arc_evaluate_and_baseline(hub):
    task = ARC(subset="ARC-Easy", split="test", stop=5, **hub)
    assert (task.eval_type, task.random_baseline) == ("categorical", 0.25)
    for conv in task:
        right = conv["messages"][-1]["content"]
        wrong = next(letter for letter in conv["letters"] if letter != right)
        assert task.evaluate(conv, right) and task.evaluate(conv, f" {right}\n")
        assert not task.evaluate(conv, wrong)
    with pytest.raises(ValueError, match="ARC subset"):
        ARC(subset="ARC-Hard", split="test", **hub)


def test_mmlu_rendering_subjects_and_evaluate(hub, shared_data):
    task = MMLU(subset="all", split="validation", **hub)
    raw = pq.read_table(shared_data / "hf_schema/cais--mmlu/all/validation/00000.parquet")
    assert len(task) == raw.num_rows
    assert (task.eval_type, task.random_baseline) == ("categorical", 0.25)
    rows: dict[tuple, list[dict]] = {}  # a few questions appear under two subjects
    for r in raw.to_pylist():
        rows.setdefault((r["question"], tuple(r["choices"])), []).append(r)
    checked = 0
    for i in range(0, len(task), 7):
        conv = task[i]
        validate_conversation(conv)
        user, answer = conv["messages"][0]["content"], conv["messages"][1]["content"]
        bindings = _mc_bindings(user)
        if len(bindings) != 4:
            continue  # a choice spans several lines; the regex cannot parse it back
        question = user.removeprefix("Multiple Choice question: ").split("\n- ", 1)[0]
        candidates = rows[(question, tuple(bindings.values()))]
        row = next(r for r in candidates if r["subject"] == conv["subject"])
        assert list(bindings) == ["A", "B", "C", "D"] and conv["letters"] == ["A", "B", "C", "D"]
        assert bindings[answer] == row["choices"][row["answer"]]
        assert task.evaluate(conv, answer) and not task.evaluate(conv, "ABCD"[(row["answer"] + 1) % 4])
        checked += 1
    assert checked > 150

    subject = MMLU(subset="high_school_physics", split="validation", **hub)
    expected = sum(1 for s in raw.column("subject").to_pylist() if s == "high_school_physics")
    assert len(subject) == expected > 0
    assert {c["subject"] for c in subject} == {"high_school_physics"}
    with pytest.raises(ValueError, match="auxiliary_train"):
        MMLU(subset="auxiliary_train", split="test", **hub)
    with pytest.raises(ValueError, match="subject"):
        MMLU(subset="underwater_basketry", split="test", **hub)


def test_mmlu_auxiliary_train_nested_rows(hub, shared_data, tmp_path):
    # The hub's auxiliary_train subset wraps every row in a struct column "train"; build a
    # mirror holding real MMLU rows in that shape.
    flat = pq.read_table(shared_data / "hf_schema/cais--mmlu/all/dev/00000.parquet")
    nested = pa.table({"train": pa.StructArray.from_arrays(
        [flat.column(n).combine_chunks() for n in ("answer", "choices", "question", "subject")],
        names=["answer", "choices", "question", "subject"])})
    split_dir = tmp_path / "mirror" / "cais--mmlu" / "auxiliary_train" / "train"
    split_dir.mkdir(parents=True)
    pq.write_table(nested, split_dir / "00000.parquet")
    assert _unwrap_train_column(nested).num_rows == flat.num_rows
    task = MMLU(subset="auxiliary_train", split="train", base_dir=tmp_path / "base", mirror=f"file://{tmp_path / 'mirror'}")
    assert len(task) == flat.num_rows
    seen = Counter((c["messages"][0]["content"], c["messages"][1]["content"], c["subject"]) for c in task)
    expected = Counter((render_mc(r["question"], "ABCD", r["choices"]), "ABCD"[r["answer"]], r["subject"])
                       for r in flat.to_pylist())
    assert seen == expected  # a permutation: every row once


# -----------------------------------------------------------------------------
# GSM8K

def test_gsm8k_tool_calls_from_real_row(shared_data):
    row = pq.read_table(shared_data / "hf_schema/openai--gsm8k/main/train/00000.parquet").slice(0, 1).to_pylist()[0]
    assert row["question"].startswith("Natalia sold clips")
    conv = gsm8k_conversation(row)
    validate_conversation(conv)
    assert conv["messages"][0] == {"role": "user", "content": row["question"]}
    assert conv["messages"][1]["content"] == [
        {"type": "text", "text": "Natalia sold 48/2 = "},
        {"type": "python", "text": "48/2"},
        {"type": "python_output", "text": "24"},
        {"type": "text", "text": "24 clips in May.\nNatalia sold 48+24 = "},
        {"type": "python", "text": "48+24"},
        {"type": "python_output", "text": "72"},
        {"type": "text", "text": "72 clips altogether in April and May.\n#### 72"},
    ]
    # the tool the model calls reproduces the annotated results
    assert [calculate(p["text"]) for p in conv["messages"][1]["content"] if p["type"] == "python"] == ["24", "72"]


def test_gsm8k_parts_round_trip_and_evaluate(hub):
    task = GSM8K(subset="main", split="test", stop=200, **hub)
    assert (task.eval_type, task.random_baseline) == ("generative", 0.0)
    for conv in task:
        parts = conv["messages"][1]["content"]
        rebuilt = ""
        for k, p in enumerate(parts):
            if p["type"] == "python":
                assert parts[k + 1]["type"] == "python_output"
                rebuilt += f"<<{p['text']}="
            elif p["type"] == "python_output":
                rebuilt += f"{p['text']}>>"
            else:
                rebuilt += p["text"]
        answer = extract_answer(rebuilt)
        assert answer is not None and parts[-1]["type"] == "text"
        assert task.evaluate(conv, f"Working... so the total is {answer}.\n#### {answer}")
        assert not task.evaluate(conv, f"#### {int(float(answer)) + 1}")
        assert not task.evaluate(conv, f"the answer is {answer}")  # no #### marker
        assert task.reward(conv, f"#### {answer}") == 1.0 and task.reward(conv, "#### -1.5") == 0.0
    conv = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "#### 1234"}]}
    assert task.evaluate(conv, "#### 1,234") and task.evaluate(conv, "#### 1234.") and task.evaluate(conv, "#### 1234.00")


# -----------------------------------------------------------------------------
# HumanEval (through the sandbox)

def test_humaneval_canonical_passes_wrong_fails(hub):
    task = HumanEval(stop=2, **hub)
    assert len(task) == 2 and task.eval_type == "generative" and task.random_baseline == 0.0
    conv = task[0]
    validate_conversation(conv)
    prompt, full = conv["messages"][0]["content"], conv["messages"][1]["content"]
    body = full[len(prompt) + 1:]  # the canonical solution alone (the assistant turn is prompt + "\n" + body)
    assert task.evaluate(conv, f"Here you go:\n```python\n{full}\n```\nHope it helps.")
    assert task.evaluate(conv, body)  # a bare continuation of the prompt
    assert not task.evaluate(conv, f"```python\n{prompt}    return None\n```")
    assert not task.evaluate(conv, "```python\ndef oops(:\n```")  # syntax error


def test_extract_program_and_build_program():
    assert extract_program("text\n```python\nx = 1\n```\nmore\n```python\ny = 2\n```") == "x = 1"
    assert extract_program("```\nx = 1\n```") == "x = 1"
    assert extract_program("```py\nx = 1") == "x = 1"  # unclosed fence
    assert extract_program("    return 1\n") == "    return 1"
    prog = build_program("import math\n\ndef f(x):\n    '''doc'''\n", "def f(x):\n    return math.sqrt(x)", "def check(c): pass", "f")
    assert prog.startswith("import math\n\ndef f(x):\n    return math.sqrt(x)") and prog.rstrip().endswith("check(f)")


# -----------------------------------------------------------------------------
# SmolTalk (not available offline: a hand-made file in the hub's schema)

def _smoltalk_table(conversations):
    message = pa.struct([("content", pa.string()), ("role", pa.string())])
    return pa.table({"messages": pa.array(conversations, type=pa.list_(message)),
                     "source": pa.array(["hand-made"] * len(conversations))})


def test_smoltalk_rows_to_conversations(tmp_path):
    convs = [
        [{"content": "You are terse.", "role": "system"}, {"content": "Hi", "role": "user"},
         {"content": "Hello.", "role": "assistant"}],
        [{"content": "2+2?", "role": "user"}, {"content": "4", "role": "assistant"},
         {"content": "and 3+3?", "role": "user"}, {"content": "6", "role": "assistant"}],
    ]
    split_dir = tmp_path / "mirror" / "HuggingFaceTB--smol-smoltalk" / "default" / "test"
    split_dir.mkdir(parents=True)
    pq.write_table(_smoltalk_table(convs), split_dir / "00000.parquet")
    task = SmolTalk(split="test", base_dir=tmp_path / "base", mirror=f"file://{tmp_path / 'mirror'}")
    assert len(task) == 2 and task.eval_type == "generative"
    got = sorted((task[i] for i in range(2)), key=lambda c: len(c["messages"]))
    assert got[0]["messages"] == [{"role": m["role"], "content": m["content"]} for m in convs[0]]
    assert got[1]["messages"][3] == {"role": "assistant", "content": "6"}
    for conv in got:
        validate_conversation(conv)

    bad_dir = tmp_path / "bad" / "HuggingFaceTB--smol-smoltalk" / "default" / "train"
    bad_dir.mkdir(parents=True)
    pq.write_table(_smoltalk_table([[{"content": "Hi", "role": "assistant"}, {"content": "?", "role": "user"}]]),
                   bad_dir / "00000.parquet")
    bad = SmolTalk(split="train", base_dir=tmp_path / "base2", mirror=f"file://{tmp_path / 'bad'}")
    with pytest.raises(ValueError, match="SmolTalk train row 0: message 0 has role 'assistant'"):
        bad[0]


# -----------------------------------------------------------------------------
# Spelling

def test_word_list_crlf(words_file):
    task = SimpleSpelling(size=5, words_path=words_file)
    expected = [w for w in words_file.read_bytes().decode().split("\r\n") if w]
    assert len(task.words) == len(expected) and list(task.words[:3]) == expected[:3]
    assert all(w.isalpha() and w == w.strip() for w in task.words[::997])


def test_word_list_download(words_file, tmp_path, monkeypatch):
    task = SpellingBee(size=3, base_dir=tmp_path, words_url=f"file://{words_file}")
    assert (tmp_path / "words_alpha.txt").read_bytes() == words_file.read_bytes()
    with pytest.raises(FileNotFoundError, match="NANOCHAT_WORDS_URL"):
        SpellingBee(base_dir=tmp_path / "elsewhere", words_url=f"file://{tmp_path}/nothing.txt")
    import nanochat.tasks.spellingbee as spellingbee
    monkeypatch.setattr(spellingbee, "download_file", lambda *a, **k: pytest.fail("downloaded twice"))
    assert SimpleSpelling(size=3, base_dir=tmp_path).words == task.words


def test_spellingbee_conversations(words_file):
    task = SpellingBee(size=300, split="train", words_path=words_file)
    again = SpellingBee(size=300, split="train", words_path=words_file)
    test = SpellingBee(size=300, split="test", words_path=words_file)
    assert [task[i] for i in range(20)] == [again[i] for i in range(20)]  # deterministic per index
    assert sum(task[i] != test[i] for i in range(20)) >= 18  # splits draw independently
    zero_counts = 0
    for conv in task:
        validate_conversation(conv)
        parts = conv["messages"][1]["content"]
        assert [p["type"] for p in parts] == ["text", "text", "python", "python_output", "text"]
        word, letter = re.fullmatch(r"'([a-z]+)'\.count\('([a-z])'\)", parts[2]["text"]).groups()
        assert word in task.words
        count = word.count(letter)
        zero_counts += count == 0
        assert parts[3]["text"] == str(count) == calculate(parts[2]["text"])
        assert parts[4]["text"].endswith(f"#### {count}")
        assert f"{word}:{','.join(word)}" in parts[0]["text"]
        steps = re.findall(r"^(\d+):([a-z])( found, count=(\d+))?$", parts[0]["text"], re.MULTILINE)
        assert "".join(s[1] for s in steps) == word and [int(s[0]) for s in steps] == list(range(1, len(word) + 1))
        assert [int(s[3]) for s in steps if s[2]] == list(range(1, count + 1))
        assert task.evaluate(conv, f"... #### {count}") and not task.evaluate(conv, f"#### {count + 1}")
        assert task.reward(conv, f"#### {count}") == 1.0
    assert 0 < zero_counts < 100  # ~10% of questions ask for a letter the word may lack


def test_simple_spelling(words_file):
    task = SimpleSpelling(size=50, split="test", words_path=words_file)
    for conv in task:
        validate_conversation(conv)
        answer = conv["messages"][1]["content"]
        word, letters = answer.split(":")
        assert word in conv["messages"][0]["content"] and letters.split(",") == list(word)
        assert task.evaluate(conv, answer + "\n") and not task.evaluate(conv, answer[:-1])
    with pytest.raises(ValueError, match="split"):
        SimpleSpelling(split="validation", words_path=words_file)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SimpleSpelling(words_path=words_file.parent / "missing.txt")


# -----------------------------------------------------------------------------
# Slicing, mixtures, sequences

class Numbers(Task):
    """A tiny task whose example i is i (the unit under test is the Task machinery)."""

    def __init__(self, n, tag="n", **view):
        super().__init__(**view)
        self.n, self.tag = n, tag

    def num_examples(self):
        return self.n

    def get_example(self, index):
        return {"messages": [], "tag": self.tag, "i": index}


@pytest.mark.parametrize("start,stop,step", [(0, None, 1), (3, 17, 1), (2, None, 3), (5, 6, 4), (7, 7, 1), (4, 1000, 5)])
def test_slicing_matches_python_slices(start, stop, step):
    view = Numbers(23, start=start, stop=stop, step=step)
    expected = list(range(23))[start:stop:step]
    assert len(view) == len(expected)
    assert [c["i"] for c in view] == expected
    if expected:
        assert view[-1]["i"] == expected[-1]
    with pytest.raises(IndexError):
        view[len(expected)]


def test_slicing_real_task(hub):
    full = GSM8K(subset="main", split="test", **hub)
    part = GSM8K(subset="main", split="test", start=10, stop=40, step=3, **hub)
    assert [part[i] for i in range(len(part))] == [full[i] for i in range(10, 40, 3)]


@pytest.mark.parametrize("kwargs", [{"start": -1}, {"start": 5, "stop": 2}, {"step": 0}, {"stop": 2.5}])
def test_bad_slices(kwargs):
    with pytest.raises(ValueError):
        Numbers(10, **kwargs)


def test_mixture_coverage_oversampling_determinism():
    a, b = Numbers(50, "a"), Numbers(7, "b")
    mix = TaskMixture([a, b, b])  # b listed twice: oversampled 2x
    assert len(mix) == 64
    seen = [(c["tag"], c["i"]) for c in mix]
    counts = {key: seen.count(key) for key in set(seen)}
    assert counts == {**{("a", i): 1 for i in range(50)}, **{("b", i): 2 for i in range(7)}}
    assert seen == [(c["tag"], c["i"]) for c in TaskMixture([a, b, b])]  # same order every time
    assert seen != [(c["tag"], c["i"]) for c in TaskMixture([a, b, b], seed=1)]
    assert seen[:50] != [("a", i) for i in range(50)]  # actually mixed
    # the order the reference gets by shuffling (task, index) pairs with random.Random(42)
    pairs = [(t, i) for t, n in enumerate([50, 7, 7]) for i in range(n)]
    random.Random(42).shuffle(pairs)
    assert [mix.locate(k) for k in range(len(mix))] == pairs
    assert len(TaskMixture([a, b], stop=10)) == 10


def test_mixture_of_real_tasks(hub, words_file, shared_data):
    identity = CustomJSON(shared_data / "chat_sft" / "identity_conversations.jsonl", stop=40)
    tasks = [identity, GSM8K(subset="main", split="train", stop=30, **hub),
             SpellingBee(size=20, words_path=words_file), SimpleSpelling(size=20, words_path=words_file)]
    mix = TaskMixture(tasks)
    assert len(mix) == 110
    for conv in mix:
        validate_conversation(conv)
    first_user = [c["messages"][0]["content"] for c in mix]
    expected = [t[i]["messages"][0]["content"] for t in tasks for i in range(len(t))]
    assert sorted(first_user) == sorted(expected)


def test_sequence_is_concatenation():
    seq = TaskSequence([Numbers(3, "a"), Numbers(0, "z"), Numbers(4, "b")])
    assert [(c["tag"], c["i"]) for c in seq] == [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1), ("b", 2), ("b", 3)]
    assert [c["i"] for c in TaskSequence([Numbers(3), Numbers(4)], start=2, step=2)] == [2, 1, 3]
    with pytest.raises(ValueError):
        TaskSequence([])


# -----------------------------------------------------------------------------
# CustomJSON

def test_customjson_identity_conversations(shared_data):
    path = shared_data / "chat_sft" / "identity_conversations.jsonl"
    task = CustomJSON(path)
    assert len(task) == sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    for conv in (task[0], task[len(task) - 1]):
        validate_conversation(conv)
        assert conv["messages"][0]["role"] == "user"
    task[0]["messages"].clear()
    assert task[0]["messages"]  # callers get copies


def test_customjson_errors_name_file_and_line(tmp_path):
    good = json.dumps([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    lines = {
        1: good,
        2: '[{"role": "user", "content": "hi"}',                                                 # bad JSON
        3: json.dumps({"role": "user", "content": "hi"}),                                        # not a list
        4: json.dumps([{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]),       # unknown role
        5: json.dumps([{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]),  # wrong order
        6: json.dumps([{"role": "user", "content": "a"}, {"role": "assistant", "content": 3}]),   # non-string content
        7: "[]",                                                                                  # empty
        8: json.dumps([{"role": "user", "content": "a"}]),                                        # too short
        9: "",                                                                                    # blank: skipped
        10: json.dumps({"messages": json.loads(good)}),                                           # object form: fine
    }
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(lines[k] for k in sorted(lines)) + "\n", encoding="utf-8")
    with pytest.raises(ValueError) as info:
        CustomJSON(path)
    message = str(info.value)
    for lineno, what in [(2, "invalid JSON"), (3, "expected a JSON list"), (4, "unknown role 'bot'"),
                         (5, "role 'assistant' but should be 'user'"), (6, "content must be a string"),
                         (7, "empty"), (8, "at least a user and an assistant")]:
        (line,) = [m for m in message.splitlines() if m.startswith(f"{path}:{lineno}: ")]
        assert what in line
    for lineno in (1, 9, 10):
        assert f"{path}:{lineno}:" not in message
    assert message.startswith("7 malformed conversation(s)")

    ok = tmp_path / "ok.jsonl"
    ok.write_text(lines[1] + "\n\n" + lines[10] + "\n", encoding="utf-8")
    assert len(CustomJSON(ok)) == 2


def test_customjson_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl does not exist"):
        CustomJSON(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match="curl -L -o .*identity_conversations.jsonl"):
        CustomJSON(tmp_path / "identity_conversations.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no conversations"):
        CustomJSON(empty)
