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

Long documents (`long_docs=`): "crop" is the reference's rule above, and this function's
default. "split" (base-train's default) wastes nothing: when no document fits, the
shortest one is split instead; its head fills the row and its tail goes back into the
buffer as a piece of its own with BOS prepended, so rows still start with BOS and every
token of every document is trained on once per epoch. The price is one extra BOS per
piece, and a piece's tokens no longer see the start of their document. On the OpenStax
books (chapters of ~3,200 tokens) at T=512, crop trains on ~15% of the text, split on all.

Beyond the reference:
- Exact resume. Each batch comes with a small JSON-serialisable state: the reader's
  position (epoch, shard, row group, document within the row group) and the buffered
  documents *by reference* (shard, row group, document index, and for a split piece the
  token offset where it starts), not their tokens.
  `resume_state=` re-reads and re-tokenizes those documents, so the batch after a resume
  is identical to the one the uninterrupted run would have produced next.
- Tokenization and packing run on a background thread that prefetches a few batches
  into a bounded queue, so the training loop never waits on the tokenizer (tiktoken
  releases the GIL while encoding). Errors on that thread are re-raised in the consumer;
  closing or dropping the generator stops the thread.
- Token accounting in the state: tokens packed, cropped away, and BOS tokens added at the
  head of split pieces; `used_fraction(state)` is the share of the dataset's tokens taken
  from the buffer that rows actually hold, and `state["last_epoch"]` gives it per epoch.
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

from nanochat.errors import UserError

log = logging.getLogger("nanochat.dataloader")

STATE_VERSION = 1

# A buffered piece's address: (file index in the split's file list, row group, row within
# it, token offset). Offset 0 is the whole document (BOS + its tokens); offset k > 0 is the
# piece BOS + tokens[k:] left over when "split" packing cut the document.
Ref = tuple[int, int, int, int]
LONG_DOCS = ("split", "crop")


class TokenizerLike(Protocol):
    def get_bos_token_id(self) -> int: ...
    def encode(self, text: list[str], prepend: int | None = None, num_threads: int = ...) -> list[list[int]]: ...


# -----------------------------------------------------------------------------
# Public API

def pretrain_batches(tokenizer: TokenizerLike, B: int, T: int, split: str, *, base_dir,
                     device: str | torch.device = "cpu", rank: int = 0, world_size: int = 1,
                     resume_state: dict | Sequence[dict] | None = None, tokenizer_threads: int = 4,
                     tokenizer_batch_size: int = 128, buffer_size: int = 1000,
                     prefetch: int = 4, long_docs: str = "crop",
                     dataset: str | None = None,
                     epochs: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict]]:
    """Endless iterator of (inputs, targets, state) for `split` ("train" or "val"), or
    one that ends after `epochs` passes over the split.

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
    long_docs: "crop" (the reference's packing) or "split" (no token discarded); see above.
    dataset: a named dataset (`nanochat ingest`); None reads the downloaded web text.
    epochs: None loops forever; N stops reading after N passes over the split, packs what
        the buffer still holds, and ends before the first batch it cannot fill (evaluation
        uses 1: every document of a small val split once, not copies of its shortest ones).

    Bad arguments and missing shards raise here, not at the first next(). Call
    `.close()` (or drop the iterator) to stop the background thread.
    """
    from nanochat.dataset import split_files

    problems = []
    for name, value, low in (("B", B, 1), ("T", T, 1), ("world_size", world_size, 1), ("buffer_size", buffer_size, 1),
                             ("tokenizer_batch_size", tokenizer_batch_size, 1), ("tokenizer_threads", tokenizer_threads, 1),
                             ("prefetch", prefetch, 1), ("epochs", 1 if epochs is None else epochs, 1)):
        if not isinstance(value, int) or value < low:
            problems.append(f"{name} must be an integer >= {low}, got {value!r}")
    if not (isinstance(rank, int) and 0 <= rank < max(world_size, 1)):
        problems.append(f"rank must be in [0, world_size={world_size}), got {rank!r}")
    if long_docs not in LONG_DOCS:
        problems.append(f"long_docs must be 'split' or 'crop', got {long_docs!r}")
    if problems:
        raise UserError("; ".join(problems))
    files = split_files(split, base_dir, dataset)
    start = _resume_plan(resume_state, split, [f.name for f in files], rank, world_size)
    device = _resolve_device(device)
    spec = _Spec(tokenizer=tokenizer, B=B, T=T, split=split, files=files, rank=rank, world_size=world_size,
                 tokenizer_threads=tokenizer_threads, tokenizer_batch_size=tokenizer_batch_size,
                 buffer_size=buffer_size, device=device, long_docs=long_docs, epochs=epochs)
    return _consume(spec, start, prefetch)


def cropped_fraction(state: dict) -> float:
    """Share of the tokens taken from the buffer so far that packing cropped away."""
    packed, cropped = state.get("packed_tokens", 0), state.get("cropped_tokens", 0)
    return cropped / (packed + cropped) if packed + cropped else 0.0


def used_fraction(state: dict) -> float:
    """Share of the dataset's tokens taken from the buffer so far that rows hold (trained
    on): 1.0 with "split"; with "crop", one minus what was cropped away. BOS tokens added
    to split pieces are not dataset tokens and count on neither side."""
    return _used(state.get("packed_tokens", 0), state.get("cropped_tokens", 0), state.get("piece_bos_tokens", 0))


def _used(packed: int, cropped: int, piece_bos: int) -> float:
    used = packed - piece_bos
    return used / (used + cropped) if used + cropped else 1.0


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
                raise UserError(f"rank {self.rank} of {self.world_size} gets no documents: the split's "
                                f"{len(self.files)} shard(s) have {total} row group(s) in all, shared out by row "
                                f"group; use fewer ranks or more shards")

    def read(self, n: int) -> tuple[list[Ref], list[str]]:
        """Up to n documents from the current row group (never crossing into the next)."""
        if self._loaded != (self.file, self.rg):
            self._texts = self._read_row_group(self.file, self.rg)
            self._loaded = (self.file, self.rg)
        stop = min(self.doc + n, len(self._texts))
        refs = [(self.file, self.rg, d, 0) for d in range(self.doc, stop)]
        texts = self._texts[self.doc:stop]
        self.doc = stop
        self._normalise()
        return refs, texts

    def fetch(self, refs: list[Ref]) -> list[str]:
        """The texts of arbitrary documents (for rebuilding a buffer on resume)."""
        cache: dict[tuple[int, int], list[str]] = {}
        out = []
        for f, rg, d, _ in refs:
            if (f, rg) not in cache:
                cache[(f, rg)] = self._read_row_group(f, rg)
            texts = cache[(f, rg)]
            if d >= len(texts):
                raise UserError(f"resume state names document {d} of row group {rg} of {self.files[f].name}, "
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
    """Tokenized documents (and pieces of them) waiting to be packed.

    Kept sorted by (length, arrival) so that "largest that fits" and "shortest" are
    binary searches instead of the reference's linear scan; ties go to the oldest
    document, exactly as the scan would pick. Iterating `refs()` gives the documents in
    arrival order (dicts keep insertion order), which is what the resume state records.
    Tokens wait as 4-byte arrays, not lists of Python ints (36 bytes a token): a buffer
    of a thousand long documents would otherwise hold a few hundred MB. A piece is the
    document's array and an offset k, standing for tokens[0] (its BOS) + tokens[k:]:
    splitting a book of a million tokens row by row copies each token once, not once
    per row.
    """

    def __init__(self) -> None:
        self._keys: list[tuple[int, int]] = []                   # sorted (length, arrival)
        self._docs: dict[int, tuple[Any, array, int]] = {}        # arrival -> (ref, tokens, offset)
        self._arrivals = 0

    def __len__(self) -> int:
        return len(self._docs)

    def add(self, ref: Any, tokens: list[int] | array, offset: int = 0) -> None:
        """Buffer `tokens` (offset 0), or the piece tokens[0] + tokens[offset:]."""
        tokens = tokens if isinstance(tokens, array) else array("i", tokens)
        key = (len(tokens) if offset == 0 else len(tokens) - offset + 1, self._arrivals)
        self._arrivals += 1
        bisect.insort(self._keys, key)
        self._docs[key[1]] = (ref, tokens, offset)

    def pop_largest_fitting(self, space: int) -> list[int] | None:
        taken = self.take_largest_fitting(space)
        return None if taken is None else taken[1]

    def pop_shortest(self) -> list[int]:
        return self.take_shortest()[1]

    def take_largest_fitting(self, space: int) -> tuple[Any, list[int]] | None:
        """(ref, tokens) of the longest document of at most `space` tokens (ties: the oldest), or None."""
        i = bisect.bisect_right(self._keys, (space, math.inf))
        if i == 0:
            return None
        length = self._keys[i - 1][0]
        ref, tokens, offset = self._pop(bisect.bisect_left(self._keys, (length, -1)))
        return ref, _piece(tokens, offset)

    def take_shortest(self) -> tuple[Any, list[int]]:
        """(ref, tokens) of the shortest document (ties: the oldest)."""
        ref, tokens, offset = self._pop(0)
        return ref, _piece(tokens, offset)

    def split_shortest(self, space: int) -> tuple[Any, list[int], array, int]:
        """Take the shortest document (ties: the oldest), longer than `space`, and return
        (ref, its first `space` tokens, its token array, the offset its rest starts at),
        for the caller to buffer the rest as a piece under a ref of its choosing."""
        ref, tokens, offset = self._pop(0)
        head = _piece(tokens, offset, space)
        return ref, head, tokens, (space if offset == 0 else offset + space - 1)

    def _pop(self, index: int) -> tuple[Any, array, int]:
        _, arrival = self._keys.pop(index)
        return self._docs.pop(arrival)

    def refs(self) -> list[Any]:
        return [ref for ref, _, _ in self._docs.values()]


def _piece(tokens: array, offset: int, n: int | None = None) -> list[int]:
    """The first n (all) tokens of the piece tokens[0] + tokens[offset:] (offset 0: tokens)."""
    if offset == 0:
        return tokens[:n].tolist()
    return [tokens[0], *tokens[offset:offset + n - 1 if n is not None else None]]


def pack_rows(buffer: BestFitBuffer, refill, num_rows: int, row_len: int, buffer_size: int,
              long_docs: str = "crop") -> tuple[list[int], int, int]:
    """Fill `num_rows` rows of `row_len` tokens from `buffer` (topped up to `buffer_size`
    by calling `refill()` before every placement; a refill that returns False has nothing
    more to add); buffered refs are `Ref`s and every document starts with BOS. When nothing
    fits, the shortest document is cropped ("crop") or split ("split": the rest goes back
    into the buffer behind the BOS). Raises _Exhausted when the buffer runs dry.
    Returns (the rows concatenated, tokens cropped away, BOS tokens of pieces placed)."""
    assert long_docs in LONG_DOCS
    flat: list[int] = []
    cropped = piece_bos = 0
    for _ in range(num_rows):
        used = 0
        while used < row_len:
            while len(buffer) < buffer_size:
                if refill() is False:
                    break
            if not len(buffer):
                raise _Exhausted
            space = row_len - used
            taken = buffer.take_largest_fitting(space)
            if taken is not None:
                ref, doc = taken
            elif long_docs == "crop":
                ref, doc = buffer.take_shortest()
                cropped += len(doc) - space
                doc = doc[:space]
            else:
                ref, doc, tokens, rest = buffer.split_shortest(space)
                file, rg, d, _ = ref
                buffer.add((file, rg, d, rest), tokens, rest)
            piece_bos += int(ref[3] > 0)
            flat.extend(doc)
            used += len(doc)
    return flat, cropped, piece_bos


# -----------------------------------------------------------------------------
# Resume state

@dataclass
class _Counts:
    """Running token counts (all since the loader's first batch, resumes included)."""
    packed: int = 0      # tokens placed in rows
    cropped: int = 0     # tokens cropped away ("crop")
    piece_bos: int = 0   # BOS tokens placed at the head of split pieces ("split"): not dataset tokens

    def as_list(self) -> list[int]:
        return [self.packed, self.cropped, self.piece_bos]


@dataclass
class _Start:
    exact: bool
    epoch: int = 1
    file: int = 0
    rg: int | None = None   # None: a fresh start at this rank's first row group
    doc: int = 0
    buffer: list[Ref] | None = None
    counts: _Counts | None = None
    epoch_start: list[int] | None = None   # counts when the reader entered its current epoch
    last_epoch: dict | None = None


def _encode_indices(items: list[tuple[int, int]]) -> str:
    """[(0, 0), (1, 0), (2, 0), (5, 300), (7, 0), (8, 0)] -> "0-2,5:300,7-8": (document,
    token offset) pairs, whole documents (offset 0) in ascending runs collapsed."""
    parts, i = [], 0
    while i < len(items):
        d, offset = items[i]
        if offset:
            parts.append(f"{d}:{offset}")
            i += 1
            continue
        j = i
        while j + 1 < len(items) and items[j + 1] == (items[j][0] + 1, 0):
            j += 1
        parts.append(str(d) if i == j else f"{d}-{items[j][0]}")
        i = j + 1
    return ",".join(parts)


def _decode_indices(text: str) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for part in filter(None, text.split(",")):
        if ":" in part:
            d, _, offset = part.partition(":")
            out.append((int(d), int(offset)))
            continue
        lo, _, hi = part.partition("-")
        out.extend((d, 0) for d in range(int(lo), int(hi or lo) + 1))
    return out


def _encode_buffer(refs: list[Ref], names: list[str]) -> list[list]:
    """Buffered documents in arrival order as [[shard name, row group, "doc ranges"], ...]."""
    groups: list[list] = []
    for f, rg, d, offset in refs:
        if groups and groups[-1][0] == f and groups[-1][1] == rg:
            groups[-1][2].append((d, offset))
        else:
            groups.append([f, rg, [(d, offset)]])
    return [[names[f], rg, _encode_indices(ds)] for f, rg, ds in groups]


def _decode_buffer(entries: list, index: dict[str, int]) -> list[Ref]:
    refs: list[Ref] = []
    for name, rg, docs in entries:
        if name not in index:
            raise UserError(f"resume state refers to shard {name}, which is not among this split's shards")
        refs.extend((index[name], int(rg), d, offset) for d, offset in _decode_indices(docs))
    return refs


def _state(split: str, rank: int, world_size: int, reader: _DocReader, buffer: BestFitBuffer,
           names: list[str], counts: _Counts, long_docs: str, epoch_start: list[int],
           last_epoch: dict | None) -> dict:
    state = {
        "version": STATE_VERSION, "split": split, "rank": rank, "world_size": world_size,
        "epoch": reader.epoch, "shard": names[reader.file], "row_group": reader.rg, "doc": reader.doc,
        "buffer": _encode_buffer(buffer.refs(), names),
        "packed_tokens": counts.packed, "cropped_tokens": counts.cropped, "piece_bos_tokens": counts.piece_bos,
        "long_docs": long_docs, "epoch_start": epoch_start,
    }
    if last_epoch is not None:
        state["last_epoch"] = last_epoch
    return state


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
                raise UserError(f"resume state is for the {s['split']!r} split, not {split!r}")
            if s["shard"] not in index:
                raise UserError(f"resume state points into shard {s['shard']}, which is not among the "
                                f"{split} shards on disk ({len(names)} of them)")
            counts = _Counts(int(s.get("packed_tokens", 0)), int(s.get("cropped_tokens", 0)),
                             int(s.get("piece_bos_tokens", 0)))
            epoch_start = [int(v) for v in s["epoch_start"]] if "epoch_start" in s else None
            return _Start(exact=True, epoch=int(s["epoch"]), file=index[s["shard"]], rg=int(s["row_group"]),
                          doc=int(s["doc"]), buffer=_decode_buffer(s["buffer"], index), counts=counts,
                          epoch_start=epoch_start, last_epoch=s.get("last_epoch"))
        return _approximate_start(states, index, rank, world_size)
    except (KeyError, TypeError, AttributeError) as e:
        raise UserError(f"resume_state is malformed ({type(e).__name__}: {e}); pass a state yielded by "
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
    long_docs: str = "crop"
    epochs: int | None = None


class _Exhausted(Exception):
    """The reader stopped (`epochs` passes done) and the buffer cannot fill the next row."""


class _End:
    """Put by the producer after the last batch of a loader with `epochs`."""


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
                    buffer.add(ref, tokens, ref[3])
        if start.rg is not None:
            reader.seek(start.epoch, start.file, start.rg, start.doc)
        counts = start.counts or _Counts()
        epoch_start, last_epoch = start.epoch_start or counts.as_list(), start.last_epoch

        row_len = spec.T + 1
        # tokens of this rank's whole split, counted over a first epoch read from its start
        # (a split smaller than one row would only fill rows with copies of itself)
        split_tokens = 0 if start.rg is None and not start.buffer else None

        def refill() -> bool:
            nonlocal split_tokens
            if spec.epochs is not None and reader.epoch > spec.epochs:
                return False
            epoch = reader.epoch
            refs, texts = reader.read(spec.tokenizer_batch_size)
            for ref, tokens in zip(refs, encode(texts)):
                buffer.add(ref, tokens)
                if split_tokens is not None:
                    split_tokens += len(tokens)
            if split_tokens is not None and reader.epoch != epoch:
                if split_tokens < row_len:
                    where = f" (rank {spec.rank} of {spec.world_size}: its row groups)" if spec.world_size > 1 else ""
                    raise UserError(f"the {spec.split} split holds only {split_tokens} tokens{where}, less than one "
                                    f"row of {row_len}: add text to the dataset, or lower the sequence length")
                split_tokens = None
            return True

        while not stop.is_set():
            epoch = reader.epoch
            try:
                flat, n_cropped, n_piece_bos = pack_rows(buffer, refill, spec.B, row_len, spec.buffer_size,
                                                         spec.long_docs)
            except _Exhausted:  # `epochs` passes done: the rows of a partial batch are dropped
                _put(out, _End(), stop)
                return
            counts.packed += spec.B * row_len
            counts.cropped += n_cropped
            counts.piece_bos += n_piece_bos
            if reader.epoch != epoch:
                # the reader wrapped: close the epoch's books (counted at batch granularity:
                # what the buffer handed out between the two wraps)
                packed, cropped, piece_bos = (now - then for now, then in zip(counts.as_list(), epoch_start))
                last_epoch = {"epoch": reader.epoch - 1, "used_fraction": _used(packed, cropped, piece_bos),
                              "dataset_tokens": packed - piece_bos + cropped}
                epoch_start = counts.as_list()
            rows = torch.tensor(flat, dtype=torch.long).view(spec.B, row_len)
            # (2, B, T): [0] inputs, [1] targets, each contiguous; one host->device copy
            batch = torch.empty((2, spec.B, spec.T), dtype=torch.long, pin_memory=pin)
            batch[0].copy_(rows[:, :-1])
            batch[1].copy_(rows[:, 1:])
            state = _state(spec.split, spec.rank, spec.world_size, reader, buffer, names, counts, spec.long_docs,
                           epoch_start, last_epoch)
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
            if isinstance(item, _End):
                return
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
