"""FX rewrite passes over the exported aten graph.

Each pass is `rewrite(ctx) -> Counter` (counter name -> applications). A pass reads and edits ctx.graph and
may add compile-time weights (e.g. concatenated projections) with ctx.add_weight.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.fx

from kernl.compiler.passes.context import PassContext
from kernl.compiler.passes.layer_norm import fuse_layer_norm
from kernl.compiler.passes.noops import remove_inference_noops

# Order matters: no-ops first so that patterns see through dropout.
PASSES = (remove_inference_noops, fuse_layer_norm)


def run_passes(gm: torch.fx.GraphModule, weights: dict[str, torch.Tensor] | None = None) -> dict[str, int]:
    """Apply every pass in order; returns the rewrite report. weights (placeholder name -> tensor) is updated."""
    ctx = PassContext(gm.graph, weights if weights is not None else {})
    report: Counter[str] = Counter()
    for rewrite in PASSES:
        report.update(rewrite(ctx))
    gm.graph.eliminate_dead_code()
    ctx.drop_unused_weights()
    gm.graph.lint()
    gm.recompile()
    return dict(sorted(report.items()))


__all__ = ["PASSES", "PassContext", "run_passes"]
