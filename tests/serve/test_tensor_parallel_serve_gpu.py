"""`kernl serve BUNDLE --tensor-parallel 2` on two GPUs (NCCL, NVLink multicast off): rank 0 serves HTTP and rank 1
follows its calls; concurrent completions (joining one running batch) and a streamed one equal what the unsplit
bundle generates on one GPU, token for token (fp32)."""

import asyncio
import json

import httpx
import pytest
import torch

import kernl
from tests.serve.conftest import Server
from tests.serve.test_generation_server import generated, random_prompt, read_stream, tiny_chat_llama

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def two_gpus(monkeypatch):
    if not (torch.cuda.is_available() and torch.cuda.device_count() >= 2):
        pytest.skip("needs 2 CUDA GPUs; runs on a multi-GPU machine through scripts/gpu-check")
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "0")
    monkeypatch.setenv("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")


def test_a_tensor_parallel_server_answers_what_one_gpu_generates(tmp_path):
    _, tok = tiny_chat_llama(tmp_path / "tp1", device="cuda")
    tiny_chat_llama(tmp_path / "tp2", tensor_parallel=2, device="cuda")
    one = kernl.load(tmp_path / "tp1")
    rng = torch.Generator().manual_seed(11)
    prompts = [random_prompt(rng, n) for n in (3, 9, 5, 12)]
    server = Server(tmp_path / "tp2", "--tensor-parallel", "2", log=tmp_path / "tp2.log")
    try:
        server.wait_ready(timeout=300)

        async def ask_all():
            async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
                bodies = [{"prompt": p, "max_tokens": 10, "temperature": 0, "return_token_ids": True} for p in prompts]
                answers = await asyncio.gather(*(client.post("/v1/completions", json=b) for b in bodies))
                streamed, _ = await read_stream(client, "/v1/completions", {**bodies[1], "return_token_ids": False})
                return answers, streamed

        answers, streamed = asyncio.run(ask_all())
        for prompt, answer in zip(prompts, answers, strict=True):
            assert answer.status_code == 200, answer.text
            want = generated(one, tok(prompt).input_ids, 10)
            assert answer.json()["choices"][0]["token_ids"] == want, prompt
        text = "".join(chunk["choices"][0]["text"] for chunk in streamed)
        assert text == answers[1].json()["choices"][0]["text"]
        health = httpx.get(f"{server.url}/health", timeout=30)
        assert health.status_code == 200, health.text
        print(json.dumps(health.json()))
    finally:
        code = server.stop(timeout=120)
    assert code in (0, -15), server.output()[-3000:]
