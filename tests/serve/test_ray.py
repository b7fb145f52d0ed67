"""`kernl serve BUNDLE --ray --replicas 2`: two Ray Serve replicas on a local cluster answer the same API."""

import asyncio

import httpx
import pytest

from tests.serve.conftest import Server
from tests.serve.test_server import _post_all, assert_embedding

pytest.importorskip("ray.serve", reason="Ray Serve replicas need the ray extra: pip install 'kernl[ray]'")


def test_two_ray_replicas_answer_the_same_api(minilm, tmp_path):
    bundle, texts, refs, _ = minilm
    server = Server(bundle, "--ray", "--replicas", "2", "--max-batch-delay-ms", "20", log=tmp_path / "ray.log")
    try:
        server.wait_ready(timeout=300)
        answers = asyncio.run(_post_all(server.url, [{"input": text} for text in texts[:16]]))
        assert [r.status_code for r in answers] == [200] * 16
        for answer, ref in zip(answers, refs):
            assert_embedding(answer.json()["data"][0]["embedding"], ref)
        replicas = {httpx.get(f"{server.url}/health", timeout=30).json()["replica"] for _ in range(40)}
        assert len(replicas) == 2, replicas  # Ray's router spreads requests over both
        models = httpx.get(f"{server.url}/v1/models", timeout=30).json()
        assert models["data"][0]["id"] == "minilm"
        bad = httpx.post(f"{server.url}/v1/embeddings", json={"input": "word " * 100}, timeout=30)
        assert bad.status_code == 413
    finally:
        code = server.stop(timeout=120)
    assert code in (0, -15), server.output()[-3000:]
