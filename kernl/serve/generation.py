"""Continuous batching for generation bundles: a Scheduler (kernl.serve.scheduler) of "generate" requests.

One asyncio loop owns the batch (kernl.runtime.continuous). Each turn it retires rows whose clients went away or
whose text hit a stop string, admits waiting requests into the free rows (their prefill runs as one call, beside
the rows already decoding), and runs decode steps: STEPS_PER_TURN of them read back at once while no request
waits for a row (one host round trip per few tokens), one while some do (they join at the next step). The
blocking GPU work of a turn runs in ONE worker thread, so the event loop keeps serving HTTP meanwhile. Tokens go
to their requests' streams as each turn ends; a row that finishes leaves the batch in that turn and its client
gets its final chunk (a stop string found mid-turn discards the row's few tokens after it). A full queue answers 503 at
once; drain() refuses new requests and finishes every admitted and waiting one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from kernl.serve.detokenize import Detokenizer
from kernl.serve.errors import Unavailable
from kernl.serve.metrics import GenerationMetrics
from kernl.serve.scheduler import WorkerLoop

log = logging.getLogger("kernl.serve")
STEPS_PER_TURN = 4


@dataclass
class GenerationJob:
    """One request for the scheduler: its prompt's ids, Generator.request's options, and its stop strings."""

    prompt_ids: list[int]
    options: dict[str, Any]
    stop: list[str] = field(default_factory=list)


@dataclass
class Chunk:
    """What a stream yields: new text and the token ids it came from; finish_reason on the last chunk."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None


class GenerationStream:
    """One admitted request's tokens as they come (async iteration yields Chunks), then its counts."""

    def __init__(self, job: GenerationJob, request: Any, detokenizer: Detokenizer, eos: set[int]) -> None:
        self.job = job
        self.request = request
        self.detokenizer = detokenizer
        self.eos = eos
        self.arrived = time.monotonic()
        self.first_token_s: float | None = None
        self.prompt_tokens = len(job.prompt_ids)
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self.cancelled = False
        self._pending: list[int] = []  # ids whose text is not sent yet
        self._queue: asyncio.Queue = asyncio.Queue()

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    def cancel(self) -> None:
        """The client went away: its row leaves the batch at the next turn."""
        self.cancelled = True

    async def __aiter__(self) -> AsyncIterator[Chunk]:
        while True:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finish_reason is not None:
                return

    async def collect(self) -> tuple[str, Chunk]:
        """The whole text, and the last chunk (its finish_reason)."""
        parts, last = [], None
        async for chunk in self:
            parts.append(chunk.text)
            last = chunk
        return "".join(parts), last

    # Called on the event loop by the scheduler.
    def _token(self, token: int, last: bool) -> bool:
        """Take one generated token; returns True when the stream ended with it (eos, length or a stop string)."""
        if self.finished:
            return True
        if self.first_token_s is None:
            self.first_token_s = time.monotonic() - self.arrived
        self.token_ids.append(token)
        self._pending.append(token)
        at_eos = last and token in self.eos
        text = "" if at_eos else self.detokenizer.add(token)  # the eos token is not part of the text
        if self.detokenizer.stopped:
            reason = "stop"
        elif last:
            text += self.detokenizer.finish()
            reason = "stop" if at_eos else "length"
        else:
            reason = None
        if text or reason is not None:
            self._queue.put_nowait(Chunk(text, self._pending, reason))
            self._pending = []
            self.finish_reason = reason
        return reason is not None

    def _fail(self, err: BaseException) -> None:
        if not self.finished:
            self.finish_reason = "error"
            self._queue.put_nowait(err)


class GenerationScheduler(WorkerLoop):
    """The Scheduler of a generation bundle's "generate" requests: submit(kind, GenerationJob) -> GenerationStream."""

    kinds = frozenset({"generate"})

    def __init__(
        self,
        bundle: Any,
        tokenizer: Any,
        *,
        max_queue: int = 1024,
        max_rows: int | None = None,
        metrics: GenerationMetrics | None = None,
    ) -> None:
        # The bundle's generator and the lock its calls hold (a generate() in the same process waits for it).
        self.batch = bundle.continuous()
        self.generator = self.batch.gen
        self.lock = bundle.lock
        if max_rows is not None:
            self.batch.set_max_rows(min(max_rows, self.batch.rows))
        self.tokenizer = tokenizer
        self.max_queue = max_queue
        self.metrics = metrics
        self._waiting: deque[GenerationStream] = deque()
        self._running: dict[int, GenerationStream] = {}
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._closing = False

    @property
    def max_rows(self) -> int:
        return self.batch.max_rows

    # -- the Scheduler protocol ------------------------------------------------------------------------------

    def queue_length(self) -> int:
        return len(self._waiting)

    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._closing = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kernl-generate")
        # Every decode graph is captured before the first request: no capture runs while requests are prepared.
        await asyncio.get_running_loop().run_in_executor(self._executor, self._warm)
        self._task = asyncio.create_task(self._loop(), name="kernl-generation")

    async def submit(self, kind: str, payload: GenerationJob) -> GenerationStream:
        """Check the request (InputError: 400) and queue it; its stream yields chunks once it is admitted."""
        self._admit()
        request = await asyncio.to_thread(self.generator.request, [payload.prompt_ids], **payload.options)
        self._admit()
        eos = payload.options.get("eos_token_id")
        eos = set(self.generator.settings.eos_token_id if eos is None else [eos] if isinstance(eos, int) else eos)
        stream = GenerationStream(payload, request, Detokenizer(self.tokenizer, payload.stop), eos)
        self._waiting.append(stream)
        self._wake.set()
        return stream

    # -- the loop -------------------------------------------------------------------------------------------

    def _admit(self) -> None:
        if self._closing or self._task is None:
            raise Unavailable("the server is shutting down")
        if len(self._waiting) >= self.max_queue:
            raise Unavailable(f"the queue is full ({self.max_queue} requests waiting); retry later")

    def _warm(self) -> None:
        with self.lock:
            self.batch.warm()

    def _work(self, retire: list[int], requests: list[Any], steps: int):
        """One turn in the worker thread: retire rows, admit requests (one prefill call), up to `steps` decode
        steps read back together."""
        with self.lock:
            for slot in retire:
                self.batch.retire(slot)
            admitted = self.batch.admit(requests) if requests else []
            rows = self.generator.batch_bucket(max(self.batch.slots) + 1) if self.batch.slots else 0
            stepped = self.batch.steps(steps)
            return admitted, stepped, rows

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            retire = [slot for slot, s in self._running.items() if s.cancelled or s.finished]
            for slot in retire:
                del self._running[slot]
            while self._waiting and self._waiting[0].cancelled:
                self._waiting.popleft()
            if not self._waiting and not self._running and not retire:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            take: list[GenerationStream] = []
            free = self.batch.free() + len(retire)
            while self._waiting and len(take) < free:
                stream = self._waiting.popleft()
                if not stream.cancelled:
                    take.append(stream)
            running = len(self._running)
            steps = 1 if self._waiting else STEPS_PER_TURN  # a request waiting for a row joins at the next step
            try:
                admitted, stepped, rows = await loop.run_in_executor(
                    self._executor, self._work, retire, [s.request for s in take], steps
                )
            except Exception as err:  # never let the loop die: fail what was in the batch, keep serving
                log.exception("kernl serve: a generation step failed")
                await self._reset(loop, [*take, *self._running.values()], err)
                continue
            if take and self.metrics is not None:
                self.metrics.admit(len(take), running)
            delivered = 0
            for stream, token in zip(take, admitted, strict=True):
                if not token.finished:
                    self._running[token.slot] = stream
                self._first(stream)
                stream._token(token.token, token.finished)
                delivered += 1
            for step in stepped or [[]]:
                for token in step:
                    stream = self._running.get(token.slot)
                    if stream is None:
                        continue
                    if not stream.finished:
                        delivered += 1
                    stream._token(token.token, token.finished)
                    if token.finished:
                        del self._running[token.slot]
                if self.metrics is not None:
                    self.metrics.step(rows if step else 0, delivered, len(self.batch.slots))
                delivered = 0

    def _first(self, stream: GenerationStream) -> None:
        if self.metrics is not None:
            self.metrics.first(time.monotonic() - stream.arrived)

    async def _reset(self, loop, streams: list[GenerationStream], err: Exception) -> None:
        failure = RuntimeError(f"internal error while generating: {type(err).__name__}")
        for stream in streams:
            stream._fail(failure)
        self._running.clear()

        def retire_all() -> None:
            with self.lock:
                for slot in self.batch.active:
                    self.batch.retire(slot)

        try:
            await loop.run_in_executor(self._executor, retire_all)
        except Exception:
            log.exception("kernl serve: the decode batch could not be reset")
