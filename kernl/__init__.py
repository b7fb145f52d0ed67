"""kernl: Hugging Face transformers compiled onto Triton kernels, shipped as bundles replayed through CUDA graphs.

Importing kernl is cheap: the compiler (and with it transformers) loads only when kernl.compile is called.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from kernl.errors import BundleError, InputError, KernlError

if TYPE_CHECKING:
    import torch

    from kernl.runtime.bundle import Bundle

__version__ = "0.1.0"
__all__ = ["BundleError", "InputError", "KernlError", "compile", "load", "optimize_model"]


def compile(
    model: torch.nn.Module,
    output_dir: str | os.PathLike,
    *,
    buckets: list[tuple[int, int]],
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    example_inputs: dict[str, torch.Tensor] | None = None,
    **options,
) -> Path:
    """Export model for the (batch, seq_len) buckets, rewrite it onto kernl's kernels, and write a bundle.

    generation: a dict {max_length, batch_sizes, seq_lens?} makes a text-generation bundle (prefill per
    (batch, prompt length) bucket, decode step per batch size, KV cache of max_length); its seq_lens default
    to the buckets' lengths. For an encoder-decoder model (config.is_encoder_decoder: T5, BART-like, Whisper) it
    makes an encode entry and a decode step, with num_beams (the most beams a call may ask for) and seq_lens
    bucketing the encoder's text input (Whisper's window is fixed); option feature_extractor (Whisper's, else the
    default for the model's mel bins) stores the log-mel settings so generate(audio=...) works.
    options: tokenizer (saved into the bundle), overwrite (replace an existing output_dir), archive (also
    write the one-file form, output_dir + ".kernl"), progress (a callable given each stage's name),
    metadata (extra JSON entries for the manifest, e.g. {"task": ...}), sign_key (an Ed25519 private key, PEM
    path or bytes, that signs the bundle), tensor_parallel (split the model over this many GPUs of a host:
    Megatron-style, one program and one weights file per rank; load it under torchrun --nproc-per-node N),
    weights_from (for a model built on the meta device: the folder of safetensors files its weights are read
    from, one tensor at a time, so the whole model is never in memory).
    """
    generation = options.pop("generation", None)
    if generation is not None and getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return _compile_seq2seq(model, output_dir, buckets, generation, dtype, device, example_inputs, options)
    if generation is not None:
        return _compile_generation(model, output_dir, buckets, generation, dtype, device, example_inputs, options)
    from kernl.compiler import compile_model

    return compile_model(
        model, output_dir, buckets=buckets, dtype=dtype, device=device, example_inputs=example_inputs, **options
    )


def _compile_generation(model, output_dir, buckets, generation, dtype, device, example_inputs, options) -> Path:
    from kernl.compiler import GenerationSettings, compile_generation

    if example_inputs is not None:
        raise KernlError("example_inputs: a generation bundle's inputs are token ids and positions, not custom")
    if not isinstance(generation, dict) or "max_length" not in generation:
        raise KernlError("generation: expected a dict with max_length (and batch_sizes, seq_lens)")
    unknown = set(generation) - {"max_length", "batch_sizes", "seq_lens"}
    if unknown:
        raise KernlError(f"generation: unknown setting {sorted(unknown)[0]!r}")
    batch_sizes = generation.get("batch_sizes") or sorted({b for b, _ in buckets or []}) or [1]
    seq_lens = generation.get("seq_lens") or sorted({s for _, s in buckets or []})
    config = getattr(model, "config", None)
    model_max = next((getattr(config, k) for k in ("max_position_embeddings", "n_positions") if
                      isinstance(getattr(config, k, None), int)), None)  # fmt: skip
    settings = GenerationSettings.checked(generation["max_length"], batch_sizes, seq_lens, model_max)
    return compile_generation(model, output_dir, settings=settings, dtype=dtype, device=device, **options)


def _compile_seq2seq(model, output_dir, buckets, generation, dtype, device, example_inputs, options) -> Path:
    """An encoder-decoder's generation bundle: generation={max_length, batch_sizes, seq_lens (text encoder
    input buckets; speech: the model's fixed window), num_beams (the most a call may ask, default 1)}."""
    from kernl.compiler import Seq2SeqSettings, compile_seq2seq
    from kernl.compiler.lower_seq2seq import SPEECH, model_kind, speech_frames

    if example_inputs is not None:
        raise KernlError("example_inputs: a seq2seq bundle's inputs are fixed by the model, not custom")
    if not isinstance(generation, dict) or "max_length" not in generation:
        raise KernlError("generation: expected a dict with max_length (and batch_sizes, seq_lens, num_beams)")
    unknown = set(generation) - {"max_length", "batch_sizes", "seq_lens", "num_beams"}
    if unknown:
        raise KernlError(f"generation: unknown setting {sorted(unknown)[0]!r}")
    kind = model_kind(model)
    batch_sizes = generation.get("batch_sizes") or sorted({b for b, _ in buckets or []}) or [1]
    if kind == SPEECH:
        seq_lens = [speech_frames(model)]
    else:
        seq_lens = generation.get("seq_lens") or sorted({s for _, s in buckets or []})
    config = model.config
    model_max = next((getattr(config, k) for k in ("max_target_positions", "max_position_embeddings") if
                      isinstance(getattr(config, k, None), int)), None)  # fmt: skip
    settings = Seq2SeqSettings.checked(
        kind, generation["max_length"], batch_sizes, seq_lens, generation.get("num_beams", 1), model_max
    )
    return compile_seq2seq(model, output_dir, settings=settings, dtype=dtype, device=device, **options)


def load(path: str | os.PathLike, device: str | torch.device | None = None, **options) -> Bundle:
    """Load a bundle; the result is called with the model's keyword inputs. Loading runs no code from the bundle.

    options: verify, cuda_graphs, capture ("all" at load or "lazy" on a bucket's first call), recompile,
    trusted_keys (Ed25519 public keys; unsigned or foreign bundles are refused); for a tensor-parallel bundle,
    rank, world_size and timeout_s (torchrun's environment otherwise). See kernl.runtime.load.
    """
    from kernl.runtime import load as _load

    return _load(path, device=device, **options)


def optimize_model(model: torch.nn.Module) -> torch.nn.Module:
    """Make model's forward run through kernl in place (compiled per shape bucket, in memory); returns model."""
    from kernl.model_optimization import optimize_model as _optimize

    return _optimize(model)
