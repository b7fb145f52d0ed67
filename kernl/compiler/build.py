"""kernl.compile: export → rewrite → program source → warm-up and check → bundle on disk."""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.export.graph_signature import InputKind

from kernl.artifacts.manifest import FORMAT_VERSION, describe_target, library_versions
from kernl.artifacts.weights import save_weights
from kernl.artifacts.writer import BundleWriter
from kernl.compiler.codegen import bind_device, program_source
from kernl.compiler.inputs import example_inputs_for, input_specs
from kernl.compiler.outputs import output_layout, output_names
from kernl.compiler.passes import run_passes
from kernl.compiler.trace import export_model
from kernl.compiler.warmup import load_program, warm_up
from kernl.errors import KernlError


def _check_buckets(buckets: Sequence) -> list[tuple[int, int]]:
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


def compile_model(
    model: torch.nn.Module,
    output_dir: str | os.PathLike,
    *,
    buckets: Sequence[tuple[int, int]],
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    example_inputs: dict[str, torch.Tensor] | None = None,
    tokenizer=None,
    overwrite: bool = False,
    progress=None,
) -> Path:
    """Compile model into a bundle at output_dir; returns its path. See kernl.compile."""
    buckets = _check_buckets(buckets)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KernlError("device cuda: no CUDA GPU is available on this machine")
    stage = progress or (lambda name: None)
    timings: dict[str, float] = {}

    def timed(name: str):
        stage(name)
        timings[name] = time.perf_counter()

    param = next(iter(model.parameters()), None)
    if param is not None and ((dtype and param.dtype != dtype) or param.device != device):
        model = copy.deepcopy(model).to(device=device, dtype=dtype)  # leave the caller's model as it was
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

    timed("export")
    with torch.no_grad():
        traced = export_model(model, make_inputs, buckets)
        eager_out = model(**traced.example)
    ep = traced.program
    layout = output_layout(ep, traced.example, static=traced.mode == "static")
    names = output_names(eager_out, len(layout))

    timed("rewrite")
    gm = ep.graph_module
    weights = _weights(ep)
    user_inputs = [s.arg.name for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    report = run_passes(gm, weights)
    bind_device(gm.graph)
    gm.recompile()
    weight_names = [n.name for n in gm.graph.nodes if n.op == "placeholder" and n.name in weights]
    from kernl import __version__

    source = program_source(gm, model_name=type(model).__name__, version=__version__, outputs=names, report=report)

    with BundleWriter(output_dir, overwrite=overwrite) as writer:
        program_path = writer.write_text("program.py", source)
        timed("warm-up")
        forward = load_program(program_path)
        checks = warm_up(forward, model, make_inputs, buckets, device, [weights[n] for n in weight_names], user_inputs)
        timed("save")
        aliases = save_weights(weights, writer.root / "weights.safetensors")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(writer.root / "tokenizer"))
        manifest = {
            "format_version": FORMAT_VERSION,
            "model": type(model).__name__,
            "versions": library_versions(),
            "target": describe_target(device),
            "dtype": str(dtype).removeprefix("torch."),
            "export_mode": traced.mode,
            "inputs": [s.to_json() for s in specs if s.name in user_inputs],
            "outputs": [{"name": n, "dims": d} for n, d in zip(names, layout)],
            "buckets": [list(b) for b in buckets],
            "rewrites": report,
            "program": {"file": "program.py", "weights": weight_names, "inputs": user_inputs},
            "weights": {"file": "weights.safetensors", "aliases": aliases},
            "checks": checks,
        }
        timed("end")
        stamps = list(timings.items())
        manifest["build_seconds"] = {a: round(tb - ta, 3) for (a, ta), (_, tb) in zip(stamps, stamps[1:])}
        return writer.commit(manifest)


def _resize(t: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
    """Repeat an example input to (batch, seq), keeping its values' distribution."""
    reps = (-(-batch // t.shape[0]), -(-seq // t.shape[1]))
    return t.repeat(*reps)[:batch, :seq].contiguous()
