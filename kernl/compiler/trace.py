"""Export a model with torch.export for a set of (batch, seq) buckets: dynamic dims when it can."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

import torch
from torch.export import Dim, ExportedProgram

from kernl.errors import KernlError


@dataclass
class Traced:
    program: ExportedProgram
    mode: str  # "strict-dynamic", "nonstrict-dynamic" or "static"
    example: dict[str, torch.Tensor]


def _dynamic_shapes(inputs: dict[str, torch.Tensor], max_batch: int, max_seq: int) -> dict:
    dims = {}
    if max_batch > 1:
        dims[0] = Dim("batch", min=1, max=max_batch)
    if max_seq > 1:
        dims[1] = Dim("seq", min=1, max=max_seq)
    return {name: dict(dims) for name in inputs}


def _short_reason(err: BaseException) -> str:
    """The first line of an export error and the innermost user-code line it names."""
    text = str(err)
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(err).__name__)
    frames = re.findall(r'File "([^"]+)", line (\d+)', text)
    where = next((f"{f}:{n}" for f, n in reversed(frames) if "/torch/" not in f), None)
    return f"{first}" + (f" (at {where})" if where else "")


def export_model(model: torch.nn.Module, make_inputs, buckets: list[tuple[int, int]]) -> Traced:
    """Export with strict (Dynamo) export, then non-strict, then statically at the largest bucket.

    make_inputs(batch, seq) returns example inputs; the dynamic export uses a small example inside the
    buckets' range so one program serves every bucket.
    """
    max_batch = max(b for b, _ in buckets)
    max_seq = max(s for _, s in buckets)
    small = make_inputs(min(2, max_batch), min(16, max_seq))
    shapes = _dynamic_shapes(small, max_batch, max_seq)
    errors = []
    for strict in (True, False):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ep = torch.export.export(model, (), dict(small), dynamic_shapes=shapes, strict=strict)
            return Traced(ep, ("strict" if strict else "nonstrict") + "-dynamic", small)
        except Exception as err:  # noqa: BLE001 - every export failure moves on to the next strategy
            errors.append(err)
    if len(buckets) > 1:
        raise KernlError(
            "export with dynamic batch/seq dims failed and a static program serves one bucket only; "
            f"compile one bucket per bundle. Reason: {_short_reason(errors[-1])}"
        )
    largest = make_inputs(max_batch, max_seq)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ep = torch.export.export(model, (), dict(largest), strict=False)
    except Exception as err:  # noqa: BLE001
        raise KernlError(f"{type(model).__name__} cannot be exported: {_short_reason(errors[0])}") from err
    return Traced(ep, "static", largest)
