"""`kernl serve` under load against a FastAPI app that runs the HF model eagerly per request, and against the
bundle called directly in-process, for /v1/embeddings.

Both servers run in their own processes on localhost; the load generator (this process) runs N clients for T
seconds, each posting one text of 1-30 words at a time, and records every request's latency. The model is random
weights of a geometry (MiniLM-L6 or bert-base) with a BERT WordPiece tokenizer from --model-dir (config and
tokenizer files; no weights needed).

    python3 benchmarks/serve_embeddings.py --model-dir .serve-assets/minilm --geometry minilm,bert-base \
        --clients 64 --seconds 20 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
WORDS = (
    "the a model server batch request answer vector kernel graph token sentence meaning quick brown fox jumps over "
    "lazy dog river bank money music light dark fast slow happy sad city night morning coffee tea code test"
).split()
GEOMETRIES = {
    "minilm": {},  # the config in --model-dir (6 layers, hidden 384)
    "bert-base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
}
BUCKETS = [(b, s) for b in (1, 8, 32, 64) for s in (32, 64)]
if os.environ.get("BENCH_SMALL"):  # a quick check of the script itself
    BUCKETS = [(1, 32), (8, 64)]

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30))) for _ in range(n)]


def build(model_dir: Path, geometry: str, out: Path, device: str) -> float:
    from transformers import AutoTokenizer, BertConfig, BertModel

    import kernl
    from kernl.commands.pooling import sentence_transformers_config

    config = BertConfig.from_pretrained(model_dir, **GEOMETRIES[geometry])
    torch.manual_seed(0)
    model = BertModel(config).eval()
    meta = {"task": "feature-extraction", "sentence_transformers": sentence_transformers_config(model_dir)}
    start = time.perf_counter()
    dtype = torch.float16 if device == "cuda" else torch.float32
    kernl.compile(model, out, buckets=BUCKETS, dtype=dtype, device=device,
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


async def load(port: int, clients: int, seconds: float, pool: list[str]) -> dict:
    import httpx

    latencies: list[float] = []
    errors = 0
    stop = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=60) as client:

        async def worker(i: int) -> None:
            nonlocal errors
            k = i
            while time.perf_counter() < stop:
                k += clients
                t0 = time.perf_counter()
                r = await client.post("/v1/embeddings", json={"input": pool[k % len(pool)]})
                if r.status_code == 200 and r.json()["data"]:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors += 1

        await asyncio.gather(*(worker(i) for i in range(clients)))
    return summary(latencies, seconds, errors)


def summary(latencies: list[float], seconds: float, errors: int = 0) -> dict:
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
    return {"requests": len(latencies), "errors": errors, "rps": len(latencies) / seconds,
            "p50_ms": 1e3 * q[49], "p99_ms": 1e3 * q[98]}  # fmt: skip


def direct(bundle_dir: Path, pool: list[str], n: int) -> dict:
    """bundle(...) in this process, one text at a time: tokenize, call, mean-pool, normalize, to a list."""
    import kernl

    bundle = kernl.load(bundle_dir)
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
    parser.add_argument("--model-dir", type=Path, required=True, help="BERT config + tokenizer files")
    parser.add_argument("--geometry", default="minilm,bert-base")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--device", default="cuda", help="cpu: a quick check of the script itself")
    args = parser.parse_args()
    pool = texts(4096, 1)
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}", "HF_HUB_OFFLINE": "1"}
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    results = {"gpu": gpu, "torch": torch.__version__, "clients": args.clients,
               "seconds": args.seconds, "buckets": BUCKETS, "models": {}}  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="kernl-serve-bench-"))
    for geometry in args.geometry.split(","):
        res: dict = {}
        bundle = work / geometry
        res["compile_s"] = build(args.model_dir, geometry, bundle, args.device)
        res["direct_1"] = direct(bundle, pool, 300)
        if args.device == "cuda":
            torch.cuda.empty_cache()
        port = free_port()
        cli = [sys.executable, "-c", "from kernl.cli import main; main()", "serve", str(bundle), "--port", str(port),
               "--max-batch-delay-ms", "2", "--log-level", "warning"]  # fmt: skip
        proc = start(cli, env, port, work / f"{geometry}-kernl.log")
        try:
            res["kernl_1"] = asyncio.run(load(port, 1, args.seconds / 2, pool))
            res[f"kernl_{args.clients}"] = asyncio.run(load(port, args.clients, args.seconds, pool))
        finally:
            proc.terminate()
            proc.wait(30)
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
        proc = start(uv, hf_env, port, work / f"{geometry}-hf.log")
        try:
            res["hf_eager_1"] = asyncio.run(load(port, 1, args.seconds / 2, pool))
            res[f"hf_eager_{args.clients}"] = asyncio.run(load(port, args.clients, args.seconds, pool))
        finally:
            proc.terminate()
            proc.wait(30)
        res["server_overhead_p50"] = res["kernl_1"]["p50_ms"] / res["direct_1"]["p50_ms"] - 1
        results["models"][geometry] = res
        print(geometry, json.dumps(res, indent=1), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
