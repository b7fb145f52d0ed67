"""Export a model with torch.export for a set of (batch, seq) buckets: dynamic dims when it can.

Fixed-shape inputs (kernl.compiler.inputs) have a dynamic batch only; their buckets are (batch, window).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

import torch
from torch.export import Dim, ExportedProgram
from torch.export.graph_signature import InputKind
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from kernl.compiler.inputs import fixed_dims, window_of
from kernl.errors import KernlError


@dataclass
class Traced:
    program: ExportedProgram
    mode: str  # "strict-dynamic", "nonstrict-dynamic" or "static"
    example: dict[str, torch.Tensor]


def _dynamic_shapes(inputs: dict[str, torch.Tensor], max_batch: int, max_seq: int) -> dict:
    """Batch (dim 0) dynamic in every input, seq (dim 1) in the [batch, seq] ones; fixed-shape inputs keep the rest."""
    batch = Dim("batch", min=1, max=max_batch) if max_batch > 1 else None
    seq = Dim("seq", min=1, max=max_seq) if max_seq > 1 else None
    shapes = {}
    for name, value in inputs.items():
        dims = {0: batch} if batch is not None else {}
        if seq is not None and fixed_dims(value) is None:
            dims[1] = seq
        shapes[name] = dims
    return shapes


def check_window(inputs: dict[str, torch.Tensor], buckets: list[tuple[int, int]]) -> None:
    """A program whose inputs are all fixed-shape serves one length: every bucket must be (batch, window)."""
    window = window_of(inputs)
    if window is None:
        return
    wrong = [b for b in buckets if b[1] != window]
    if wrong:
        names = ", ".join(f"{n} {[*v.shape[1:]]}" for n, v in inputs.items())
        raise KernlError(
            f"bucket {wrong[0]}: the model's inputs have a fixed shape after the batch ({names}); give buckets as "
            f"(batch, {window}), {window} being the window's length"
        )


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
    check_window(small, buckets)
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
    if any(is_constraint_violation(err) for err in errors):
        try:
            return Traced(relaxed_export(model, small, shapes), "nonstrict-dynamic", small)
        except Exception as err:  # noqa: BLE001
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


def is_constraint_violation(err: BaseException) -> bool:
    """torch's solver could not prove a guard over a declared range (torch 2.11 on some models: seq *
    roundup8(seq) > 1, or GPT-2's position table, though true for every size the buckets allow)."""
    return "Constraints violated" in str(err)


def relaxed_export(
    model: torch.nn.Module, example: dict[str, torch.Tensor], shapes: dict, strict: bool = False
) -> ExportedProgram:
    """Export again with every declared dim Dim.AUTO (the guards stay, unproven ranges no longer fail), then
    check each declared dim stayed symbolic: KernlError where one came out a constant."""
    relaxed = {name: {d: Dim.AUTO for d in dims} for name, dims in shapes.items()}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        ep = torch.export.export(model, (), dict(example), dynamic_shapes=relaxed, strict=strict)
    check_symbolic(ep, shapes, type(model).__name__.strip("_").lower())
    return ep


def check_symbolic(ep: ExportedProgram, shapes: dict, what: str) -> None:
    """KernlError when a dim declared dynamic came out as a constant (the graph would serve one size only)."""
    values = {n.name: n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder"}
    for spec in ep.graph_signature.input_specs:
        if spec.kind != InputKind.USER_INPUT or spec.arg.name not in values:
            continue
        val = values[spec.arg.name]
        for d, dim in (shapes.get(spec.arg.name) or {}).items():
            if dim is not None and is_concrete_int(val.shape[d]):
                raise KernlError(f"{what} export: {spec.arg.name} dim {d} was specialised to {val.shape[d]}")
