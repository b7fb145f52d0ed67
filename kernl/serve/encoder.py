"""Encoder requests (embeddings, predictions): a batch of requests' texts to token rows, bundle calls, answers.

A batch is tokenized in the worker thread with one tokenizer call for all its texts (padded to the longest, as
tokenizing them together always gave; the tokenizer leaves the GIL, so the event loop goes on meanwhile). A
request with a text past max_seq tokens, or one its handler's check refuses, gets its own error; the others run,
in as few calls as the buckets allow, and each call's outputs are turned into answers at once (one pooling of all
its rows), then split back by request.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kernl.errors import InputError
from kernl.serve.batcher import Buckets, Prepared
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


@dataclass
class Call:
    """One bundle call over several requests' rows: the merged inputs, the outputs on the CPU, and each request's
    payload and (first row, end row, width): its width is its longest row, as it would be tokenized alone."""

    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]
    payloads: list[Texts]
    spans: list[tuple[int, int, int]]
    cut: Callable[[str, torch.Tensor, int, int, int], torch.Tensor]

    def request(self, i: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Request i's inputs and outputs: its rows, cut to its own width on the padding side."""
        start, end, width = self.spans[i]
        inputs = {name: self.cut(name, t, start, end, width) for name, t in self.inputs.items()}
        return inputs, {name: self.cut(name, t, start, end, width) for name, t in self.outputs.items()}


class Encoder:
    """bundle + its tokenizer: tokenize a batch, check each request's lengths, run calls that buckets cover."""

    def __init__(self, bundle: Any, tokenizer: Any, *, max_seq: int | None = None, max_rows: int | None = None) -> None:
        self.bundle = bundle
        self.tokenizer = tokenizer
        longest, largest = max(s for _, s in bundle.buckets), max(b for b, _ in bundle.buckets)
        self.max_seq = min(max_seq or longest, longest)
        self.max_rows = min(max_rows or largest, largest)
        self.buckets = Buckets(tuple((int(b), int(s)) for b, s in bundle.buckets), self.max_rows)
        self.left = tokenizer.padding_side == "left"
        outputs = bundle.manifest.get("outputs") or []
        # Which outputs follow the batch's rows and its sequence (dims as the manifest names them).
        self.dims = {o["name"]: list(o.get("dims") or []) for o in outputs}

    def check(self, texts: list[str]) -> None:
        """What a request's texts can be refused for before tokenizing (on the event loop)."""
        if not texts:
            raise InputError("input: empty; give a string or a non-empty list of strings")
        if len(texts) > self.max_rows:
            raise TooLarge(f"input: {len(texts)} texts, at most {self.max_rows} a request")

    def tokenize(self, texts: list[str]) -> tuple[dict[str, torch.Tensor], list[int]]:
        """Every text's tokens, padded to the longest ([texts, longest] tensors), and each text's length.

        Truncating one token past max_seq tells an over-long text apart without encoding all of it."""
        inputs = self.tokenizer(texts, max_length=self.max_seq + 1)
        return inputs, inputs["attention_mask"].sum(1).tolist()

    def too_long(self, lengths: Sequence[int]) -> TooLarge | None:
        """The error of a request whose texts have these lengths, or None when each fits."""
        for i, n in enumerate(lengths):
            if n > self.max_seq:
                return TooLarge(f"input {i}: longer than {self.max_seq} tokens, the most this server takes")
        return None

    def cut(self, name: str, t: torch.Tensor, start: int, end: int, width: int) -> torch.Tensor:
        """Rows start:end of a [batch, (seq), ...] tensor, cut to width on the padding side."""
        dims = self.dims.get(name) or ["batch", "seq"][: t.dim()]
        if dims[:1] == ["batch"] and (start, end) != (0, t.shape[0]):
            t = t[start:end]
        if dims[1:2] == ["seq"] and width < t.shape[1]:
            t = t[:, t.shape[1] - width :] if self.left else t[:, :width]
        return t

    def calls(
        self,
        inputs: dict[str, torch.Tensor],
        requests: list[tuple[int, int, int]],
        payloads: list[Texts],
        outputs: Sequence[str] | None = None,
    ) -> Iterator[tuple[list[int], Call]]:
        """Run requests (first row, end row, width in inputs), in order, in as few calls as the buckets allow;
        yield each call's request indices and the Call. outputs: the outputs to bring to the CPU (default: all)."""
        group: list[int] = []
        rows = seq = 0
        for i, (start, end, width) in enumerate(requests):
            if group and not self.buckets.fits(rows + end - start, max(seq, width)):
                yield group, self._call(inputs, [requests[j] for j in group], [payloads[j] for j in group], outputs)
                group, rows, seq = [], 0, 0
            group.append(i)
            rows, seq = rows + end - start, max(seq, width)
        if group:
            yield group, self._call(inputs, [requests[j] for j in group], [payloads[j] for j in group], outputs)

    def _call(
        self,
        inputs: dict[str, torch.Tensor],
        requests: list[tuple[int, int, int]],
        payloads: list[Texts],
        names: Sequence[str] | None,
    ) -> Call:
        width = max(w for _, _, w in requests)
        if all(requests[k][1] == requests[k + 1][0] for k in range(len(requests) - 1)):
            start, end = requests[0][0], requests[-1][1]  # adjacent rows (the usual case): views, no copies
            merged = {name: self.cut(name, t, start, end, width) for name, t in inputs.items()}
        else:
            index = torch.tensor([r for s, e, _ in requests for r in range(s, e)])
            merged = {
                name: self.cut(name, t.index_select(0, index), 0, len(index), width) for name, t in inputs.items()
            }
        out = self.bundle(**merged)
        wanted = list(out.keys()) if names is None else names
        spans, row = [], 0
        for start, end, w in requests:
            spans.append((row, row + end - start, w))
            row += end - start
        return Call(merged, {name: out[name].cpu() for name in wanted}, payloads, spans, self.cut)


class EncoderHandler:
    """A BatchHandler (kernl.serve.batcher): check a request's texts, then tokenize, run and finish whole batches.

    finish(call) -> one result a request of the call (an exception fails that request alone); check(payload,
    inputs) refuses a request by its tokens (kernl.InputError) without failing the others. outputs: the bundle
    outputs finish reads (default: all)."""

    def __init__(
        self,
        encoder: Encoder,
        finish: Callable[[Call], list[Any]],
        check: Callable[[Texts, dict[str, torch.Tensor]], None] | None = None,
        outputs: Sequence[str] | None = None,
    ) -> None:
        self.encoder = encoder
        self.finish = finish
        self.check = check
        self.outputs = outputs

    def prepare(self, payload: Texts) -> Prepared:
        self.encoder.check(payload.texts)
        return Prepared(rows=len(payload.texts), seq=0, data=payload)

    def run(self, items: list[Prepared]) -> list[Any]:
        payloads: list[Texts] = [item.data for item in items]
        inputs, lengths = self.encoder.tokenize([text for p in payloads for text in p.texts])
        results: list[Any] = [None] * len(items)
        taken, spans, row = [], [], 0
        for i, payload in enumerate(payloads):
            start, row = row, row + len(payload.texts)
            span = (start, row, max(lengths[start:row]))
            error = self._refused(payload, inputs, lengths, span)
            if error is None:
                taken.append(i)
                spans.append(span)
            results[i] = error
        if taken:
            for group, call in self.encoder.calls(inputs, spans, [payloads[i] for i in taken], self.outputs):
                for j, result in zip(group, self.finish(call), strict=True):
                    tokens = sum(lengths[spans[j][0] : spans[j][1]])
                    results[taken[j]] = result if isinstance(result, BaseException) else Answer(result, tokens)
        return results

    def _refused(
        self, payload: Texts, inputs: dict[str, torch.Tensor], lengths: list[int], span: tuple[int, int, int]
    ) -> Exception | None:
        """Why one request of the batch cannot run (its own error, the others still run), or None."""
        start, end, width = span
        error = self.encoder.too_long(lengths[start:end])
        if error is not None:
            return error
        if self.check is not None:
            try:
                self.check(payload, {name: self.encoder.cut(name, t, start, end, width) for name, t in inputs.items()})
            except InputError as err:
                return err
        if not self.encoder.buckets.fits(end - start, width):
            return self.encoder.buckets.refusal(end - start, width)
        return None
