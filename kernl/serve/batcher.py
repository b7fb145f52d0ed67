"""Dynamic batching: requests that arrive within a short window share one bundle call.

Each request is prepared on its own (validated, tokenized): on the event loop when its handler says that is
cheap (a few short texts: a thread hop would cost more), else in a thread; then it waits in one FIFO queue. The
worker takes the head request and, for at most max_batch_delay_ms after it arrived, lets later requests of the
same kind join while their rows and length still fit one bucket; the batch then runs as ONE call in a single
worker thread (the event loop stays free) and each request gets its own slice back. With idle_dispatch (the
default) a lone request runs at once: when it is the only one waiting and none is being prepared, no other can
join its window, so waiting it out would only add latency; under load requests pile up while a call runs and
still form batches. The queue is the only queue: the bundle's lock is never waited on by more than this one thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from kernl.serve.errors import TooLarge, Unavailable
from kernl.serve.scheduler import WorkerLoop

log = logging.getLogger("kernl.serve")


@dataclass
class Prepared:
    """One request, ready to join a batch: its row count, its longest row in tokens, and the handler's data."""

    rows: int
    seq: int
    data: Any = None


class BatchHandler(Protocol):
    """Turns one kind of request into rows, and runs a batch of them as one bundle call."""

    def prepare(self, payload: Any) -> Prepared:
        """Validate and tokenize one request (runs in a thread); raise kernl.InputError for bad input."""

    def run(self, items: list[Prepared]) -> list[Any]:
        """One result a request, from ONE bundle call over all their rows (runs in the worker thread)."""

    # Optional: cheap(payload) -> bool, True when prepare(payload) is fast enough to run on the event loop.


class BatchObserver(Protocol):
    """What the batcher reports (kernl.serve.metrics.Metrics)."""

    def queued(self, length: int) -> None: ...

    def batch(self, rows: int, requests: int, seconds: float) -> None: ...


@dataclass
class _Waiting:
    kind: str
    item: Prepared
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)


class DynamicBatcher(WorkerLoop):
    """A Scheduler (kernl.serve.scheduler) for requests answered by one forward call of the bundle.

    handlers: request kind -> BatchHandler. buckets: the bundle's (batch, seq) buckets; a batch is formed only
    while some bucket covers its rows and longest row. max_rows: cap on rows a call (default: the largest batch).
    idle_dispatch: a request alone in the queue, with none being prepared, runs at once instead of waiting out
    max_delay_ms (False: every request waits its window, for deployments that always want to batch).
    """

    def __init__(
        self,
        handlers: dict[str, BatchHandler],
        buckets: Sequence[tuple[int, int]],
        *,
        max_rows: int | None = None,
        max_queue: int = 1024,
        max_delay_ms: float = 5.0,
        observer: BatchObserver | None = None,
        idle_dispatch: bool = True,
    ) -> None:
        self.handlers = dict(handlers)
        self.kinds = frozenset(self.handlers)
        self.buckets = [tuple(b) for b in buckets]
        largest = max(b for b, _ in self.buckets)
        self.max_rows = min(max_rows or largest, largest)
        self.max_queue = max_queue
        self.max_delay = max_delay_ms / 1000
        self.observer = observer
        self.idle_dispatch = idle_dispatch
        self._preparing = 0  # requests being prepared in a thread: they may still join the head's window
        self._waiting: deque[_Waiting] = deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closing = False
        self._executor: ThreadPoolExecutor | None = None

    # -- the Scheduler protocol ------------------------------------------------------------------------------

    def queue_length(self) -> int:
        return len(self._waiting)

    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._closing = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kernl-bundle")
        self._task = asyncio.create_task(self._loop(), name="kernl-batcher")

    async def submit(self, kind: str, payload: Any) -> Any:
        self._admit()  # refuse at once, before tokenizing, when the queue is already full
        handler = self.handlers[kind]
        cheap = getattr(handler, "cheap", None)
        if cheap is not None and cheap(payload):
            item = handler.prepare(payload)
        else:
            self._preparing += 1
            try:
                item = await asyncio.to_thread(handler.prepare, payload)
            finally:
                self._preparing -= 1
                self._wake.set()  # the head may have been waiting for this one only
        if not self.fits(item.rows, item.seq):
            raise TooLarge(
                f"{item.rows} input(s) of up to {item.seq} tokens: no bucket takes them "
                f"(buckets: {', '.join(f'{b}x{s}' for b, s in self.buckets)}; at most {self.max_rows} rows a call)"
            )
        self._admit()
        waiting = _Waiting(kind, item, asyncio.get_running_loop().create_future())
        self._waiting.append(waiting)
        self._queued()
        self._wake.set()
        # A client that goes away cancels this await and so the future: the worker then skips the request.
        return await waiting.future

    # -- batching -------------------------------------------------------------------------------------------

    def fits(self, rows: int, seq: int) -> bool:
        """Whether one call of rows rows, the longest seq tokens, has a covering bucket within max_rows."""
        return rows <= self.max_rows and any(b >= rows and s >= seq for b, s in self.buckets)

    def _admit(self) -> None:
        if self._closing or self._task is None:
            raise Unavailable("the server is shutting down")
        if len(self._waiting) >= self.max_queue:
            raise Unavailable(f"the queue is full ({self.max_queue} requests waiting); retry later")

    def _queued(self) -> None:
        if self.observer is not None:
            self.observer.queued(len(self._waiting))

    def _plan(self, kind: str) -> tuple[list[_Waiting], bool]:
        """The waiting requests of kind that one call takes, in arrival order, and whether that call is full.

        Stops at the first request that does not fit, so a long request is never passed over for ever."""
        taken: list[_Waiting] = []
        rows = seq = 0
        for waiting in self._waiting:
            if waiting.kind != kind or waiting.future.done():
                continue
            item = waiting.item
            if not self.fits(rows + item.rows, max(seq, item.seq)):
                return taken, True
            taken.append(waiting)
            rows, seq = rows + item.rows, max(seq, item.seq)
        return taken, rows >= self.max_rows

    def _alone(self) -> bool:
        """Whether nothing can join the head's window now: it waits alone and no request is being prepared."""
        return self.idle_dispatch and self._preparing == 0 and len(self._waiting) == 1

    def _drop_cancelled(self) -> None:
        while self._waiting and self._waiting[0].future.done():
            self._waiting.popleft()

    async def _loop(self) -> None:
        while True:
            self._drop_cancelled()
            if not self._waiting:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            head = self._waiting[0]
            # Wait for others to join until the head's window closes or the call is full; when draining, go now.
            while not self._closing:
                taken, full = self._plan(head.kind)
                left = head.arrived + self.max_delay - time.monotonic()
                if full or left <= 0 or head.future.done() or self._alone():
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), left)
                except TimeoutError:
                    break
            taken, _ = self._plan(head.kind)
            if not taken:
                continue
            for waiting in taken:
                self._waiting.remove(waiting)
            self._queued()
            try:
                await self._run(head.kind, taken)
            except Exception:  # never let the worker die: the next batch must still run
                log.exception("kernl serve: batch of %d requests failed", len(taken))
                for waiting in taken:
                    if not waiting.future.done():
                        waiting.future.set_exception(RuntimeError("internal error while running the batch"))

    async def _run(self, kind: str, batch: list[_Waiting]) -> None:
        handler = self.handlers[kind]
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        try:
            results = await loop.run_in_executor(self._executor, handler.run, [w.item for w in batch])
            outcomes = [(w, r, None) for w, r in zip(batch, results, strict=True)]
        except Exception as err:
            if len(batch) == 1:
                outcomes = [(batch[0], None, err)]
            else:
                # One bad request must not fail the others: run each alone, each gets its own answer.
                outcomes = []
                for waiting in batch:
                    try:
                        (result,) = await loop.run_in_executor(self._executor, handler.run, [waiting.item])
                        outcomes.append((waiting, result, None))
                    except Exception as one:
                        outcomes.append((waiting, None, one))
        if self.observer is not None:
            self.observer.batch(sum(w.item.rows for w in batch), len(batch), time.perf_counter() - start)
        for waiting, result, err in outcomes:
            if waiting.future.done():  # its client went away
                continue
            if err is None:
                waiting.future.set_result(result)
            else:
                waiting.future.set_exception(err)
