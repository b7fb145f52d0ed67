"""The bundle's tokenizer (tokenizer/tokenizer.json) through the `tokenizers` library, never transformers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from kernl.commands.errors import CliError

PAD_CANDIDATES = ("[PAD]", "<pad>", "<|padding|>")
MASK_CANDIDATES = ("[MASK]", "<mask>")


def _token(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class BundleTokenizer:
    """Encode texts into the bundle's [batch, seq] inputs (padded, truncated to its longest bucket); decode ids."""

    def __init__(self, bundle_root: Path) -> None:
        from tokenizers import Tokenizer

        folder = bundle_root / "tokenizer"
        if not (folder / "tokenizer.json").is_file():
            raise CliError(
                f"{bundle_root}: the bundle has no tokenizer/tokenizer.json (compile it with a fast tokenizer)"
            )
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        config_file = folder / "tokenizer_config.json"
        self.config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        pad = self._special_id("pad_token", PAD_CANDIDATES)
        pad = pad if pad is not None else self._special_id("eos_token", ())
        self.pad_id = pad if pad is not None else 0  # the mask hides padding; any id in the vocabulary does
        self.mask_id = self._special_id("mask_token", MASK_CANDIDATES)

    def _special_id(self, key: str, candidates: tuple[str, ...]) -> int | None:
        for token in (_token(self.config.get(key)), *candidates):
            if token is not None and self.tokenizer.token_to_id(token) is not None:
                return self.tokenizer.token_to_id(token)
        return None

    def encode(self, texts: list[str], max_length: int, input_names: list[str]) -> dict[str, torch.Tensor]:
        """The inputs the bundle takes, right-padded to the longest text, at most max_length tokens each."""
        tok = self.tokenizer
        tok.no_padding()
        tok.enable_truncation(max_length=max_length)
        tok.enable_padding(pad_id=self.pad_id, pad_token=tok.id_to_token(self.pad_id) or "")
        encodings = tok.encode_batch(texts)
        columns = {
            "input_ids": [e.ids for e in encodings],
            "attention_mask": [e.attention_mask for e in encodings],
            "token_type_ids": [e.type_ids for e in encodings],
        }
        return {name: torch.tensor(columns[name]) for name in input_names if name in columns}

    def decode(self, token_id: int) -> str:
        text = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return text.strip() or (self.tokenizer.id_to_token(token_id) or str(token_id))
