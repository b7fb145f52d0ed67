"""Export → rewrite → prefill and decode entries, in memory: what kernl.compile writes for text generation."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from kernl.compiler.codegen import bind_device, generation_source
from kernl.compiler.generation import (
    DECODE,
    GENERATION_INPUTS,
    PREFILL,
    PREFILL_EXTRA,
    CacheLayout,
    cache_layout,
    decode_graph,
    prefill_graph,
)
from kernl.compiler.lower import rewrite_model
from kernl.compiler.serialize import generation_spec
from kernl.compiler.shard import ShardPlan, shard_program
from kernl.errors import KernlError
from kernl.runtime.program import ProgramSpec


def positive(name: str, values) -> tuple[int, ...]:
    """values sorted and deduplicated; KernlError naming the setting unless they are ints >= 1."""
    values = sorted(set(values))
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values):
        raise KernlError(f"{name}: give positive ints, got {values!r}")
    return tuple(values)


@dataclass(frozen=True)
class GenerationSettings:
    """What a generation bundle serves: prompts padded to (batch, seq) buckets, decode steps per batch bucket,
    and a cache of max_length positions per row."""

    max_length: int
    batch_sizes: tuple[int, ...]
    seq_lens: tuple[int, ...]

    @classmethod
    def checked(
        cls, max_length: int, batch_sizes: Sequence[int], seq_lens: Sequence[int], model_max: int | None = None
    ) -> GenerationSettings:
        (max_length,) = positive("max_length", [max_length])
        batch_sizes, seq_lens = positive("batch_sizes", batch_sizes), positive("seq_lens", seq_lens)
        if seq_lens[-1] >= max_length:
            raise KernlError(f"seq_lens: the largest prompt bucket {seq_lens[-1]} leaves no room to generate "
                             f"within max_length {max_length}")  # fmt: skip
        if model_max is not None and max_length > model_max:
            raise KernlError(f"max_length {max_length} is beyond the model's {model_max} positions")
        return cls(max_length, batch_sizes, seq_lens)

    @property
    def rows(self) -> int:
        """Cache rows: the largest batch, plus one scratch row that a bucket's padding rows write into."""
        return self.batch_sizes[-1] + 1

    def prefill_buckets(self) -> list[tuple[int, int]]:
        return [(b, s) for b in self.batch_sizes for s in self.seq_lens]

    def to_json(self) -> dict:
        return {"max_length": self.max_length, "batch_sizes": list(self.batch_sizes), "seq_lens": list(self.seq_lens)}


@dataclass
class LoweredGeneration:
    model: torch.nn.Module
    spec: ProgramSpec
    source: str
    weights: dict[str, torch.Tensor]
    report: dict[str, int]
    mode: str
    settings: GenerationSettings
    layout: CacheLayout
    dtype: torch.dtype
    device: torch.device
    shard: ShardPlan | None = None  # with tensor_parallel > 1: how each rank's weights are made from weights

    def weight_list(self) -> list[torch.Tensor]:
        """The program's weights in order (unsharded: see rank_weights for a tensor-parallel one)."""
        return [self.weights[name] for name in self.spec.weights]

    def rank_weights(self, rank: int) -> dict[str, torch.Tensor]:
        """The weights rank holds, by name: all of them without tensor parallelism."""
        return self.weights if self.shard is None else self.shard.weights_for(self.weights, rank)


def _input_spec(name: str, rank: int) -> dict:
    return {"name": name, "dtype": "int64", "rank": rank}


ENTRY_INPUTS = {
    PREFILL: [*(_input_spec(n, 2) for n in GENERATION_INPUTS), *(_input_spec(n, 1) for n in PREFILL_EXTRA)],
    DECODE: [_input_spec(n, 2) for n in GENERATION_INPUTS],
}


def lower_generation(
    model: torch.nn.Module,
    settings: GenerationSettings,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    stage: Callable[[str], None] | None = None,
    tensor_parallel: int = 1,
) -> LoweredGeneration:
    """Export model's forward(input_ids, position_ids) once and derive its prefill and decode entries.

    tensor_parallel: the graph is split over this many ranks (kernl.compiler.shard) before the entries are
    derived from it, so both entries, and their caches (heads_kv / tensor_parallel heads), are per rank.
    """
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 0)
    if vocab < 1:
        raise KernlError(f"{type(model).__name__}: no config.vocab_size; text generation needs a causal LM")
    batch, seq = min(2, settings.batch_sizes[-1]), min(16, settings.seq_lens[-1])
    example = {
        "input_ids": torch.randint(0, vocab, (batch, seq)),
        "position_ids": torch.arange(seq).expand(batch, seq).contiguous(),
    }
    # seq is exported dynamic from 1: the decode step runs the same graph at seq 1.
    export_buckets = [(settings.batch_sizes[-1], max(2, settings.seq_lens[-1]))]
    rw = rewrite_model(model, export_buckets, dtype=dtype, device=device, example_inputs=example, stage=stage)
    if rw.mode == "static" or rw.user_inputs != list(GENERATION_INPUTS):
        raise KernlError(f"{type(model).__name__}: generation needs forward(input_ids, position_ids) exported with "
                         f"dynamic batch and length (got {rw.mode}, inputs {rw.user_inputs})")  # fmt: skip
    gm, report, shard = rw.gm, rw.report, None
    if tensor_parallel != 1:
        shard = shard_program(gm, rw.weights, tensor_parallel)
        report = dict(sorted({**report, **shard.report}.items()))
    bind_device(gm.graph)
    gm.recompile()
    layout = cache_layout(gm)
    weight_names = [n.name for n in gm.graph.nodes if n.op == "placeholder" and n.name in rw.weights]
    entries = {PREFILL: prefill_graph(gm, layout), DECODE: decode_graph(gm, layout)}
    from kernl import __version__

    source = generation_source(entries, model_name=type(rw.model).__name__, version=__version__, report=report)
    spec = generation_spec(
        {name: (g, ENTRY_INPUTS[name]) for name, g in entries.items()},
        weights=weight_names,
        state=layout.state(settings.rows, settings.max_length),
        outputs=[{"name": "logits", "dims": ["batch", vocab]}],
    )
    return LoweredGeneration(
        rw.model, spec, source, rw.weights, report, rw.mode, settings, layout, rw.dtype, rw.device, shard
    )
