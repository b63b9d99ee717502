"""The loop every training stage runs (`train_loop`), its resume helpers and its clean-up,
on a tiny linear model with real checkpoints on disk."""
from __future__ import annotations

import gc
import math
import io
import json

import pytest
import torch

from logcapture import capture_log
from nanochat import checkpoint as ckpt
from nanochat.common import Runtime
from nanochat.training import (MetricSink, NonFiniteLossError, StepLogger, find_resume_step, make_grad_scaler,
                               optimizer_step, restore_checkpoint, train_loop)

MODEL_CONFIG = {"n_in": 4, "n_out": 3}


class _Sink(MetricSink):
    def __init__(self):
        self.records: list[dict] = []
        self.closed = False

    def log(self, record: dict) -> None:
        self.records.append(record)

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def training_log():
    with capture_log("nanochat.training") as handler:
        yield handler


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(MODEL_CONFIG["n_in"], MODEL_CONFIG["n_out"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    return model, optimizer


def _run(tmp_path, *, num_steps=5, save_every=2, resume_step=None, step=0, fail_at=None, seed=0):
    """Train `model` on a fixed regression task with `train_loop`; returns what each
    callback saw, the loop's result and the objects it was given."""
    model, optimizer = _setup(seed)
    runtime = Runtime(device=torch.device("cpu"), dtype=torch.float32, base_dir=tmp_path)
    if resume_step is not None:
        restore_checkpoint(tmp_path, resume_step, model, optimizer, runtime, model_config=MODEL_CONFIG, mismatch="")
    sink = _Sink()
    logger = StepLogger(num_steps, 1, 1.0, 0.0, sink, stream=io.StringIO())
    seen = {"evaluate": [], "train": [], "gc_enabled": [], "closed": 0}
    x, y = torch.randn(8, 4, generator=torch.Generator().manual_seed(1)), torch.zeros(8, 3)

    def train_step(s: int) -> dict:
        seen["train"].append(s)
        seen["gc_enabled"].append(gc.isenabled())
        if s == fail_at:
            raise NonFiniteLossError("the training loss is nan")
        loss = optimizer_step(model, optimizer, [(x, y)], lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]),
                              runtime, num_micro_steps=1)
        return logger.step(s, loss, 0.01, 1.0)

    def close():
        seen["closed"] += 1

    result = train_loop(step=step, model=model, optimizer=optimizer, runtime=runtime, logger=logger,
                        ckpt_dir=tmp_path, save_every=save_every, resume_step=resume_step,
                        is_last=lambda s: s == num_steps, evaluate=lambda s, last: seen["evaluate"].append((s, last)),
                        checkpoint_meta=lambda s: {"step": s, "model_config": MODEL_CONFIG}, train_step=train_step,
                        close=close)
    return seen, result, model, sink


def _saved_steps(d) -> list[int]:
    return sorted(json.loads(p.read_text())["step"] for p in d.glob("meta_*.json"))


def test_loop_evaluates_trains_and_saves_on_schedule(tmp_path):
    seen, (final_step, record), model, sink = _run(tmp_path, num_steps=5, save_every=2)
    assert final_step == 5 and record["step"] == 4 and record is sink.records[-1]
    assert seen["evaluate"] == [(0, False), (1, False), (2, False), (3, False), (4, False), (5, True)]
    assert seen["train"] == [0, 1, 2, 3, 4]
    # every save_every steps (not step 0) and at the end, in the reference layout
    assert _saved_steps(tmp_path) == [2, 4, 5]
    assert ckpt.model_path(tmp_path, 5).is_file() and ckpt.optim_path(tmp_path, 5, 0).is_file()
    saved = torch.load(ckpt.model_path(tmp_path, 5), weights_only=True)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in saved.items())


def test_loop_housekeeping_and_clean_up(tmp_path):
    seen, _, _, sink = _run(tmp_path, num_steps=4, save_every=0)
    # after_step: automatic GC off from the second step on, and back on when the loop ends
    assert seen["gc_enabled"] == [True, False, False, False]
    assert gc.isenabled()
    assert sink.closed and seen["closed"] == 1
    assert _saved_steps(tmp_path) == [4]  # save_every 0: only at the end


def test_loop_stops_on_a_non_finite_loss_keeping_the_last_good_checkpoint(tmp_path, training_log):
    with pytest.raises(NonFiniteLossError):
        _run(tmp_path, num_steps=6, save_every=2, fail_at=3)
    assert _saved_steps(tmp_path) == [2]
    assert "stopping at step 3: the loss is not finite; the last good checkpoint is kept" in training_log.messages
    assert gc.isenabled()


def test_resume_restores_exactly_and_does_not_save_the_resumed_step_again(tmp_path):
    straight = tmp_path / "straight"
    _, _, model_straight, _ = _run(straight, num_steps=6, save_every=3)
    assert _saved_steps(straight) == [3, 6]
    for p in straight.glob("*_000006*"):
        p.unlink()  # a run interrupted after step 3
    before = ckpt.meta_path(straight, 3).stat().st_mtime_ns
    assert find_resume_step(straight, None, "latest") == 3
    seen, (final_step, _), model_resumed, _ = _run(straight, num_steps=6, save_every=3, resume_step=3, step=3,
                                                   seed=123)  # other init: everything comes from the checkpoint
    assert final_step == 6 and seen["train"] == [3, 4, 5]
    assert ckpt.meta_path(straight, 3).stat().st_mtime_ns == before  # not rewritten
    for k, v in model_straight.state_dict().items():
        assert torch.equal(v, model_resumed.state_dict()[k]), k


def test_find_resume_step_and_restore_errors(tmp_path):
    assert find_resume_step(tmp_path, None, None) is None
    assert find_resume_step(tmp_path, 7, None) == 7
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        find_resume_step(tmp_path, None, "latest")
    _run(tmp_path, num_steps=2, save_every=0)
    model, optimizer = _setup()
    runtime = Runtime(device=torch.device("cpu"), dtype=torch.float32, base_dir=tmp_path)
    with pytest.raises(ValueError, match=r"in .* has \{'n_in': 4, 'n_out': 3\}, not \{'n_in': 5\}"):
        restore_checkpoint(tmp_path, 2, model, optimizer, runtime, model_config={"n_in": 5},
                           mismatch="the checkpoint in {ckpt_dir} has {saved}, not {expected}")


def test_fp16_trains_with_a_working_loss_scaler_on_the_cpu():
    """The scaler is built for the runtime's device: on the CPU it scales (a CUDA-default
    GradScaler disables itself there), unscales before the step, and a GPT computing in
    fp16 learns a batch."""
    from nanochat.gpt import GPTConfig, build_model

    rt = Runtime(device=torch.device("cpu"), dtype=torch.float16)
    scaler = make_grad_scaler(rt)
    assert scaler is not None and scaler.is_enabled() and scaler.get_scale() > 1
    assert make_grad_scaler(Runtime(device=torch.device("cpu"), dtype=torch.bfloat16)) is None
    torch.manual_seed(0)
    config = GPTConfig(sequence_len=32, vocab_size=128, n_layer=2, n_head=2, n_kv_head=2, n_embd=64, window_pattern="L")
    model = build_model(config, rt.device, rt.dtype)
    optimizer = model.setup_optimizer()
    seq = torch.randint(0, 128, (4, 33), generator=torch.Generator().manual_seed(1))
    batch = (seq[:, :-1], seq[:, 1:])
    losses = [optimizer_step(model, optimizer, iter([batch]), lambda m, b: m(*b), rt, num_micro_steps=1,
                             scaler=scaler) for _ in range(12)]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.7 * losses[0], losses
    assert scaler.get_scale() > 1
