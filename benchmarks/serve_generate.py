"""Load generator for `kernl serve` with a generation bundle: N concurrent streaming clients for T seconds.

    kernl serve BUNDLE --port 8000 &
    python benchmarks/serve_generate.py --url http://127.0.0.1:8000 --clients 1,8,32 --seconds 30 \
        --prompt-tokens 128 --max-tokens 256 [--chat] [--json OUT.json]

Each client loops: POST /v1/completions (or /v1/chat/completions) with stream: true, ignore_eos (every request
produces max_tokens tokens), temperature 0, reading the server-sent events as they come. Prompts are random token
ids (completions) or random words (chat) of about --prompt-tokens tokens, a different one a request. Reports, per
concurrency: total generated tokens/s over the run, time to first token (p50, p99: request sent to first chunk
with text or token ids), request latency (p50, p99), tokens/s per stream (p50), and requests completed. Requests
still running when the time is up are left out of the latencies but their tokens count.

Needs nothing but what `kernl[serve]` installs: httpx when it is there, else the standard library (threads and
http.client).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse


@dataclass
class Result:
    ttft: float | None = None
    latency: float | None = None
    tokens: int = 0
    error: str | None = None


@dataclass
class Run:
    results: list[Result] = field(default_factory=list)
    tokens: int = 0


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def body(args, rng: random.Random, vocab: int) -> dict:
    common = {"max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
              "return_token_ids": True}  # fmt: skip
    if args.chat:
        words = " ".join(
            rng.choice(["the", "a", "model", "fast", "token", "server", "graph"]) for _ in range(args.prompt_tokens)
        )
        return {**common, "messages": [{"role": "user", "content": words}]}
    return {**common, "prompt": [rng.randrange(10, vocab) for _ in range(args.prompt_tokens)]}


def count(event: dict) -> int:
    """Tokens an event carries (token_ids, which the request asks for)."""
    choices = event.get("choices") or []
    return sum(len(c.get("token_ids") or []) for c in choices)


# ---- httpx (asyncio) ----------------------------------------------------------------------------------------


async def _client_httpx(httpx, args, path: str, vocab: int, deadline: float, run: Run, seed: int) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=args.url, timeout=600) as client:
        while time.perf_counter() < deadline:
            result, start = Result(), time.perf_counter()
            try:
                async with client.stream("POST", path, json=body(args, rng, vocab)) as r:
                    if r.status_code != 200:
                        result.error = f"{r.status_code} {(await r.aread())[:200]!r}"
                    else:
                        async for line in r.aiter_lines():
                            if not line.startswith("data: ") or line == "data: [DONE]":
                                continue
                            n = count(json.loads(line[6:]))
                            if n and result.ttft is None:
                                result.ttft = time.perf_counter() - start
                            result.tokens += n
                            run.tokens += n
                        result.latency = time.perf_counter() - start
            except httpx.HTTPError as err:
                result.error = repr(err)
            run.results.append(result)


async def _run_httpx(httpx, args, path, vocab, clients: int, deadline: float) -> Run:
    run = Run()
    await asyncio.gather(*(_client_httpx(httpx, args, path, vocab, deadline, run, i) for i in range(clients)))
    return run


# ---- standard library (threads) -----------------------------------------------------------------------------


def _client_stdlib(args, path: str, vocab: int, deadline: float, run: Run, seed: int, lock: threading.Lock) -> None:
    import http.client

    url = urlparse(args.url)
    rng = random.Random(seed)
    while time.perf_counter() < deadline:
        result, start = Result(), time.perf_counter()
        conn = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=600)
        try:
            conn.request("POST", path, json.dumps(body(args, rng, vocab)), {"Content-Type": "application/json"})
            r = conn.getresponse()
            if r.status != 200:
                result.error = f"{r.status} {r.read()[:200]!r}"
            else:
                while line := r.readline():
                    line = line.decode().strip()
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    n = count(json.loads(line[6:]))
                    if n and result.ttft is None:
                        result.ttft = time.perf_counter() - start
                    result.tokens += n
                    with lock:
                        run.tokens += n
                result.latency = time.perf_counter() - start
        except OSError as err:
            result.error = repr(err)
        finally:
            conn.close()
        with lock:
            run.results.append(result)


def _run_stdlib(args, path, vocab, clients: int, deadline: float) -> Run:
    run, lock = Run(), threading.Lock()
    threads = [threading.Thread(target=_client_stdlib, args=(args, path, vocab, deadline, run, i, lock))
               for i in range(clients)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return run


# ---- main ---------------------------------------------------------------------------------------------------


def model_info(url: str) -> dict:
    import urllib.request

    with urllib.request.urlopen(f"{url}/v1/models", timeout=30) as r:
        return json.loads(r.read())["data"][0]


def measure(args, clients: int, vocab: int) -> dict:
    path = "/v1/chat/completions" if args.chat else "/v1/completions"
    try:
        import httpx
    except ImportError:
        httpx = None
    start = time.perf_counter()
    deadline = start + args.seconds
    if httpx is not None:
        run = asyncio.run(_run_httpx(httpx, args, path, vocab, clients, deadline))
    else:
        run = _run_stdlib(args, path, vocab, clients, deadline)
    elapsed = time.perf_counter() - start
    done = [r for r in run.results if r.latency is not None]
    ttft = [r.ttft for r in done if r.ttft is not None]
    latency = [r.latency for r in done]
    per_stream = [r.tokens / (r.latency - r.ttft) for r in done if r.ttft is not None and r.latency > r.ttft]
    errors = [r.error for r in run.results if r.error]
    return {
        "clients": clients,
        "seconds": round(elapsed, 2),
        "requests_completed": len(done),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "tokens_per_s": round(run.tokens / elapsed, 1),
        "ttft_p50_ms": _ms(percentile(ttft, 50)),
        "ttft_p99_ms": _ms(percentile(ttft, 99)),
        "latency_p50_ms": _ms(percentile(latency, 50)),
        "latency_p99_ms": _ms(percentile(latency, 99)),
        "stream_tokens_per_s_p50": round(statistics.median(per_stream), 1) if per_stream else None,
        "client": "httpx" if httpx is not None else "stdlib",
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--clients", default="1,8,32", help="concurrent streams, one run each (comma-separated)")
    parser.add_argument("--seconds", type=float, default=30.0, help="each run's length")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--chat", action="store_true", help="POST /v1/chat/completions (needs a chat template)")
    parser.add_argument("--vocab", type=int, default=None, help="token ids below this (default: 1000)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    info = model_info(args.url)
    vocab = args.vocab or 1000
    rows = []
    for clients in (int(c) for c in args.clients.split(",")):
        row = measure(args, clients, vocab)
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = {"model": info.get("id"), "device": info.get("device"), "prompt_tokens": args.prompt_tokens,
           "max_tokens": args.max_tokens, "chat": args.chat, "runs": rows}  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    if any(r["errors"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
