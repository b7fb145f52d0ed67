"""kernl's Triton kernels. Importing this package registers every `torch.ops.kernl.*` op."""

from kernl.kernels.layer_norm import layer_norm, layer_norm_reference
from kernl.kernels.rms_norm import rms_norm, rms_norm_reference

__all__ = ["layer_norm", "layer_norm_reference", "rms_norm", "rms_norm_reference"]

from kernl.kernels.rotary import rotary, rotary_reference  # noqa: E402

__all__ += ["rotary", "rotary_reference"]
