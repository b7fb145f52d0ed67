"""kernl's Triton kernels. `register_ops()` registers them as `torch.ops.kernl.*` (the compiler does, the runtime
need not)."""

from kernl.kernels import autotune_cache
from kernl.kernels._custom_ops import register_ops
from kernl.kernels.attention import attention, attention_reference
from kernl.kernels.decode_attention import (
    cache_append,
    cache_append_reference,
    decode_attention,
    decode_attention_append,
    decode_attention_reference,
)
from kernl.kernels.gated_linear import gated_linear, gated_linear_reference
from kernl.kernels.layer_norm import layer_norm, layer_norm_reference
from kernl.kernels.linear import linear, linear_reference
from kernl.kernels.peer_linear_norm import linear_all_reduce_add_rms_norm
from kernl.kernels.peer_norm import all_reduce_add_rms_norm
from kernl.kernels.rms_norm import rms_norm, rms_norm_reference
from kernl.kernels.rotary import rotary, rotary_reference

__all__ = [
    "all_reduce_add_rms_norm",
    "attention",
    "attention_reference",
    "autotune_cache",
    "cache_append",
    "cache_append_reference",
    "decode_attention",
    "decode_attention_append",
    "decode_attention_reference",
    "gated_linear",
    "gated_linear_reference",
    "layer_norm",
    "layer_norm_reference",
    "linear",
    "linear_all_reduce_add_rms_norm",
    "linear_reference",
    "register_ops",
    "rms_norm",
    "rms_norm_reference",
    "rotary",
    "rotary_reference",
]
