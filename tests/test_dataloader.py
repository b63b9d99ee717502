"""nanochat.dataloader on the real OpenStax shards with tiktoken's GPT-2 encoding
(BOS = <|endoftext|>): packing checked against an independent, deliberately naive
best-fit packer; exact resume; DDP sharding; the background thread's lifecycle."""
from __future__ import annotations

import gc
import json
import logging
import random
import threading
import time
from pathlib import Path

import pytest
import torch

from nanochat.dataloader import BestFitBuffer, cropped_fraction, pretrain_batches
from nanochat.dataset import parquets_iter_batched


class GPT2Tokenizer:
    """The two methods the loader needs, on tiktoken's GPT-2 encoding."""

    def __init__(self):
        import tiktoken
        self.enc = tiktoken.get_encoding("gpt2")
        self.calls = 0

    def get_bos_token_id(self) -> int:
        return self.enc.eot_token

    def encode(self, texts: list[str], prepend: int | None = None, num_threads: int = 4) -> list[list[int]]:
        self.calls += 1
        rows = self.enc.encode_ordinary_batch(texts, num_threads=num_threads)
        return [[prepend, *r] for r in rows] if prepend is not None else rows


@pytest.fixture(scope="module")
def tok() -> GPT2Tokenizer:
    return GPT2Tokenizer()


@pytest.fixture(scope="module")
def base(shared_data, tmp_path_factory) -> Path:
    """A base dir whose base_data/ links to the six OpenStax shards (shard_00005 = val)."""
    root = tmp_path_factory.mktemp("loader_base")
    (root / "base_data").mkdir()
    for shard in sorted((shared_data / "pretrain_openstax" / "base_data").glob("*.parquet")):
        (root / "base_data" / shard.name).symlink_to(shard)
    return root


def take(loader, n: int) -> list[tuple[torch.Tensor, torch.Tensor, dict]]:
    out = [next(loader) for _ in range(n)]
    loader.close()
    return out


def naive_rows(tok, split, base, *, T, num_rows, rank=0, world_size=1, buffer_size, batch_docs):
    """Best-fit packing written the plain way: linear scans over a list, documents read
    row group by row group (rank-strided), in chunks of `batch_docs`, forever."""
    def chunks():
        while True:
            for texts in parquets_iter_batched(split, base, start=rank, step=world_size):
                for i in range(0, len(texts), batch_docs):
                    yield texts[i:i + batch_docs]

    source, buffer, rows, cropped = chunks(), [], [], 0
    bos = tok.get_bos_token_id()
    for _ in range(num_rows):
        row: list[int] = []
        while len(row) < T + 1:
            while len(buffer) < buffer_size:
                buffer.extend(tok.encode(next(source), prepend=bos))
            space = T + 1 - len(row)
            fitting = [i for i, d in enumerate(buffer) if len(d) <= space]
            if fitting:
                best = max(fitting, key=lambda i: (len(buffer[i]), -i))  # largest, then oldest
                row += buffer.pop(best)
            else:
                shortest = min(range(len(buffer)), key=lambda i: (len(buffer[i]), i))
                doc = buffer.pop(shortest)
                cropped += len(doc) - space
                row += doc[:space]
        rows.append(row)
    return torch.tensor(rows), cropped


def loader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("nanochat-dataloader")]


# -----------------------------------------------------------------------------

def test_batches_equal_an_independent_best_fit_packer(tok, base):
    B, T, nb = 3, 200, 5
    kw = dict(buffer_size=24, tokenizer_batch_size=8)
    batches = take(pretrain_batches(tok, B, T, "train", base_dir=base, **kw), nb)
    rows, cropped = naive_rows(tok, "train", base, T=T, num_rows=B * nb, buffer_size=24, batch_docs=8)
    bos = tok.get_bos_token_id()
    for k, (x, y, state) in enumerate(batches):
        assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64
        assert x.device.type == "cpu" and x.is_contiguous() and y.is_contiguous()
        assert (x[:, 0] == bos).all()
        assert torch.equal(x[:, 1:], y[:, :-1])
        assert torch.equal(x, rows[k * B:(k + 1) * B, :-1]) and torch.equal(y, rows[k * B:(k + 1) * B, 1:])
        json.dumps(state)
    state = batches[-1][2]
    assert state["packed_tokens"] == B * nb * (T + 1)
    assert state["cropped_tokens"] == cropped > 0


def test_ranks_read_disjoint_row_groups(tok, base):
    kw = dict(buffer_size=16, tokenizer_batch_size=8)
    seen = []
    for rank in (0, 1):
        batches = take(pretrain_batches(tok, 2, 96, "train", base_dir=base, rank=rank, world_size=2, **kw), 4)
        rows, _ = naive_rows(tok, "train", base, T=96, num_rows=8, rank=rank, world_size=2, buffer_size=16, batch_docs=8)
        assert torch.equal(torch.cat([x for x, _, _ in batches]), rows[:, :-1])
        refs = set()
        for _, _, state in batches:
            assert state["row_group"] % 2 == rank and state["rank"] == rank
            for shard, rg, _docs in state["buffer"]:
                assert rg % 2 == rank
                refs.add((shard, rg))
        seen.append(refs)
    assert seen[0] and seen[1] and not seen[0] & seen[1]


@pytest.mark.parametrize("split,rank,world_size,T", [("train", 0, 1, 128), ("val", 1, 2, 64)])
def test_resume_is_exact(tok, base, split, rank, world_size, T):
    # val rank 1 of 2 owns only row group 1 of the val shard (15 documents): the buffer
    # of 16 holds repeats of the same documents and the reader wraps epochs constantly
    kw = dict(base_dir=base, rank=rank, world_size=world_size, buffer_size=16, tokenizer_batch_size=8)
    full = take(pretrain_batches(tok, 2, T, split, **kw), 10)
    if split == "val":
        assert full[-1][2]["epoch"] >= 3
    for k in (0, 3, 7):
        state = json.loads(json.dumps(full[k][2]))  # as stored in a checkpoint's meta
        resumed = take(pretrain_batches(tok, 2, T, split, resume_state=state, **kw), 9 - k)
        for (x, y, s), (xr, yr, sr) in zip(full[k + 1:], resumed):
            assert torch.equal(x, xr) and torch.equal(y, yr) and s == sr


def test_resume_with_every_ranks_states_and_approximately(tok, base, caplog):
    kw = dict(base_dir=base, buffer_size=16, tokenizer_batch_size=8)
    states = [take(pretrain_batches(tok, 2, 64, "train", rank=r, world_size=2, **kw), 2)[-1][2] for r in (0, 1)]
    nxt = take(pretrain_batches(tok, 2, 64, "train", rank=1, world_size=2, **kw), 3)[2]
    x, _, _ = take(pretrain_batches(tok, 2, 64, "train", rank=1, world_size=2, resume_state=states, **kw), 1)[0]
    assert torch.equal(x, nxt[0])
    # another world size, or the reference's format: the next unread row-group block, with a warning
    with caplog.at_level(logging.WARNING, logger="nanochat.dataloader"):
        for old in (states[0], {"pq_idx": 1, "rg_idx": 2, "epoch": 1}):
            x, y, s = take(pretrain_batches(tok, 2, 64, "train", rank=0, world_size=3, resume_state=old, **kw), 1)[0]
            assert (x[:, 0] == tok.get_bos_token_id()).all() and s["row_group"] % 3 == 0
    assert "approximately" in caplog.text
    with pytest.raises(ValueError, match="'val' split"):
        pretrain_batches(tok, 2, 64, "train", base_dir=base, resume_state=dict(states[0], split="val",
                                                                               world_size=1, rank=0))
    with pytest.raises(ValueError, match="malformed"):
        pretrain_batches(tok, 2, 64, "train", base_dir=base, resume_state={"version": 1, "rank": 0, "world_size": 1})


def test_bad_arguments_fail_at_call_time(tok, base, tmp_path):
    with pytest.raises(ValueError, match="B must be"):
        pretrain_batches(tok, 0, 64, "train", base_dir=base)
    with pytest.raises(ValueError, match="rank must be"):
        pretrain_batches(tok, 2, 64, "train", base_dir=base, rank=2, world_size=2)
    with pytest.raises(ValueError, match="'train' or 'val'"):
        pretrain_batches(tok, 2, 64, "test", base_dir=base)
    with pytest.raises(FileNotFoundError, match="nanochat download"):
        pretrain_batches(tok, 2, 64, "train", base_dir=tmp_path)
    assert not loader_threads()


def test_errors_on_the_worker_reach_the_consumer(tok, base):
    # the val shard has 2 row groups: rank 3 of 4 has nothing to read
    loader = pretrain_batches(tok, 2, 64, "val", base_dir=base, rank=3, world_size=4)
    with pytest.raises(ValueError, match="rank 3 of 4 gets no documents"):
        next(loader)

    class Failing(GPT2Tokenizer):
        def encode(self, texts, prepend=None, num_threads=4):
            if self.calls == 2:
                raise RuntimeError("tokenizer exploded")
            return super().encode(texts, prepend, num_threads)

    loader = pretrain_batches(Failing(), 2, 64, "train", base_dir=base, buffer_size=16, tokenizer_batch_size=8)
    with pytest.raises(RuntimeError, match="tokenizer exploded"):
        for _ in range(50):
            next(loader)
    _wait_no_threads()


def _wait_no_threads(timeout: float = 30.0) -> None:  # generous: a loaded machine schedules late
    deadline = time.monotonic() + timeout
    while loader_threads() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not loader_threads()


def test_thread_stops_on_close_and_on_garbage_collection(tok, base):
    kw = dict(base_dir=base, buffer_size=16, tokenizer_batch_size=8, prefetch=2)
    loader = pretrain_batches(tok, 2, 64, "train", **kw)
    assert not loader_threads()  # nothing starts before the first next()
    next(loader)
    assert len(loader_threads()) == 1
    loader.close()
    assert not loader_threads()  # close() joins it
    loader = pretrain_batches(tok, 2, 64, "train", **kw)
    next(loader)
    time.sleep(0.2)  # let it fill its queue and block on put
    del loader
    gc.collect()
    _wait_no_threads()


def test_best_fit_buffer_matches_linear_scan_with_ties():
    rng = random.Random(0)
    fast, slow = BestFitBuffer(), []
    for step in range(3000):
        if len(slow) < 20 or rng.random() < 0.3:
            doc = [step] * rng.randint(1, 12)  # few distinct lengths: many ties
            fast.add(step, doc)
            slow.append(doc)
            continue
        space = rng.randint(1, 12)
        fitting = [i for i, d in enumerate(slow) if len(d) <= space]
        if fitting and rng.random() < 0.8:
            want = slow.pop(max(fitting, key=lambda i: (len(slow[i]), -i)))
            assert fast.pop_largest_fitting(space) == want
        else:
            if not fitting:
                assert fast.pop_largest_fitting(space) is None
            assert fast.pop_shortest() == slow.pop(min(range(len(slow)), key=lambda i: (len(slow[i]), i)))
    assert fast.refs() == [d[0] for d in slow]


def test_best_fit_crops_far_less_than_greedy(tok, base, record_property):
    # buffer_size=1 degenerates to greedy packing: take the next document, crop it if it does not fit
    frac = {}
    for name, buffer_size in (("greedy", 1), ("best_fit", 128)):
        *_, (_, _, state) = take(pretrain_batches(tok, 8, 1024, "train", base_dir=base, buffer_size=buffer_size), 6)
        frac[name] = cropped_fraction(state)
        record_property(f"cropped_fraction_{name}_T1024", round(frac[name], 4))
    assert 0 < frac["best_fit"] < 0.75 * frac["greedy"]


def test_with_the_projects_tokenizer(tiny_tokenizer, tiny_tokenizer_dir):
    import pyarrow.parquet as pq
    bos = tiny_tokenizer.get_bos_token_id()
    x, y, _ = take(pretrain_batches(tiny_tokenizer, 2, 256, "val", base_dir=tiny_tokenizer_dir, buffer_size=8), 1)[0]
    assert (x[:, 0] == bos).all() and torch.equal(x[:, 1:], y[:, :-1])
    val = pq.read_table(tiny_tokenizer_dir / "base_data" / "shard_00005.parquet").column("text").to_pylist()
    row = x[0].tolist()
    first_doc = row[1:row.index(bos, 1)] if bos in row[1:] else row[1:]
    text = tiny_tokenizer.decode(first_doc)
    assert len(text) > 20 and any(doc.startswith(text[:-4]) for doc in val)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_match_cpu(tok, base):
    kw = dict(base_dir=base, buffer_size=16, tokenizer_batch_size=8)
    cpu = take(pretrain_batches(tok, 4, 128, "train", **kw), 4)
    gpu = take(pretrain_batches(tok, 4, 128, "train", device="cuda", **kw), 4)
    for (x, y, s), (xg, yg, sg) in zip(cpu, gpu):
        assert xg.is_cuda and yg.is_cuda and xg.dtype == torch.int64
        assert torch.equal(x, xg.cpu()) and torch.equal(y, yg.cpu()) and s == sg
