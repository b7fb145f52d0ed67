"""Export → rewrite → program source, in memory: what kernl.compile writes out and optimize_model runs."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.export.graph_signature import InputKind

from kernl.compiler.codegen import bind_device, program_source
from kernl.compiler.hoist import hoist_invariants
from kernl.compiler.inputs import example_inputs_for, input_specs
from kernl.compiler.outputs import output_layout, output_names
from kernl.compiler.passes import run_passes
from kernl.compiler.serialize import program_spec
from kernl.compiler.shard import ShardPlan, shard_program
from kernl.compiler.tail import split_tail
from kernl.compiler.trace import export_model
from kernl.errors import KernlError
from kernl.runtime.program import Program, ProgramSpec


@dataclass
class Lowered:
    """A rewritten program and everything needed to run it, before anything is written to disk."""

    model: torch.nn.Module  # the eval-mode model that was exported (on device, in dtype)
    spec: ProgramSpec  # the program as data: what a bundle holds and what runs
    source: str  # program.py, its readable view
    weights: dict[str, torch.Tensor]  # program weight inputs by placeholder name
    report: dict[str, int]  # rewrite counters
    mode: str  # export mode: "strict-dynamic", "nonstrict-dynamic" or "static"
    buckets: list[tuple[int, int]]  # the sorted buckets the program was exported for
    dtype: torch.dtype
    device: torch.device
    make_inputs: Callable[[int, int], dict[str, torch.Tensor]]
    shard: ShardPlan | None = None  # with tensor_parallel > 1: how each rank's weights are made from weights

    @property
    def input_names(self) -> list[str]:
        """The program's user inputs, in order."""
        return self.spec.input_names

    def weight_list(self) -> list[torch.Tensor]:
        """The program's weight parameters, in order (unsharded: see rank_weights for a tensor-parallel one)."""
        return [self.weights[name] for name in self.spec.weights]

    def rank_weights(self, rank: int) -> dict[str, torch.Tensor]:
        """The weights rank holds, by name: all of them without tensor parallelism."""
        return self.weights if self.shard is None else self.shard.weights_for(self.weights, rank)

    def bind(self) -> Program:
        """The program's forward entry, bound from its data exactly as a bundle's load binds it."""
        return self.spec.bind()


def check_buckets(buckets: Sequence) -> list[tuple[int, int]]:
    out = []
    for b in buckets:
        if not (isinstance(b, Sequence) and len(b) == 2 and all(isinstance(v, int) and v >= 1 for v in b)):
            raise KernlError(f"bucket {b!r}: expected a (batch, seq_len) pair of positive ints")
        out.append((int(b[0]), int(b[1])))
    if not out:
        raise KernlError("buckets: give at least one (batch, seq_len) pair")
    return sorted(set(out))


def _weights(ep) -> dict[str, torch.Tensor]:
    """Program inputs that are parameters, buffers or constants, by placeholder name."""
    tensors = {}
    for spec in ep.graph_signature.input_specs:
        if spec.kind == InputKind.USER_INPUT:
            continue
        source = ep.state_dict if spec.target in ep.state_dict else ep.constants
        value = source.get(spec.target)
        if not isinstance(value, torch.Tensor):
            raise KernlError(f"{spec.target}: a non-tensor constant in the exported program is not supported")
        tensors[spec.arg.name] = value
    return tensors


def _resize(t: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
    """Repeat an example input to (batch, seq), keeping its values' distribution."""
    reps = (-(-batch // t.shape[0]), -(-seq // t.shape[1]))
    return t.repeat(*reps)[:batch, :seq].contiguous()


def _on_meta(make_inputs: Callable[[int, int], dict[str, torch.Tensor]]) -> Callable:
    return lambda batch, seq: {k: v.to("meta") for k, v in make_inputs(batch, seq).items()}


@dataclass
class Rewritten:
    """An exported model's graph after the rewrite passes, before it becomes program entries."""

    model: torch.nn.Module
    gm: torch.fx.GraphModule
    weights: dict[str, torch.Tensor]
    report: dict[str, int]
    mode: str
    example: dict[str, torch.Tensor]
    eager_out: object
    program: object  # the ExportedProgram
    user_inputs: list[str]
    specs: list
    make_inputs: Callable[[int, int], dict[str, torch.Tensor]]
    dtype: torch.dtype
    device: torch.device


def rewrite_model(
    model: torch.nn.Module,
    buckets: list[tuple[int, int]],
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    example_inputs: dict[str, torch.Tensor] | None = None,
    stage: Callable[[str], None] | None = None,
) -> Rewritten:
    """Export model for buckets and run the rewrite passes; stage(name) marks "export" and "rewrite"."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KernlError("device cuda: no CUDA GPU is available on this machine")
    stage = stage or (lambda name: None)

    param = next(iter(model.parameters()), None)
    # A model on the meta device (weights read later, kernl.compiler.meta) is exported on meta tensors.
    meta = param is not None and param.device.type == "meta"
    if param is not None and ((dtype and param.dtype != dtype) or (param.device != device and not meta)):
        model = copy.deepcopy(model).to(device=param.device if meta else device, dtype=dtype)  # the caller's stays
    model = model.eval()
    if hasattr(model, "config") and hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    dtype = dtype or (param.dtype if param is not None else torch.float32)

    if example_inputs is not None:
        given = {k: v.to(device) for k, v in example_inputs.items()}
        specs = input_specs(given)

        def make_inputs(batch: int, seq: int) -> dict[str, torch.Tensor]:
            return {k: _resize(v, batch, seq) for k, v in given.items()}
    else:

        def make_inputs(batch: int, seq: int) -> dict[str, torch.Tensor]:
            return example_inputs_for(model, batch, seq, device)

        specs = input_specs(make_inputs(1, 2))

    stage("export")
    with torch.no_grad():
        traced = export_model(model, _on_meta(make_inputs) if meta else make_inputs, buckets)
        # Eager code may read values (HF's mask checks): on meta, the exported graph stands in for it.
        eager_out = (traced.program.module() if meta else model)(**traced.example)
    ep = traced.program

    stage("rewrite")
    gm = ep.graph_module
    weights = _weights(ep)
    user_inputs = [s.arg.name for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    if meta:  # the weights the passes make are recorded, to be made again from the checkpoint's tensors
        from kernl.compiler import meta as _meta

        sources = {s.arg.name: s.target for s in ep.graph_signature.input_specs if s.kind != InputKind.USER_INPUT}
        with _meta.recording(weights, sources) as recorder:
            report = run_passes(gm, weights)
        weights = _meta.lazy_weights(weights, recorder, model)
    else:
        report = run_passes(gm, weights)
    return Rewritten(
        model, gm, weights, report, traced.mode, traced.example, eager_out, ep, user_inputs, specs, make_inputs,
        dtype, device,
    )  # fmt: skip


def lower_model(
    model: torch.nn.Module,
    buckets: Sequence[tuple[int, int]],
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    example_inputs: dict[str, torch.Tensor] | None = None,
    stage: Callable[[str], None] | None = None,
    tensor_parallel: int = 1,
) -> Lowered:
    """Export model for buckets and rewrite it onto kernl's kernels; stage(name) marks "export" and "rewrite".

    tensor_parallel: the number of ranks (GPUs) the program is split over (kernl.compiler.shard): one program
    for all of them, whose weights differ per rank (Lowered.rank_weights).
    """
    buckets = check_buckets(buckets)
    rw = rewrite_model(model, buckets, dtype=dtype, device=device, example_inputs=example_inputs, stage=stage)
    model, gm, weights, report = rw.model, rw.gm, rw.weights, rw.report
    shard = None
    if tensor_parallel != 1:
        # On the rewritten graph (the passes' kernl.linear/attention nodes), before the device binding, the
        # invariants and the tail split, which then see the per-rank program.
        shard = shard_program(gm, weights, tensor_parallel)
        report = dict(sorted({**report, **shard.report}.items()))
    layout = output_layout(rw.program, rw.example, static=rw.mode == "static")
    names = output_names(rw.eager_out, len(layout))
    bind_device(gm.graph)
    gm.recompile()
    weight_names = [n.name for n in gm.graph.nodes if n.op == "placeholder" and n.name in weights]
    from kernl import __version__

    constants = set(weight_names) | {"target_device"}
    hoisted = hoist_invariants(gm, constants)
    split = split_tail(gm, constants)
    source = program_source(
        gm,
        model_name=type(model).__name__,
        version=__version__,
        outputs=names,
        report=report,
        invariants=hoisted,
        split=split,
        weight_count=len(weight_names),
    )
    outputs = [{"name": n, "dims": d} for n, d in zip(names, layout)]
    by_name = {s.name: s.to_json() for s in rw.specs}
    inputs = [by_name[name] for name in rw.user_inputs]
    spec = program_spec(gm, invariants=hoisted, split=split, weights=weight_names, inputs=inputs, outputs=outputs)
    return Lowered(
        model=model,
        spec=spec,
        source=source,
        weights=weights,
        report=report,
        mode=rw.mode,
        buckets=buckets,
        dtype=rw.dtype,
        device=rw.device,
        make_inputs=rw.make_inputs,
        shard=shard,
    )
