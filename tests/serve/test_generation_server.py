"""`kernl serve` with a generation bundle on localhost: completions and chat completions, continuous batching,
server-sent events, bad input, back-pressure, draining. A tiny random Llama with a word-level tokenizer whose
config carries a chat template; CPU kernels through their torch references (the server process runs without
TRITON_INTERPRET)."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import httpx
import pytest
import torch

import kernl
from tests.serve.conftest import Server, metric

pytestmark = pytest.mark.usefixtures("cpu_references")

WORDS = ("the a cat dog sat on mat is was good bad movie film great awful i liked it . , ! you we they run walk "
         "house tree river sun moon red blue green big small user assistant system hello how are").split()  # fmt: skip
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} . {% endfor %}"
            "{% if add_generation_prompt %}assistant :{% endif %}")  # fmt: skip
MAX_LENGTH = 48


class InlineTemplate:
    """The tokenizer, saved with its chat template inside tokenizer_config.json (as many hub models ship it)."""

    def __init__(self, tok) -> None:
        self.tok = tok

    def save_pretrained(self, folder: str) -> None:
        from pathlib import Path

        self.tok.save_pretrained(folder)
        root = Path(folder)
        (root / "chat_template.jinja").unlink(missing_ok=True)
        config = json.loads((root / "tokenizer_config.json").read_text())
        config["chat_template"] = TEMPLATE
        (root / "tokenizer_config.json").write_text(json.dumps(config))


def tiny_chat_llama(path, tensor_parallel: int = 1, device: str = "cpu"):
    """A tiny random Llama generation bundle at path with a word-level tokenizer (chat template in its config);
    returns (the model, transformers' tokenizer)."""
    import transformers

    torch.manual_seed(0)
    sizes = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 intermediate_size=128, max_position_embeddings=64)  # fmt: skip
    config = transformers.LlamaConfig(vocab_size=len(VOCAB), bos_token_id=2, eos_token_id=3, pad_token_id=0, **sizes)
    model = transformers.LlamaForCausalLM(config).eval()
    tok = transformers.BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)})
    tok.chat_template = TEMPLATE
    kernl.compile(model.to(device), path, buckets=[], device=device, tokenizer=InlineTemplate(tok),
                  generation={"max_length": MAX_LENGTH, "batch_sizes": [1, 2, 4], "seq_lens": [8, 16]},
                  tensor_parallel=tensor_parallel)  # fmt: skip
    return model, tok


@pytest.fixture(scope="module")
def gen(tmp_path_factory, cpu_references):
    """(bundle path, the bundle loaded here, transformers' tokenizer)."""
    path = tmp_path_factory.mktemp("gen") / "tiny-llama"
    _, tok = tiny_chat_llama(path)
    return path, kernl.load(path, device="cpu"), tok


@pytest.fixture(scope="module")
def servers(gen, tmp_path_factory):
    """`main` serves with the defaults; `small` decodes one row at a time and queues one request."""
    logs = tmp_path_factory.mktemp("logs")
    main = Server(gen[0], log=logs / "main.log")
    small = Server(gen[0], "--max-batch", "1", "--max-queue", "1", log=logs / "small.log")
    try:
        yield main.wait_ready(), small.wait_ready()
    finally:
        main.stop()
        small.stop()


def generated(bundle, ids: list[int], n: int, ignore_eos: bool = False) -> list[int]:
    """The new tokens bundle.generate gives ids alone (greedy), up to and with the eos token."""
    options = {"eos_token_id": []} if ignore_eos else {}
    new = bundle.generate([ids], max_new_tokens=n, **options)[0, len(ids) :].tolist()
    eos = bundle.manifest["generation"]["eos_token_id"]
    return new if ignore_eos or eos not in new else new[: new.index(eos) + 1]


def random_prompt(rng: torch.Generator, n: int) -> str:
    return " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS) - 6, (n,), generator=rng))


async def read_stream(client: httpx.AsyncClient, path: str, body: dict, started: asyncio.Event | None = None):
    """(chunks, raw event lines) of a streamed request; started is set at the first chunk."""
    chunks, lines = [], []
    async with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, await r.aread()
        assert r.headers["content-type"].startswith("text/event-stream")
        async for line in r.aiter_lines():
            lines.append(line)
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
                if started is not None:
                    started.set()
    return chunks, lines


def test_completions_equal_bundle_generate(servers, gen):
    main = servers[0]
    _, bundle, tok = gen
    rng = torch.Generator().manual_seed(1)
    for prompt in (random_prompt(rng, 5), random_prompt(rng, 9)):
        body = {"prompt": prompt, "max_tokens": 12, "temperature": 0, "return_token_ids": True, "model": "tiny-llama"}
        r = httpx.post(f"{main.url}/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        out = r.json()
        ids = tok(prompt).input_ids  # with the special tokens, as transformers' tokenizer adds them
        want = generated(bundle, ids, 12)
        choice = out["choices"][0]
        assert choice["token_ids"] == want
        assert choice["finish_reason"] == ("stop" if want[-1] == 3 else "length")  # 3: eos
        assert choice["text"] == tok.decode(want, skip_special_tokens=True)
        assert out["object"] == "text_completion" and out["model"] == "tiny-llama" and out["id"].startswith("cmpl-")
        assert out["usage"] == {"prompt_tokens": len(ids), "completion_tokens": len(want),
                                "total_tokens": len(ids) + len(want)}  # fmt: skip
    # A prompt of token ids, and ignore_eos: exactly max_tokens tokens.
    ids = torch.randint(5, len(VOCAB), (6,), generator=rng).tolist()
    body = {"prompt": ids, "max_tokens": 20, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    choice = httpx.post(f"{main.url}/v1/completions", json=body, timeout=120).json()["choices"][0]
    assert choice["token_ids"] == generated(bundle, ids, 20, ignore_eos=True)
    assert choice["finish_reason"] == "length"


async def _staggered(url: str, bodies: list[dict]) -> list[list[dict]]:
    """The first request starts; once it streams, the others arrive one after another while it decodes."""
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        started = asyncio.Event()
        first = asyncio.create_task(read_stream(client, "/v1/completions", bodies[0], started))
        await started.wait()

        async def later(i: int, body: dict):
            await asyncio.sleep(0.03 * i)
            return await read_stream(client, "/v1/completions", body)

        rest = await asyncio.gather(*(later(i, b) for i, b in enumerate(bodies[1:])))
        return [c for c, _ in [await first, *rest]]


def test_streams_joining_a_running_batch_get_what_each_generates_alone(servers, gen):
    main = servers[0]
    _, bundle, tok = gen
    before = httpx.get(f"{main.url}/metrics").text
    rng = torch.Generator().manual_seed(2)
    prompts = [torch.randint(5, len(VOCAB), (n,), generator=rng).tolist() for n in (3, 7, 12, 5, 9)]
    lengths = [24, 8, 10, 5, 8]
    bodies = [{"prompt": p, "max_tokens": n, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
              for p, n in zip(prompts, lengths)]  # fmt: skip
    streams = asyncio.run(_staggered(main.url, bodies))
    for prompt, n, chunks in zip(prompts, lengths, streams):
        ids = [i for c in chunks for i in c["choices"][0].get("token_ids", [])]
        assert ids == generated(bundle, prompt, n, ignore_eos=True)
        assert "".join(c["choices"][0]["text"] for c in chunks) == tok.decode(ids, skip_special_tokens=True)
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    after = httpx.get(f"{main.url}/metrics").text
    joined = metric(after, "kernl_generation_joined_total") - metric(before, "kernl_generation_joined_total")
    assert joined >= 1, "no request was admitted while another one was decoding"
    rows = metric(after, "kernl_generation_step_rows_sum") - metric(before, "kernl_generation_step_rows_sum")
    steps = metric(after, "kernl_generation_step_rows_count") - metric(before, "kernl_generation_step_rows_count")
    assert rows > steps  # some steps decoded several rows at once
    assert metric(after, "kernl_generation_tokens_total") - metric(before, "kernl_generation_tokens_total") == sum(
        lengths
    )
    assert metric(after, "kernl_generation_time_to_first_token_seconds_count") >= 5
    assert metric(after, "kernl_generation_active_rows") == 0
    assert "kernl_generation_tokens_per_second" in after


def test_server_sent_events_format(servers):
    main = servers[0]
    body = {"prompt": [7, 8, 9], "max_tokens": 5, "temperature": 0, "ignore_eos": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    chunks, lines = asyncio.run(_one_stream(main.url, "/v1/completions", body))
    events = [line for line in lines if line]
    assert all(line.startswith("data: ") for line in events)
    assert lines[-1] == "" and events[-1] == "data: [DONE]"
    assert all(lines[i] == "" for i in range(1, len(lines), 2))  # each event ends with a blank line
    text_chunks, usage = chunks[:-1], chunks[-1]
    assert all(c["object"] == "text_completion" and c["id"] == text_chunks[0]["id"] for c in text_chunks)
    assert [c["choices"][0]["finish_reason"] for c in text_chunks] == [None] * (len(text_chunks) - 1) + ["length"]
    assert usage["choices"] == [] and usage["usage"] == {"prompt_tokens": 3, "completion_tokens": 5,
                                                         "total_tokens": 8}  # fmt: skip


async def _one_stream(url: str, path: str, body: dict):
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        return await read_stream(client, path, body)


def test_chat_completions_apply_the_chat_template(servers, gen):
    main = servers[0]
    _, bundle, tok = gen
    messages = [{"role": "system", "content": "you are good"}, {"role": "user", "content": "hello how are you"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    want = generated(bundle, ids, 10)
    body = {"messages": messages, "max_tokens": 10, "temperature": 0, "return_token_ids": True}
    out = httpx.post(f"{main.url}/v1/chat/completions", json=body, timeout=120).json()
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    choice = out["choices"][0]
    assert choice["token_ids"] == want and choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == tok.decode(want, skip_special_tokens=True)
    assert out["usage"]["prompt_tokens"] == len(ids)

    chunks, _ = asyncio.run(_one_stream(main.url, "/v1/chat/completions", body))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == choice["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == choice["finish_reason"]


def test_stop_strings_end_the_completion(servers, gen):
    main = servers[0]
    body = {"prompt": [9, 10, 11], "max_tokens": 20, "temperature": 0, "ignore_eos": True}
    full = httpx.post(f"{main.url}/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]
    words = full.split(" ")
    stop = " " + words[len(words) // 2]
    want = full[: full.index(stop)]
    out = httpx.post(f"{main.url}/v1/completions", json={**body, "stop": [stop, "zzz"]}, timeout=120).json()
    assert out["choices"][0]["text"] == want and out["choices"][0]["finish_reason"] == "stop"
    chunks, _ = asyncio.run(_one_stream(main.url, "/v1/completions", {**body, "stop": stop}))
    assert "".join(c["choices"][0]["text"] for c in chunks) == want
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        ("/v1/completions", {"prompt": "the cat", "temperature": -1}, 400, "temperature"),
        ("/v1/completions", {"prompt": "the cat", "max_tokens": 0}, 400, "max_tokens must be >= 1"),
        ("/v1/completions", {"prompt": "the cat", "max_tokens": 100}, 400, "max_length 48"),
        ("/v1/completions", {"prompt": [5, 9999]}, 400, "outside the vocabulary"),
        ("/v1/completions", {"prompt": [5] * 17}, 400, "longer than the largest prompt bucket 16"),
        ("/v1/completions", {"prompt": "the cat", "top_p": 0}, 400, "top_p"),
        ("/v1/completions", {"prompt": "the cat", "n": 2}, 400, "n: one completion"),
        ("/v1/completions", {"prompt": ["the", "cat"]}, 400, "one prompt a request"),
        ("/v1/completions", {"prompt": "the cat", "seed": -3}, 400, "seed"),
        ("/v1/completions", {"max_tokens": 3}, 422, "prompt"),
        ("/v1/completions", {"prompt": 5}, 422, "prompt"),
        ("/v1/completions", {"prompt": "the cat", "model": "gpt-4o"}, 404, "not served here"),
        ("/v1/chat/completions", {"messages": []}, 400, "messages: empty"),
        ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, 422, "role"),
    ],
)
def test_bad_requests_answer_4xx_and_the_server_keeps_serving(servers, path, body, status, message):
    main = servers[0]
    r = httpx.post(f"{main.url}{path}", json=body, timeout=60)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]["message"]
    ok = httpx.post(f"{main.url}/v1/completions", json={"prompt": "the cat", "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200


def test_models_lists_the_generation_bundle(servers):
    model = httpx.get(f"{servers[0].url}/v1/models").json()["data"][0]
    assert model["id"] == "tiny-llama" and model["task"] == "causal-lm" and model["max_model_len"] == MAX_LENGTH


async def _queue_full(url: str, body: dict):
    """A long request decodes in the one row; two more arrive: one waits in the queue, the other is refused."""
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        started = asyncio.Event()
        first = asyncio.create_task(read_stream(client, "/v1/completions", body, started))
        await started.wait()
        short = {"prompt": [5, 6], "max_tokens": 3, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
        answers = await asyncio.gather(*(client.post("/v1/completions", json=short) for _ in range(2)))
        return await first, answers


def test_a_full_queue_answers_503_at_once(servers, gen):
    small = servers[1]
    _, bundle, _ = gen
    body = {"prompt": [5, 6, 7], "max_tokens": MAX_LENGTH - 3, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}  # fmt: skip
    (chunks, _), answers = asyncio.run(_queue_full(small.url, body))
    assert sorted(r.status_code for r in answers) == [200, 503]
    refused = next(r for r in answers if r.status_code == 503)
    assert "queue is full" in refused.json()["error"]["message"] and refused.headers["retry-after"] == "1"
    served = next(r for r in answers if r.status_code == 200)
    assert served.json()["choices"][0]["token_ids"] == generated(bundle, [5, 6], 3, ignore_eos=True)
    assert [i for c in chunks for i in c["choices"][0]["token_ids"]] == generated(bundle, [5, 6, 7], MAX_LENGTH - 3,
                                                                                  ignore_eos=True)  # fmt: skip
    assert refused.elapsed.total_seconds() < served.elapsed.total_seconds()


def test_sigterm_drains_running_and_queued_requests(servers, gen):
    small: Server = servers[1]
    _, bundle, _ = gen

    async def run():
        async with httpx.AsyncClient(base_url=small.url, timeout=120) as client:
            started = asyncio.Event()
            long = {"prompt": [8, 9], "max_tokens": MAX_LENGTH - 2, "temperature": 0, "ignore_eos": True,
                    "return_token_ids": True}  # fmt: skip
            first = asyncio.create_task(read_stream(client, "/v1/completions", long, started))
            await started.wait()
            queued = asyncio.create_task(client.post("/v1/completions", json={**long, "prompt": [10, 11, 12],
                                                                              "max_tokens": 4}))  # fmt: skip
            while metric((await client.get("/metrics")).text, "kernl_queue_length") < 1:
                await asyncio.sleep(0.01)
            small.proc.send_signal(signal.SIGTERM)  # while one request decodes and one waits
            return await first, await queued

    (chunks, _), queued = asyncio.run(run())
    ids = [i for c in chunks for i in c["choices"][0].get("token_ids", [])]
    assert ids == generated(bundle, [8, 9], MAX_LENGTH - 2, ignore_eos=True)
    assert queued.status_code == 200
    assert queued.json()["choices"][0]["token_ids"] == generated(bundle, [10, 11, 12], 4, ignore_eos=True)
    assert small.proc.wait(60) in (0, -signal.SIGTERM)
    log = small.output()
    assert "Application shutdown complete." in log and "Traceback" not in log
    time.sleep(0.1)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{small.url}/health")
