"""bundle.generate for several calls in a fresh process (no transformers imported there), for the seq2seq tests."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

FRESH = textwrap.dedent(
    """
    import json, os, sys
    os.environ["TRITON_INTERPRET"] = "0"
    import torch, kernl
    bundle = kernl.load(sys.argv[1])
    assert "transformers" not in sys.modules
    calls = torch.load(sys.argv[2], weights_only=True)
    print(json.dumps({name: bundle.generate(**call).tolist() for name, call in calls.items()}))
    """
)


def generate_in_fresh_process(bundle: Path, calls: dict[str, dict], tmp_path: Path) -> dict[str, list]:
    """name → bundle.generate(**calls[name]).tolist(), run in a new Python process from the bundle on disk."""
    torch.save(calls, tmp_path / "calls.pt")
    run = subprocess.run([sys.executable, "-c", FRESH, str(bundle), str(tmp_path / "calls.pt")], capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])
