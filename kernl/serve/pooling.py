"""Sentence embeddings from token states, as the model's sentence-transformers config says.

kernl-compile records that config in the manifest's "sentence_transformers" entry (kernl.commands.pooling); a
bundle without it is mean-pooled over its real tokens and not normalised, as `kernl run` shows embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kernl.errors import BundleError

# sentence-transformers' names; with a left-padding tokenizer each mode still counts from the first real token.
MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")


@dataclass(frozen=True)
class Pooling:
    """modes: concatenated in this order, as sentence-transformers does; normalize: to unit L2 norm."""

    modes: tuple[str, ...] = ("mean",)
    normalize: bool = False
    max_seq_length: int | None = None

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> Pooling:
        config = manifest.get("sentence_transformers")
        if config is None:
            return cls()
        modes = config.get("pooling") if isinstance(config, dict) else None
        if not isinstance(modes, list) or not modes or any(m not in MODES for m in modes):
            raise BundleError(f"manifest: sentence_transformers.pooling {modes!r}, expected a list of {MODES}")
        limit = config.get("max_seq_length")
        return cls(
            tuple(modes),
            bool(config.get("normalize", False)),
            limit if isinstance(limit, int) and limit > 0 else None,
        )

    def __call__(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """hidden: [rows, seq, dim], mask: [rows, seq] (1 on real tokens) -> [rows, dim * len(modes)], fp32."""
        hidden = hidden.float()
        m = mask.to(hidden.device, torch.float32).unsqueeze(-1)
        parts = [_pool(mode, hidden, m) for mode in self.modes]
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        return torch.nn.functional.normalize(out, p=2, dim=-1) if self.normalize else out


def _pool(mode: str, hidden: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    count = m.sum(1).clamp(min=1e-9)
    if mode == "cls":  # the first real token
        return hidden[rows, m.squeeze(-1).argmax(1)]
    if mode == "mean":
        return (hidden * m).sum(1) / count
    if mode == "mean_sqrt_len_tokens":
        return (hidden * m).sum(1) / count.sqrt()
    if mode == "max":
        return hidden.masked_fill(m == 0, float("-inf")).max(1).values
    if mode == "weightedmean":  # weights 1, 2, 3... from the first real token
        first = m.squeeze(-1).argmax(1).view(-1, 1, 1).to(hidden.dtype)
        w = m * (torch.arange(1, hidden.shape[1] + 1, device=hidden.device, dtype=hidden.dtype).view(1, -1, 1) - first)
        return (hidden * w).sum(1) / w.sum(1).clamp(min=1e-9)
    # lasttoken: the last real token
    last = hidden.shape[1] - 1 - m.squeeze(-1).flip(1).argmax(1)
    return hidden[rows, last]
