"""RL on GSM8K: the reward, group advantages and the masked policy-gradient loss on
hand-made batches (exact numbers), then `nanochat rl` end to end at toy size through the
CLI (rollouts, finite loss, checkpoints, exact resume) and `chat-eval -i rl`."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nanochat import cli
from nanochat.stages import rl


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from a second intra-op thread, and on a busy 2-core
    machine its spin-waits make every small matmul many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -----------------------------------------------------------------------------
# Reward and advantages

def test_reward_is_one_for_the_right_final_answer(shared_data, tmp_path, monkeypatch):
    from nanochat.tasks.gsm8k import GSM8K, reference_answer
    monkeypatch.setenv("NANOCHAT_HF_MIRROR", (shared_data / "hf_schema").as_uri())
    task = GSM8K(subset="main", split="train", base_dir=tmp_path)
    conv = task[0]
    answer = reference_answer(conv)
    assert answer is not None
    assert task.reward(conv, f"Some working <|python_start|>1+1<|python_end|>.\n#### {answer}") == 1.0
    assert task.reward(conv, f"#### {float(answer) + 1:g}") == 0.0
    assert task.reward(conv, f"the answer is {answer}") == 0.0  # no "####": not graded as an answer


def test_advantages_subtract_the_group_mean_without_std():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0])
    adv = rl.compute_advantages(rewards, group_size=4)
    expected = torch.tensor([0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0, 0.0, -0.25, -0.25, -0.25, 0.75])
    assert torch.equal(adv, expected)
    with pytest.raises(ValueError, match="groups of 5"):
        rl.compute_advantages(rewards, group_size=5)


# -----------------------------------------------------------------------------
# The training batch

def test_build_rl_batch_trains_only_on_sampled_tokens():
    # prompt = 3 tokens; row 0 sampled 4 tokens, of which 21, 22 were forced tool output;
    # row 1 sampled 1 token and is padded; row 2's mask wrongly marks a prompt token.
    sequences = [[1, 2, 3, 10, 21, 22, 11], [1, 2, 3, 12], [1, 2, 3, 13, 14]]
    masks = [[0, 0, 0, 1, 0, 0, 1], [0, 0, 0, 1], [0, 1, 0, 1, 1]]
    inputs, targets = rl.build_rl_batch(sequences, masks, prompt_len=3, pad_id=99)
    assert inputs.tolist() == [[1, 2, 3, 10, 21, 22], [1, 2, 3, 12, 99, 99], [1, 2, 3, 13, 14, 99]]
    assert targets.tolist() == [[-1, -1, 10, -1, -1, 11], [-1, -1, 12, -1, -1, -1], [-1, -1, 13, 14, -1, -1]]
    assert inputs.dtype == targets.dtype == torch.long
    with pytest.raises(ValueError, match="mask has"):
        rl.build_rl_batch([[1, 2, 3]], [[0, 1]], prompt_len=1, pad_id=0)


class _Bigram(torch.nn.Module):
    """A model whose logits for the next token depend only on the current one, with the
    GPT's loss interface (per-token NLL, 0 where the target is -1)."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table.clone())

    def forward(self, idx, targets, loss_reduction="mean"):
        logits = self.table[idx]  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1, reduction=loss_reduction)


def test_policy_loss_exact_on_a_hand_made_batch():
    # uniform over V=4: every trained token has log p = -log 4
    model = _Bigram(torch.zeros(4, 4))
    inputs = torch.tensor([[0, 1, 2], [0, 3, 3]])
    targets = torch.tensor([[1, 2, -1], [-1, 3, -1]])  # 2 trained tokens in row 0, 1 in row 1
    adv = torch.tensor([0.5, -0.5])
    loss = rl.policy_loss(model, inputs, targets, adv)
    # -(0.5·2·(-log 4) + (-0.5)·1·(-log 4)) / 3 = log(4) / 6
    assert loss.item() == pytest.approx(math.log(4) / 6, abs=1e-7)
    # nothing trained on: 0, and backward still works
    zero = rl.policy_loss(model, inputs, torch.full_like(targets, -1), adv)
    zero.backward()
    assert zero.item() == 0.0


def test_policy_gradient_raises_the_likelihood_of_positive_advantage_tokens():
    torch.manual_seed(0)
    model = _Bigram(torch.randn(5, 5))
    inputs = torch.tensor([[0, 1], [0, 2]])
    targets = torch.tensor([[1, 4], [2, 3]])
    adv = torch.tensor([1.0, -1.0])
    logp = lambda: -model(inputs, targets, loss_reduction="none").view(2, 2).detach()  # noqa: E731
    before = logp()
    rl.policy_loss(model, inputs, targets, adv).backward()
    with torch.no_grad():
        model.table -= 0.5 * model.table.grad
    after = logp()
    assert (after[0] > before[0]).all() and (after[1] < before[1]).all()


def test_policy_loss_matches_log_softmax_of_the_real_gpt():
    from nanochat.gpt import GPTConfig, build_model
    torch.manual_seed(0)
    model = build_model(GPTConfig(sequence_len=32, vocab_size=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=32,
                                  window_pattern="L"), "cpu")
    with torch.no_grad():  # init_weights zeroes lm_head; give the test something to see
        model.lm_head.weight.normal_(0, 0.5)
    seqs = [[1, 5, 6, 7, 8, 9], [1, 5, 6, 30, 31], [1, 5, 6, 40, 41, 42, 43]]
    masks = [[0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1, 0, 1]]
    inputs, targets = rl.build_rl_batch(seqs, masks, prompt_len=3, pad_id=0)
    adv = rl.compute_advantages(torch.tensor([1.0, 0.0, 1.0]), group_size=3)
    loss = rl.policy_loss(model, inputs, targets, adv)
    with torch.no_grad():
        logp = torch.log_softmax(model(inputs), dim=-1)  # (B, T, V)
    expected, count = 0.0, 0
    for b in range(3):
        for t in range(targets.size(1)):
            if targets[b, t] >= 0:
                expected -= adv[b].item() * logp[b, t, targets[b, t]].item()
                count += 1
    assert count == 3 + 1 + 3
    assert loss.item() == pytest.approx(expected / count, rel=1e-5, abs=1e-6)


def test_rollout_seeds_are_reproducible_and_distinct():
    seeds = {rl.rollout_seed(42, s, i, c) for s in range(4) for i in range(8) for c in range(3)}
    assert len(seeds) == 4 * 8 * 3
    assert all(0 <= s < 2 ** 31 for s in seeds)
    assert rl.rollout_seed(42, 3, 5, 1) == rl.rollout_seed(42, 3, 5, 1)


def test_config_validation_lists_problems():
    cfg = rl.Config(num_samples=1, temperature=0.0, resume="first", eval_every=-2)  # -1 is the reference's "never"
    with pytest.raises(ValueError) as e:
        cfg.validate()
    msg = str(e.value)
    for flag in ("--num-samples", "--temperature", "--resume", "--eval-every"):
        assert flag in msg


# -----------------------------------------------------------------------------
# End to end through the CLI

TAG = "d2"  # the conftest's tiny base model


@pytest.fixture(scope="module")
def sft_base(tiny_base_checkpoint, shared_data, tmp_path_factory) -> Path:
    """A base dir with the tiny tokenizer and an SFT checkpoint made by `nanochat sft`
    (2 steps on GSM8K conversations) from the conftest's tiny base model. Read-only."""
    base = tmp_path_factory.mktemp("rl_base")
    for name in ("tokenizer", "base_checkpoints"):
        (base / name).symlink_to((tiny_base_checkpoint / name).resolve(), target_is_directory=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOCHAT_HF_MIRROR", (shared_data / "hf_schema").as_uri())
        assert cli.main(["sft", "-g", TAG, "--no-load-optimizer", "--mixture", "gsm8k@32", "--val-mixture",
                         "gsm8k-test@16", "--max-seq-len", "256", "--device-batch-size", "2", "--total-batch-size",
                         "512", "--num-iterations", "2", "--eval-every", "0", "--eval-tokens", "512",
                         "--chatcore-every", "0", "--device-type", "cpu", "--base-dir", str(base)]) == 0
    return base


RL_TOY = ["-g", TAG, "--examples-per-step", "2", "--num-samples", "4", "--device-batch-size", "2",
          "--max-new-tokens", "12", "--eval-every", "2", "--eval-examples", "2", "--eval-samples", "2",
          "--save-every", "1", "--device-type", "cpu"]


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_rl_cli_end_to_end_with_resume_then_chat_eval(sft_base, shared_data, tmp_path, monkeypatch):
    from nanochat import training
    from nanochat.checkpoint import checkpoint_dir
    from nanochat.report import read_sections

    monkeypatch.setenv("NANOCHAT_HF_MIRROR", (shared_data / "hf_schema").as_uri())
    housekeeping = []  # (step, first step) of each training.after_step call, which RL must make too
    after_step = training.after_step
    monkeypatch.setattr(training, "after_step", lambda step, first: (housekeeping.append((step, first)),
                                                                     after_step(step, first)))
    base = tmp_path / "base"
    shutil.copytree(sft_base, base)
    assert cli.main(["report", "--reset", "--base-dir", str(base)]) == 0
    args = ["rl", *RL_TOY, "--num-steps", "3", "--base-dir", str(base)]
    assert cli.main(args) == 0
    assert housekeeping == [(1, 0), (2, 0), (3, 0)]

    ckpt = checkpoint_dir(base, "rl", TAG)
    assert sorted(p.name for p in ckpt.glob("meta_*.json")) == [f"meta_00000{i}.json" for i in (1, 2, 3)]
    meta = json.loads((ckpt / "meta_000003.json").read_text())
    assert meta["step"] == 3 and meta["source"] == {"stage": "sft", "tag": TAG, "step": 2}
    assert meta["model_config"]["n_layer"] == 2
    records = _records(ckpt / "metrics.jsonl")
    steps = [r for r in records if "reward" in r]
    assert [r["step"] for r in steps] == [0, 1, 2]
    for r in steps:
        assert 0.0 <= r["reward"] <= 1.0 and math.isfinite(r["loss"]) and r["seq_len"] > 12
        assert r["trained_tokens"] > 0
    evals = [r for r in records if "pass@1" in r]
    assert [r["step"] for r in evals] == [0, 2, 3]
    assert all(0.0 <= r["pass@1"] <= r["pass@2"] <= 1.0 for r in evals)
    section = {s["title"]: s["data"] for s in read_sections(base)}["Chat RL"]
    assert section["metrics"]["steps"] == 3 and section["metrics"]["pass@1"] is not None

    # resume from step 1: steps 2 and 3 come out the same as the uninterrupted run
    final = torch.load(ckpt / "model_000003.pt", weights_only=True)
    housekeeping.clear()
    assert cli.main([*args, "--resume-from-step", "1"]) == 0
    assert housekeeping == [(2, 1), (3, 1)]
    again = torch.load(ckpt / "model_000003.pt", weights_only=True)
    assert final.keys() == again.keys()
    for k in final:
        assert torch.equal(final[k], again[k]), k
    records = _records(ckpt / "metrics.jsonl")
    assert [r["step"] for r in records if "reward" in r] == [0, 1, 2]  # the file reads as one run
    assert [r["step"] for r in records if "pass@1" in r] == [0, 2, 3]

    # the RL model is what `chat-eval -i rl` evaluates
    assert cli.main(["chat-eval", "-i", "rl", "-a", "GSM8K", "-x", "2", "-g", TAG,
                     "--max-new-tokens", "12", "--base-dir", str(base), "--device-type", "cpu"]) == 0
    section = {s["title"]: s["data"] for s in read_sections(base)}["Chat evaluation rl"]
    assert section["results"]["GSM8K"]["total"] == 2

    # ... and the report card shows it in the RL column, with the RL curves
    assert cli.main(["report", "-o", str(tmp_path / "card.md"), "--base-dir", str(base)]) == 0
    text = (tmp_path / "card.md").read_text()
    assert f"| GSM8K | - | - | {section['accuracy']['GSM8K']:.4f} |" in text
    assert "## Chat RL" in text and "![rl training](report-rl.png)" in text
    assert (tmp_path / "report-rl.png").read_bytes()[:4] == b"\x89PNG"


def test_rl_cli_reports_user_mistakes(sft_base, shared_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NANOCHAT_HF_MIRROR", (shared_data / "hf_schema").as_uri())
    assert cli.main(["rl", *RL_TOY, "--num-samples", "1", "--base-dir", str(sft_base)]) == 2
    assert "--num-samples" in capsys.readouterr().err
    assert cli.main(["rl", *RL_TOY, "--resume", "latest", "--output-tag", "nothing-here",
                     "--base-dir", str(sft_base)]) == 2
    assert "no checkpoint folder" in capsys.readouterr().err


class _HasACapital:
    """Real GSM8K questions with a toy reward a random model earns about half the time
    (its answer contains a capital letter), so that advantages are not all zero."""

    def __init__(self, task):
        self.task = task

    def __getitem__(self, i):
        return self.task[i]

    def reward(self, conversation, completion):
        return float(any(ch.isupper() for ch in completion))


def test_one_step_on_real_rollouts_moves_the_policy_toward_rewarded_answers(sft_base, shared_data, tmp_path,
                                                                             monkeypatch):
    from nanochat.checkpoint import load_model
    from nanochat.common import Runtime
    from nanochat.engine import Engine
    from nanochat.tasks.gsm8k import GSM8K
    from nanochat.training import optimizer_step

    monkeypatch.setenv("NANOCHAT_HF_MIRROR", (shared_data / "hf_schema").as_uri())
    runtime = Runtime(device=torch.device("cpu"), dtype=torch.float32, base_dir=sft_base)
    model, tokenizer, _ = load_model("sft", sft_base, "cpu", tag=TAG)
    task = _HasACapital(GSM8K(subset="main", split="train", base_dir=tmp_path))
    config = rl.Config(num_samples=6, device_batch_size=4, max_new_tokens=10)
    stats = rl.StepStats([], [], [])
    batches = list(rl.rollout_micro_batches(Engine(model, tokenizer), model, tokenizer, task, [0, 1], config, 0,
                                            torch.device("cpu"), stats))
    assert len(batches) == 2 * 2  # two questions × ceil(6 / 4) slices
    assert len(stats.rewards) == 12 and 0 < sum(stats.rewards) < 12
    assert stats.trained_tokens == sum(int((t >= 0).sum()) for _, t, _ in batches) > 0

    def objective() -> float:  # Σ_b A_b · log p(sampled tokens of b), the quantity RL climbs
        with torch.no_grad():
            return sum(-rl.policy_loss(model, *b).item() * int((b[1] >= 0).sum()) for b in batches)

    before = objective()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    loss = optimizer_step(model, optimizer, iter(batches), rl._rl_loss, runtime, num_micro_steps=len(batches))
    assert math.isfinite(loss) and loss != 0.0
    assert objective() > before
