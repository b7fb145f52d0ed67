"""EncoderHandler on the CPU MiniLM bundle: a batch tokenized at once in the worker, per-request errors, calls fitted
to the buckets, and embeddings equal to the bundle called directly on each text alone."""

import asyncio
import random
import time

import numpy as np
import pytest

import kernl
from kernl.serve.batcher import DynamicBatcher, Prepared
from kernl.serve.encoder import Answer, Encoder, EncoderHandler, Texts
from kernl.serve.errors import TooLarge, status_of
from kernl.serve.pooling import Pooling
from kernl.serve.tasks import embeddings
from tests.serve.conftest import random_texts
from tests.serve.test_fast_routes import reference, text_of

pytestmark = pytest.mark.usefixtures("cpu_references")


@pytest.fixture(scope="module")
def bundle(minilm, cpu_references):
    return kernl.load(minilm[0])


class Shapes:
    """The bundle, announcing other buckets (the real ones still cover every call) and recording each call's
    [rows, seq]."""

    def __init__(self, bundle, buckets) -> None:
        self.inner, self.buckets, self.calls = bundle, buckets, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, **inputs):
        self.calls.append(tuple(inputs["input_ids"].shape))
        return self.inner(**inputs)


def handler_of(bundle) -> EncoderHandler:
    encoder = Encoder(bundle, bundle.tokenizer, max_seq=64)
    return EncoderHandler(encoder, embeddings(Pooling.from_manifest(bundle.manifest)), outputs=["last_hidden_state"])


def check_answer(answer, bundle, texts) -> None:
    assert isinstance(answer, Answer), answer
    assert answer.result.shape == (len(texts), 384) and answer.result.dtype == np.float32
    for row, text in zip(answer.result, texts, strict=True):
        np.testing.assert_allclose(row, reference(bundle, text), atol=2e-6, rtol=0)
    assert answer.tokens == sum(int(bundle.tokenizer([t])["attention_mask"].sum()) for t in texts)


def test_a_too_long_request_fails_alone_and_the_others_equal_the_bundle_called_directly(bundle):
    rng = random.Random(time.time_ns())
    longest = max(s for _, s in bundle.buckets)
    over = text_of(bundle, longest + 1, rng)
    requests = [random_texts(1, rng), [*random_texts(2, rng), over], random_texts(5, rng), [text_of(bundle, 9, rng)]]
    handler = handler_of(bundle)
    items = [handler.prepare(Texts(texts, {})) for texts in requests]
    results = handler.run(items)
    assert isinstance(results[1], TooLarge) and status_of(results[1]) == 413
    assert str(results[1]) == f"input 2: longer than {longest} tokens, the most this server takes"
    for i in (0, 2, 3):
        check_answer(results[i], bundle, requests[i])


def test_requests_no_bucket_covers_together_run_in_several_calls(bundle):
    """4 rows of up to 64 tokens, or 16 of up to 32: a request with a 40-token text and one of 10 short texts take
    a call each; a request that no bucket covers alone gets the batcher's 413."""
    rng = random.Random(time.time_ns())
    shapes = Shapes(bundle, [(4, 64), (16, 32)])
    handler = handler_of(shapes)
    long_one = [text_of(bundle, 40, rng), *random_texts(2, rng, max_words=5)]
    short = random_texts(10, rng, max_words=5)
    too_wide = [text_of(bundle, 40, rng) for _ in range(5)]  # 5 rows of 40 tokens: no bucket
    results = handler.run([handler.prepare(Texts(t, {})) for t in (long_one, short, too_wide)])
    check_answer(results[0], bundle, long_one)
    check_answer(results[1], bundle, short)
    assert isinstance(results[2], TooLarge) and "5 input(s) of up to 40 tokens: no bucket takes them" in str(results[2])
    assert shapes.calls == [(3, 40), (10, max(len(bundle.tokenizer([t])["input_ids"][0]) for t in short))]


def test_a_batch_with_a_bad_request_answers_the_others_through_the_batcher(bundle):
    """Requests that wait out one window share a call; the one with a too-long text gets its 413 there."""
    rng = random.Random(time.time_ns())
    handler = handler_of(bundle)
    runs: list[list[Prepared]] = []
    run = handler.run
    handler.run = lambda items: runs.append(items) or run(items)
    over = [text_of(bundle, max(s for _, s in bundle.buckets) + 1, rng)]
    requests = [random_texts(3, rng), over, random_texts(1, rng)]

    async def main():
        batcher = DynamicBatcher({"embeddings": handler}, bundle.buckets, max_delay_ms=300, idle_dispatch=False)
        await batcher.start()
        results = await asyncio.gather(
            *(batcher.submit("embeddings", Texts(t, {})) for t in requests), return_exceptions=True
        )
        await batcher.drain()
        return results

    results = asyncio.run(asyncio.wait_for(main(), 60))
    assert len(runs) == 1 and len(runs[0]) == 3  # one batch, not re-run request by request
    assert isinstance(results[1], TooLarge) and str(results[1]).startswith("input 0: longer than")
    check_answer(results[0], bundle, requests[0])
    check_answer(results[2], bundle, requests[2])
