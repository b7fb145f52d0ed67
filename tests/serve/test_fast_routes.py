"""The fast routes (kernl.serve.fast_routes): POST /v1/embeddings and /v1/predict answered in front of FastAPI's
router, with the answers, error bodies, statuses and metrics the FastAPI routes gave."""

import base64
import json
import random
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from pydantic import ValidationError

import kernl
from kernl.serve import app
from tests.serve.conftest import Server, metric, random_texts

pytestmark = pytest.mark.usefixtures("cpu_references")  # the bundle is also called in this process
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def bundle(minilm, cpu_references):
    return kernl.load(minilm[0])


@pytest.fixture(scope="module")
def server(minilm, tmp_path_factory):
    log = tmp_path_factory.mktemp("fast-routes") / "server.log"
    main = Server(minilm[0], "--max-batch-delay-ms", "20", log=log)
    try:
        yield main.wait_ready()
    finally:
        main.stop()


def reference(bundle, text: str) -> np.ndarray:
    """bundle(...) on the text alone, then sentence-transformers' mean pooling and Normalize module."""
    inputs = bundle.tokenizer([text])
    hidden = bundle(**inputs).last_hidden_state.float()
    mask = inputs["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)[0].numpy()


def test_the_router_never_sees_the_encoder_endpoints(bundle):
    """A user's middleware around the app sees whether FastAPI's router handled a request (it leaves "router" in
    the scope): the POSTs to /v1/embeddings are answered before it, the rest still reach it; Observe counts all."""
    api = app(bundle)
    routed = {}

    class Spy:
        def __init__(self, inner) -> None:
            self.inner = inner

        async def __call__(self, scope, receive, send) -> None:
            await self.inner(scope, receive, send)
            if scope["type"] == "http":
                routed[scope["method"], scope["path"]] = "router" in scope

    api.add_middleware(Spy)
    with TestClient(api) as client:
        ok = client.post("/v1/embeddings", json={"input": "a fresh text"})
        assert ok.status_code == 200 and len(ok.json()["data"][0]["embedding"]) == 384
        assert client.post("/v1/embeddings", json={"input": []}).status_code == 400
        assert client.get("/v1/embeddings").status_code == 405  # other methods: FastAPI's route answers
        schema = client.get("/openapi.json").json()
        text = client.get("/metrics").text
    assert routed == {
        ("POST", "/v1/embeddings"): False,
        ("GET", "/v1/embeddings"): True,
        ("GET", "/openapi.json"): True,
        ("GET", "/metrics"): True,
    }
    body = schema["paths"]["/v1/embeddings"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["required"] == ["input"]
    for status in (200, 400, 405):
        assert metric(text, f'kernl_requests_total{{endpoint="/v1/embeddings",status="{status}"}}') == 1
    assert metric(text, 'kernl_request_seconds_count{endpoint="/v1/embeddings"}') == 3
    assert metric(text, "kernl_requests_in_flight") == 0


def test_embeddings_of_fresh_texts_equal_the_bundle_called_directly(server, bundle):
    rng = random.Random(time.time_ns())
    texts = random_texts(7, rng) + [f"café {rng.randint(0, 10**6)} naïve — 東京 über straße 🙂"]
    for text in texts[:4]:  # one text a request: the same call as bundle(...) on it alone
        r = httpx.post(f"{server.url}/v1/embeddings", json={"input": text}, timeout=60)
        assert r.status_code == 200 and r.headers["content-type"] == "application/json"
        assert int(r.headers["content-length"]) == len(r.content)
        got = np.asarray(r.json()["data"][0]["embedding"], dtype=np.float32)
        np.testing.assert_allclose(got, reference(bundle, text), atol=2e-6, rtol=0)
    r = httpx.post(f"{server.url}/v1/embeddings", json={"input": texts, "model": "minilm"}, timeout=60)
    out = r.json()
    assert [(d["object"], d["index"]) for d in out["data"]] == [("embedding", i) for i in range(len(texts))]
    for row, text in zip(out["data"], texts, strict=True):  # padded together: the bundle masks the padding
        np.testing.assert_allclose(np.float32(row["embedding"]), reference(bundle, text), atol=2e-6, rtol=0)
    tokens = sum(len(bundle.tokenizer([t])["input_ids"][0]) for t in texts)
    assert out["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens} and out["model"] == "minilm"


# The bodies HEAD's FastAPI routes answered (before the fast routes), word for word; then one fix.
NOT_A_DICT = "body: Input should be a valid dictionary or object to extract fields from"
NOT_TEXT = "input.str: Input should be a valid string; input.list[str]: Input should be a valid list"
BAD = [
    (b'{"input": ', JSON, 422, "10: JSON decode error"),
    (b'{"input": "x"} trailing', JSON, 422, "15: JSON decode error"),
    (b"", JSON, 422, "0: JSON decode error"),
    (b"[1, 2]", JSON, 422, NOT_A_DICT),
    (b"input=x", {"content-type": "text/plain"}, 422, NOT_A_DICT),
    (b'{"input": "x"}', {}, 422, NOT_A_DICT),
    (b'{"input": 5}', JSON, 422, NOT_TEXT),
    (b'{"model": "minilm"}', JSON, 422, "input: Field required"),
    (b'{"input": "x", "encoding_format": "int8"}', JSON, 422, "encoding_format: Input should be 'float' or 'base64'"),
    (b'{"input": "x", "dimensions": 0}', JSON, 422, "dimensions: Input should be greater than or equal to 1"),
    (b'{"input": []}', JSON, 400, "input: empty; give a string or a non-empty list of strings"),
    (b'{"input": "x", "dimensions": 3}', JSON, 400, "dimensions: 3 asked; this model's embeddings have 384"),
    (
        json.dumps({"input": "word " * 100}).encode(),
        JSON,
        413,
        "input 0: longer than 64 tokens, the most this server takes",
    ),
    (json.dumps({"input": ["x"] * 17}).encode(), JSON, 413, "input: 17 texts, at most 16 a request"),
    (b'{"input": "x", "model": "gpt"}', JSON, 404, "model 'gpt': not served here (this server serves 'minilm')"),
    # HEAD answered a body that is not UTF-8 with a 500 (json.loads' UnicodeDecodeError); it is a malformed body.
    (b'{"input": "\xff"}', JSON, 422, "11: JSON decode error"),
]
KINDS = {
    400: "invalid_request_error",
    404: "not_found_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
}


@pytest.mark.parametrize(("raw", "headers", "status", "message"), BAD)
def test_bad_requests_answer_the_same_error_bodies(server, raw, headers, status, message):
    r = httpx.post(f"{server.url}/v1/embeddings", content=raw, headers=headers, timeout=60)
    assert r.status_code == status
    assert r.json() == {"error": {"message": message, "type": KINDS[status], "code": status}}
    assert r.headers["content-type"] == "application/json" and "retry-after" not in r.headers


def test_a_utf16_body_is_still_taken(server, bundle):
    """pydantic's parser takes UTF-8 only; the slow path behind it still takes what json.loads did."""
    r = httpx.post(f"{server.url}/v1/embeddings", content='{"input": "naïve café"}'.encode("utf-16"), headers=JSON)
    assert r.status_code == 200
    np.testing.assert_allclose(np.float32(r.json()["data"][0]["embedding"]), reference(bundle, "naïve café"), atol=2e-6)


def text_of(bundle, tokens: int, rng: random.Random) -> str:
    """A random text of exactly tokens tokens, special tokens included (words that overshoot are skipped)."""
    text = ""
    for word in " ".join(random_texts(100, rng)).split():
        longer = f"{text} {word}".strip()
        n = int(bundle.tokenizer([longer])["attention_mask"].sum())
        text = longer if n <= tokens else text
        if n == tokens:
            return text
    raise AssertionError(f"no text of {tokens} tokens")


def test_texts_of_the_longest_bucket_are_taken_one_token_more_answers_413(server, bundle):
    """The length check at its edge: a text of exactly the longest bucket's length is answered (beside a short
    one: rows padded to it), a text one token longer is refused by its index in the request."""
    longest, rng = max(s for _, s in bundle.buckets), random.Random(time.time_ns())
    fits, short, over = text_of(bundle, longest, rng), text_of(bundle, 5, rng), text_of(bundle, longest + 1, rng)
    r = httpx.post(f"{server.url}/v1/embeddings", json={"input": [short, fits]}, timeout=60)
    assert r.status_code == 200, r.text
    for row, text in zip(r.json()["data"], [short, fits], strict=True):
        np.testing.assert_allclose(np.float32(row["embedding"]), reference(bundle, text), atol=2e-6, rtol=0)
    r = httpx.post(f"{server.url}/v1/embeddings", json={"input": [fits, over]}, timeout=60)
    assert r.status_code == 413
    assert r.json()["error"]["message"] == f"input 1: longer than {longest} tokens, the most this server takes"


def test_a_full_queue_answers_503_through_the_fast_routes(bundle):
    """One request waits out a 2 s window in a queue of one; the others are refused at once, with Retry-After."""
    api = app(bundle, max_queue=1, idle_dispatch=False, max_batch_delay_ms=2000)
    with TestClient(api) as client, ThreadPoolExecutor(3) as pool:
        start = time.monotonic()
        answers = list(pool.map(lambda i: client.post("/v1/embeddings", json={"input": f"text {i}"}), range(3)))
        refused = [r for r in answers if r.status_code == 503]
        assert sorted(r.status_code for r in answers) == [200, 503, 503] and time.monotonic() - start > 1.5
        text = client.get("/metrics").text
    message = "the queue is full (1 requests waiting); retry later"
    for r in refused:
        assert r.json() == {"error": {"message": message, "type": "server_error", "code": 503}}
        assert r.headers["retry-after"] == "1"
    assert metric(text, 'kernl_requests_total{endpoint="/v1/embeddings",status="503"}') == 2


class Poisoned:
    """A loaded bundle whose outputs are NaN: the answer cannot be JSON."""

    def __init__(self, bundle) -> None:
        self.inner = bundle

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, **inputs):
        return {name: torch.full_like(t, float("nan")) for name, t in self.inner(**inputs).items()}


def test_an_unexpected_error_answers_500_from_the_apps_handler(bundle):
    """As before (json.dumps refused NaN): a 500 with the app's error body, counted in the metrics; base64 carries
    the NaN bytes as it did."""
    with TestClient(app(Poisoned(bundle)), raise_server_exceptions=False) as client:
        r = client.post("/v1/embeddings", json={"input": "x"})
        packed = client.post("/v1/embeddings", json={"input": "x", "encoding_format": "base64"})
        text = client.get("/metrics").text
    message = "internal error: ValueError: Out of range float values are not JSON compliant: nan"
    assert r.status_code == 500 and r.json() == {"error": {"message": message, "type": "server_error", "code": 500}}
    assert packed.status_code == 200
    assert np.isnan(np.frombuffer(base64.b64decode(packed.json()["data"][0]["embedding"]), "<f4")).all()
    assert metric(text, 'kernl_requests_total{endpoint="/v1/embeddings",status="500"}') == 1


BODIES = [
    b'{"input": "x"}',
    b'{"input": ["a", "b"], "dimensions": 3.0, "extra": {"deep": [1, 2]}}',
    b'{"input": "x", "dimensions": true}',
    b'{"input": "x", "top_k": "5"}',
    b'{"input": "x", "top_k": 5.5}',
    b'{"input": "x", "input": ["y"]}',
    b'{"input": "x", "model": null, "encoding_format": "base64"}',
    b'{"input": ["a", null]}',
    b'{"input": "x", "top_k": 1e400}',
    b'  {"input": "\\u00e9\\n"}  ',
    b'{"input": "\\ud800"}',
    b'\xef\xbb\xbf{"input": "x"}',
    b'{"input": "x", "top_k": 100.0, "dimensions": -0}',
]


@pytest.mark.parametrize("raw", BODIES)
def test_the_fast_parse_takes_what_json_loads_and_validate_took(raw):
    """parse_body against the old parse (json.loads, then model_validate): the same model, or both refuse."""
    from fastapi.exceptions import RequestValidationError

    from kernl.serve.bodies import parse_body
    from kernl.serve.schemas import EmbeddingsBody, PredictBody

    for model in (EmbeddingsBody, PredictBody):
        try:
            want = model.model_validate(json.loads(raw))
        except (ValidationError, ValueError):
            with pytest.raises(RequestValidationError):
                parse_body(model, raw, "application/json")
        else:
            assert parse_body(model, raw, "application/json; charset=utf-8") == want


def test_json_floats_round_trip_exactly_with_or_without_orjson(monkeypatch):
    from kernl.serve import responses

    assert responses.orjson is not None  # the serve extra installs it
    rows = np.random.default_rng(time.time_ns() % 2**32).standard_normal((3, 384)).astype(np.float32)
    content = {"data": [{"embedding": row, "label": "é"} for row in rows]}
    fast = responses.dumps(content)
    back = np.array([d["embedding"] for d in json.loads(fast)["data"]], dtype=np.float32)
    assert np.array_equal(back, rows)  # float32's shortest repr parses back to the very same float32
    assert len(fast) < len(json.dumps({"data": [{"embedding": r.tolist(), "label": "é"} for r in rows]}))
    monkeypatch.setattr(responses, "orjson", None)  # json instead: float64 reprs of the same float32 values
    slow = json.loads(responses.dumps(content))
    assert [d["label"] for d in slow["data"]] == ["é"] * 3
    assert np.array_equal(np.float32([d["embedding"] for d in slow["data"]]), rows)
