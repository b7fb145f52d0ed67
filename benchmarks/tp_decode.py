"""Tensor-parallel decode at batch 1: tokens/s of a Llama-geometry generation program split over N GPUs, the cost
of one all-reduce, and the bandwidth floor (the weight bytes a rank reads a step, an embedding table counting as
the row it reads, over the measured copy bandwidth), as JSON.

Each rank builds only its own shard: the model is exported on the meta device (no weights anywhere), sharded,
and each rank makes random weights of its shard's shapes on its GPU (replicated weights from a per-tensor seed, so
every rank holds the same norms and logits agree). Nothing is written to disk; kernels compile at the first call.

    NCCL_NVLS_ENABLE=0 torchrun --nproc-per-node 2 benchmarks/tp_decode.py --out results/tp_decode_8b_tp2.json
    python benchmarks/tp_decode.py --out tp1.json                                   (one GPU, the baseline)
    NCCL_NVLS_ENABLE=0 torchrun --nproc-per-node 4 benchmarks/tp_decode.py --geometry 70b --layers 20 --out ...
    python benchmarks/tp_decode.py --heads 8 --kv-heads 2 --head-dim 128 --intermediate 3584 --vocab 32064 --out r.json
        (one GPU running one tp=4 rank's shapes of the 8B geometry, without its all-reduces)
    torchrun --nproc-per-node 2 benchmarks/tp_decode.py --device cpu --layers 2 --hidden 128 --intermediate 256 \
        --vocab 512 --heads 4 --kv-heads 2 --prompt 16 --new-tokens 8 --out /tmp/tp.json   (logic check, gloo)
    torchrun --nproc-per-node 2 benchmarks/tp_decode.py --variants "base: k512:prefetch_k=512 apart:push_linear=0" \
        --rounds 5 --out ab.json   (an A/B in one process: one program per variant, rounds in rotating order)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import statistics
import sys
import time
import zlib
from pathlib import Path

import torch
import torch.distributed as dist

GEOMETRIES = {
    "8b": dict(hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336, vocab=128256),
    "70b": dict(hidden=8192, layers=80, heads=64, kv_heads=8, intermediate=28672, vocab=128256),
}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--geometry", choices=sorted(GEOMETRIES), default="8b")
    for name in ("layers", "hidden", "heads", "kv-heads", "intermediate", "vocab"):
        p.add_argument(f"--{name}", type=int, default=None, help="override the geometry's")
    p.add_argument("--head-dim", type=int, default=None, help="default: hidden / heads")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None, help="cuda: bf16, cpu: fp32")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--profile", type=Path, help="also write rank 0's GPU kernel table of 32 decode steps here")
    p.add_argument(
        "--variants",
        type=parse_variants,
        default=None,
        help=f'"NAME:KNOB=V,KNOB=V NAME: ..." timed against each other in one process; knobs: {", ".join(KNOBS)}',
    )  # noqa: E501
    p.add_argument("--rounds", type=int, default=3, help="with --variants: each variant timed once a round")
    return p.parse_args()


# A/B knobs of --variants: the module global each sets (read at launch: a variant's graphs are captured with it).
KNOBS = {
    "prefetch_k": ("kernl.kernels._pdl", "PREFETCH_MAX_K"),
    "prefetch": ("kernl.kernels._pdl", "PREFETCH"),
    "pdl": ("kernl.kernels._pdl", "ENABLED"),
    "peer_norm": ("kernl.kernels.peer_norm", "ENABLED"),
    "push_linear": ("kernl.kernels.peer_linear_norm", "ENABLED"),
    "split_embedding": ("kernl.compiler.shard_vocab", "SPLIT_UNTIED_EMBEDDING"),  # at export: a program of its own
}
COMPILE_KNOBS = {"split_embedding"}


def parse_variants(text: str) -> dict[str, dict[str, int]]:
    """'base: k512:prefetch_k=512,pdl=0' → {"base": {}, "k512": {"prefetch_k": 512, "pdl": 0}}."""
    out: dict[str, dict[str, int]] = {}
    for item in text.split():
        name, _, knobs = item.partition(":")
        settings = {}
        for pair in filter(None, knobs.split(",")):
            knob, _, value = pair.partition("=")
            if knob not in KNOBS or not value.isdigit():
                raise argparse.ArgumentTypeError(f"{pair!r}: expected KNOB=INT with KNOB in {sorted(KNOBS)}")
            settings[knob] = int(value)
        if not name or name in out:
            raise argparse.ArgumentTypeError(f"variant {name!r}: names must be given and distinct")
        out[name] = settings
    return out


@contextlib.contextmanager
def knobs_set(settings: dict[str, int]):
    """The knobs' module globals set to settings (booleans from 0/1), restored after."""
    import importlib

    saved = []
    for knob, value in settings.items():
        module, attr = KNOBS[knob]
        mod = importlib.import_module(module)
        saved.append((mod, attr, getattr(mod, attr)))
        setattr(mod, attr, type(getattr(mod, attr))(value))
    try:
        yield
    finally:
        for mod, attr, value in reversed(saved):
            setattr(mod, attr, value)


def geometry(args: argparse.Namespace) -> dict:
    g = dict(GEOMETRIES[args.geometry])
    for key in g:
        value = getattr(args, key)
        if value is not None:
            g[key] = value
    g["head_dim"] = args.head_dim or g["hidden"] // g["heads"]
    return g


def start_ranks(device_type: str) -> tuple[int, int, torch.device]:
    """torchrun's rank (or one process without it), its device, the process group started."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if device_type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1:
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=900))
    return rank, world, device


def lower(g: dict, dtype: torch.dtype, device: torch.device, world: int, prompt: int, new: int):
    """Export on meta and shard: the per-rank program, its cache, and how each weight is split."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from kernl.compiler.lower_generation import GenerationSettings, lower_generation

    config = LlamaConfig(
        vocab_size=g["vocab"], hidden_size=g["hidden"], num_hidden_layers=g["layers"],
        num_attention_heads=g["heads"], num_key_value_heads=g["kv_heads"], head_dim=g["head_dim"],
        intermediate_size=g["intermediate"],
        max_position_embeddings=max(8192, prompt + new + 1), rope_theta=500000.0, tie_word_embeddings=False,
    )  # fmt: skip
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(dtype).eval()
    settings = GenerationSettings.checked(prompt + new + 1, [1], [prompt])
    return lower_generation(model, settings, dtype=dtype, device=device, tensor_parallel=world)


def lookups(low) -> set[str]:
    """The weights the program reads through aten.embedding (a row a token)."""
    return set(re.findall(r"aten\.embedding\.default\((\w+),", low.source))


def rank_weights(low, rank: int, device: torch.device) -> list[torch.Tensor]:
    """This rank's weights, made on device one at a time: real buffers (rotary frequencies) as the model computes
    them, 1-D weights (norms) ones, the rest N(0, 0.02) from a seed per tensor (and per rank, for split ones)."""
    from kernl.compiler.shard import Offset, Split

    lazy, plan = low.weights, low.shard
    out = []
    for name in low.spec.weights:
        meta = lazy.shapes[name]
        rule = plan.rules.get(name) if plan is not None else None
        recipe = lazy.recipes[name]
        if isinstance(rule, Offset):
            out.append(plan.shard(name, torch.zeros(1, dtype=torch.int64, device=device), rank))
            continue
        if recipe[0] == "source" and recipe[1] in lazy.buffers:
            out.append(lazy.buffers[recipe[1]].to(device))
            continue
        shape = list(meta.shape)
        if isinstance(rule, Split):
            shape[rule.dim] //= plan.world_size
        if meta.dim() == 1:
            out.append(torch.ones(shape, dtype=meta.dtype, device=device))
            continue
        seed = zlib.crc32(f"{name}/{rank if isinstance(rule, Split) else 'all'}".encode())
        gen = torch.Generator(device).manual_seed(seed)
        out.append((torch.randn(shape, generator=gen, device=device, dtype=meta.dtype) * 0.02).to(meta.dtype))
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_rate(gen, vocab: int, prompt: int, new: int, repeats: int, device: torch.device) -> dict:
    """Median seconds of generate with 1 and with new tokens (the same prompt on every rank); their difference is
    new - 1 decode steps."""
    ids = torch.randint(0, vocab, (1, prompt), generator=torch.Generator().manual_seed(1))

    def run(n: int) -> float:
        req = gen.request(ids, None, max_new_tokens=n, eos_token_id=[])
        sync(device)
        start = time.perf_counter()
        gen.run(req)
        sync(device)
        return time.perf_counter() - start

    run(new)  # warm: every graph captured, every kernel compiled
    first = statistics.median(run(1) for _ in range(repeats))
    full = statistics.median(run(new) for _ in range(repeats))
    step = (full - first) / (new - 1)
    return {"prefill_s": first, "generate_s": full, "decode_ms_per_token": step * 1e3, "decode_tokens_per_s": 1 / step}


def time_variants(args: argparse.Namespace, variants: dict, gens: dict, vocab: int, device: torch.device) -> dict:
    """Each variant's decode ms/token, once a round, the order rotating each round (the same on every rank)."""
    names = list(variants)
    rounds: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            settings = {k: v for k, v in variants[name].items() if k not in COMPILE_KNOBS}
            with knobs_set(settings):  # where a step runs outside its graphs
                rate = decode_rate(gens[name], vocab, args.prompt, args.new_tokens, args.repeats, device)
            rounds[name].append(rate["decode_ms_per_token"])
    out = {}
    for name in names:
        out[name] = {"knobs": variants[name], "decode_ms_per_token": statistics.median(rounds[name]),
                     "rounds_ms_per_token": rounds[name]}  # fmt: skip
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"{name:>16}: {out[name]['decode_ms_per_token']:.3f} ms/token  rounds {rounds[name]}", flush=True)
    return out


def profile_decode(gen, vocab: int, prompt: int, rank: int, path: Path, steps: int = 32) -> None:
    """Where a decode step's GPU time goes: the kernels of one generate call of steps tokens (graph replays
    included), by total time, as torch.profiler tabulates them; rank 0 writes the table."""
    from torch.profiler import ProfilerActivity, profile

    ids = torch.randint(0, vocab, (1, prompt), generator=torch.Generator().manual_seed(1))
    req = gen.request(ids, None, max_new_tokens=steps, eos_token_id=[])
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        gen.run(req)
        torch.cuda.synchronize()
    if rank == 0:
        path.write_text(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70))


def all_reduce_us(hidden: int, dtype: torch.dtype, device: torch.device, world: int) -> float:
    """Microseconds of one all-reduce of [1, hidden] as the decode step makes it: kernl's all_reduce (NCCL, or
    the one-shot over NVLink: KERNL_ALL_REDUCE, kernels/peer_all_reduce.py), 100 back to back in a CUDA graph."""
    from kernl.kernels.collectives import all_reduce

    x = torch.zeros(1, hidden, dtype=dtype, device=device)
    return 0.0 if world == 1 else chain_us(lambda x: all_reduce(x), x, device)


def sum_norm_us(hidden: int, dtype: torch.dtype, device: torch.device, world: int) -> float:
    """Microseconds of one all-reduce + residual add + RMS norm of [1, hidden] (kernels/peer_norm.py: one kernel,
    or the sum then the norm), 100 back to back in a CUDA graph, each call's sum the next one's residual."""
    from kernl.kernels.peer_norm import all_reduce_add_rms_norm

    x = torch.zeros(1, hidden, dtype=dtype, device=device)
    weight = torch.ones(hidden, dtype=dtype, device=device)
    return 0.0 if world == 1 else chain_us(lambda r: all_reduce_add_rms_norm(x.clone(), r, weight, 1e-6)[1], x, device)


def chain_us(step, x: torch.Tensor, device: torch.device, calls: int = 100) -> float:
    """Microseconds of x = step(x), calls times back to back (in a CUDA graph on GPUs)."""
    if device.type != "cuda":
        step(x)
        start = time.perf_counter()
        for _ in range(calls):
            x = step(x)
        return (time.perf_counter() - start) / calls * 1e6
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        step(x)  # the communicator (or the peer memory) is set up outside the capture
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        for _ in range(calls):
            x = step(x)
    graph.replay()
    torch.cuda.synchronize(device)
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(10):
        graph.replay()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / (10 * calls) * 1e3


def copy_bandwidth(device: torch.device, nbytes: int = 2**30) -> float:
    """Bytes per second of a device copy, reads and writes counted (DESIGN.md's "copy bandwidth")."""
    if device.type != "cuda":
        nbytes = 2**26
    a = torch.empty(nbytes, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    sync(device)
    times = []
    for _ in range(10):
        start = time.perf_counter()
        b.copy_(a)
        sync(device)
        times.append(time.perf_counter() - start)
    return 2 * nbytes / statistics.median(times)


def main() -> None:
    args = parse()
    rank, world, device = start_ranks(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    g = geometry(args)
    from kernl.kernels import peer_all_reduce, peer_norm
    from kernl.kernels.session import compile_session
    from kernl.runtime.generation import Generator, Settings

    t0 = time.perf_counter()
    variants = args.variants or {"base": {}}
    programs: dict[tuple, tuple] = {}  # compile-time knobs → (lowered program, this rank's weights)

    def program(settings: dict[str, int]) -> tuple:
        key = tuple(sorted((k, v) for k, v in settings.items() if k in COMPILE_KNOBS))
        if key not in programs:
            with knobs_set(dict(key)):
                low = lower(g, dtype, device, world, args.prompt, args.new_tokens)
            programs[key] = (low, rank_weights(low, rank, device))
        return programs[key]

    low, weights = program(next(iter(variants.values())))
    t_lower = time.perf_counter() - t0
    weight_bytes = sum(w.numel() * w.element_size() for w in weights)
    tables = lookups(low)  # read one row a token, not whole
    read_bytes = weight_bytes - sum(
        (w.numel() - w.shape[-1]) * w.element_size() for name, w in zip(low.spec.weights, weights) if name in tables
    )
    gens = {}
    with compile_session() as _:  # kernels compile and tune at their first call, as at compile time
        t1 = time.perf_counter()
        for name, settings in variants.items():
            v_low, v_weights = program(settings)
            run_settings = {k: v for k, v in settings.items() if k not in COMPILE_KNOBS}
            with knobs_set(run_settings):
                v_settings = Settings(v_low.settings.max_length, [1], [args.prompt], g["vocab"], [], None)
                gens[name] = Generator(v_low.spec, v_weights, device, v_settings, cuda_graphs=device.type == "cuda")
                gens[name].capture()
        t_capture = time.perf_counter() - t1
        gen = gens[next(iter(variants))]
        if args.variants is None:
            rate = decode_rate(gen, g["vocab"], args.prompt, args.new_tokens, args.repeats, device)
        else:
            rate = {"variants": time_variants(args, variants, gens, g["vocab"], device)}
        if args.profile is not None and device.type == "cuda":
            profile_decode(gen, g["vocab"], args.prompt, rank, args.profile)
    ar_us = all_reduce_us(g["hidden"], dtype, device, world)
    sn_us = sum_norm_us(g["hidden"], dtype, device, world)
    bandwidth = copy_bandwidth(device)
    floor_ms = read_bytes / bandwidth * 1e3
    vocab = low.shard.describe().get("vocab_parallel", {}) if low.shard is not None else {}
    result = {
        "benchmark": "tp_decode",
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "versions": {"torch": torch.__version__, "triton": _version("triton")},
        "world_size": world,
        "geometry": {**g, "name": args.geometry, "dtype": str(dtype).removeprefix("torch.")},
        "batch": 1,
        "prompt": args.prompt,
        "new_tokens": args.new_tokens,
        **rate,
        "all_reduce_us": ar_us,
        "all_reduce_path": peer_all_reduce.status() or "nccl",
        "all_reduces_per_step": low.report.get("tp_all_reduce", 0),
        "sum_norm_us": sn_us,
        "sums_in_norms_per_step": low.report.get("tp_all_reduce_in_norm", 0),
        "linears_in_sums_per_step": low.report.get("tp_linear_in_norm", 0),
        "sum_norm_path": peer_norm.status() or "apart",
        "all_gathers_per_step": low.report.get("tp_vocab_lm_head", 0),
        "vocab_parallel": {"embedding": bool(vocab.get("embedding")), "lm_head": bool(vocab.get("lm_head"))},
        "weight_bytes_per_rank": weight_bytes,
        "weight_bytes_read_per_step": read_bytes,
        "cache_bytes_per_rank": sum(t.numel() * t.element_size() for t in gen.state),
        "copy_bandwidth_GBps": bandwidth / 1e9,
        "floor_ms_per_token": floor_ms,
        "fraction_of_floor": floor_ms / rate["decode_ms_per_token"] if "decode_ms_per_token" in rate else None,
        "seconds": {"export_and_shard": t_lower, "capture_and_kernels": t_capture, "total": time.perf_counter() - t0},
    }
    everyone = [None] * world
    if world > 1 and "decode_tokens_per_s" in result:
        dist.all_gather_object(everyone, result["decode_tokens_per_s"])
        result["ranks_tokens_per_s"] = everyone
    if rank == 0:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(result, indent=1))
    if world > 1:
        # Tearing NCCL down while captured graphs still hold its communicators hung on the H200s (the JSON was out):
        # the results are written, so leave without the teardown.
        sys.stdout.flush()
        os._exit(0)


def _version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001
        return None


if __name__ == "__main__":
    main()
