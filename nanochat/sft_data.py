"""
SFT batches: whole conversations packed best-fit into padded rows (BOS-aligned).

`SFTLoader` packs rendered conversations into rows of T+1 tokens, best fit first, as
the reference's SFT loader does: a row is filled by repeatedly taking the longest
buffered conversation that still fits whole; when none fits, the rest of the row is
padding. Conversations are never split across rows, so every row starts with BOS and
the model trains on exactly the layout it will see at inference. Conversations longer
than a row are truncated to the row (the reference would keep them in the buffer
forever); one left without any supervised token is skipped (it still counts as
consumed). Targets are -1 (ignored by the loss) on padding and on every token the
rendering mask marks unsupervised (user turns, tool outputs, BOS, <|assistant_start|>).
The loader's state (position, epoch, buffered conversations by index) is a small JSON
dict that resumes it exactly.

The dataset is anything with `len()` and `[i]` -> conversation (a `nanochat.tasks`
Task or TaskMixture); which conversations to train on is decided by the sft stage.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from nanochat.dataloader import BestFitBuffer
from nanochat.errors import UserError



def pack_batch(rows: Sequence[tuple[list[int], list[int]]], bos_id: int,
               row_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tensors from packed rows: `rows` holds one (ids, mask) pair of lists per row, at
    most `row_len` tokens each; the rest of a row is BOS padding with mask 0. Returns
    inputs (B, row_len-1) and targets (B, row_len-1), -1 where the target's mask is 0."""
    B = len(rows)
    ids = np.full((B, row_len), bos_id, dtype=np.int64)
    mask = np.zeros((B, row_len), dtype=np.int8)
    for r, (row_ids, row_mask) in enumerate(rows):
        assert len(row_ids) == len(row_mask) <= row_len
        ids[r, :len(row_ids)] = row_ids
        mask[r, :len(row_mask)] = row_mask
    inputs = torch.from_numpy(ids[:, :-1].copy())
    targets = torch.from_numpy(np.where(mask[:, 1:] == 1, ids[:, 1:], -1))
    return inputs, targets


class SFTLoader:
    """Batches (inputs, targets) of shape (B, T) from a dataset of conversations.

    Rank r of W reads conversations r, r+W, r+2W, ... wrapping around the dataset (the
    epoch counts the wraps). `progress` is the fraction of one epoch consumed, counted
    over all ranks (each rank's own count × W), and `epoch_done` turns True once a whole
    epoch has been packed into batches; the training loop stops there by default.
    Iterating never ends: past the first epoch it continues into the next.
    """

    def __init__(self, dataset, tokenizer, batch_size: int, seq_len: int, *, device: torch.device | str = "cpu",
                 rank: int = 0, world_size: int = 1, buffer_size: int = 100, state: dict | None = None):
        if len(dataset) == 0:
            raise UserError("the SFT dataset is empty")
        self.dataset, self.tokenizer = dataset, tokenizer
        self.B, self.T = batch_size, seq_len
        self.row_len = seq_len + 1  # +1: the last position's target
        self.device = torch.device(device)
        self.rank, self.world_size, self.buffer_size = rank, world_size, buffer_size
        self.bos = tokenizer.get_bos_token_id()
        self.buffer = BestFitBuffer()
        self.cursor, self.consumed, self.epoch, self.batches = rank, rank, 1, 0
        self.padding_tokens = self.content_tokens = 0
        self.skipped = 0  # conversations without a supervised token left after truncation
        if state is not None:
            self._restore(state)

    # -- state ---------------------------------------------------------------------

    def state_dict(self) -> dict:
        """JSON-serialisable position; buffered conversations are kept by index."""
        return {"cursor": self.cursor, "consumed": self.consumed, "epoch": self.epoch, "batches": self.batches,
                "buffer": list(self.buffer.refs()), "dataset_size": len(self.dataset),
                "rank": self.rank, "world_size": self.world_size,
                "padding_tokens": self.padding_tokens, "content_tokens": self.content_tokens,
                "skipped": self.skipped}

    def _restore(self, state: dict) -> None:
        try:
            size, rank, world = state["dataset_size"], state["rank"], state["world_size"]
            buffered = [int(i) for i in state["buffer"]]
            cursor, consumed, epoch, batches = (int(state[k]) for k in ("cursor", "consumed", "epoch", "batches"))
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"the SFT loader state is malformed ({type(e).__name__}: {e}); "
                            "resume from a checkpoint written by `nanochat sft`") from e
        if size != len(self.dataset) or (rank, world) != (self.rank, self.world_size):
            raise UserError(f"the SFT loader state was saved for a mixture of {size:,} rows on rank {rank} of "
                            f"{world}, but this run has {len(self.dataset):,} rows on rank {self.rank} of "
                            f"{self.world_size}; resume with the same --mixture and number of processes")
        self.cursor, self.consumed, self.epoch, self.batches = cursor, consumed, epoch, batches
        self.padding_tokens = int(state.get("padding_tokens", 0))
        self.content_tokens = int(state.get("content_tokens", 0))
        self.skipped = int(state.get("skipped", 0))
        for index in buffered:
            encoded = self._render(index)
            if encoded is None:
                raise UserError("the SFT loader state lists a conversation that renders differently now; "
                                "resume with the same --max-seq-len and tokenizer")
            self.buffer.add(index, encoded)

    # -- progress ------------------------------------------------------------------

    @property
    def progress(self) -> float:
        return self.consumed / len(self.dataset)

    @property
    def epoch_done(self) -> bool:
        return self.consumed >= len(self.dataset)

    @property
    def padding_fraction(self) -> float:
        total = self.padding_tokens + self.content_tokens
        return self.padding_tokens / total if total else 0.0

    # -- packing -------------------------------------------------------------------

    def _render(self, index: int) -> list[int] | None:
        """The conversation's tokens, unsupervised ones stored as ~id (= -id-1 < 0): one
        int list carries ids and mask, so the length-keyed best-fit buffer of the
        pretraining loader is reused as is. None when truncation to the row left no
        supervised token (nothing to learn from it)."""
        ids, mask = self.tokenizer.render_conversation(self.dataset[index], max_tokens=self.row_len)
        if not any(mask):
            return None
        return [t if m else ~t for t, m in zip(ids, mask)]

    def _refill(self) -> None:
        misses = 0
        while len(self.buffer) < self.buffer_size:
            index = self.cursor
            self.cursor += self.world_size
            if self.cursor >= len(self.dataset):
                self.cursor %= len(self.dataset)
                self.epoch += 1
            encoded = self._render(index)
            if encoded is None:
                # skipped, but it counts as consumed: the epoch still ends on time
                self.consumed += self.world_size
                self.skipped += 1
                misses += 1
                if misses > len(self.dataset):
                    raise UserError(f"no conversation of the mixture keeps an assistant token within "
                                    f"{self.row_len} tokens; raise --max-seq-len")
                continue
            self.buffer.add(index, encoded)

    def _next_row(self) -> list[int]:
        row: list[int] = []
        while len(row) < self.row_len:
            self._refill()
            conv = self.buffer.pop_largest_fitting(self.row_len - len(row))
            if conv is None:
                break  # nothing fits whole: pad the rest
            row.extend(conv)
            self.consumed += self.world_size
        return row

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = []
        for _ in range(self.B):
            packed = np.asarray(self._next_row(), dtype=np.int64)
            supervised = packed >= 0
            rows.append((np.where(supervised, packed, ~packed).tolist(), supervised.astype(np.int8).tolist()))
            self.content_tokens += len(packed)
            self.padding_tokens += self.row_len - len(packed)
        self.batches += 1
        inputs, targets = pack_batch(rows, self.bos, self.row_len)
        if self.device.type == "cuda":
            return (inputs.pin_memory().to(self.device, non_blocking=True),
                    targets.pin_memory().to(self.device, non_blocking=True))
        return inputs.to(self.device), targets.to(self.device)
