"""torch.ops.kernl.* as plain calls, under the ops' own names: what a bundle's program.py runs.

Same arguments and results as the registered ops, without the custom-op dispatcher: its first call imports
torch._dynamo, which costs 1-5 s of a fresh process's start.
"""

from kernl.kernels.attention import attention_call as attention
from kernl.kernels.collectives import all_gather_call as all_gather
from kernl.kernels.collectives import all_reduce_call as all_reduce
from kernl.kernels.decode_attention import cache_append_call as cache_append
from kernl.kernels.decode_attention import cache_fill_call as cache_fill
from kernl.kernels.decode_attention import decode_attention_append_call as decode_attention_append
from kernl.kernels.decode_attention import decode_attention_call as decode_attention
from kernl.kernels.gated_linear import gated_linear_call as gated_linear
from kernl.kernels.layer_norm import add_layer_norm_call as add_layer_norm
from kernl.kernels.layer_norm import layer_norm_call as layer_norm
from kernl.kernels.linear import linear_call as linear
from kernl.kernels.peer_linear_norm import linear_all_reduce_add_rms_norm_call as linear_all_reduce_add_rms_norm
from kernl.kernels.peer_norm import all_reduce_add_rms_norm_call as all_reduce_add_rms_norm
from kernl.kernels.rms_norm import add_rms_norm_call as add_rms_norm
from kernl.kernels.rms_norm import rms_norm_call as rms_norm
from kernl.kernels.rotary import rotary_call as rotary

__all__ = [
    "add_layer_norm",
    "add_rms_norm",
    "all_gather",
    "all_reduce",
    "all_reduce_add_rms_norm",
    "attention",
    "cache_append",
    "cache_fill",
    "decode_attention",
    "decode_attention_append",
    "gated_linear",
    "layer_norm",
    "linear",
    "linear_all_reduce_add_rms_norm",
    "rms_norm",
    "rotary",
]
