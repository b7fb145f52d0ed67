"""What the kernel tests share: the error measure, fp64 activations, and well-scaled weights."""

import torch
import torch.nn.functional as F

# fp64 activations written with torch's own functions, independent of kernl's.
FP64_ACT = {
    None: lambda t: t,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "silu": F.silu,
    "tanh": torch.tanh,
}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in fp64 (an all-zero reference divides by a tiny floor, not by zero)."""
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def make_weight(out_f: int, in_f: int, dtype: torch.dtype, device: str = "cpu") -> torch.Tensor:
    # Scaled so that x @ W.T stays O(1) and every activation sees both signs.
    return torch.randn(out_f, in_f, device=device).div(in_f**0.5).to(dtype)
