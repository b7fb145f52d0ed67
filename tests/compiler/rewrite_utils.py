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

# Counters that say how a torch or transformers version wrote the model, not what kernl rewrote: Llama's
# rotary runs in a no-grad region in transformers 5.17 and as plain code in 5.24. Tests check that no wrapped
# region is left, never how many there were.
INCIDENTAL_COUNTERS = NOOP_COUNTERS | {"inlined_region"}


def expected_rewrites(name: str, config) -> dict[str, int]:
    """What the passes must do to a family of tests/models.py, whatever the dtype, from its config's layer count."""
    n = config.num_hidden_layers
    if name == "bert":
        # Per layer: one attention over fused Q/K/V; linears QKV, attention output, intermediate (gelu), output;
        # two post-norm residual blocks. Once: the embeddings' norm (after a broadcast add), the pooler (tanh).
        return {
            "add_layer_norm": 2 * n,
            "attention": n,
            "fused_projections": n,
            "layer_norm": 1,
            "linear": 4 * n + 1,
            "linear_activation": n + 1,
        }
    if name == "gpt2":
        # Per layer: c_attn (one Conv1D already), c_proj, c_fc (gelu_new), c_proj; each pre-norm after a residual
        # add but the first; ln_f.
        return {"add_layer_norm": 2 * n, "attention": n, "layer_norm": 1, "linear": 4 * n, "linear_activation": n}
    if name == "llama":
        # Per layer: attention over fused Q/K/V, one rotary call for q and k, a SwiGLU gate/up, linears QKV,
        # o_proj, down_proj; two pre-norms after a residual add, except the very first.
        return {
            "add_rms_norm": 2 * n,
            "attention": n,
            "fused_projections": n,
            "gated_linear": n,
            "linear": 3 * n,
            "rms_norm": 1,
            "rotary": n,
        }
    raise KeyError(name)


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

    @property
    def kernel_rewrites(self) -> dict[str, int]:
        """The report without the counters that depend on how a version wrote the model."""
        return {k: v for k, v in self.report.items() if k not in INCIDENTAL_COUNTERS}

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
