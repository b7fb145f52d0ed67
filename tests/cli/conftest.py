"""Tiny BERT checkpoints saved with a tiny tokenizer, a bundle compiled from one, and ways to run the CLI."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

REPO = Path(__file__).resolve().parents[2]
WORDS = "the a cat dog sat on mat is was good bad movie film great awful i liked it . , !".split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
MAX_POSITIONS = 32


def save_checkpoint(folder: Path, model_class: str, **config) -> Path:
    """A random-init tiny BERT of model_class and its word-level BERT tokenizer, as from_pretrained reads them."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=MAX_POSITIONS,
        **config,
    )
    getattr(transformers, model_class)(cfg).eval().save_pretrained(folder)
    transformers.BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session", autouse=True)
def _kernl_cache(tmp_path_factory):
    """Archives unpack under the test's temporary folder, not ~/.cache/kernl (subprocesses inherit it)."""
    old = os.environ.get("KERNL_CACHE")
    os.environ["KERNL_CACHE"] = str(tmp_path_factory.mktemp("kernl-cache"))
    yield
    if old is None:
        os.environ.pop("KERNL_CACHE", None)
    else:
        os.environ["KERNL_CACHE"] = old


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {
        "masked-lm": save_checkpoint(root / "mlm", "BertForMaskedLM"),
        "classifier": save_checkpoint(
            root / "classifier", "BertForSequenceClassification", id2label={0: "negative", 1: "positive"}
        ),
    }


@pytest.fixture(scope="session")
def mlm_bundle(tmp_path_factory, checkpoints):
    """The masked LM compiled through `kernl-compile` (one bucket, with the archive); the CliRunner result."""
    from kernl.cli import compile_command

    out = tmp_path_factory.mktemp("bundles") / "mlm"
    args = [str(checkpoints["masked-lm"]), "-o", str(out), "--buckets", "2x16", "--device", "cpu", "--archive"]
    result = CliRunner().invoke(compile_command, args)
    assert result.exit_code == 0, result.output
    return out, result


def run_cli(*args: str, importtime: bool = False) -> subprocess.CompletedProcess:
    """`python -m kernl.cli ARGS` in a fresh process; with importtime, stderr lists every module imported."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    flags = ["-X", "importtime"] if importtime else []
    cmd = [sys.executable, *flags, "-m", "kernl.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=REPO)


def imported_modules(stderr: str) -> set[str]:
    """Top-level module names from -X importtime's report."""
    return {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in stderr.splitlines() if "import time:" in line}


@pytest.fixture(scope="session")
def classifier_bundle(tmp_path_factory, checkpoints):
    """The classifier compiled by `python -m kernl.cli compile` in a fresh process; the finished process."""
    out = tmp_path_factory.mktemp("bundles") / "classifier"
    proc = run_cli("compile", str(checkpoints["classifier"]), "-o", str(out), "--buckets", "2x16", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    return out, proc
