"""Checkpoints: layout, bit-exact round trip (model + sharded optimizer state), crash
safety of saves, clear errors for missing/corrupt files, tag/step discovery, old keys."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from dataclasses import asdict

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from nanochat import checkpoint as ckpt
from nanochat.optim import MuonAdamW


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(40, 16)
        self.h = nn.ModuleList(nn.Linear(16, 16, bias=False) for _ in range(2))
        self.lm_head = nn.Linear(16, 40, bias=False)
        self.resid_lambdas = nn.Parameter(torch.ones(2))

    def forward(self, idx):
        x = self.wte(idx).float()
        for i, lin in enumerate(self.h):
            x = self.resid_lambdas[i] * x + torch.tanh(lin(x))
        return self.lm_head(x)


def trained(steps: int = 3, seed: int = 0) -> tuple[Small, MuonAdamW]:
    torch.manual_seed(seed)
    model = Small()
    model.wte.to(torch.bfloat16)  # mixed dtypes, as the reference's bf16 embeddings
    opt = MuonAdamW([
        dict(kind="adamw", params=[model.wte.weight, model.lm_head.weight], lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.01),
        dict(kind="adamw", params=[model.resid_lambdas], lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0),
        dict(kind="muon", params=list(model.h.parameters()), lr=0.02, momentum=0.95, ns_steps=5, beta2=0.9, weight_decay=0.1),
    ])
    for _ in range(steps):
        idx = torch.randint(0, 40, (4, 8))
        model(idx).logsumexp(-1).mean().backward()
        opt.step()
        model.zero_grad(set_to_none=True)
    return model, opt


_TRAINED: dict[int, tuple[Small, MuonAdamW]] = {}


def save_step(d, step, seed=0, **kw):
    """Save a checkpoint of a (cached, so cheap) trained model; don't mutate the result."""
    if seed not in _TRAINED:
        _TRAINED[seed] = trained(seed=seed)
    model, opt = _TRAINED[seed]
    meta = {"step": step, "model_config": {"n_layer": 2}, "loop_state": {"min_val_bpb": 1.25}}
    ckpt.save_checkpoint(d, step, model.state_dict(), opt.state_dict(), meta, **kw)
    return model, opt, meta


def assert_same(a, b):
    """Recursive bit-exact equality of nested dicts/lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


# -----------------------------------------------------------------------------

def test_layout_uses_the_reference_directory_names(tmp_path):
    assert ckpt.checkpoint_dir(tmp_path, "base", "d12") == tmp_path / "base_checkpoints" / "d12"
    assert ckpt.checkpoint_dir(tmp_path, "sft", "d12") == tmp_path / "chatsft_checkpoints" / "d12"
    assert ckpt.checkpoint_dir(tmp_path, "rl", "d12") == tmp_path / "chatrl_checkpoints" / "d12"
    with pytest.raises(ValueError, match="unknown checkpoint stage"):
        ckpt.checkpoint_dir(tmp_path, "mid", "d12")
    d = ckpt.checkpoint_dir(tmp_path, "base", "d2")
    save_step(d, 7)
    assert sorted(p.name for p in d.iterdir()) == ["meta_000007.json", "model_000007.pt", "optim_000007_rank0.pt"]


def test_round_trip_is_bit_exact_including_optimizer_state(tmp_path):
    d = tmp_path / "base_checkpoints" / "d2"
    model, opt = trained()
    meta = {"step": 5, "model_config": {"n_layer": 2}, "loop_state": {"min_val_bpb": 1.25}}
    ckpt.save_checkpoint(d, 5, model.state_dict(), opt.state_dict(), meta)
    model_state, optim_state, meta2 = ckpt.load_checkpoint(d, 5, "cpu", load_optimizer=True)
    assert_same(model.state_dict(), model_state)
    assert model_state["wte.weight"].dtype == torch.bfloat16
    assert_same(opt.state_dict(), optim_state)
    assert meta2 == meta
    _, no_optim, _ = ckpt.load_checkpoint(d, 5, "cpu")
    assert no_optim is None
    # the loaded state resumes the same trajectory
    twin, twin_opt = trained(steps=0, seed=1)
    twin.load_state_dict(model_state)
    twin_opt.load_state_dict(optim_state)
    for m, o in ((model, opt), (twin, twin_opt)):
        torch.manual_seed(9)
        m(torch.randint(0, 40, (4, 8))).logsumexp(-1).mean().backward()
        o.step()
    assert_same(model.state_dict(), twin.state_dict())


def test_interrupted_saves_leave_the_previous_checkpoint(tmp_path, monkeypatch):
    d = tmp_path / "base_checkpoints" / "d2"
    model, opt, _ = save_step(d, 10)

    # 1) the model write fails half way: no trace of step 20 at all
    real_save = torch.save

    def failing_save(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        with open(f, "r+b") as fh:
            fh.truncate(100)
        raise OSError("disk full")
    monkeypatch.setattr(ckpt.torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(d, 20, model.state_dict(), opt.state_dict(), {"step": 20})
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    assert sorted(p.name for p in d.iterdir()) == ["meta_000010.json", "model_000010.pt", "optim_000010_rank0.pt"]

    # 2) model and optimizer written, crash before the meta: step 30 is incomplete
    def crash(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(ckpt, "atomic_write_text", crash)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(d, 30, model.state_dict(), opt.state_dict(), {"step": 30})
    assert ckpt.model_path(d, 30).exists() and not ckpt.meta_path(d, 30).exists()
    assert ckpt.find_last_step(d) == 10
    with pytest.raises(ValueError, match=r"step 30 .* incomplete .*latest complete: 10"):
        ckpt.load_checkpoint(d, 30, "cpu")

    # 3) re-saving step 10 and crashing before its meta: step 10 no longer looks complete
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(d, 10, model.state_dict(), opt.state_dict(), {"step": 10})
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        ckpt.find_last_step(d)

    # a meta that is not JSON fails before anything is touched
    monkeypatch.undo()
    save_step(d, 40)
    with pytest.raises(ValueError, match="JSON"):
        ckpt.save_checkpoint(d, 40, model.state_dict(), None, {"when": object()})
    assert ckpt.find_last_step(d) == 40


@pytest.mark.slow
def test_a_killed_save_is_ignored(tmp_path):
    """A real process is SIGKILLed while writing step 2's model (no cleanup runs)."""
    d = tmp_path / "base_checkpoints" / "d2"
    script = textwrap.dedent(f"""
        import os, signal, torch
        from nanochat import checkpoint as ckpt
        state = {{"w": torch.arange(10_000.0)}}
        ckpt.save_checkpoint({str(d)!r}, 1, state, None, {{"step": 1}})
        real = torch.save
        def dying_save(obj, f, *a, **k):
            real(obj, f, *a, **k)
            with open(f, "r+b") as fh:
                fh.truncate(500)
            os.kill(os.getpid(), signal.SIGKILL)
        ckpt.torch.save = dying_save
        ckpt.save_checkpoint({str(d)!r}, 2, state, None, {{"step": 2}})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert any(p.name.endswith(".tmp") for p in d.iterdir())  # the half-written file is left behind...
    assert ckpt.find_last_step(d) == 1                          # ...and ignored
    model_state, _, meta = ckpt.load_checkpoint(d, 1, "cpu")
    assert torch.equal(model_state["w"], torch.arange(10_000.0)) and meta == {"step": 1}


def test_missing_and_corrupt_files_give_clear_errors(tmp_path):
    root = tmp_path / "base_checkpoints"
    with pytest.raises(FileNotFoundError, match="nanochat base-train"):
        ckpt.find_last_step(root / "d2")
    with pytest.raises(FileNotFoundError, match="nanochat sft"):
        ckpt.find_largest_tag(tmp_path / "chatsft_checkpoints")
    d = root / "d2"
    save_step(d, 3)
    save_step(d, 6)
    with pytest.raises(FileNotFoundError, match=r"step 4 .*\[3, 6\]"):
        ckpt.load_checkpoint(d, 4, "cpu")
    with pytest.raises(FileNotFoundError, match="as many processes as saved it"):
        ckpt.load_checkpoint(d, 6, "cpu", load_optimizer=True, rank=1)
    # truncated model file
    path = ckpt.model_path(d, 6)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ValueError, match=r"model_000006\.pt is unreadable.*delete step 6.*latest complete: 3"):
        ckpt.load_checkpoint(d, 6, "cpu")
    # bad JSON
    ckpt.meta_path(d, 3).write_text('{"step": 3, ')
    with pytest.raises(ValueError, match=r"meta_000003\.json is not valid JSON"):
        ckpt.load_checkpoint(d, 3, "cpu")
    # corrupt optimizer shard
    ckpt.optim_path(d, 6).write_bytes(b"garbage")
    ckpt.model_path(d, 6).unlink()
    save_step(d, 6)
    ckpt.optim_path(d, 6).write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"optim_000006_rank0\.pt is unreadable"):
        ckpt.load_checkpoint(d, 6, "cpu", load_optimizer=True)


def test_find_largest_tag_and_last_step(tmp_path):
    root = tmp_path / "base_checkpoints"
    for tag in ("d4", "d12", "d8"):
        save_step(root / tag, 1)
    (root / "d20").mkdir()                      # no complete checkpoint: not a candidate
    torch.save({}, ckpt.model_path(root / "d20", 5))
    assert ckpt.find_largest_tag(root) == "d12"
    # without depth tags: the most recently written
    other = tmp_path / "chatsft_checkpoints"
    for i, tag in enumerate(("alpha", "beta", "gamma")):
        save_step(other / tag, 1)
        os.utime(ckpt.meta_path(other / tag, 1), (1000 + i, 1000 + [5, 9, 1][i]))
    assert ckpt.find_largest_tag(other) == "beta"
    save_step(root / "d4", 20)
    save_step(root / "d4", 100)
    assert ckpt.find_last_step(root / "d4") == 100
    assert ckpt.complete_steps(root / "d4") == [1, 20, 100]


def test_prune_and_keep_last(tmp_path):
    d = tmp_path / "rl"
    for step in (1, 2, 3):
        save_step(d, step)
    save_step(d, 4, keep_last=2)
    assert ckpt.complete_steps(d) == [3, 4]
    assert not list(d.glob("*_000001*")) and not list(d.glob("*_000002*"))
    assert ckpt.prune_checkpoints(d, 1) == [3]
    with pytest.raises(ValueError, match="at least 1"):
        ckpt.prune_checkpoints(d, 0)


def test_old_checkpoint_keys_are_mapped():
    model = Small()
    expected = model.state_dict()
    old = {"_orig_mod." + k: v.clone() for k, v in expected.items() if k != "resid_lambdas"}
    patched = ckpt.patch_model_state(old, expected)
    assert patched.keys() == expected.keys()
    assert torch.equal(patched["resid_lambdas"], torch.ones(2))
    model.load_state_dict(patched, strict=True)
    assert ckpt.patch_model_config({"n_layer": 2}) == {"n_layer": 2, "window_pattern": "L"}
    assert ckpt.patch_model_config({"window_pattern": "SSSL"})["window_pattern"] == "SSSL"


# -----------------------------------------------------------------------------
# 2 gloo ranks: each writes its shard, rank 0 the model and (last) the meta

def _save_worker(rank: int, world: int, port: int, d: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, opt = trained(steps=2)
        ckpt.save_checkpoint(d, 2, model.state_dict() if rank == 0 else None, opt.state_dict(), {"step": 2}, rank=rank)
        _, optim_state, _ = ckpt.load_checkpoint(d, 2, "cpu", load_optimizer=True, rank=rank)
        assert optim_state["sharding"] == {"world_size": 2, "rank": rank}
        assert_same(opt.state_dict(), optim_state)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_save_their_shards(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = tmp_path / "base_checkpoints" / "d2"
    mp.spawn(_save_worker, args=(2, port, str(d)), nprocs=2, join=True)
    assert sorted(p.name for p in d.iterdir()) == [
        "meta_000002.json", "model_000002.pt", "optim_000002_rank0.pt", "optim_000002_rank1.pt"]
    assert json.loads(ckpt.meta_path(d, 2).read_text()) == {"step": 2}


# -----------------------------------------------------------------------------
# load_model with the real GPT and tokenizer

def test_load_model_builds_the_gpt_from_a_reference_style_checkpoint(tiny_tokenizer_dir, tmp_path):
    gpt = pytest.importorskip("nanochat.gpt")
    base = tmp_path / "base"
    shutil.copytree(tiny_tokenizer_dir / "tokenizer", base / "tokenizer")
    vocab = 2048  # the tiny tokenizer's
    config = gpt.GPTConfig(sequence_len=32, vocab_size=vocab, n_layer=2, n_head=2, n_kv_head=2, n_embd=32)
    torch.manual_seed(0)
    model = gpt.build_model(config, torch.device("cpu"), torch.float32)
    state = model.state_dict()
    model_config = asdict(config)
    model_config.pop("window_pattern", None)  # as in checkpoints older than sliding windows
    # saved from a compiled model, before the per-layer lambdas existed
    old_state = {"_orig_mod." + k: v for k, v in state.items() if k not in ("resid_lambdas", "x0_lambdas")}
    d = ckpt.checkpoint_dir(base, "base", "d2")
    ckpt.save_checkpoint(d, 50, old_state, None, {"step": 50, "model_config": model_config})
    loaded, tokenizer, meta = ckpt.load_model("base", base, "cpu")
    assert meta["step"] == 50 and not loaded.training
    assert loaded.config.window_pattern == "L"  # old checkpoints: full context everywhere
    assert tokenizer.get_vocab_size() == vocab
    loaded_state = loaded.state_dict()
    assert loaded_state.keys() == state.keys()
    for k, v in loaded_state.items():
        if k not in ("resid_lambdas", "x0_lambdas"):
            assert torch.equal(v.float(), state[k].float()), k
    assert torch.equal(loaded_state["resid_lambdas"], torch.ones(2))   # neutral: identity scaling
    assert torch.equal(loaded_state["x0_lambdas"], torch.zeros(2))     # neutral: no x0 skip
    with pytest.raises(FileNotFoundError, match="tags present: \\['d2'\\]"):
        ckpt.load_model("base", base, "cpu", tag="d9")
    with pytest.raises(FileNotFoundError, match="nanochat sft"):
        ckpt.load_model("sft", base, "cpu")
