"""The model's tensor inputs: which ones to export, example values, and their roles at run time.

Two kinds of input: [batch, seq] tensors (token ids, masks), whose batch and sequence follow the call, and
fixed-shape float inputs of rank 3 or more (Whisper's log-mel `input_features` [batch, mel, frames]), whose
batch alone follows the call. A program whose inputs are all fixed-shape has a fixed window: each of its
buckets is (batch, window), the window being the inputs' last dim (3000 frames for Whisper).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from kernl.errors import KernlError

# Inputs exported by default when the forward accepts them, and how the runtime fills an omitted one.
DEFAULT_INPUTS = {"input_ids": "required", "attention_mask": "ones"}
FILL_RULES = {"attention_mask": "ones", "token_type_ids": "zeros"}


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: torch.dtype
    fill: str  # what the runtime does when a call omits it: "required", "ones" or "zeros"
    fixed: tuple[int, ...] | None = None  # the sizes after batch of a fixed-shape input; None for [batch, seq]

    def to_json(self) -> dict:
        out = {"name": self.name, "dtype": str(self.dtype).removeprefix("torch."), "fill": self.fill}
        if self.fixed is None:
            return {**out, "rank": 2}
        # "dims" as the outputs' dims: "batch" follows the call, an integer is a fixed size.
        return {**out, "rank": 1 + len(self.fixed), "dims": ["batch", *self.fixed]}


def fixed_dims(value: torch.Tensor) -> tuple[int, ...] | None:
    """The fixed sizes after batch of a fixed-shape input (a float tensor of rank >= 3), None for [batch, seq]."""
    if value.dim() >= 3 and value.dtype.is_floating_point:
        return tuple(int(d) for d in value.shape[1:])
    return None


def feature_window(model: torch.nn.Module) -> int:
    """The number of frames an audio encoder takes: its positions times the strides of its 1-D convolutions
    (Whisper: 1500 positions * 2 = 3000 frames, a 30 s window). KernlError when the model does not say."""
    positions = getattr(getattr(model, "config", None), "max_source_positions", None)
    if not isinstance(positions, int):
        raise KernlError(f"{type(model).__name__}: its config has no max_source_positions; pass example_inputs=")
    window = positions
    for module in model.modules():
        if isinstance(module, torch.nn.Conv1d):
            window *= module.stride[0]
    return window


def forward_parameters(model: torch.nn.Module) -> list[str]:
    return list(inspect.signature(model.forward).parameters)


def example_inputs_for(model: torch.nn.Module, batch: int, seq: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Random token ids and a padding mask with a few masked positions, for the inputs the forward accepts; for
    an audio encoder (input_features and no input_ids), random log-mel features [batch, mel, window], seq unused."""
    params = forward_parameters(model)
    if "input_ids" not in params and "input_features" in params:
        mel = getattr(model.config, "num_mel_bins", None)
        if not isinstance(mel, int):
            raise KernlError(f"{type(model).__name__}: its config has no num_mel_bins; pass example_inputs=")
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        return {"input_features": torch.randn(batch, mel, feature_window(model), device=device, dtype=dtype)}
    if "input_ids" not in params:
        raise KernlError(
            f"{type(model).__name__}.forward takes no input_ids; pass example_inputs= with its tensor inputs"
        )
    vocab = int(getattr(model.config, "vocab_size", 1000))
    inputs = {"input_ids": torch.randint(0, vocab, (batch, seq), device=device)}
    if "attention_mask" in params:
        mask = torch.ones(batch, seq, dtype=torch.long, device=device)
        if seq > 2:
            mask[-1, -(seq // 3) :] = 0  # one row with right padding, as a tokenizer would produce
        inputs["attention_mask"] = mask
    return inputs


def input_specs(inputs: dict[str, torch.Tensor]) -> list[InputSpec]:
    """Validate example inputs ([batch, seq] tensors sharing both dims, fixed-shape float inputs sharing the
    batch) and describe them."""
    specs, shape, batch = [], None, None
    for name, value in inputs.items():
        if not isinstance(value, torch.Tensor) or value.dim() < 2:
            raise KernlError(f"example input {name!r}: expected a [batch, seq] tensor (or a float [batch, ...] one)")
        fixed = fixed_dims(value)
        if fixed is None and value.dim() != 2:
            raise KernlError(f"example input {name!r}: expected a [batch, seq] tensor, got {tuple(value.shape)}")
        if batch is not None and value.shape[0] != batch:
            raise KernlError(f"example input {name!r}: batch {value.shape[0]} differs from {batch}")
        batch = value.shape[0]
        if fixed is None:
            if shape is not None and tuple(value.shape) != shape:
                raise KernlError(f"example input {name!r}: shape {tuple(value.shape)} differs from {shape}")
            shape = tuple(value.shape)
        specs.append(
            InputSpec(name, value.dtype, FILL_RULES.get(name, "required") if fixed is None else "required", fixed)
        )
    return specs


def window_of(inputs: dict[str, torch.Tensor]) -> int | None:
    """The fixed window of a program whose inputs are all fixed-shape (their last dim), else None."""
    fixed = [fixed_dims(v) for v in inputs.values()]
    if not fixed or any(f is None for f in fixed):
        return None
    return fixed[0][-1]
