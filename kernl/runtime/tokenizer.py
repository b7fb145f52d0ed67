"""The bundle's tokenizer, built from its verified bytes with the `tokenizers` library (never transformers).

tokenizer/tokenizer.json holds the whole pipeline (normalizer, pre-tokenizer, model, post-processor with the
special tokens a text gets, decoder); tokenizer_config.json and special_tokens_map.json add what transformers
keeps beside it: which tokens are pad/eos/bos/mask, the model's length limit, the padding and truncation side.
Encoding follows transformers' fast tokenizer called with padding=True, truncation=True, return_tensors="pt".
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from kernl.errors import BundleError, InputError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

TOKENIZER_FILE = "tokenizer/tokenizer.json"
# Read in this order, later entries winning, as transformers merges them.
CONFIG_FILES = ("tokenizer/tokenizer_config.json", "tokenizer/special_tokens_map.json")
CHAT_TEMPLATE_FILE = "tokenizer/chat_template.jinja"
TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# Each token input and the field of a tokenizers Encoding that holds it.
_FIELDS = {"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}
# transformers' LARGE_INTEGER: a model_max_length above it means "no limit" (its default is 1e30).
NO_LIMIT = int(1e20)


class VerifiedFiles(Protocol):
    """What the tokenizer needs of a verified bundle: its manifest and the verified bytes of a listed file."""

    manifest: dict[str, Any]

    def read(self, rel: str) -> bytes: ...


def _token(value: Any) -> str | None:
    """A special token as the configs write it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _json(bundle: VerifiedFiles, rel: str) -> dict[str, Any]:
    try:
        data = json.loads(bundle.read(rel).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BundleError(f"{rel}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise BundleError(f"{rel}: expected a JSON object")
    return data


def load_tokenizer(bundle: VerifiedFiles) -> BundleTokenizer | None:
    """The bundle's tokenizer from the verified bytes of tokenizer/, or None when the bundle has none.

    bundle: a verified bundle (kernl.artifacts.reader.open_bundle); only files its manifest lists are read.
    """
    from tokenizers import Tokenizer

    files = bundle.manifest["files"]
    if TOKENIZER_FILE not in files:
        return None
    data = bundle.read(TOKENIZER_FILE)  # a BundleError of its own when the bytes do not verify
    try:
        backend = Tokenizer.from_str(data.decode("utf-8"))
    except Exception as err:  # tokenizers raises a bare Exception on a bad file (and UnicodeDecodeError)
        raise BundleError(f"{TOKENIZER_FILE}: not a tokenizers file ({str(err).splitlines()[0][:200]})") from None
    config: dict[str, Any] = {}
    for rel in CONFIG_FILES:
        if rel in files:
            config.update(_json(bundle, rel))
    if CHAT_TEMPLATE_FILE in files:  # transformers 5 saves the template beside the config; it takes precedence
        try:
            config["chat_template"] = bundle.read(CHAT_TEMPLATE_FILE).decode("utf-8")
        except UnicodeDecodeError:
            raise BundleError(f"{CHAT_TEMPLATE_FILE}: not UTF-8 text") from None
    program = bundle.manifest.get("program")
    names = program.get("inputs") if isinstance(program, dict) else None
    return BundleTokenizer(backend, config, input_names=names)


class BundleTokenizer:
    """Texts to the bundle's token inputs (padded to the longest, truncated), and token ids back to text."""

    def __init__(
        self, backend: Tokenizer, config: dict[str, Any] | None = None, *, input_names: Sequence[str] | None = None
    ) -> None:
        self.backend = backend
        self.config = dict(config or {})
        names = [n for n in (input_names or ("input_ids", "attention_mask")) if n in TOKEN_INPUTS]
        # The token inputs the bundle takes, in its order; input_ids always.
        self.input_names = names if "input_ids" in names else ["input_ids", *names]
        limit = self.config.get("model_max_length")
        self.model_max_length = limit if isinstance(limit, int) and 0 < limit <= NO_LIMIT else None
        self.padding_side = self._side("padding_side")
        self.truncation_side = self._side("truncation_side")
        pad_type = self.config.get("pad_token_type_id")
        self._pad_type_id = pad_type if isinstance(pad_type, int) else 0
        self.clean_up_tokenization_spaces = bool(self.config.get("clean_up_tokenization_spaces", False))
        self._bpe = type(backend.model).__name__ == "BPE"
        # Padding and truncation are settings of the backend: set under a lock, so threads can share it, and only
        # when a call needs others than the last one set (setting them costs about as much as a short text's encoding).
        self._lock = threading.Lock()
        self._settings: tuple | None = None

    def _side(self, key: str) -> str:
        side = self.config.get(key, "right")
        if side not in ("left", "right"):
            raise BundleError(f"tokenizer/tokenizer_config.json: {key} {side!r}, expected 'left' or 'right'")
        return side

    def _special_id(self, key: str) -> int | None:
        token = _token(self.config.get(key))
        return self.backend.token_to_id(token) if token is not None else None

    @property
    def pad_token_id(self) -> int | None:
        return self._special_id("pad_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._special_id("eos_token")

    @property
    def bos_token_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def mask_token_id(self) -> int | None:
        return self._special_id("mask_token")

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def __call__(
        self, texts: str | list[str], *, max_length: int | None = None, truncation: bool = True
    ) -> dict[str, torch.Tensor]:
        """{input_ids, attention_mask, token_type_ids (those the bundle takes)}: [batch, seq] int64 tensors,
        padded to the longest text on the padding side. With truncation, each text keeps at most max_length
        tokens (default: the tokenizer's model_max_length, when it has one). A str is a batch of one."""
        batch = [texts] if isinstance(texts, str) else list(texts) if isinstance(texts, list | tuple) else []
        if not batch or not all(isinstance(t, str) for t in batch):
            raise InputError("texts: expected a str or a non-empty list of str")
        if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
            raise InputError(f"max_length: expected a positive int, got {max_length!r}")
        limit = (max_length or self.model_max_length) if truncation else None
        # Rows shorter than the longest are padded with pad; without one, eos (GPT-2 style), else id 0: the
        # attention mask hides them either way.
        pad_id = next((i for i in (self.pad_token_id, self.eos_token_id) if i is not None), 0)
        with self._lock:
            tok = self.backend
            if self._settings != (limit, pad_id):
                if limit is None:
                    tok.no_truncation()
                else:
                    tok.enable_truncation(max_length=limit, direction=self.truncation_side)
                tok.enable_padding(
                    direction=self.padding_side,
                    pad_id=pad_id,
                    pad_type_id=self._pad_type_id,
                    pad_token=tok.id_to_token(pad_id) or "",
                )
                self._settings = (limit, pad_id)
            encodings = tok.encode_batch(batch)
        # Rows are padded to one length: numpy makes the [batch, seq] array in one step (torch.tensor on nested
        # lists walks every element in Python).
        return {
            name: torch.from_numpy(np.array([getattr(e, _FIELDS[name]) for e in encodings], dtype=np.int64))
            for name in self.input_names
        }

    def encode(self, texts: str | list[str]) -> list[list[int]]:
        """Token ids of each text, unpadded and untruncated (prompts for generate)."""
        batch = [texts] if isinstance(texts, str) else list(texts) if isinstance(texts, list | tuple) else []
        if not batch or not all(isinstance(t, str) for t in batch):
            raise InputError("texts: expected a str or a non-empty list of str")
        with self._lock:
            self.backend.no_truncation()
            self.backend.no_padding()
            self._settings = None
            return [e.ids for e in self.backend.encode_batch(batch)]

    def _clean(self, text: str) -> str:
        """transformers' clean_up_tokenization (spaces before punctuation), which it skips for BPE models."""
        if not self.clean_up_tokenization_spaces or self._bpe:
            return text
        for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't")):
            text = text.replace(before, after)
        for suffix in ("'m", "'s", "'ve", "'re"):
            text = text.replace(" " + suffix, suffix)
        return text

    def decode(self, ids: int | Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """The text of one sequence of token ids."""
        if isinstance(ids, torch.Tensor):
            ids = ids.flatten().tolist()
        elif isinstance(ids, int):
            ids = [ids]
        return self._clean(self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def batch_decode(
        self, sequences: Sequence[Sequence[int]] | torch.Tensor, skip_special_tokens: bool = True
    ) -> list[str]:
        """The text of each row of token ids."""
        rows = sequences.tolist() if isinstance(sequences, torch.Tensor) else [list(s) for s in sequences]
        texts = self.backend.decode_batch(rows, skip_special_tokens=skip_special_tokens)
        return [self._clean(t) for t in texts]
