"""Decode-step linears timed the way a decode step runs them, each candidate config forced in turn.

A batch-1 decode step is a chain of short GEMVs whose weights are cold (the model streams through L2), with
programmatic dependent launch overlapping each Triton kernel's start with the previous one's tail. Here every
candidate runs the way the autotuner now times linears of few rows (autotune_cache.stream_timer): a CUDA graph
of back-to-back calls on rotating weight copies (more bytes than L2 holds). The figures are µs per call inside
that chain, the bandwidth it reaches, and which candidate the tuner picks (at one row it chooses among the GEMV
configs only; the other candidates are timed here for comparison).

    python3 benchmarks/decode_linears.py --json out.json            # the Llama-8B tp=1/2/4 and 1.2B shapes
    python3 benchmarks/decode_linears.py --shapes linear:4096x2048 --m 1,4
"""

from __future__ import annotations

import argparse
import json

import torch

from kernl.kernels import autotune_cache, gated_linear, linear

# name: (kind, N, K): N outputs from K inputs ("gated": N per weight, two weights).
SHAPES = {
    "8b-qkv": ("linear", 6144, 4096),
    "8b-o": ("linear", 4096, 4096),
    "8b-gate-up": ("gated", 14336, 4096),
    "8b-down": ("linear", 4096, 14336),
    "8b-tp2-qkv": ("linear", 3072, 4096),
    "8b-tp2-o": ("linear", 4096, 2048),
    "8b-tp2-gate-up": ("gated", 7168, 4096),
    "8b-tp2-down": ("linear", 4096, 7168),
    "8b-tp4-qkv": ("linear", 1536, 4096),
    "8b-tp4-o": ("linear", 4096, 1024),
    "8b-tp4-gate-up": ("gated", 3584, 4096),
    "8b-tp4-down": ("linear", 4096, 3584),
    "1.2b-qkv": ("linear", 3072, 2048),
    "1.2b-o": ("linear", 2048, 2048),
    "1.2b-gate-up": ("gated", 8192, 2048),
    "1.2b-down": ("linear", 2048, 8192),
}


def _candidates(kind: str, m: int, n: int, k: int) -> tuple[str, tuple, list[dict]]:
    """The kernel's tuner key and its candidates: those it had before the GEMV (tiles, split-K, cuBLAS), then GEMV's."""
    from kernl.kernels import _gemv
    from kernl.kernels.gated_linear import gated_linear_configs
    from kernl.kernels.linear import linear_configs

    bucket = autotune_cache.bucket_m(m)
    enabled, _gemv.ENABLED = _gemv.ENABLED, False
    try:
        linear_configs.cache_clear()
        gated_linear_configs.cache_clear()
        if kind == "gated":
            kernel, key, old = "gated_linear", ("bfloat16", bucket, n, k, "silu"), gated_linear_configs(bucket, n, k, 2)
        else:
            kernel, key = "linear", ("bfloat16", bucket, n, k, "none", False, False, False)
            old = linear_configs(bucket, n, k, 2, False)
    finally:
        _gemv.ENABLED = enabled
        linear_configs.cache_clear()
        gated_linear_configs.cache_clear()
    return kernel, key, old + _gemv.gemv_configs(bucket, n, k, weight_tiles=2 if kind == "gated" else 1)


def measure(name: str, kind: str, n: int, k: int, m: int) -> dict:
    tiles = 2 if kind == "gated" else 1
    weights = tuple(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k**-0.5 for _ in range(tiles))
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    kernel, key, candidates = _candidates(kind, m, n, k)

    def call(operands: tuple[torch.Tensor, ...]) -> None:
        gated_linear(x, *operands) if kind == "gated" else linear(x, *operands)

    def forced(config: dict, operands: tuple[torch.Tensor, ...]) -> None:
        with autotune_cache.use(autotune_cache.pinned(kernel, key, config)):
            call(operands)

    # The tuner's own chain timing (autotune_cache.stream_timer), each candidate forced through the public op.
    time_ms = autotune_cache.stream_timer(autotune_cache.Streamed(weights, forced))
    rows = []
    for config in candidates:
        try:
            t = time_ms(config) * 1000
        except Exception as e:  # a config this GPU cannot run loses, as in the tuner
            rows.append({"config": config, "error": str(e)[:200]})
            continue
        rows.append({"config": config, "us": round(t, 2), "tb_s": round(2 * tiles * n * k / t / 1e6, 3)})
    del time_ms
    tuner = autotune_cache.Tuner()
    with autotune_cache.use(tuner):
        call(weights)  # the tuner's own pick, timed its way
    picked = tuner.lookup(kernel, key)
    timed = [r for r in rows if "us" in r]
    best = min(timed, key=lambda r: r["us"])
    picked_row = next((r for r in timed if r["config"] == picked), None)
    torch.cuda.empty_cache()
    return {
        "shape": name,
        "kind": kind,
        "m": m,
        "n": n,
        "k": k,
        "mb": round(2 * tiles * n * k / 1e6, 1),
        "best": best,
        "tuner_pick": picked_row,
        "candidates": rows,
    }


def _label(config: dict) -> str:
    if config.get("CUBLAS"):
        return "cuBLAS"
    kind = "gemv" if config.get("GEMV") else f"split{config['SPLIT_K']}" if config.get("SPLIT_K", 1) > 1 else "tile"
    return f"{kind} {config['BLOCK_M']}x{config['BLOCK_N']}x{config['BLOCK_K']} w{config['num_warps']}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(SHAPES), help="names of SHAPES, or kind:NxK")
    parser.add_argument("--m", default="1", help="rows (comma-separated)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    results = []
    for m in (int(v) for v in args.m.split(",")):
        for spec in args.shapes.split(","):
            if spec in SHAPES:
                kind, n, k = SHAPES[spec]
            else:
                kind, dims = spec.split(":")
                n, k = (int(v) for v in dims.split("x"))
            r = measure(spec, kind, n, k, m)
            results.append(r)
            pick = r["tuner_pick"]
            print(
                f"{spec:16s} m={m} {r['mb']:6.1f} MB  best {r['best']['us']:7.2f} us {r['best']['tb_s']:.2f} TB/s "
                f"({_label(r['best']['config'])})  tuner: "
                + (f"{pick['us']:7.2f} us ({_label(pick['config'])})" if pick else "?"),
                flush=True,
            )
            for row in r["candidates"]:
                timing = f"{row['us']:7.2f} us {row['tb_s']:.2f} TB/s" if "us" in row else row["error"]
                print(f"    {_label(row['config']):28s} {timing}")
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": results}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
