"""Run the program once per bucket: Triton compiles (and tunes) its kernels, and each output is checked."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from kernl.errors import KernlError


def _flat(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [v for v in out.values() if isinstance(v, torch.Tensor)]
    return [v for v in out if isinstance(v, torch.Tensor)]


def compare(got: list[torch.Tensor], want: list[torch.Tensor]) -> dict[str, float]:
    """Largest absolute difference and smallest cosine similarity over all outputs, in fp32."""
    if len(got) != len(want):
        raise KernlError(f"the program returned {len(got)} outputs, the model {len(want)}")
    max_abs, min_cos = 0.0, 1.0
    for g, w in zip(got, want):
        g, w = g.float().flatten(), w.float().flatten()
        max_abs = max(max_abs, (g - w).abs().max().item() if g.numel() else 0.0)
        min_cos = min(min_cos, torch.nn.functional.cosine_similarity(g, w, dim=0, eps=1e-12).item())
    return {"max_abs_diff": max_abs, "cosine": min_cos}


def warm_up(forward, model, make_inputs, buckets, device, weights, input_names, on_bucket=None) -> list[dict]:
    """Each bucket: run the program on fresh example inputs and compare with the eager model.

    on_bucket((batch, seq)) is called before each bucket, for progress reports.
    """
    checks = []
    with torch.no_grad():
        for batch, seq in buckets:
            if on_bucket is not None:
                on_bucket((batch, seq))
            inputs = make_inputs(batch, seq)
            got = forward(device, *weights, *(inputs[n] for n in input_names))
            want = _flat(model(**inputs))
            checks.append({"bucket": [batch, seq], **compare(list(got), want)})
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return checks
