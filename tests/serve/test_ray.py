"""`kernl serve BUNDLE --ray`: two Ray Serve replicas on a local cluster answer the same API; a replica serves a
tensor-parallel bundle."""

import asyncio

import httpx
import pytest
import torch

from tests.serve.conftest import Server
from tests.serve.test_server import _post_all, assert_embedding

pytest.importorskip("ray.serve", reason="Ray Serve replicas need the ray extra: pip install 'kernl[ray]'")
# One local Ray cluster at a time (pytest-xdist runs a group on one worker).
pytestmark = pytest.mark.xdist_group("ray")


@pytest.fixture(autouse=True)
def patient_proxy(monkeypatch):
    """Ray Serve gives its HTTP proxy 5 s to report ready: on a 2-core CI machine busy with other tests, more."""
    monkeypatch.setenv("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
    monkeypatch.setenv("RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S", "60")


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


def test_a_ray_replica_serves_a_tensor_parallel_bundle(tmp_path):
    """`--ray --tensor-parallel 2`: one replica is rank 0 of a 2-rank bundle and starts rank 1 itself (gloo here;
    on GPUs the replica reserves 2 of them); its completions are the unsplit model's greedy tokens."""
    from tests.runtime.test_generation import hf_greedy
    from tests.serve.test_generation_server import random_prompt, tiny_chat_llama

    model, tok = tiny_chat_llama(tmp_path / "tp2", tensor_parallel=2)
    server = Server(tmp_path / "tp2", "--ray", "--tensor-parallel", "2", log=tmp_path / "ray-tp.log")
    try:
        server.wait_ready(timeout=300)
        prompt = random_prompt(torch.Generator().manual_seed(3), 6)
        body = {"prompt": prompt, "max_tokens": 8, "temperature": 0, "return_token_ids": True}
        answer = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)
        assert answer.status_code == 200, answer.text
        ids = tok(prompt).input_ids
        want = hf_greedy(model, [ids], max_new_tokens=8, eos=3)[0, len(ids) :].tolist()
        want = want[: want.index(3) + 1] if 3 in want else want
        assert answer.json()["choices"][0]["token_ids"] == want
    finally:
        code = server.stop(timeout=120)
    assert code in (0, -15), server.output()[-3000:]
