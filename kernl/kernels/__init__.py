"""kernl's Triton kernels. Importing this package registers every `torch.ops.kernl.*` op."""

from kernl.kernels import autotune_cache
from kernl.kernels.attention import attention, attention_reference
from kernl.kernels.gated_linear import gated_linear, gated_linear_reference
from kernl.kernels.layer_norm import layer_norm, layer_norm_reference
from kernl.kernels.linear import linear, linear_reference
from kernl.kernels.rms_norm import rms_norm, rms_norm_reference
from kernl.kernels.rotary import rotary, rotary_reference

__all__ = [
    "attention",
    "attention_reference",
    "autotune_cache",
    "gated_linear",
    "gated_linear_reference",
    "layer_norm",
    "layer_norm_reference",
    "linear",
    "linear_reference",
    "rms_norm",
    "rms_norm_reference",
    "rotary",
    "rotary_reference",
]
