"""Encoder requests (embeddings, predictions): texts to token rows, many requests' rows into ONE bundle call.

Each request is tokenized alone (padded to its own longest text); a batch pads every request to the batch's
longest row on the tokenizer's padding side, with the values the tokenizer pads with, so the merged call sees
exactly what tokenizing all texts at once would give. Outputs are split back by rows and sequence length.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from kernl.errors import InputError
from kernl.serve.batcher import Prepared
from kernl.serve.errors import TooLarge


@dataclass
class Answer:
    """One request's result, and the tokens its texts took (for the response's usage)."""

    result: Any
    tokens: int


@dataclass
class Texts:
    """A request's payload for an encoder handler: the texts, and the request's own options."""

    texts: list[str]
    options: dict[str, Any]


class Encoder:
    """bundle + its tokenizer: encode one request, run a batch of them, split the outputs back."""

    def __init__(self, bundle: Any, tokenizer: Any, *, max_seq: int | None = None, max_rows: int | None = None) -> None:
        self.bundle = bundle
        self.tokenizer = tokenizer
        longest, largest = max(s for _, s in bundle.buckets), max(b for b, _ in bundle.buckets)
        self.max_seq = min(max_seq or longest, longest)
        self.max_rows = min(max_rows or largest, largest)
        self.left = tokenizer.padding_side == "left"
        pad = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
        pad_type = tokenizer.config.get("pad_token_type_id")
        self.pad_values = {"input_ids": pad, "attention_mask": 0, "token_type_ids": pad_type or 0}
        outputs = bundle.manifest.get("outputs") or []
        # Which outputs follow the batch's rows and its sequence (dims as the manifest names them).
        self.dims = {o["name"]: list(o.get("dims") or []) for o in outputs}

    def encode(self, texts: list[str]) -> Prepared:
        """Prepared(rows, longest row, inputs) for one request; TooLarge when a text passes max_seq tokens."""
        if not texts:
            raise InputError("input: empty; give a string or a non-empty list of strings")
        if len(texts) > self.max_rows:
            raise TooLarge(f"input: {len(texts)} texts, at most {self.max_rows} a request")
        # Truncating one token past the limit tells an over-long text apart without encoding all of it twice.
        inputs = self.tokenizer(texts, max_length=self.max_seq + 1)
        seq = inputs["input_ids"].shape[1]
        # Rows are padded to the longest: only a width past max_seq has a row too long. Checking the width first
        # keeps the per-row tensor ops (a measurable part of a small request's event-loop time) off the usual path.
        if seq > self.max_seq:
            too_long = (inputs["attention_mask"].sum(1) > self.max_seq).nonzero().flatten().tolist()
            raise TooLarge(f"input {too_long[0]}: longer than {self.max_seq} tokens, the most this server takes")
        return Prepared(rows=len(texts), seq=seq, data=inputs)

    def _pad(self, name: str, t: torch.Tensor, seq: int) -> torch.Tensor:
        extra = seq - t.shape[1]
        if extra == 0:
            return t
        side = (extra, 0) if self.left else (0, extra)
        return torch.nn.functional.pad(t, side, value=self.pad_values.get(name, 0))

    def forward(self, items: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        """One bundle call over every item's rows; each item's outputs, on the CPU, cut to its rows and length."""
        seq = max(inputs["input_ids"].shape[1] for inputs in items)
        merged = {name: torch.cat([self._pad(name, inputs[name], seq) for inputs in items]) for name in items[0]}
        outputs = {name: t.cpu() for name, t in self.bundle(**merged).items()}
        results, row = [], 0
        for inputs in items:
            rows, own = inputs["input_ids"].shape
            results.append({name: self._cut(name, t, row, rows, own, seq) for name, t in outputs.items()})
            row += rows
        return results

    def _cut(self, name: str, t: torch.Tensor, row: int, rows: int, own: int, seq: int) -> torch.Tensor:
        dims = self.dims.get(name) or ["batch", "seq"][: t.dim()]
        if dims[:1] == ["batch"]:
            t = t[row : row + rows]
        if dims[1:2] == ["seq"] and own < seq:
            t = t[:, seq - own :] if self.left else t[:, :own]
        return t


class EncoderHandler:
    """A BatchHandler (kernl.serve.batcher): check, encode, run; finish turns one request's outputs into its answer.

    check(payload, inputs) runs on the request alone (bad input fails before queueing); finish(payload, inputs,
    outputs) runs in the worker thread after the call."""

    def __init__(
        self,
        encoder: Encoder,
        finish: Callable[[Texts, dict[str, torch.Tensor], dict[str, torch.Tensor]], Any],
        check: Callable[[Texts, dict[str, torch.Tensor]], None] | None = None,
    ) -> None:
        self.encoder = encoder
        self.finish = finish
        self.check = check

    # Tokenizing this much takes well under a thread hop's cost (~0.1 ms), so it runs on the event loop.
    CHEAP_TEXTS, CHEAP_CHARS = 4, 2048

    def cheap(self, payload: Texts) -> bool:
        texts = payload.texts
        return len(texts) <= self.CHEAP_TEXTS and sum(len(t) for t in texts) <= self.CHEAP_CHARS

    def prepare(self, payload: Texts) -> Prepared:
        item = self.encoder.encode(payload.texts)
        if self.check is not None:
            self.check(payload, item.data)
        item.data = (payload, item.data)
        return item

    def run(self, items: list[Prepared]) -> list[Answer]:
        outputs = self.encoder.forward([item.data[1] for item in items])
        return [
            Answer(self.finish(payload, inputs, out), int(inputs["attention_mask"].sum()))
            for (payload, inputs), out in zip((item.data for item in items), outputs, strict=True)
        ]
