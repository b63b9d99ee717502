"""Chat scoring (nanochat.chat_scoring, shared by chat-eval, sft and rl): pass@k and
ChatCORE arithmetic, multiple-choice scoring from letter logits (batched = one by one =
an independent computation), sampled tasks with pass@k, problems split over ranks; and
chat-eval's user mistakes. The CLI end to end runs in test_sft.py on a fine-tuned model."""
from __future__ import annotations

import itertools

import pytest
import torch

from nanochat import chat_scoring, cli
from nanochat.chat_scoring import chatcore, pass_at_k, run_chat_eval
from nanochat.stages import chat_eval
from nanochat.stages.chat_eval import parse_task_names


@pytest.fixture(scope="module")
def tiny(tiny_base_checkpoint):
    from nanochat.checkpoint import load_model
    model, tokenizer, _ = load_model("base", tiny_base_checkpoint, "cpu", torch.float32)
    return model, tokenizer


@pytest.fixture(scope="module")
def hub(shared_data, tmp_path_factory) -> dict:
    return {"base_dir": tmp_path_factory.mktemp("chat_eval_hub"), "mirror": (shared_data / "hf_schema").as_uri()}


def test_pass_at_k_matches_enumeration():
    # pass@k = P(at least one correct among k of the n samples drawn without replacement)
    for n, c in [(4, 0), (4, 1), (5, 2), (6, 6), (6, 3)]:
        outcomes = [1] * c + [0] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(outcomes, k))
            assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets)), (n, c, k)


def test_chatcore_is_mean_centered_accuracy():
    acc = {"ARC-Easy": 0.25, "ARC-Challenge": 0.5, "MMLU": 1.0, "GSM8K": 0.1, "HumanEval": 0.0, "SpellingBee": 0.3}
    # centered: 0, 1/3, 1, 0.1, 0, 0.3
    assert chatcore(acc) == pytest.approx((0 + 1 / 3 + 1 + 0.1 + 0 + 0.3) / 6)
    assert chatcore({k: v for k, v in acc.items() if k != "HumanEval"}) is None
    assert chatcore(acc, tasks=chat_scoring.CATEGORICAL_TASKS) == pytest.approx((0 + 1 / 3 + 1) / 3)
    assert parse_task_names(" ARC-Easy | GSM8K|GSM8K ") == ["ARC-Easy", "GSM8K"]


def test_config_errors(tmp_path, capsys):
    with pytest.raises(ValueError) as e:
        chat_eval.Config(task_name="ARC-Eazy|GSM8K", num_samples=4, temperature=0.0, max_problems=0).validate()
    msg = str(e.value)
    assert "unknown task(s) ['ARC-Eazy']" in msg and "greedy completion N times" in msg and "--max-problems" in msg
    assert cli.main(["chat-eval", "-a", "HumanEvil", "--base-dir", str(tmp_path)]) == 2
    assert "HumanEvil" in capsys.readouterr().err
    # no SFT model yet: says what to run
    assert cli.main(["chat-eval", "-i", "sft", "--device-type", "cpu", "--base-dir", str(tmp_path)]) == 2
    assert "nanochat sft" in capsys.readouterr().err


@torch.no_grad()
def _predict_one_by_one(model, tokenizer, task, n: int) -> int:
    """Independent scoring: each prompt alone (no padding), letters looked up by hand."""
    passed = 0
    for i in range(n):
        conv = task[i]
        ids = tokenizer.render_for_completion(conv)
        logits = model(torch.tensor([ids]))[0, -1]  # (vocab,)
        scores = [logits[tokenizer.encode(letter)[0]].item() for letter in conv["letters"]]
        predicted = conv["letters"][max(range(len(scores)), key=scores.__getitem__)]
        passed += predicted == conv["messages"][-1]["content"]
    return passed


def test_categorical_scoring_batched_equals_single(tiny, hub):
    model, tokenizer = tiny
    task = chat_scoring.load_task("ARC-Easy", **hub)
    n = 8
    expected = _predict_one_by_one(model, tokenizer, task, n)
    for batch_size in (1, 4):
        result = run_chat_eval(model, tokenizer, "ARC-Easy", task=task, batch_size=batch_size, max_problems=n)
        assert (result.passed, result.total) == (expected, n)
    # rank r of 2 takes batches r, r+2, ...; together they cover every problem once
    halves = [run_chat_eval(model, tokenizer, "ARC-Easy", task=task, batch_size=3, max_problems=n, rank=r,
                            world_size=2) for r in (0, 1)]
    assert [h.total for h in halves] == [5, 3]  # batches {0, 2} and {1} of sizes 3, 3, 2
    assert sum(h.passed for h in halves) == expected


def test_generative_pass_at_k_and_ranks(tiny, hub):
    model, tokenizer = tiny
    task = chat_scoring.load_task("GSM8K", **hub)
    result = run_chat_eval(model, tokenizer, "GSM8K", task=task, num_samples=3, temperature=1.0, max_new_tokens=6,
                           max_problems=3)
    assert result.total == 3 and result.num_samples == 3 and set(result.pass_at_k) == {1, 2, 3}
    assert 0.0 <= result.pass_at_k[1] <= result.pass_at_k[2] <= result.pass_at_k[3] == result.accuracy <= 1.0
    # the same seeds per problem: a rank split gives the same counts
    parts = [run_chat_eval(model, tokenizer, "GSM8K", task=task, num_samples=3, temperature=1.0, max_new_tokens=6,
                           max_problems=3, rank=r, world_size=2) for r in (0, 1)]
    assert [p.total for p in parts] == [2, 1]
    assert sum(p.passed for p in parts) == result.passed


def _greedy_task(answers):
    from nanochat.tasks import Task

    class Greedy(Task):
        eval_type = "generative"

        def num_examples(self):
            return len(answers)

        def get_example(self, i):
            return {"messages": [{"role": "user", "content": f"Say something about {i}"},
                                 {"role": "assistant", "content": answers[i]}], "index": i}

        def evaluate(self, conv, completion):
            return completion == answers[conv["index"]]

    return Greedy()


def test_generative_grades_what_the_model_wrote(tiny):
    """When the reference answers are the model's own greedy completions every problem
    passes; changed by one character, none does: the grader gets the decoded
    completion (not the prompt, not a truncated or special-token-laden string)."""
    from nanochat.engine import Engine

    model, tokenizer = tiny
    engine = Engine(model, tokenizer)
    probe = _greedy_task(["", ""])
    answers = []
    for i in range(2):
        prompt = tokenizer.render_for_completion(probe[i])
        seqs, _ = engine.generate_batch(prompt, num_samples=1, max_tokens=5, temperature=0.0, seed=42 + i)
        answers.append(tokenizer.decode(seqs[0][len(prompt):]))
    assert all(answers)  # the tiny model writes something
    right = run_chat_eval(model, tokenizer, "Greedy", task=_greedy_task(answers), max_new_tokens=5, engine=engine)
    wrong = run_chat_eval(model, tokenizer, "Greedy", task=_greedy_task([a + "!" for a in answers]), max_new_tokens=5)
    assert (right.passed, right.total) == (2, 2) and (wrong.passed, wrong.total) == (0, 2)
