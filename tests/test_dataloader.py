"""nanochat.dataloader on the real OpenStax shards with tiktoken's GPT-2 encoding
(BOS = <|endoftext|>): packing checked against an independent, deliberately naive
best-fit packer (crop, the reference's rule, and split); exact resume; DDP sharding; the
background thread's lifecycle; with split, every token of every document trained on once
per epoch (counted on a synthetic corpus whose every token is unique)."""
from __future__ import annotations

import gc
import json
import logging
import random
import threading
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanochat.dataloader import BestFitBuffer, cropped_fraction, pretrain_batches, used_fraction
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


def naive_rows(tok, split, base, *, T, num_rows, rank=0, world_size=1, buffer_size, batch_docs, long_docs="crop"):
    """Best-fit packing written the plain way: linear scans over a list, documents read
    row group by row group (rank-strided), in chunks of `batch_docs`, forever. When
    nothing fits, the shortest document is cropped, or ("split") its rest goes back to
    the buffer, newest, behind a BOS."""
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
                if long_docs == "crop":
                    cropped += len(doc) - space
                else:
                    buffer.append([bos, *doc[space:]])
                row += doc[:space]
        rows.append(row)
    return torch.tensor(rows), cropped


def loader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("nanochat-dataloader")]


# -----------------------------------------------------------------------------

def test_batches_equal_an_independent_best_fit_packer(tok, base):
    # crop: the reference's rule (and pretrain_batches' default)
    B, T, nb = 3, 200, 5
    kw = dict(buffer_size=24, tokenizer_batch_size=8, long_docs="crop")
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
    assert state["long_docs"] == "crop" and state["piece_bos_tokens"] == 0
    assert not any(":" in docs for _, _, docs in state["buffer"])  # whole documents only


def test_split_batches_equal_an_independent_split_packer(tok, base):
    B, T, nb = 3, 200, 8
    batches = take(pretrain_batches(tok, B, T, "train", base_dir=base, buffer_size=24, tokenizer_batch_size=8,
                                    long_docs="split"), nb)
    rows, cropped = naive_rows(tok, "train", base, T=T, num_rows=B * nb, buffer_size=24, batch_docs=8,
                               long_docs="split")
    assert cropped == 0
    for k, (x, y, _) in enumerate(batches):
        assert (x[:, 0] == tok.get_bos_token_id()).all()
        assert torch.equal(x, rows[k * B:(k + 1) * B, :-1]) and torch.equal(y, rows[k * B:(k + 1) * B, 1:])
    state = batches[-1][2]
    assert state["cropped_tokens"] == 0 and state["piece_bos_tokens"] > 0 and used_fraction(state) == 1.0
    assert any(":" in docs for _, _, docs in state["buffer"])  # pieces are buffered by (document, offset)


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


@pytest.mark.parametrize("long_docs", ["crop", "split"])
@pytest.mark.parametrize("split,rank,world_size,T", [("train", 0, 1, 128), ("val", 1, 2, 64)])
def test_resume_is_exact(tok, base, split, rank, world_size, T, long_docs):
    # val rank 1 of 2 owns only row group 1 of the val shard (15 documents): the buffer
    # of 16 holds repeats of the same documents and the reader wraps epochs constantly
    kw = dict(base_dir=base, rank=rank, world_size=world_size, buffer_size=16, tokenizer_batch_size=8,
              long_docs=long_docs)
    n = 10 if long_docs == "crop" else 40  # split wastes nothing: it reads documents more slowly
    full = take(pretrain_batches(tok, 2, T, split, **kw), n)
    if split == "val":
        assert full[-1][2]["epoch"] >= 3
    for k in (0, 3, 7) if long_docs == "crop" else (0, 3, 7, 20, 33):
        state = json.loads(json.dumps(full[k][2]))  # as stored in a checkpoint's meta
        resumed = take(pretrain_batches(tok, 2, T, split, resume_state=state, **kw), n - 1 - k)
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
    with pytest.raises(ValueError, match="long_docs must be"):
        pretrain_batches(tok, 2, 64, "train", base_dir=base, long_docs="truncate")
    with pytest.raises(FileNotFoundError, match="no dataset 'mine'.*nanochat ingest"):
        pretrain_batches(tok, 2, 64, "train", base_dir=base, dataset="mine")
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
        *_, (_, _, state) = take(pretrain_batches(tok, 8, 1024, "train", base_dir=base, buffer_size=buffer_size,
                                                  long_docs="crop"), 6)
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


# -----------------------------------------------------------------------------
# Every token once per epoch ("split"), counted

class NumberedTokenizer:
    """Document "k:n" -> BOS, then n tokens k*10_000 + j (j = 0..n-1): every token of the
    corpus is unique, so each one in a batch names its document and position."""
    BOS = 1

    def get_bos_token_id(self) -> int:
        return self.BOS

    def encode(self, texts, prepend=None, num_threads=4):
        out = []
        for text in texts:
            k, n = map(int, text.split(":"))
            out.append(([prepend] if prepend is not None else []) + [k * 10_000 + j for j in range(n)])
        return out


@pytest.fixture(scope="module")
def numbered(tmp_path_factory) -> tuple[Path, list[list[str]]]:
    """base_data/ with two train shards (row groups of 7) and a val shard of "k:n"
    documents, lengths 1..300 (rows in the tests are 64 tokens: most documents split)."""
    root = tmp_path_factory.mktemp("numbered")
    (root / "base_data").mkdir()
    rng = random.Random(0)
    shards, k = [], 1
    for n_docs in (40, 33, 12):
        texts = [f"{k + i}:{rng.randint(1, 300)}" for i in range(n_docs)]
        k += n_docs
        pq.write_table(pa.table({"text": texts}), root / "base_data" / f"shard_{len(shards):05d}.parquet",
                       row_group_size=7)
        shards.append(texts)
    return root, shards[:-1]


def _rows(batches) -> list[list[int]]:
    """The packed rows (T+1 tokens) back from (inputs, targets)."""
    return [row for x, y, _ in batches for row in torch.cat([x, y[:, -1:]], dim=1).tolist()]


def _tokens_read(state: dict, shards: list[list[str]], tok) -> Counter:
    """Every token of every document the reader has read by `state` (whole epochs, then
    the current one up to its position), counted."""
    order = [(f"shard_{f:05d}.parquet", d // 7, d % 7, text) for f, texts in enumerate(shards)
             for d, text in enumerate(texts)]
    here = (state["shard"], state["row_group"], state["doc"])
    read = Counter()
    for shard, rg, d, text in order:
        times = state["epoch"] - 1 + ((shard, rg, d) < here)
        for token in tok.encode([text])[0]:
            read[token] += times
    return read


def _tokens_buffered(state: dict, shards: list[list[str]], tok) -> Counter:
    from nanochat.dataloader import _decode_indices
    out = Counter()
    for shard, rg, docs in state["buffer"]:
        for d, offset in _decode_indices(docs):
            tokens = tok.encode([shards[int(shard[6:11])][rg * 7 + d]], prepend=tok.BOS)[0]
            out.update(tokens[max(offset, 1):])  # a piece at offset k holds tokens[k:] behind its own BOS
    return out


@pytest.mark.parametrize("long_docs", ["split", "crop"])
def test_split_trains_on_every_token_once_per_epoch(numbered, long_docs):
    base, shards = numbered
    tok = NumberedTokenizer()
    loader = pretrain_batches(tok, 2, 63, "train", base_dir=base, buffer_size=8, tokenizer_batch_size=4,
                              long_docs=long_docs)
    batches = []
    for batch in loader:  # until the reader is well into its third pass over the split
        batches.append(batch)
        if batch[2]["epoch"] == 3 and batch[2]["doc"] > 3:
            break
    loader.close()
    state = batches[-1][2]
    rows = _rows(batches)
    assert all(row[0] == tok.BOS for row in rows)
    # between BOS tokens, a row holds consecutive tokens of one document (a whole one or a piece)
    segments = [seg for row in rows for seg in _split_at(row[1:] if row[0] == tok.BOS else row, tok.BOS)]
    assert all(b - a == 1 and a // 10_000 == b // 10_000 for seg in segments for a, b in zip(seg, seg[1:]))
    trained = Counter(t for row in rows for t in row if t != tok.BOS)
    read = _tokens_read(state, shards, tok)
    left = read - trained - _tokens_buffered(state, shards, tok)
    if long_docs == "split":
        # conservation, token by token: what was read is exactly what was trained on plus
        # what still waits in the buffer; nothing twice, nothing lost
        assert trained + _tokens_buffered(state, shards, tok) == read
        assert state["cropped_tokens"] == 0 and state["piece_bos_tokens"] > 0 and used_fraction(state) == 1.0
        assert state["last_epoch"]["epoch"] == 2 and state["last_epoch"]["used_fraction"] == 1.0
    else:
        # the reference's rule: the tails of long documents are gone, and only they
        assert sum(left.values()) == state["cropped_tokens"] > 0
        assert not trained - read
        assert state["last_epoch"]["epoch"] == 2 and 0 < state["last_epoch"]["used_fraction"] < 0.6
        assert used_fraction(state) == pytest.approx(1 - cropped_fraction(state))


def _split_at(row: list[int], bos: int) -> list[list[int]]:
    out, cur = [], []
    for t in row:
        if t == bos:
            out.append(cur)
            cur = []
        else:
            cur.append(t)
    return [seg for seg in out + [cur] if seg]


def test_split_uses_every_token_of_long_documents_crop_a_fraction(tok, base, record_property):
    """The OpenStax val chapters (~3,200 tokens on average) at T=512: crop trains on a
    small share of each epoch's tokens, split on all of them."""
    used = {}
    for long_docs in ("crop", "split"):
        loader = pretrain_batches(tok, 8, 512, "val", base_dir=base, buffer_size=64, long_docs=long_docs)
        for _, _, state in loader:
            if "last_epoch" in state:
                break
        loader.close()
        used[long_docs] = state["last_epoch"]["used_fraction"]
        record_property(f"used_fraction_{long_docs}_T512", round(used[long_docs], 4))
    assert used["split"] == 1.0
    assert used["crop"] < 0.35


def test_a_split_smaller_than_one_row_is_a_clear_error(tmp_path):
    (tmp_path / "base_data").mkdir()
    pq.write_table(pa.table({"text": ["1:20", "2:30"]}), tmp_path / "base_data" / "shard_00000.parquet")
    pq.write_table(pa.table({"text": ["3:500"]}), tmp_path / "base_data" / "shard_00001.parquet")
    loader = pretrain_batches(NumberedTokenizer(), 2, 63, "train", base_dir=tmp_path, buffer_size=4, long_docs="split")
    with pytest.raises(ValueError, match="the train split holds only 52 tokens, less than one row of 64"):
        next(loader)
    x, _, _ = take(pretrain_batches(NumberedTokenizer(), 2, 63, "val", base_dir=tmp_path, buffer_size=4), 1)[0]
    assert x.shape == (2, 63)
