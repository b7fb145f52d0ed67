"""`kernl-compile MODEL -o BUNDLE`: check the request, load the model, compile, print a summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from kernl.commands.buckets import resolve_buckets
from kernl.commands.errors import CliError, Command, first_line
from kernl.commands.tasks import TASKS, infer_task, load_model, max_positions

DTYPES = ("float16", "bfloat16", "float32")
ARCHIVE_SUFFIX = ".kernl"


def _check_output(output: Path, *, force: bool, archive: bool) -> None:
    """Before anything is compiled. BUNDLE and BUNDLE.kernl are one name: an archive already there is replaced
    (with --archive) or removed (without) by --force, so that the two never hold different bundles."""
    if output.exists() and not output.is_dir():
        raise CliError(f"{output} exists and is not a bundle directory")
    if output.exists() and not force:
        raise CliError(f"{output} already exists (use --force to replace it)")
    packed = output.with_name(output.name + ARCHIVE_SUFFIX)
    if packed.exists() and not packed.is_file():
        raise CliError(f"{packed} exists and is not an archive file")
    if packed.exists() and not force:
        raise CliError(f"{packed} already exists (use --force to replace it)")


def _resolve_device(device: str | None) -> str:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda: no CUDA GPU on this machine (use --device cpu)")
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def _load_config(model: str) -> tuple[str, Any]:
    """The model's source (absolute directory, or the hub id as given) and its config, from disk only."""
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise CliError(f"{model}: not a Hugging Face model directory (no config.json)")
        source = str(path.resolve())
    else:
        source = model
    from transformers import AutoConfig

    try:
        return source, AutoConfig.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        if not path.exists():
            raise CliError(f"{model}: no such model directory, nor a hub id in the local Hugging Face cache") from None
        raise CliError(f"{model}: unreadable config ({first_line(err)})") from None


def _check_lengths(buckets: list[tuple[int, int]], config: Any) -> int | None:
    limit = max_positions(config)
    too_long = [f"{b}x{s}" for b, s in buckets if limit is not None and s > limit]
    if too_long:
        raise CliError(f"bucket {too_long[0]}: longer than the model's {limit} positions")
    return limit


def _metadata(task: str, source: str, config: Any, limit: int | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"task": task, "source": source, "max_positions": limit}
    if isinstance(getattr(config, "vocab_size", None), int):
        meta["vocab_size"] = config.vocab_size
    if task == "sequence-classification" and getattr(config, "id2label", None):
        meta["id2label"] = {str(k): str(v) for k, v in config.id2label.items()}
    if task == "feature-extraction":
        from kernl.commands.pooling import sentence_transformers_config

        if (st := sentence_transformers_config(source)) is not None:
            meta["sentence_transformers"] = st  # pooling and normalisation for kernl serve's embeddings
    return meta


def _generation(task: str, max_length: int | None, buckets: list[tuple[int, int]], limit: int | None) -> dict | None:
    """kernl.compile's generation settings for --task text-generation: prompt buckets and the cache length."""
    if task != "text-generation":
        if max_length is not None:
            raise CliError(f"--max-length: only for --task text-generation (this is {task})")
        return None
    max_length = max_length or min(limit or 2048, 2048)
    if limit is not None and max_length > limit:
        raise CliError(f"--max-length {max_length}: beyond the model's {limit} positions")
    longest = max(s for _, s in buckets)
    if longest >= max_length:
        raise CliError(f"--max-length {max_length}: leaves no room to generate after a {longest}-token prompt")
    batch_sizes, seq_lens = sorted({b for b, _ in buckets}), sorted({s for _, s in buckets})
    return {"max_length": max_length, "batch_sizes": batch_sizes, "seq_lens": seq_lens}


def _load_sign_key(path: Path | None):
    """The Ed25519 private key of --sign, loaded before anything is compiled; CliError when it cannot be."""
    if path is None:
        return None
    from kernl.artifacts.signing import load_private_key
    from kernl.errors import KernlError

    try:
        return load_private_key(path)
    except KernlError as err:
        raise CliError(f"--sign: {err}") from None


def _load_tokenizer(source: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError):
        return None


@click.command(name="kernl-compile", cls=Command, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="bundle directory to write")
@click.option("--buckets", default=None, help="shape buckets, BATCHxSEQ separated by commas: 1x128,8x128")
@click.option("--batch-sizes", default=None, help="batch sizes (with --seq-lens: every combination): 1,8")
@click.option("--seq-lens", default=None, help="sequence lengths (with --batch-sizes): 64,128")
@click.option("--dtype", type=click.Choice(DTYPES), default=None, help="default: the model's own")
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default=None, help="default: cuda when present")
@click.option("--task", type=click.Choice(TASKS), default="auto", show_default=True, help="auto: from the config")
@click.option(
    "--max-length", type=click.IntRange(2), default=None, help="text-generation: KV cache positions (prompt + new)"
)
@click.option("--archive", is_flag=True, help="also write the one-file form, BUNDLE.kernl")
@click.option("--force", is_flag=True, help="replace an existing output")
@click.option(
    "--tensor-parallel",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="split the model over this many GPUs (load it with torchrun --nproc-per-node N)",
)
@click.option(
    "--sign",
    "sign_key",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="sign the bundle with this Ed25519 private key (PEM, from kernl keygen)",
)
@click.pass_context
def compile_command(
    ctx: click.Context,
    model: str,
    output: Path,
    buckets: str | None,
    batch_sizes: str | None,
    seq_lens: str | None,
    dtype: str | None,
    device: str | None,
    task: str,
    max_length: int | None,
    archive: bool,
    force: bool,
    tensor_parallel: int,
    sign_key: Path | None,
) -> None:
    """Compile a Hugging Face MODEL (local directory or cached hub id) into a kernl bundle."""
    # Every check runs before anything heavy is loaded or written.
    bucket_list = resolve_buckets(buckets, batch_sizes, seq_lens)
    _check_output(output, force=force, archive=archive)
    device = _resolve_device(device)
    source, config = _load_config(model)
    task = infer_task(getattr(config, "architectures", None)) if task == "auto" else task
    if task == "causal-lm" and max_length is not None:
        task = "text-generation"  # a cache length asks for generation
    limit = _check_lengths(bucket_list, config)
    generation = _generation(task, max_length, bucket_list, limit)
    private_key = _load_sign_key(sign_key)

    import torch

    import kernl
    from kernl.artifacts.reader import open_bundle
    from kernl.commands.describe import compile_summary, human_size
    from kernl.commands.progress import StageProgress
    from kernl.errors import KernlError

    torch_dtype = getattr(torch, dtype) if dtype else None
    try:
        hf_model = load_model(source, task, **({"dtype": torch_dtype} if torch_dtype else {})).to(device)
    except (OSError, ValueError, KeyError) as err:
        raise CliError(f"{model}: cannot load it as {task} ({first_line(err)})") from None
    steps = len(bucket_list) + (len(generation["batch_sizes"]) if generation else 0)  # + one decode check each
    progress = StageProgress(steps, ctx.command_path)
    try:
        path = kernl.compile(
            hf_model,
            output,
            buckets=bucket_list,
            dtype=torch_dtype,
            device=device,
            tokenizer=_load_tokenizer(source),
            overwrite=force,
            archive=archive,
            progress=progress,
            metadata=_metadata(task, source, config, limit),
            sign_key=private_key,
            tensor_parallel=tensor_parallel,
            **({"generation": generation} if generation else {}),
        )
    except KernlError as err:
        raise CliError(str(err), exit_code=1) from None
    finally:
        progress.close()
    with open_bundle(path, verify=False) as written:
        click.echo(compile_summary(written.manifest, str(path)))
    if archive:
        packed = path.with_name(path.name + ARCHIVE_SUFFIX)
        click.echo(f"\narchive: {packed} ({human_size(packed.stat().st_size)})")
