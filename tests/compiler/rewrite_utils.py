"""Export a module, run kernl's passes on it, and run the rewritten graph: what the rewrite tests share."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

from kernl.compiler.build import _weights
from kernl.compiler.passes import run_passes
from kernl.compiler.trace import export_model

# Counters of the no-op pass: how many asserts export leaves differs between torch versions.
NOOP_COUNTERS = {"assert_removed", "dropout_removed"}

# What the passes do to the tiny families of tests/models.py (2 layers each), whatever the dtype.
EXPECTED_REWRITES = {
    "bert": {
        "add_layer_norm": 4,
        "attention": 2,
        "fused_projections": 2,
        "layer_norm": 1,
        "linear": 9,
        "linear_activation": 3,
    },
    "gpt2": {"add_layer_norm": 4, "attention": 2, "layer_norm": 1, "linear": 8, "linear_activation": 2},
    "llama": {
        "add_rms_norm": 4,
        "attention": 2,
        "fused_projections": 2,
        "gated_linear": 2,
        "inlined_region": 1,
        "linear": 6,
        "rms_norm": 1,
        "rotary": 2,
    },
}


@dataclass
class Rewritten:
    gm: torch.fx.GraphModule
    weights: dict[str, torch.Tensor]
    report: dict[str, int]

    @property
    def code(self) -> str:
        return self.gm.code

    @property
    def rewrites(self) -> dict[str, int]:
        """The report without the no-op counters."""
        return {k: v for k, v in self.report.items() if k not in NOOP_COUNTERS}

    def calls(self, target) -> list[torch.fx.Node]:
        return [n for n in self.gm.graph.nodes if n.op == "call_function" and n.target is target]

    def __call__(self, *args: torch.Tensor, **inputs: torch.Tensor) -> tuple:
        """Run the rewritten graph: weights by placeholder name, then the user inputs (by name or in order)."""
        user = iter(args)
        values = []
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                values.append(self.weights[node.name] if node.name in self.weights else inputs.get(node.name))
                if values[-1] is None:
                    values[-1] = next(user)
        with torch.no_grad():
            out = self.gm(*values)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def rewrite_model(model: torch.nn.Module, inputs: dict[str, torch.Tensor], max_batch=2, max_seq=16) -> Rewritten:
    """Export with dynamic batch and seq, as kernl.compile does (though not under no_grad), then rewrite."""
    model.config.use_cache = False
    ep = export_model(model, lambda b, s: {k: v[:b, :s] for k, v in inputs.items()}, [(max_batch, max_seq)]).program
    weights = _weights(ep)
    report = run_passes(ep.graph_module, weights)
    return Rewritten(ep.graph_module, weights, report)


def rewrite_module(module: torch.nn.Module, *args: torch.Tensor) -> Rewritten:
    """Export a small test module statically (its inputs need not be [batch, seq]), then rewrite."""
    ep = torch.export.export(module.eval(), args)
    weights = _weights(ep)
    report = run_passes(ep.graph_module, weights)
    return Rewritten(ep.graph_module, weights, report)


def max_diff(got, want) -> float:
    got = got if isinstance(got, (tuple, list)) else (got,)
    want = want if isinstance(want, (tuple, list)) else (want,)
    assert len(got) == len(want)
    return max((g.float() - w.float()).abs().max().item() for g, w in zip(got, want))
