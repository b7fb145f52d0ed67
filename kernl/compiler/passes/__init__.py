"""FX rewrite passes over the exported aten graph. Each returns how often it fired, by counter name."""

from __future__ import annotations

from collections import Counter

import torch.fx

from kernl.compiler.passes.layer_norm import fuse_layer_norm
from kernl.compiler.passes.noops import remove_inference_noops

# Order matters: no-ops first so that patterns see through dropout.
PASSES = (remove_inference_noops, fuse_layer_norm)


def run_passes(gm: torch.fx.GraphModule) -> dict[str, int]:
    """Apply every pass in order; returns the rewrite report (counter name -> applications)."""
    report: Counter[str] = Counter()
    for rewrite in PASSES:
        report.update(rewrite(gm.graph))
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return dict(sorted(report.items()))
