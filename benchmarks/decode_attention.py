"""Decode attention (one query token per row over a static KV cache): bandwidth against the copy ceiling.

python benchmarks/decode_attention.py [--json OUT.json] [--sweep] [--dtype float16|bfloat16]

Each implementation runs 20 times inside one CUDA graph, so the figure is µs per call as it runs inside a
decode step's graph, not the ~9 µs floor of a one-kernel replay. Bytes are what a call must read: K and V of
each row's valid positions, plus q and the output. GB/s = bytes / time, set against the device copy rate
measured in the same run (read + write bytes / time, as benchmarks/conftest.py counts it).

Implementations, side by side:
- kernl: decode_attention (split-K + combine), lengths on the device;
- kernl+append: decode_attention_append, the new token written into the cache by the same kernel;
- sdpa-cache: torch SDPA over the whole static cache with a padding mask (what a static-cache model runs);
- sdpa-exact: torch SDPA over exactly the valid positions, only where every row has the same length.
Every kernl result is checked against the fp32 reference before it is timed. --sweep also times other tiles
and split counts for kernl and reports the best beside the default.
"""

from __future__ import annotations

import argparse
import datetime
import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from kernl.commands.timing import graph_us_per_call, median_ms
from kernl.kernels._decode_attention_kernel import DecodeConfig, decode_config, launch_decode_attention
from kernl.kernels.decode_attention import decode_attention, decode_attention_append, decode_attention_reference

LAUNCHES = 20

# (name, batch, heads_q, heads_kv, head_dim, max_len, lengths): an int is every row's length, "mixed" random.
SHAPES = [
    ("llama-1.2B", 1, 32, 8, 64, 2048, 128),
    ("llama-1.2B", 1, 32, 8, 64, 2048, 512),
    ("llama-1.2B", 1, 32, 8, 64, 2048, 2048),
    ("llama-1.2B", 8, 32, 8, 64, 2048, 384),
    ("llama-1.2B", 8, 32, 8, 64, 2048, 2048),
    ("llama-1.2B", 8, 32, 8, 64, 2048, "mixed"),
    ("llama-1.2B", 32, 32, 8, 64, 2048, 384),
    ("llama-1.2B", 32, 32, 8, 64, 2048, 2048),
    ("llama-8B", 1, 32, 8, 128, 4096, 512),
    ("llama-8B", 1, 32, 8, 128, 4096, 4096),
    ("llama-8B", 8, 32, 8, 128, 4096, 4096),
    ("gpt2", 1, 12, 12, 64, 1024, 384),
    ("gpt2", 8, 12, 12, 64, 1024, 1024),
]


def copy_gbs() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), torch.device("cuda"), warmup=3, runs=20)
    return 2 * src.numel() / ms / 1e6


def sweep_configs(default: DecodeConfig) -> list[DecodeConfig]:
    configs = []
    for block_n in (32, 64, 128):
        for splits in (1, 2, 4, 8, 16, 32, 64):
            for stages in (2, 3):
                configs.append(DecodeConfig(block_n, splits, default.num_warps, stages))
    return [c for c in configs if c != default]


def bench_shape(shape: tuple, dtype: torch.dtype, ceiling: float, sweep: bool) -> list[dict]:
    name, batch, heads_q, heads_kv, head_dim, max_len, length = shape
    q = torch.randn(batch, heads_q, head_dim, dtype=dtype, device="cuda")
    k_cache, v_cache = torch.randn(2, batch, heads_kv, max_len, head_dim, dtype=dtype, device="cuda").unbind(0)
    if length == "mixed":
        lengths = torch.randint(1, max_len + 1, (batch,), dtype=torch.int32, device="cuda")
    else:
        lengths = torch.full((batch,), length, dtype=torch.int32, device="cuda")
    positions = lengths - 1
    k_new = k_cache[torch.arange(batch, device="cuda"), :, positions.long()].clone()
    v_new = v_cache[torch.arange(batch, device="cuda"), :, positions.long()].clone()
    itemsize = q.element_size()
    read = int(lengths.sum()) * heads_kv * head_dim * 2 * itemsize  # K and V of the valid positions
    io = 2 * q.numel() * itemsize  # q in, output out
    cfg = decode_config(batch, heads_q, heads_kv, max_len, head_dim, dtype, q.device)
    scale = head_dim**-0.5
    ref = decode_attention_reference(q.float(), k_cache.float(), v_cache.float(), lengths)
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3

    def checked(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        out = fn()
        err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
        if err > tol:
            raise AssertionError(f"{name} b{batch} len {length}: relative error {err:.2e} > {tol}")
        return fn

    keep = torch.arange(max_len, device="cuda")[None, :] < lengths[:, None]
    mask = keep[:, None, None, :]
    q4 = q[:, :, None]
    impls: dict[str, tuple[Callable[[], object], int]] = {
        "kernl": (checked(lambda: decode_attention(q, k_cache, v_cache, lengths)), read + io),
        "kernl+append": (
            checked(lambda: decode_attention_append(q, k_cache, v_cache, k_new, v_new, positions)),
            read + io + 2 * k_new.numel() * itemsize,
        ),
        "sdpa-cache": (
            lambda: F.scaled_dot_product_attention(q4, k_cache, v_cache, attn_mask=mask, enable_gqa=True),
            max_len * batch * heads_kv * head_dim * 2 * itemsize + io,
        ),
    }
    if length != "mixed":
        k_exact, v_exact = k_cache[:, :, :length], v_cache[:, :, :length]
        impls["sdpa-exact"] = (
            lambda: F.scaled_dot_product_attention(q4, k_exact, v_exact, enable_gqa=True),
            read + io,
        )
    rows = []
    base = {"model": name, "batch": batch, "heads_q": heads_q, "heads_kv": heads_kv, "head_dim": head_dim,
            "max_len": max_len, "length": length, "dtype": str(dtype).removeprefix("torch."),
            "bytes_needed": read + io}  # fmt: skip
    for impl, (fn, moved) in impls.items():
        us = graph_us_per_call(fn, LAUNCHES)
        row = {**base, "impl": impl, "us": us, "bytes_moved": moved, "gbs": moved / us / 1e3}
        row["fraction_of_copy"] = row["gbs"] / ceiling
        # Against the bytes the step needs: what counts for tokens/s, whatever an implementation reads.
        row["needed_fraction_of_copy"] = (read + io) / us / 1e3 / ceiling
        if impl.startswith("kernl"):
            row["config"] = cfg._asdict()
        rows.append(row)
    if sweep:
        best_cfg, best_us = cfg, rows[0]["us"]
        for alt in sweep_configs(cfg):
            try:
                fn = checked(
                    lambda alt=alt: launch_decode_attention(q, k_cache, v_cache, lengths, None, None, scale, alt)
                )
                us = graph_us_per_call(fn, LAUNCHES)
            except Exception as e:  # a config that does not fit (shared memory) is skipped
                print(f"  skip {alt}: {type(e).__name__}", flush=True)
                continue
            if us < best_us:
                best_cfg, best_us = alt, us
        rows[0]["sweep_best"] = {"config": best_cfg._asdict(), "us": best_us}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--sweep", action="store_true", help="also time other tiles and split counts")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    args = parser.parse_args()
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    ceiling = copy_gbs()
    print(f"{torch.cuda.get_device_name()}: copy {ceiling:.0f} GB/s (read + write)", flush=True)
    results = []
    for shape in SHAPES:
        rows = bench_shape(shape, dtype, ceiling, args.sweep)
        results.extend(rows)
        name, batch, heads_q, heads_kv, head_dim, max_len, length = shape
        cells = " | ".join(f"{r['impl']} {r['us']:.2f} µs {r['needed_fraction_of_copy']:.0%}" for r in rows)
        label = f"{name} b{batch} h{heads_q}/{heads_kv} d{head_dim} len {length}/{max_len}"
        splits = rows[0]["config"]["num_splits"]
        best = rows[0].get("sweep_best")
        extra = f" | best {best['us']:.2f} µs {tuple(best['config'].values())}" if best else ""
        print(f"{label:44s} s{splits:<2d} {cells}{extra}", flush=True)
    from importlib.metadata import version

    report = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%MZ"),
        "gpu": torch.cuda.get_device_name(),
        "versions": {"torch": torch.__version__, "triton": version("triton")},
        "copy_gbs": ceiling,
        "launches_per_graph": LAUNCHES,
        "results": results,
    }
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
