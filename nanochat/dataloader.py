"""
Pretraining batches: documents from the parquet shards, tokenized, packed into rows of
T+1 tokens with BOS-aligned best-fit packing, yielded as (inputs, targets) of shape (B, T).

Packing (as in the reference nanochat):
- every document is tokenized with BOS prepended, so every row starts with BOS and each
  token can attend back to the start of its document;
- documents wait in a buffer of about `buffer_size`; a row is filled by repeatedly taking
  the LARGEST buffered document that fits the space left (ties: the oldest);
- only when none fits is one document cropped to fill the row exactly: the SHORTEST
  (ties: the oldest), which wastes the fewest tokens;
- no padding: every position is trained on. The price is the cropped tails (about a
  third of all tokens at T=2048 on web text, per the reference; more on long documents).

Beyond the reference:
- Exact resume. Each batch comes with a small JSON-serialisable state: the reader's
  position (epoch, shard, row group, document within the row group) and the buffered
  documents *by reference* (shard, row group, document index), not their tokens.
  `resume_state=` re-reads and re-tokenizes those documents, so the batch after a resume
  is identical to the one the uninterrupted run would have produced next.
- Tokenization and packing run on a background thread that prefetches a few batches
  into a bounded queue, so the training loop never waits on the tokenizer (tiktoken
  releases the GIL while encoding). Errors on that thread are re-raised in the consumer;
  closing or dropping the generator stops the thread.
- Yielded tensors are fresh each batch (no buffer reused under the caller's feet); on
  CUDA the host copy is pinned and moved with non_blocking=True.

DDP: rank r of W reads row groups r, r+W, r+2W, ... of every shard (disjoint documents).
Train loops over epochs (the state's `epoch` counts from 1); val loops too.
"""
from __future__ import annotations

import bisect
import logging
import math
import queue
import threading
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

log = logging.getLogger("nanochat.dataloader")

STATE_VERSION = 1

# A document's address: (file index in the split's file list, row group, row within it).
Ref = tuple[int, int, int]


class TokenizerLike(Protocol):
    def get_bos_token_id(self) -> int: ...
    def encode(self, text: list[str], prepend: int | None = None, num_threads: int = ...) -> list[list[int]]: ...


# -----------------------------------------------------------------------------
# Public API

def pretrain_batches(tokenizer: TokenizerLike, B: int, T: int, split: str, *, base_dir,
                     device: str | torch.device = "cpu", rank: int = 0, world_size: int = 1,
                     resume_state: dict | Sequence[dict] | None = None, tokenizer_threads: int = 4,
                     tokenizer_batch_size: int = 128, buffer_size: int = 1000,
                     prefetch: int = 4) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict]]:
    """Endless iterator of (inputs, targets, state) for `split` ("train" or "val").

    inputs, targets: int64 (B, T) on `device`; targets[:, i] == inputs[:, i+1] and the
        last target is the token after the row. inputs[:, 0] is always BOS.
    state: JSON-serialisable position after this batch. Passing it back as
        `resume_state` makes the next batch equal the one that followed it. Each rank
        has its own state; `resume_state` may also be the list of every rank's state
        (indexed by rank). A state from another world size, or a reference-style
        {"pq_idx", "rg_idx", "epoch"}, resumes approximately (next unread row groups,
        empty buffer) with a warning.

    tokenizer_threads / tokenizer_batch_size: threads and documents per encode() call.
    buffer_size: documents kept for best-fit choices (larger = less cropping).
    prefetch: batches the background thread may prepare ahead.

    Bad arguments and missing shards raise here, not at the first next(). Call
    `.close()` (or drop the iterator) to stop the background thread.
    """
    from nanochat.dataset import split_files

    problems = []
    for name, value, low in (("B", B, 1), ("T", T, 1), ("world_size", world_size, 1), ("buffer_size", buffer_size, 1),
                             ("tokenizer_batch_size", tokenizer_batch_size, 1), ("tokenizer_threads", tokenizer_threads, 1),
                             ("prefetch", prefetch, 1)):
        if not isinstance(value, int) or value < low:
            problems.append(f"{name} must be an integer >= {low}, got {value!r}")
    if not (isinstance(rank, int) and 0 <= rank < max(world_size, 1)):
        problems.append(f"rank must be in [0, world_size={world_size}), got {rank!r}")
    if problems:
        raise ValueError("; ".join(problems))
    files = split_files(split, base_dir)
    start = _resume_plan(resume_state, split, [f.name for f in files], rank, world_size)
    device = _resolve_device(device)
    spec = _Spec(tokenizer=tokenizer, B=B, T=T, split=split, files=files, rank=rank, world_size=world_size,
                 tokenizer_threads=tokenizer_threads, tokenizer_batch_size=tokenizer_batch_size,
                 buffer_size=buffer_size, device=device)
    return _consume(spec, start, prefetch)


def cropped_fraction(state: dict) -> float:
    """Share of the tokens taken from the buffer so far that packing cropped away."""
    packed, cropped = state.get("packed_tokens", 0), state.get("cropped_tokens", 0)
    return cropped / (packed + cropped) if packed + cropped else 0.0


# -----------------------------------------------------------------------------
# Reading documents in a fixed order

class _DocReader:
    """Documents of one rank's row groups, in order, forever (epochs).

    Position: (epoch, file, rg, doc) = the next document to read. It is kept normalised:
    always a real document of a row group that belongs to this rank.
    """

    def __init__(self, files: list[Path], rank: int, world_size: int):
        self.files, self.rank, self.world_size = files, rank, world_size
        self._rows: dict[int, list[int]] = {}  # file -> rows per row group (from the footer)
        self._open: tuple[int, Any] | None = None
        self._loaded: tuple[int, int] | None = None
        self._texts: list[str] = []
        self.epoch, self.file, self.rg, self.doc = 1, 0, rank, 0
        self._normalise()

    def seek(self, epoch: int, file: int, rg: int, doc: int) -> None:
        self.epoch, self.file, self.rg, self.doc = epoch, file, rg, doc
        self._normalise()

    def rows(self, file: int) -> list[int]:
        if file not in self._rows:
            md = self._parquet(file).metadata
            self._rows[file] = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
        return self._rows[file]

    def _normalise(self) -> None:
        files_passed = 0
        while True:
            rows = self.rows(self.file)
            if self.rg < len(rows):
                if self.doc < rows[self.rg]:
                    return
                self.rg, self.doc = self.rg + self.world_size, 0
                continue
            self.file, self.rg, self.doc = self.file + 1, self.rank, 0
            if self.file == len(self.files):
                self.file, self.epoch = 0, self.epoch + 1
            files_passed += 1
            if files_passed > len(self.files):
                total = sum(len(self.rows(f)) for f in range(len(self.files)))
                raise ValueError(f"rank {self.rank} of {self.world_size} gets no documents: the split's "
                                 f"{len(self.files)} shard(s) have {total} row group(s) in all, shared out by row "
                                 f"group; use fewer ranks or more shards")

    def read(self, n: int) -> tuple[list[Ref], list[str]]:
        """Up to n documents from the current row group (never crossing into the next)."""
        if self._loaded != (self.file, self.rg):
            self._texts = self._read_row_group(self.file, self.rg)
            self._loaded = (self.file, self.rg)
        stop = min(self.doc + n, len(self._texts))
        refs = [(self.file, self.rg, d) for d in range(self.doc, stop)]
        texts = self._texts[self.doc:stop]
        self.doc = stop
        self._normalise()
        return refs, texts

    def fetch(self, refs: list[Ref]) -> list[str]:
        """The texts of arbitrary documents (for rebuilding a buffer on resume)."""
        cache: dict[tuple[int, int], list[str]] = {}
        out = []
        for f, rg, d in refs:
            if (f, rg) not in cache:
                cache[(f, rg)] = self._read_row_group(f, rg)
            texts = cache[(f, rg)]
            if d >= len(texts):
                raise ValueError(f"resume state names document {d} of row group {rg} of {self.files[f].name}, "
                                 f"which has only {len(texts)}; the shard changed since the state was saved")
            out.append(texts[d])
        return out

    def _parquet(self, file: int):
        import pyarrow.parquet as pq
        if self._open is None or self._open[0] != file:
            self._open = (file, pq.ParquetFile(self.files[file]))
        return self._open[1]

    def _read_row_group(self, file: int, rg: int) -> list[str]:
        from nanochat.dataset import TEXT_COLUMN
        table = self._parquet(file).read_row_group(rg, columns=[TEXT_COLUMN])
        return [t if t is not None else "" for t in table.column(TEXT_COLUMN).to_pylist()]


# -----------------------------------------------------------------------------
# Best-fit buffer

class BestFitBuffer:
    """Tokenized documents waiting to be packed.

    Kept sorted by (length, arrival) so that "largest that fits" and "shortest" are
    binary searches instead of the reference's linear scan; ties go to the oldest
    document, exactly as the scan would pick. Iterating `refs()` gives the documents in
    arrival order (dicts keep insertion order), which is what the resume state records.
    Tokens wait as 4-byte arrays, not lists of Python ints (36 bytes a token): a buffer
    of a thousand long documents would otherwise hold a few hundred MB.
    """

    def __init__(self) -> None:
        self._keys: list[tuple[int, int]] = []               # sorted (length, arrival)
        self._docs: dict[int, tuple[Any, array]] = {}         # arrival -> (ref, tokens)
        self._arrivals = 0

    def __len__(self) -> int:
        return len(self._docs)

    def add(self, ref: Any, tokens: list[int]) -> None:
        key = (len(tokens), self._arrivals)
        self._arrivals += 1
        bisect.insort(self._keys, key)
        self._docs[key[1]] = (ref, array("i", tokens))

    def pop_largest_fitting(self, space: int) -> list[int] | None:
        i = bisect.bisect_right(self._keys, (space, math.inf))
        if i == 0:
            return None
        length = self._keys[i - 1][0]
        return self._pop(bisect.bisect_left(self._keys, (length, -1)))

    def pop_shortest(self) -> list[int]:
        return self._pop(0)

    def _pop(self, index: int) -> list[int]:
        _, arrival = self._keys.pop(index)
        return self._docs.pop(arrival)[1].tolist()

    def refs(self) -> list[Any]:
        return [ref for ref, _ in self._docs.values()]


def pack_rows(buffer: BestFitBuffer, refill, num_rows: int, row_len: int, buffer_size: int) -> tuple[list[int], int]:
    """Fill `num_rows` rows of `row_len` tokens from `buffer` (topped up to `buffer_size`
    by calling `refill()` before every placement). Returns (the rows concatenated, tokens
    cropped away)."""
    flat: list[int] = []
    cropped = 0
    for _ in range(num_rows):
        used = 0
        while used < row_len:
            while len(buffer) < buffer_size:
                refill()
            space = row_len - used
            doc = buffer.pop_largest_fitting(space)
            if doc is None:
                doc = buffer.pop_shortest()
                cropped += len(doc) - space
                doc = doc[:space]
            flat.extend(doc)
            used += len(doc)
    return flat, cropped


# -----------------------------------------------------------------------------
# Resume state

@dataclass
class _Start:
    exact: bool
    epoch: int = 1
    file: int = 0
    rg: int | None = None   # None: a fresh start at this rank's first row group
    doc: int = 0
    buffer: list[Ref] | None = None
    packed_tokens: int = 0
    cropped_tokens: int = 0


def _encode_indices(indices: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2,5,7-8" (ascending runs collapsed)."""
    parts, i = [], 0
    while i < len(indices):
        j = i
        while j + 1 < len(indices) and indices[j + 1] == indices[j] + 1:
            j += 1
        parts.append(str(indices[i]) if i == j else f"{indices[i]}-{indices[j]}")
        i = j + 1
    return ",".join(parts)


def _decode_indices(text: str) -> list[int]:
    out: list[int] = []
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def _encode_buffer(refs: list[Ref], names: list[str]) -> list[list]:
    """Buffered documents in arrival order as [[shard name, row group, "doc ranges"], ...]."""
    groups: list[list] = []
    for f, rg, d in refs:
        if groups and groups[-1][0] == f and groups[-1][1] == rg:
            groups[-1][2].append(d)
        else:
            groups.append([f, rg, [d]])
    return [[names[f], rg, _encode_indices(ds)] for f, rg, ds in groups]


def _decode_buffer(entries: list, index: dict[str, int]) -> list[Ref]:
    refs: list[Ref] = []
    for name, rg, docs in entries:
        if name not in index:
            raise ValueError(f"resume state refers to shard {name}, which is not among this split's shards")
        refs.extend((index[name], int(rg), d) for d in _decode_indices(docs))
    return refs


def _state(split: str, rank: int, world_size: int, reader: _DocReader, buffer: BestFitBuffer,
           names: list[str], packed: int, cropped: int) -> dict:
    return {
        "version": STATE_VERSION, "split": split, "rank": rank, "world_size": world_size,
        "epoch": reader.epoch, "shard": names[reader.file], "row_group": reader.rg, "doc": reader.doc,
        "buffer": _encode_buffer(buffer.refs(), names),
        "packed_tokens": packed, "cropped_tokens": cropped,
    }


def _resume_plan(resume_state, split: str, names: list[str], rank: int, world_size: int) -> _Start:
    if resume_state is None:
        return _Start(exact=True)
    states = list(resume_state) if isinstance(resume_state, (list, tuple)) else [resume_state]
    if not states or not all(isinstance(s, dict) for s in states):
        raise ValueError("resume_state must be a state dict yielded by pretrain_batches, or a list of them")
    index = {n: i for i, n in enumerate(names)}
    mine = [s for s in states if s.get("version") == STATE_VERSION and s.get("rank") == rank
            and s.get("world_size") == world_size]
    try:
        if mine:
            s = mine[0]
            if s["split"] != split:
                raise ValueError(f"resume state is for the {s['split']!r} split, not {split!r}")
            if s["shard"] not in index:
                raise ValueError(f"resume state points into shard {s['shard']}, which is not among the "
                                 f"{split} shards on disk ({len(names)} of them)")
            return _Start(exact=True, epoch=int(s["epoch"]), file=index[s["shard"]], rg=int(s["row_group"]),
                          doc=int(s["doc"]), buffer=_decode_buffer(s["buffer"], index),
                          packed_tokens=int(s.get("packed_tokens", 0)), cropped_tokens=int(s.get("cropped_tokens", 0)))
        return _approximate_start(states, index, rank, world_size)
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"resume_state is malformed ({type(e).__name__}: {e}); pass a state yielded by "
                         "pretrain_batches or None") from e


def _approximate_start(states: list[dict], index: dict[str, int], rank: int, world_size: int) -> _Start:
    """Resume from the furthest position any state records, at the next row group block.
    Documents in the old buffers and the rest of the current row groups are skipped."""
    positions = []
    for s in states:
        if "shard" in s:  # ours, but another world size or rank
            positions.append((int(s["epoch"]), index.get(s["shard"], 0), int(s["row_group"])))
        else:  # the reference's format
            positions.append((int(s.get("epoch", 1)), int(s["pq_idx"]), int(s["rg_idx"])))
    epoch, file, rg = max(positions)
    rg = (rg // world_size + 1) * world_size + rank
    log.warning("resuming the dataloader approximately (no exact state for rank %d of %d): from epoch %d, "
                "file %d, row group %d with an empty buffer", rank, world_size, epoch, file, rg)
    return _Start(exact=False, epoch=epoch, file=min(file, len(index) - 1), rg=rg)


# -----------------------------------------------------------------------------
# The producer thread and the consuming generator

@dataclass
class _Spec:
    tokenizer: Any
    B: int
    T: int
    split: str
    files: list[Path]
    rank: int
    world_size: int
    tokenizer_threads: int
    tokenizer_batch_size: int
    buffer_size: int
    device: torch.device


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


def _resolve_device(device: str | torch.device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _produce(spec: _Spec, start: _Start, out: queue.Queue, stop: threading.Event) -> None:
    """Background thread: tokenize, pack, put (batch, state) into `out` until `stop`."""
    try:
        pin = spec.device.type == "cuda"
        if pin:
            torch.cuda.set_device(spec.device)  # pinned allocations belong to this rank's GPU
        names = [f.name for f in spec.files]
        reader = _DocReader(spec.files, spec.rank, spec.world_size)
        buffer = BestFitBuffer()
        bos = spec.tokenizer.get_bos_token_id()

        def encode(texts: list[str]) -> list[list[int]]:
            return spec.tokenizer.encode(texts, prepend=bos, num_threads=spec.tokenizer_threads)

        if start.buffer:
            refs = start.buffer
            texts = reader.fetch(refs)
            for i in range(0, len(refs), spec.tokenizer_batch_size):
                chunk = slice(i, i + spec.tokenizer_batch_size)
                for ref, tokens in zip(refs[chunk], encode(texts[chunk])):
                    buffer.add(ref, tokens)
        if start.rg is not None:
            reader.seek(start.epoch, start.file, start.rg, start.doc)
        packed, cropped = start.packed_tokens, start.cropped_tokens

        def refill() -> None:
            refs, texts = reader.read(spec.tokenizer_batch_size)
            for ref, tokens in zip(refs, encode(texts)):
                buffer.add(ref, tokens)

        row_len = spec.T + 1
        while not stop.is_set():
            flat, n_cropped = pack_rows(buffer, refill, spec.B, row_len, spec.buffer_size)
            packed += spec.B * row_len
            cropped += n_cropped
            rows = torch.tensor(flat, dtype=torch.long).view(spec.B, row_len)
            # (2, B, T): [0] inputs, [1] targets, each contiguous; one host->device copy
            batch = torch.empty((2, spec.B, spec.T), dtype=torch.long, pin_memory=pin)
            batch[0].copy_(rows[:, :-1])
            batch[1].copy_(rows[:, 1:])
            state = _state(spec.split, spec.rank, spec.world_size, reader, buffer, names, packed, cropped)
            if not _put(out, (batch, state), stop):
                return
    except BaseException as e:  # hand every failure to the consumer
        _put(out, _Failure(e), stop)


def _put(out: queue.Queue, item: Any, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            out.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _consume(spec: _Spec, start: _Start, prefetch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict]]:
    out: queue.Queue = queue.Queue(maxsize=prefetch)
    stop = threading.Event()
    worker = threading.Thread(target=_produce, args=(spec, start, out, stop), daemon=True,
                              name=f"nanochat-dataloader-{spec.split}-rank{spec.rank}")
    worker.start()
    non_blocking = spec.device.type == "cuda"
    try:
        while True:
            item = _get(out, worker)
            if isinstance(item, _Failure):
                raise item.exc
            batch, state = item
            if batch.device != spec.device:
                batch = batch.to(spec.device, non_blocking=non_blocking)
            yield batch[0], batch[1], state
    finally:
        stop.set()
        while True:  # unblock a producer waiting on a full queue
            try:
                out.get_nowait()
            except queue.Empty:
                break
        worker.join(timeout=30)
        if worker.is_alive():
            log.warning("dataloader thread %s did not stop within 30s", worker.name)


def _get(out: queue.Queue, worker: threading.Thread) -> Any:
    while True:
        try:
            return out.get(timeout=0.5)
        except queue.Empty:
            if not worker.is_alive():
                try:
                    return out.get_nowait()
                except queue.Empty:
                    raise RuntimeError("the dataloader thread exited without a batch or an error") from None
