"""DynamicBatcher with a recording handler: what it merges, when it runs, what it refuses, how it drains."""

import asyncio
import random

import pytest

from kernl.errors import InputError
from kernl.serve.batcher import DynamicBatcher, Prepared
from kernl.serve.errors import TooLarge, Unavailable, status_of


class Recorder:
    """prepare: payload (rows, seq, value); run: each item's value doubled, after recording the batch.
    A value of None fails the whole call it is in."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []

    def prepare(self, payload):
        rows, seq, value = payload
        if rows == 0:
            raise InputError("input: empty")
        return Prepared(rows, seq, value)

    def run(self, items):
        self.calls.append([item.data for item in items])
        if any(item.data is None for item in items):
            raise RuntimeError("a poisoned row")
        return [item.data * 2 for item in items]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def started(buckets, **options) -> tuple[DynamicBatcher, Recorder]:
    handler = Recorder()
    batcher = DynamicBatcher({"embed": handler}, buckets, **options)
    await batcher.start()
    return batcher, handler


def test_requests_within_the_window_share_one_call_and_get_their_own_answers():
    async def main():
        batcher, handler = await started([(8, 16)], max_delay_ms=200)
        values = random.sample(range(1000), 5)
        answers = await asyncio.gather(*(batcher.submit("embed", (1, 4, v)) for v in values))
        await batcher.drain()
        return values, answers, handler.calls

    values, answers, calls = run(main())
    assert answers == [2 * v for v in values]
    assert calls == [values]  # one call, in arrival order


def test_a_full_call_runs_without_waiting_out_the_window():
    async def main():
        batcher, handler = await started([(2, 16)], max_delay_ms=10_000)
        loop = asyncio.get_running_loop()
        start = loop.time()
        answers = await asyncio.gather(*(batcher.submit("embed", (1, 4, v)) for v in (1, 2, 3, 4)))
        elapsed = loop.time() - start
        await batcher.drain()
        return answers, handler.calls, elapsed

    answers, calls, elapsed = run(main())
    assert answers == [2, 4, 6, 8] and calls == [[1, 2], [3, 4]]
    assert elapsed < 5  # two full calls of 2 rows: neither waited the 10 s window


def test_a_batch_only_takes_what_one_bucket_covers_in_arrival_order():
    async def main():
        # 4 rows of up to 8 tokens, or 1 row of up to 32.
        batcher, handler = await started([(4, 8), (1, 32)], max_delay_ms=50)
        payloads = [(1, 4, 1), (2, 8, 2), (1, 30, 3), (1, 5, 4), (2, 6, 5)]
        answers = await asyncio.gather(*(batcher.submit("embed", p) for p in payloads))
        await batcher.drain()
        return answers, handler.calls

    answers, calls = run(main())
    assert answers == [2, 4, 6, 8, 10]
    # [1, 2] stops at the long row; the long row runs alone; then the rest.
    assert calls == [[1, 2], [3], [4, 5]]


def test_input_no_bucket_covers_is_refused_before_queueing():
    async def main():
        batcher, handler = await started([(4, 8), (1, 32)], max_rows=2)
        with pytest.raises(TooLarge, match="3 input\\(s\\) of up to 4 tokens: no bucket takes them") as err:
            await batcher.submit("embed", (3, 4, 1))  # over max_rows
        with pytest.raises(TooLarge):
            await batcher.submit("embed", (2, 9, 1))  # 2 rows of 9 tokens: no bucket
        with pytest.raises(InputError, match="input: empty"):
            await batcher.submit("embed", (0, 1, 1))
        assert await batcher.submit("embed", (1, 32, 7)) == 14
        await batcher.drain()
        return err.value, handler.calls

    err, calls = run(main())
    assert status_of(err) == 413 and calls == [[7]]


def test_a_full_queue_refuses_at_once_with_503():
    async def main():
        batcher, handler = await started([(8, 16)], max_delay_ms=300, max_queue=3)
        accepted = [asyncio.create_task(batcher.submit("embed", (1, 4, v))) for v in (1, 2, 3)]
        await asyncio.sleep(0.05)
        with pytest.raises(Unavailable, match="queue is full") as err:
            await batcher.submit("embed", (1, 4, 4))
        assert batcher.queue_length() == 3
        answers = await asyncio.gather(*accepted)
        assert await batcher.submit("embed", (1, 4, 5)) == 10  # room again once the batch ran
        await batcher.drain()
        return err.value, answers

    err, answers = run(main())
    assert status_of(err) == 503 and answers == [2, 4, 6]


def test_a_failing_call_is_retried_row_by_row_so_only_the_bad_request_fails():
    async def main():
        batcher, handler = await started([(8, 16)], max_delay_ms=100)
        results = await asyncio.gather(
            *(batcher.submit("embed", (1, 4, v)) for v in (1, None, 3)), return_exceptions=True
        )
        after = await batcher.submit("embed", (1, 4, 9))  # the worker is still alive
        await batcher.drain()
        return results, after, handler.calls

    results, after, calls = run(main())
    assert results[0] == 2 and results[2] == 6 and after == 18
    assert isinstance(results[1], RuntimeError) and status_of(results[1]) == 500
    assert calls == [[1, None, 3], [1], [None], [3], [9]]


def test_a_request_whose_client_left_is_skipped():
    async def main():
        batcher, handler = await started([(8, 16)], max_delay_ms=200)
        gone = asyncio.create_task(batcher.submit("embed", (1, 4, 1)))
        kept = asyncio.create_task(batcher.submit("embed", (1, 4, 2)))
        await asyncio.sleep(0.05)
        gone.cancel()
        answer = await kept
        await batcher.drain()
        return answer, handler.calls

    answer, calls = run(main())
    assert answer == 4 and calls == [[2]]


def test_drain_answers_every_queued_request_then_refuses_new_ones():
    async def main():
        batcher, handler = await started([(8, 16)], max_delay_ms=5_000)
        queued = [asyncio.create_task(batcher.submit("embed", (1, 4, v))) for v in (1, 2, 3)]
        await asyncio.sleep(0.05)
        loop = asyncio.get_running_loop()
        start = loop.time()
        await batcher.drain()  # does not wait out the 5 s window
        elapsed = loop.time() - start
        with pytest.raises(Unavailable, match="shutting down"):
            await batcher.submit("embed", (1, 4, 4))
        return [q.result() for q in queued], elapsed, handler.calls

    answers, elapsed, calls = run(main())
    assert answers == [2, 4, 6] and calls == [[1, 2, 3]] and elapsed < 4


def test_kinds_are_batched_apart():
    async def main():
        a, b = Recorder(), Recorder()
        batcher = DynamicBatcher({"a": a, "b": b}, [(8, 16)], max_delay_ms=100)
        await batcher.start()
        kinds = ["a", "b", "a", "b", "a"]
        answers = await asyncio.gather(*(batcher.submit(k, (1, 4, i)) for i, k in enumerate(kinds)))
        await batcher.drain()
        return answers, a.calls, b.calls

    answers, a_calls, b_calls = run(main())
    assert answers == [0, 2, 4, 6, 8]
    assert a_calls == [[0, 2, 4]] and b_calls == [[1, 3]]


def test_a_kind_has_one_scheduler():
    from kernl.errors import KernlError
    from kernl.serve.scheduler import Dispatcher

    first = DynamicBatcher({"embed": Recorder()}, [(8, 16)])
    second = DynamicBatcher({"embed": Recorder(), "other": Recorder()}, [(8, 16)])
    assert Dispatcher([first]).kinds == {"embed"}
    with pytest.raises(KernlError, match="request kind 'embed': answered by two schedulers"):
        Dispatcher([first, second])


class Cheap(Recorder):
    """A Recorder whose requests are prepared on the event loop (as short texts are), and whose calls take a while."""

    def __init__(self, seconds: float = 0.0) -> None:
        super().__init__()
        self.seconds = seconds

    def cheap(self, payload) -> bool:
        return True

    def run(self, items):
        import time

        time.sleep(self.seconds)
        return super().run(items)


def test_a_lone_request_on_an_idle_batcher_runs_at_once():
    async def main():
        batcher, handler = await started([(8, 16)], max_delay_ms=10_000)
        loop = asyncio.get_running_loop()
        value = random.randrange(1000)
        start = loop.time()
        answer = await batcher.submit("embed", (1, 4, value))
        elapsed = loop.time() - start
        await batcher.drain()
        return value, answer, elapsed, handler.calls

    value, answer, elapsed, calls = run(main())
    assert answer == 2 * value and calls == [[value]]
    assert elapsed < 5  # nothing could join it: it did not wait out the 10 s window


def test_without_idle_dispatch_a_lone_request_waits_its_window():
    async def main():
        batcher, handler = await started([(8, 16)], max_delay_ms=300, idle_dispatch=False)
        loop = asyncio.get_running_loop()
        start = loop.time()
        answer = await batcher.submit("embed", (1, 4, 3))
        elapsed = loop.time() - start
        await batcher.drain()
        return answer, elapsed

    answer, elapsed = run(main())
    assert answer == 6 and elapsed >= 0.29


@pytest.mark.parametrize("handler", [Recorder, Cheap], ids=["prepared-in-a-thread", "prepared-on-the-loop"])
def test_requests_arriving_together_still_share_one_call_with_idle_dispatch(handler):
    async def main():
        recorder = handler()
        batcher = DynamicBatcher({"embed": recorder}, [(8, 16)], max_delay_ms=200)
        await batcher.start()
        values = random.sample(range(1000), 6)
        answers = await asyncio.gather(*(batcher.submit("embed", (1, 4, v)) for v in values))
        await batcher.drain()
        return values, answers, recorder.calls

    values, answers, calls = run(main())
    assert answers == [2 * v for v in values] and calls == [values]  # the first did not run alone


def test_requests_that_arrive_during_a_call_are_merged_into_the_next():
    async def main():
        handler = Cheap(seconds=0.3)
        batcher = DynamicBatcher({"embed": handler}, [(8, 16)], max_delay_ms=1)
        await batcher.start()
        first = asyncio.create_task(batcher.submit("embed", (1, 4, 1)))
        await asyncio.sleep(0.1)  # the first call is running (alone: the batcher was idle)
        later = [asyncio.create_task(batcher.submit("embed", (1, 4, v))) for v in (2, 3, 4)]
        for v in (5, 6, 7):
            await asyncio.sleep(0.02)
            later.append(asyncio.create_task(batcher.submit("embed", (1, 4, v))))
        answers = [await first] + list(await asyncio.gather(*later))
        await batcher.drain()
        return answers, handler.calls

    answers, calls = run(main())
    assert calls == [[1], [2, 3, 4, 5, 6, 7]]  # under load batches still form: they queue while a call runs
    assert answers == [2 * v for v in (1, 2, 3, 4, 5, 6, 7)]
