"""The replica pool: model copies, each with its own worker thread, handed out to
requests through an asyncio queue.

A request takes a free replica (waiting in line if all are busy, bounded by
`max_queue`, else PoolBusy, which the app answers with 503 + Retry-After), and the
token-by-token generation runs in that replica's thread so the event loop stays free
to answer other requests. The replica is handed back by the worker thread's completion
callback, i.e. only once the thread really stopped touching the model, whether the
request finished, failed, was cancelled by a client that went away, or by shutdown.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from nanochat.server.generation import Generation

log = logging.getLogger("nanochat.server")


@dataclass(eq=False)
class Replica:
    """One model copy on one device, used by one thread at a time."""
    index: int
    engine: Any                      # nanochat.engine.Engine
    tokenizer: Any                   # nanochat.tokenizer.Tokenizer
    device: torch.device = torch.device("cpu")
    context_len: int | None = None   # prompt + completion must fit (the trained sequence length)
    busy: bool = False
    requests: int = 0
    errors: int = 0
    executor: ThreadPoolExecutor = field(init=False, repr=False)

    def __post_init__(self):
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"nanochat-replica{self.index}")


class PoolBusy(Exception):
    pass


class ReplicaPool:
    """Free replicas in an asyncio queue; at most `max_queue` requests wait for one."""

    def __init__(self, replicas: Sequence[Replica], max_queue: int):
        if not replicas:
            raise ValueError("the server needs at least one model replica")
        self.replicas = list(replicas)
        self.max_queue = max_queue
        self.waiting = 0
        self.draining = False
        self.active: set[Generation] = set()
        self._free: asyncio.Queue[Replica] = asyncio.Queue()
        for r in self.replicas:
            self._free.put_nowait(r)
        # counters for /stats
        self.started_at = time.time()
        self.requests = 0
        self.rejected = 0
        self.cancelled = 0
        self.failed = 0
        self.tokens = 0
        self.busy_seconds = 0.0
        self.recent: list[tuple[float, int]] = []   # (finish time, tokens) of the last minute

    @property
    def tokenizer(self):
        return self.replicas[0].tokenizer

    @property
    def context_len(self) -> int | None:
        return self.replicas[0].context_len

    def available(self) -> int:
        return self._free.qsize()

    async def acquire(self) -> Replica:
        if self.draining:
            raise PoolBusy("the server is shutting down")
        if self._free.empty() and self.waiting >= self.max_queue:
            self.rejected += 1
            raise PoolBusy(f"all {len(self.replicas)} replica(s) are busy and {self.waiting} request(s) "
                           f"are already waiting (max_queue={self.max_queue}); retry shortly")
        self.waiting += 1
        try:
            replica = await self._free.get()
        finally:
            self.waiting -= 1
        if self.draining:
            self.release(replica)
            raise PoolBusy("the server is shutting down")
        replica.busy = True
        return replica

    def release(self, replica: Replica) -> None:
        assert replica.busy or self.draining, "released a replica that was not taken"
        replica.busy = False
        self._free.put_nowait(replica)

    def start(self, replica: Replica, gen: Generation) -> None:
        """Run `gen` on `replica`'s thread; the replica returns to the pool when the
        thread is done with it."""
        loop = asyncio.get_running_loop()
        replica.requests += 1
        self.requests += 1
        self.active.add(gen)
        future = loop.run_in_executor(replica.executor, gen.run, replica)

        def done(_):
            self.active.discard(gen)
            self._account(gen, replica)
            self.release(replica)
        future.add_done_callback(done)
        gen.future = future

    def _account(self, gen: Generation, replica: Replica) -> None:
        self.tokens += gen.generated
        self.busy_seconds += gen.elapsed
        now = time.time()
        self.recent = [(t, n) for t, n in self.recent if now - t < 60.0] + [(now, gen.generated)]
        if gen.error is not None:
            self.failed += 1
            replica.errors += 1
        elif gen.cancelled:
            self.cancelled += 1
        outcome = "failed" if gen.error else "cancelled" if gen.cancelled else "done"
        log.info("replica %d: %s, prompt %d tokens, generated %d in %.2fs (%.1f tok/s)", replica.index, outcome,
                 len(gen.tokens), gen.generated, gen.elapsed, gen.generated / max(gen.elapsed, 1e-9))

    def retry_after(self) -> int:
        """Seconds a refused client should wait: about one average generation."""
        finished = max(1, self.requests - len(self.active))
        return max(1, min(60, math.ceil(self.busy_seconds / finished)))

    def stats(self) -> dict:
        now = time.time()
        recent = sum(n for t, n in self.recent if now - t < 60.0)
        return {
            "replicas": len(self.replicas),
            "busy_replicas": sum(r.busy for r in self.replicas),
            "available_replicas": self.available(),
            "queue_length": self.waiting,
            "max_queue": self.max_queue,
            "requests": self.requests,
            "active_requests": len(self.active),
            "rejected_requests": self.rejected,
            "cancelled_requests": self.cancelled,
            "failed_requests": self.failed,
            "tokens_served": self.tokens,
            # decode speed while generating, and served throughput over the last minute
            "tokens_per_second": round(self.tokens / self.busy_seconds, 2) if self.busy_seconds > 0 else 0.0,
            "tokens_per_second_last_minute": round(recent / 60.0, 2),
            "uptime_seconds": round(now - self.started_at, 1),
        }

    async def close(self, timeout: float) -> None:
        """Refuse new work, give in-flight generations `timeout` seconds, cancel the
        rest, and wait for every replica thread to let go of its model."""
        self.draining = True
        pending = [g.future for g in self.active if g.future is not None]
        if pending:
            _, still = await asyncio.wait(pending, timeout=timeout)
            for gen in list(self.active):
                gen.cancel()
            if still:
                await asyncio.wait(still, timeout=max(5.0, timeout))
        for r in self.replicas:
            r.executor.shutdown(wait=False, cancel_futures=True)

