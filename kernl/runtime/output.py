"""The bundle's return value: keys and attributes named as the model's own output fields."""

from __future__ import annotations

import torch


class BundleOutput(dict):
    """out["logits"], out.logits and out[0] all work, as with transformers' ModelOutput."""

    def __getattr__(self, name: str) -> torch.Tensor:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"output has no field {name!r}; fields: {', '.join(self)}") from None

    def __getitem__(self, key):
        if isinstance(key, int):
            return list(self.values())[key]
        return super().__getitem__(key)

    def to_tuple(self) -> tuple[torch.Tensor, ...]:
        return tuple(self.values())
