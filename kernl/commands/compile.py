"""`kernl-compile MODEL -o BUNDLE`: check the request, load the model, compile, print a summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from kernl.commands.buckets import resolve_buckets
from kernl.commands.errors import CliError, Command, first_line
from kernl.commands.tasks import SEQ2SEQ_TASKS, SPEECH_TASK, TASKS, infer_task, load_model, max_positions

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
            raise CliError(f"--max-length: only for generation tasks (this is {task})")
        return None
    max_length = max_length or min(limit or 2048, 2048)
    if limit is not None and max_length > limit:
        raise CliError(f"--max-length {max_length}: beyond the model's {limit} positions")
    longest = max(s for _, s in buckets)
    if longest >= max_length:
        raise CliError(f"--max-length {max_length}: leaves no room to generate after a {longest}-token prompt")
    batch_sizes, seq_lens = sorted({b for b, _ in buckets}), sorted({s for _, s in buckets})
    return {"max_length": max_length, "batch_sizes": batch_sizes, "seq_lens": seq_lens}


def _decoder_positions(config: Any) -> int | None:
    for key in ("max_target_positions", "max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _seq2seq(
    task: str,
    config: Any,
    max_length: int | None,
    buckets: str | None,
    batch_sizes: str | None,
    seq_lens: str | None,
    num_beams: int | None,
) -> tuple[list[tuple[int, int]] | None, dict]:
    """(encoder buckets, kernl.compile's generation settings) of an encoder-decoder: speech reads one fixed
    window (--batch-sizes only); text buckets its input (--batch-sizes with --seq-lens, or --buckets)."""
    from kernl.commands.buckets import _positive_ints

    if task == SPEECH_TASK:
        if buckets is not None or seq_lens is not None:
            raise CliError(f"--task {task}: the encoder reads a fixed window; give --batch-sizes only")
        bucket_list, sizes, lens = None, _positive_ints(batch_sizes or "1", "--batch-sizes"), None
    else:
        bucket_list = resolve_buckets(buckets, batch_sizes, seq_lens)
        sizes, lens = sorted({b for b, _ in bucket_list}), sorted({s for _, s in bucket_list})
        encoder_limit = max_positions(config)  # BART's learned positions; T5's relative ones have no limit
        if encoder_limit is not None and lens[-1] > encoder_limit:
            raise CliError(f"--seq-lens {lens[-1]}: longer than the encoder's {encoder_limit} positions")
    limit = _decoder_positions(config)
    max_length = max_length or min(limit or 256, 448 if task == SPEECH_TASK else 256)
    if limit is not None and max_length > limit:
        raise CliError(f"--max-length {max_length}: beyond the decoder's {limit} positions")
    generation = {"max_length": max_length, "batch_sizes": sorted(set(sizes)), "num_beams": num_beams or 1}
    if lens is not None:
        generation["seq_lens"] = lens
    return bucket_list, generation


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


def _load_feature_extractor(source: str):
    """The model's WhisperFeatureExtractor (preprocessor_config.json), whose log-mel settings a speech bundle
    carries; None when it has none (the bundle then uses Whisper's defaults at the model's mel bins)."""
    from transformers import WhisperFeatureExtractor

    try:
        return WhisperFeatureExtractor.from_pretrained(source, local_files_only=True)
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
    "--max-length", type=click.IntRange(2), default=None, help="generation: KV cache positions (prompt + new)"
)
@click.option(
    "--num-beams", type=click.IntRange(1, 8), default=None, help="encoder-decoders: the most beams a call may ask"
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
    num_beams: int | None,
    archive: bool,
    force: bool,
    tensor_parallel: int,
    sign_key: Path | None,
) -> None:
    """Compile a Hugging Face MODEL (local directory or cached hub id) into a kernl bundle."""
    # Every check runs before anything heavy is loaded or written.
    if task not in ("auto", *SEQ2SEQ_TASKS):
        resolve_buckets(buckets, batch_sizes, seq_lens)  # bad buckets first, as before the config is read
    _check_output(output, force=force, archive=archive)
    device = _resolve_device(device)
    source, config = _load_config(model)
    task = infer_task(getattr(config, "architectures", None), config) if task == "auto" else task
    if task == "causal-lm" and max_length is not None:
        task = "text-generation"  # a cache length asks for generation
    if task in SEQ2SEQ_TASKS:
        if tensor_parallel > 1:
            raise CliError(f"--tensor-parallel: not supported for --task {task}")
        if not getattr(config, "is_encoder_decoder", False):
            raise CliError(f"--task {task}: {model} is not an encoder-decoder model")
        bucket_list, generation = _seq2seq(task, config, max_length, buckets, batch_sizes, seq_lens, num_beams)
        limit = _decoder_positions(config)
    else:
        if num_beams is not None:
            raise CliError(f"--num-beams: only for encoder-decoder generation tasks (this is {task})")
        bucket_list = resolve_buckets(buckets, batch_sizes, seq_lens)
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
    # Warm-up stages: one a bucket, plus one decode check a batch size (seq2seq: speech has one encoder window).
    steps = len(bucket_list or generation["batch_sizes"]) + (len(generation["batch_sizes"]) if generation else 0)
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
            **({"tensor_parallel": tensor_parallel} if task not in SEQ2SEQ_TASKS else {}),
            **({"feature_extractor": _load_feature_extractor(source)} if task == SPEECH_TASK else {}),
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
