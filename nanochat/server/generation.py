"""Generating replies on a replica's thread: the incremental row decoder (token ids to
text pieces, with stop strings) and the Generation, which hands its events to the event
loop through an asyncio.Queue.

Generated tokens are decoded incrementally with a UTF-8 decoder, so a multi-byte
character split over two tokens is emitted once complete. The tool-call special tokens
are reported as "marker" pieces and switch the kind of the text that follows.
"""
from __future__ import annotations

import asyncio
import codecs
import logging
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from nanochat.server.pool import Replica

log = logging.getLogger("nanochat.server")

# Special tokens that end an assistant turn, and the tool-call markers with the part
# kind that follows each: python code, then the tool's output, then text again.
TERMINATORS = ("<|assistant_end|>", "<|bos|>")
MARKERS = {
    "<|python_start|>": "python",
    "<|python_end|>": "text",
    "<|output_start|>": "python_output",
    "<|output_end|>": "text",
}
PART_KINDS = ("text", "python", "python_output", "marker")

Piece = tuple[str, str]  # (kind, text); kind in PART_KINDS


class RowDecoder:
    """Turns one sample's token ids into (kind, text) pieces, incrementally.

    Ordinary tokens are decoded through an incremental UTF-8 decoder, so a character
    split across tokens is emitted whole. Tool-call special tokens become ("marker",
    name) pieces and switch the kind of the text that follows. With stop strings, text
    that could be the beginning of a stop string is held back until it is not; once one
    matches, everything from the match on is dropped and `stopped` is set."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self._token_bytes = tokenizer.enc.decode_single_token_bytes
        self._markers = {tokenizer.encode_special(m): (m, kind) for m, kind in MARKERS.items()
                         if m in tokenizer.get_special_tokens()}
        self._specials = {tokenizer.encode_special(s) for s in tokenizer.get_special_tokens()}
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.kind = "text"
        self.stop = [s for s in stop if s]
        self.stopped = False
        self._held: list[Piece] = []
        self.text = ""  # everything emitted so far (OpenAI content)

    def push(self, token: int) -> list[Piece]:
        if self.stopped:
            return []
        if token in self._markers:
            name, next_kind = self._markers[token]
            pieces = self._flush_utf8() + [("marker", name)]
            self.kind = next_kind
        elif token in self._specials:
            pieces = []  # another special token mid-reply carries no text
        else:
            text = self._utf8.decode(self._token_bytes(token))
            pieces = [(self.kind, text)] if text else []
        return self._through_stop(pieces)

    def finish(self) -> list[Piece]:
        """Flush what is still held back (the reply ended)."""
        if self.stopped:
            return []
        out = self._through_stop(self._flush_utf8())
        if not self.stopped:  # held-back text can no longer become a stop string
            out += self._held
            self.text += "".join(t for _, t in self._held)
            self._held = []
        return out

    def _flush_utf8(self) -> list[Piece]:
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return [(self.kind, text)] if text else []

    def _through_stop(self, pieces: list[Piece]) -> list[Piece]:
        if not self.stop:
            self.text += "".join(t for _, t in pieces)
            return pieces
        self._held.extend(pieces)
        joined = "".join(t for _, t in self._held)
        cut = min((i for i in (joined.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            out, _ = _split_pieces(self._held, cut)
            self._held = []
            self.stopped = True
        else:
            keep = max(_overlap(joined, s) for s in self.stop)
            out, self._held = _split_pieces(self._held, len(joined) - keep)
        self.text += "".join(t for _, t in out)
        return out


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `stop`."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0


def _split_pieces(pieces: list[Piece], n_chars: int) -> tuple[list[Piece], list[Piece]]:
    head: list[Piece] = []
    tail: list[Piece] = []
    left = n_chars
    for kind, text in pieces:
        if left >= len(text):
            head.append((kind, text))
            left -= len(text)
        elif left > 0:
            head.append((kind, text[:left]))
            tail.append((kind, text[left:]))
            left = 0
        else:
            tail.append((kind, text))
    return [p for p in head if p[1]], [p for p in tail if p[1]]


# ---------------------------------------------------------------------------------------
# One generation request, run on a replica's thread

@dataclass
class Delta:
    row: int
    kind: str
    text: str


@dataclass
class Finish:
    row: int
    reason: str  # stop | length | cancelled
    tokens: int


@dataclass
class Failure:
    message: str


class Generation:
    """Samples `num_samples` replies to one prompt on a replica thread and streams
    Delta/Finish/Failure events to the event loop. `cancel()` (any thread) stops it
    at the next token."""

    _END = object()

    def __init__(self, tokens: list[int], *, num_samples: int, max_tokens: int, temperature: float,
                 top_k: int | None, seed: int, stop: Sequence[str] = ()):
        self.tokens = tokens
        self.num_samples = num_samples
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.top_k = top_k
        self.seed = seed
        self.stop = list(stop)
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self._cancel = threading.Event()
        self.cancelled = False
        self.error: str | None = None
        self.generated = 0
        self.elapsed = 0.0
        self.future: asyncio.Future | None = None

    def cancel(self) -> None:
        self._cancel.set()

    def _post(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    def run(self, replica: Replica) -> None:
        """The worker-thread body. Never raises; failures become a Failure event."""
        t0 = time.perf_counter()
        tok = replica.tokenizer
        terminators = {tok.encode_special(t) for t in TERMINATORS if t in tok.get_special_tokens()}
        rows = [RowDecoder(tok, self.stop) for _ in range(self.num_samples)]
        counts = [0] * self.num_samples
        finished = [False] * self.num_samples

        def finish(row: int, reason: str) -> None:
            for kind, text in rows[row].finish():
                self._post(Delta(row, kind, text))
            finished[row] = True
            self._post(Finish(row, reason, counts[row]))

        try:
            if replica.device.type == "cuda":
                torch.cuda.set_device(replica.device)  # the current device is per thread
            if self._cancel.is_set():
                self.cancelled = True
            else:
                # grad mode is thread-local: this thread needs its own inference_mode
                with torch.inference_mode():
                    stream = replica.engine.generate(
                        self.tokens, num_samples=self.num_samples, max_tokens=self.max_tokens,
                        temperature=self.temperature, top_k=self.top_k, seed=self.seed)
                    try:
                        for column, _forced in stream:
                            if self._cancel.is_set():
                                self.cancelled = True
                                break
                            for row, token in enumerate(column):
                                if finished[row]:
                                    continue
                                counts[row] += 1
                                if token in terminators:
                                    finish(row, "stop")
                                    continue
                                for kind, text in rows[row].push(int(token)):
                                    self._post(Delta(row, kind, text))
                                if rows[row].stopped:
                                    finish(row, "stop")
                            if all(finished):
                                break
                    finally:
                        stream.close()
            for row in range(self.num_samples):
                if not finished[row]:
                    finish(row, "cancelled" if self.cancelled else "length")
        except Exception as e:  # a replica failure must not take the server down
            log.exception("generation failed on replica %d", replica.index)
            self.error = f"generation failed: {type(e).__name__}: {e}"
            self._post(Failure(self.error))
        finally:
            self.generated = sum(counts)
            self.elapsed = time.perf_counter() - t0
            self._post(self._END)

    async def events(self) -> AsyncIterator[Delta | Finish | Failure]:
        while True:
            item = await self.queue.get()
            if item is self._END:
                return
            yield item

