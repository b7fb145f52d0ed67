"""FX rewrite passes over the exported aten graph.

Each pass is `rewrite(ctx) -> Counter` (counter name -> applications). A pass reads and edits ctx.graph and
may add compile-time weights (e.g. concatenated projections) with ctx.add_weight.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.fx

from kernl.compiler.passes.attention import fuse_attention
from kernl.compiler.passes.context import PassContext
from kernl.compiler.passes.eager_attention import fuse_eager_attention
from kernl.compiler.passes.gated import fuse_gated_linear
from kernl.compiler.passes.inline import inline_higher_order_ops
from kernl.compiler.passes.inplace import functionalize_inplace
from kernl.compiler.passes.layer_norm import fuse_layer_norm
from kernl.compiler.passes.linear import fuse_linear
from kernl.compiler.passes.noops import remove_inference_noops
from kernl.compiler.passes.projections import fuse_projections
from kernl.compiler.passes.rms_norm import fuse_rms_norm
from kernl.compiler.passes.rotary import fuse_rotary
from kernl.kernels import register_ops

register_ops()  # the passes write torch.ops.kernl.* calls into the graph

# Order matters:
# - wrapped regions inlined first, in-place ops on temporaries made functional, then no-ops removed, so that
#   patterns see one flat, functional graph without dropout (eager attention then finds softmax → matmul);
# - norms take the residual add before the linear pass could (the layer-norm tests pin add_layer_norm);
# - gate/up go to gated_linear before the projection fusion could merge them, and sibling linears are
#   merged before the linear pass turns each into kernl.linear with its activation and residual.
PASSES = (
    inline_higher_order_ops,
    functionalize_inplace,
    remove_inference_noops,
    fuse_attention,
    fuse_eager_attention,
    fuse_rotary,
    fuse_layer_norm,
    fuse_rms_norm,
    fuse_gated_linear,
    fuse_projections,
    fuse_linear,
)


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
