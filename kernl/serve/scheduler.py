"""Request kinds to the scheduler that answers them.

A scheduler owns a queue and decides how requests share the bundle: DynamicBatcher merges encoder requests
into one call per bucket; a generation scheduler (continuous batching) registers its own kinds beside it.
"""

from __future__ import annotations

from typing import Any, Protocol

from kernl.errors import KernlError


class Scheduler(Protocol):
    """What the app needs of a scheduler: the request kinds it answers, submit, queue length, start and drain."""

    kinds: frozenset[str]

    def queue_length(self) -> int:
        """Requests waiting, not yet in a running bundle call."""

    async def start(self) -> None:
        """Start serving; called once on the server's event loop."""

    async def submit(self, kind: str, payload: Any) -> Any:
        """Answer one request; raises a kernl error (kernl.serve.errors.status_of gives its HTTP status)."""

    async def drain(self) -> None:
        """Refuse new requests, answer every queued one, then stop."""


class WorkerLoop:
    """A scheduler's loop task and its one worker thread (GPU work runs there): drain stops both after the loop
    has answered what it holds. Subclasses set _closing, _task, _wake and _executor."""

    _closing: bool
    _task: Any
    _wake: Any
    _executor: Any

    async def drain(self) -> None:
        self._closing = True
        if self._task is not None:
            self._wake.set()
            await self._task
            self._task = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None


class Dispatcher:
    """kind -> scheduler; every request goes through submit(kind, payload)."""

    def __init__(self, schedulers: list[Scheduler]) -> None:
        self.schedulers = list(schedulers)
        self._by_kind: dict[str, Scheduler] = {}
        for scheduler in self.schedulers:
            for kind in scheduler.kinds:
                if kind in self._by_kind:
                    raise KernlError(f"request kind {kind!r}: answered by two schedulers")
                self._by_kind[kind] = scheduler

    @property
    def kinds(self) -> frozenset[str]:
        return frozenset(self._by_kind)

    def queue_length(self) -> int:
        return sum(s.queue_length() for s in self.schedulers)

    async def start(self) -> None:
        for scheduler in self.schedulers:
            await scheduler.start()

    async def submit(self, kind: str, payload: Any) -> Any:
        return await self._by_kind[kind].submit(kind, payload)

    async def drain(self) -> None:
        for scheduler in self.schedulers:
            await scheduler.drain()
