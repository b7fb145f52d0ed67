"""Attention tile sizes at short sequences and small batch, where a 64-row tile leaves most SMs idle.

python benchmarks/attention_tiles.py

Each config runs 20 launches inside one CUDA graph, so the figure is µs per kernel as it runs in a bundle's
graph, not the ~9 µs floor of a one-kernel replay. Each config's output is checked against the reference.
"""

from __future__ import annotations

import functools

import torch

from kernl.commands.timing import graph_us_per_call
from kernl.kernels._attention_kernel import AttentionConfig, attention_config, launch_attention
from kernl.kernels.attention import attention_reference

# (batch, heads_q, heads_kv, seq, head_dim, causal, padding mask)
SHAPES = [
    (1, 12, 12, 16, 64, False, True),
    (1, 12, 12, 128, 64, False, True),
    (8, 12, 12, 128, 64, False, True),
    (1, 12, 12, 16, 64, True, False),
    (1, 12, 12, 128, 64, True, False),
    (1, 32, 8, 16, 64, True, False),
    (1, 32, 8, 128, 64, True, False),
]
CONFIGS = [
    AttentionConfig(64, 64, 4, 3),
    AttentionConfig(32, 64, 4, 3),
    AttentionConfig(32, 64, 2, 3),
    AttentionConfig(32, 32, 2, 2),
    AttentionConfig(16, 64, 1, 3),
    AttentionConfig(16, 64, 2, 2),
    AttentionConfig(16, 32, 1, 2),
]
LAUNCHES = 20


def main() -> None:
    torch.manual_seed(0)
    for batch, hq, hkv, seq, d, causal, padded in SHAPES:
        q = torch.randn(batch, hq, seq, d, device="cuda", dtype=torch.float16)
        k, v = (torch.randn(batch, hkv, seq, d, device="cuda", dtype=torch.float16) for _ in range(2))
        mask = None
        if padded:
            mask = torch.zeros(batch, 1, 1, seq, device="cuda", dtype=torch.float16)
            mask[..., -(seq // 4) :] = torch.finfo(torch.float16).min
        want = attention_reference(q, k, v, mask=mask, causal=causal, scale=d**-0.5)
        default = attention_config(d, seq, batch * hq, q.dtype, q.device)
        cells = []
        for cfg in CONFIGS:
            run = functools.partial(launch_attention, q, k, v, mask, causal, d**-0.5, cfg)
            err = (run().float() - want.float()).abs().max().item()
            ok = "" if err < 2e-2 else f" ERR {err:.3f}"
            mark = "*" if cfg == default else ""
            tile = f"{cfg.block_m}/{cfg.block_n}/w{cfg.num_warps}/s{cfg.num_stages}{mark}"
            cells.append(f"{tile} {graph_us_per_call(run, LAUNCHES):.2f}{ok}")
        name = f"b{batch} h{hq}/{hkv} s{seq} d{d}{' causal' if causal else ''}{' mask' if padded else ''}"
        print(f"{name:32s} " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
