"""`kernl serve` on localhost with the packaged MiniLM: answers, batching, bad input, back-pressure, draining."""

import asyncio
import base64
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from tests.serve.conftest import REPO, Server, free_port, metric, server_env

# kernl.serve.run with idle dispatch off: even a lone request waits out the window, so tests can hold requests
# in the queue (`kernl serve` runs a lone request at once).
HOLDING = "import sys; from kernl.serve import run; run(sys.argv[1], port=int(sys.argv[2]), idle_dispatch=False, " \
    "max_batch_delay_ms=1500, max_queue=2, model_name='small')"  # fmt: skip


class HoldingServer(Server):
    """A server whose batcher queues 2 requests and holds each for the full 1.5 s window."""

    def __init__(self, bundle, *, log) -> None:  # Server's fields, another command
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self._out = open(log, "w")  # noqa: SIM115 - closed in stop()
        cmd = [sys.executable, "-c", HOLDING, str(bundle), str(self.port)]
        self.proc = subprocess.Popen(cmd, stdout=self._out, stderr=subprocess.STDOUT, env=server_env(), cwd=REPO)


@pytest.fixture(scope="module")
def servers(minilm, tmp_path_factory):
    """Two servers started side by side: `main` batches within 20 ms; `small` queues 2 requests for 1.5 s."""
    logs = tmp_path_factory.mktemp("logs")
    main = Server(minilm[0], "--max-batch-delay-ms", "20", "--max-queue", "256", log=logs / "main.log")
    small = HoldingServer(minilm[0], log=logs / "small.log")
    try:
        yield main.wait_ready(), small.wait_ready()
    finally:
        main.stop()
        small.stop()


def assert_embedding(got, want) -> None:
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape == (384,)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert abs(np.linalg.norm(got) - 1) < 1e-4  # the model's Normalize module


def test_embeddings_equal_the_bundle_called_directly(servers, minilm):
    main = servers[0]
    _, texts, refs, tokens = minilm
    r = httpx.post(f"{main.url}/v1/embeddings", json={"input": texts[:5], "model": "minilm"}, timeout=120)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "list" and out["model"] == "minilm"
    assert [(d["object"], d["index"]) for d in out["data"]] == [("embedding", i) for i in range(5)]
    for row, ref in zip(out["data"], refs[:5]):
        assert_embedding(row["embedding"], ref)
    assert out["usage"] == {"prompt_tokens": sum(tokens[:5]), "total_tokens": sum(tokens[:5])}

    one = httpx.post(f"{main.url}/v1/embeddings", json={"input": texts[5]}, timeout=120).json()
    assert len(one["data"]) == 1
    assert_embedding(one["data"][0]["embedding"], refs[5])

    packed = httpx.post(f"{main.url}/v1/embeddings", json={"input": texts[6], "encoding_format": "base64"}, timeout=120)
    assert_embedding(np.frombuffer(base64.b64decode(packed.json()["data"][0]["embedding"]), "<f4"), refs[6])


def test_health_and_models(servers):
    main = servers[0]
    health = httpx.get(f"{main.url}/health").json()
    assert health["status"] == "ok" and health["model"] == "minilm" and health["task"] == "feature-extraction"
    models = httpx.get(f"{main.url}/v1/models").json()
    assert models["object"] == "list"
    assert [(m["id"], m["object"], m["task"]) for m in models["data"]] == [("minilm", "model", "feature-extraction")]
    assert models["data"][0]["buckets"] == [[1, 32], [8, 32], [16, 64]]


async def _post_all(url: str, bodies: list[dict]) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(bodies))
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        return await asyncio.gather(*(client.post("/v1/embeddings", json=body) for body in bodies))


def test_64_concurrent_clients_are_batched_and_answered_correctly(servers, minilm):
    main = servers[0]
    _, texts, refs, _ = minilm
    before = httpx.get(f"{main.url}/metrics").text
    answers = asyncio.run(_post_all(main.url, [{"input": text} for text in texts]))
    assert [r.status_code for r in answers] == [200] * 64
    for answer, ref in zip(answers, refs):
        assert_embedding(answer.json()["data"][0]["embedding"], ref)

    after = httpx.get(f"{main.url}/metrics").text
    calls = metric(after, "kernl_batch_requests_count") - metric(before, "kernl_batch_requests_count")
    merged = metric(after, "kernl_batch_requests_sum") - metric(before, "kernl_batch_requests_sum")
    alone = metric(after, 'kernl_batch_requests_bucket{le="1.0"}') - metric(
        before, 'kernl_batch_requests_bucket{le="1.0"}'
    )
    assert merged == 64
    assert calls < 64 and alone < calls  # fewer bundle calls than requests: some merged several requests
    assert metric(after, 'kernl_batch_size_bucket{le="16.0"}') == metric(after, "kernl_batch_size_count")  # <= 16 rows
    assert metric(after, 'kernl_requests_total{endpoint="/v1/embeddings",status="200"}') >= 64
    assert metric(after, "kernl_queue_length") == 0
    assert 'kernl_request_seconds_bucket{endpoint="/v1/embeddings",le="+Inf"}' in after


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b'{"input": ', 422, "JSON"),
        ({"input": 5}, 422, "input"),
        ({"input": ["fine", 3]}, 422, "input"),
        ({"model": "minilm"}, 422, "input: Field required"),
        ({"input": "x", "encoding_format": "int8"}, 422, "encoding_format"),
        ({"input": []}, 400, "input: empty"),
        ({"input": "x", "dimensions": 3}, 400, "dimensions: 3 asked; this model's embeddings have 384"),
        ({"input": "word " * 100}, 413, "input 0: longer than 64 tokens"),
        ({"input": ["x"] * 17}, 413, "input: 17 texts, at most 16 a request"),
        ({"input": "x", "model": "text-embedding-3-small"}, 404, "not served here"),
    ],
)
def test_bad_requests_answer_4xx_and_the_server_keeps_serving(servers, body, status, message):
    main = servers[0]
    if isinstance(body, bytes):
        r = httpx.post(f"{main.url}/v1/embeddings", content=body, headers={"content-type": "application/json"})
    else:
        r = httpx.post(f"{main.url}/v1/embeddings", json=body, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == status and message in error["message"]
    assert httpx.post(f"{main.url}/v1/embeddings", json={"input": "still here"}, timeout=120).status_code == 200


def test_endpoints_of_other_tasks_are_not_there(servers):
    main = servers[0]
    r = httpx.post(f"{main.url}/v1/predict", json={"input": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == 404


def test_a_full_queue_answers_503_at_once(servers, minilm):
    small = servers[1]
    _, texts, refs, _ = minilm
    start = time.monotonic()
    answers = asyncio.run(_post_all(small.url, [{"input": text} for text in texts[:3]]))
    statuses = sorted(r.status_code for r in answers)
    assert statuses == [200, 200, 503]
    refused = next(r for r in answers if r.status_code == 503)
    assert refused.headers["retry-after"] == "1" and "queue is full" in refused.json()["error"]["message"]
    assert refused.elapsed.total_seconds() < 1.2 < time.monotonic() - start  # before the batch's 1.5 s window closed
    for answer, ref in zip(answers, refs):
        if answer.status_code == 200:
            assert_embedding(answer.json()["data"][0]["embedding"], ref)
    r = httpx.post(f"{small.url}/v1/embeddings", json={"input": texts[3]}, timeout=60)
    assert r.status_code == 200
    assert_embedding(r.json()["data"][0]["embedding"], refs[3])


def test_sigterm_drains_the_queue_then_exits(servers, minilm):
    small: Server = servers[1]
    _, texts, refs, _ = minilm
    with ThreadPoolExecutor(2) as pool:
        pending = [
            pool.submit(httpx.post, f"{small.url}/v1/embeddings", json={"input": texts[i]}, timeout=60) for i in (7, 8)
        ]
        deadline = time.monotonic() + 30
        while metric(httpx.get(f"{small.url}/metrics").text, "kernl_requests_in_flight") < 2:
            assert time.monotonic() < deadline, "the requests never reached the server"
            time.sleep(0.05)
        small.proc.send_signal(signal.SIGTERM)  # while both wait in the queue (a 1.5 s batching window)
        answers = [p.result() for p in pending]
    assert [a.status_code for a in answers] == [200, 200]
    for answer, i in zip(answers, (7, 8)):
        assert_embedding(answer.json()["data"][0]["embedding"], refs[i])
    # uvicorn re-raises the signal once it has shut down cleanly
    assert small.proc.wait(60) in (0, -signal.SIGTERM)
    log = small.output()
    assert "Waiting for application shutdown." in log and "Application shutdown complete." in log
    assert "Traceback" not in log
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{small.url}/health")


def test_a_body_that_is_not_json_answers_422(servers):
    main = servers[0]
    r = httpx.post(f"{main.url}/v1/embeddings", content=b"input=x", headers={"content-type": "text/plain"})
    assert r.status_code == 422 and r.json()["error"]["code"] == 422
    assert "valid dictionary" in r.json()["error"]["message"]
    r = httpx.post(f"{main.url}/v1/embeddings", content=b'{"input": "x"}', headers={"content-type": "application/json"})
    assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 384
