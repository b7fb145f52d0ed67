"""The model's tensor inputs: which ones to export, example values, and their roles at run time."""

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

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": str(self.dtype).removeprefix("torch."), "fill": self.fill, "rank": 2}


def forward_parameters(model: torch.nn.Module) -> list[str]:
    return list(inspect.signature(model.forward).parameters)


def example_inputs_for(model: torch.nn.Module, batch: int, seq: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Random token ids and a padding mask with a few masked positions, for the inputs the forward accepts."""
    params = forward_parameters(model)
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
    """Validate user-given example inputs ([batch, seq] tensors sharing both dims) and describe them."""
    specs, shape = [], None
    for name, value in inputs.items():
        if not isinstance(value, torch.Tensor) or value.dim() != 2:
            raise KernlError(f"example input {name!r}: expected a [batch, seq] tensor")
        if shape is not None and tuple(value.shape) != shape:
            raise KernlError(f"example input {name!r}: shape {tuple(value.shape)} differs from {shape}")
        shape = tuple(value.shape)
        specs.append(InputSpec(name, value.dtype, FILL_RULES.get(name, "required")))
    return specs
