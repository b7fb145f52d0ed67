"""Command line: `kernl-compile MODEL -o BUNDLE --buckets 1x128,8x128`."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from kernl.errors import KernlError

DTYPES = {"float16": "float16", "bfloat16": "bfloat16", "float32": "float32"}


def parse_buckets(spec: str) -> list[tuple[int, int]]:
    """'1x128,8x128' -> [(1, 128), (8, 128)]; raises click.BadParameter on anything else."""
    buckets = []
    for part in spec.split(","):
        batch, sep, seq = part.strip().lower().partition("x")
        if not sep or not batch.isdigit() or not seq.isdigit() or int(batch) < 1 or int(seq) < 1:
            raise click.BadParameter(f"{part.strip()!r} is not BATCHxSEQ (e.g. 8x128)", param_hint="--buckets")
        buckets.append((int(batch), int(seq)))
    return buckets


def _fail(message: str) -> None:
    click.echo(f"kernl-compile: error: {message}", err=True)
    sys.exit(2)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="bundle directory to write")
@click.option("--buckets", required=True, help="shape buckets, BATCHxSEQ separated by commas: 1x128,8x128")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default=None, help="default: the model's own")
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default=None, help="default: cuda when present")
@click.option("--force", is_flag=True, help="replace an existing output")
def compile_command(model: str, output: Path, buckets: str, dtype: str | None, device: str | None, force: bool):
    """Compile a Hugging Face MODEL (local directory or cached hub id) into a kernl bundle."""
    bucket_list = parse_buckets(buckets)
    if output.exists() and not force:
        _fail(f"{output} already exists (use --force to replace it)")
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        _fail("--device cuda: no CUDA GPU on this machine")
    from transformers import AutoModel, AutoTokenizer

    import kernl

    try:
        hf_model = AutoModel.from_pretrained(model)
    except (OSError, ValueError) as err:
        _fail(f"cannot load model {model!r}: {str(err).splitlines()[0]}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError):
        tokenizer = None
    started = time.perf_counter()
    try:
        path = kernl.compile(
            hf_model,
            output,
            buckets=bucket_list,
            dtype=getattr(torch, dtype) if dtype else None,
            device=device,
            tokenizer=tokenizer,
            overwrite=force,
            progress=lambda stage: click.echo(f"  {stage} ...", err=True),
        )
    except KernlError as err:
        _fail(str(err))
    click.echo(f"wrote {path} in {time.perf_counter() - started:.1f} s")
