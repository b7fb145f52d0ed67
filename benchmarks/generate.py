"""Text generation: a kernl generation bundle beside HF generate (static cache, which compiles itself), one process.

python benchmarks/generate.py --model llama --batches 1,8 --prompt 128 --new 256 [--json OUT.json]

Random weights, greedy, eos disabled so every row produces --new tokens. Per batch: time to first token
(generate with one new token), end-to-end tokens/s (batch × new / time of the whole call), decode step time
((T(new) - T(1)) / (new - 1)). The floor of a batch-1 step: bytes it must read (every weight but the embedding
table, which is gathered, plus the KV cache up to the prompt) / the measured device copy bandwidth.
--cold also times a fresh `python -c` to the first generated token against a bare `import torch; cuda init`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from e2e import build_model  # noqa: E402


def copy_bandwidth() -> float:
    """Device copy bandwidth in bytes/s, read + write counted (as DESIGN.md's ceilings)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * src.numel() / statistics.median(times)


def timed(fn, reps: int) -> float:
    """Median wall seconds of fn() (synchronised), after one warm call."""
    fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def step_bytes(model: torch.nn.Module, prompt: int) -> int:
    """Bytes a batch-1 decode step reads: weights except the gathered embedding rows, plus the KV cache."""
    embed = model.get_input_embeddings().weight
    tied = model.get_output_embeddings() is not None and model.get_output_embeddings().weight is embed
    params = {p.data_ptr(): p for p in model.parameters()}
    weights = sum(p.numel() * p.element_size() for p in params.values())
    if not tied:
        weights -= embed.numel() * embed.element_size()
    c = model.config
    layers = getattr(c, "num_hidden_layers", getattr(c, "n_layer", 0))
    heads = getattr(c, "num_key_value_heads", None) or getattr(c, "num_attention_heads", getattr(c, "n_head", 1))
    q_heads = getattr(c, "num_attention_heads", getattr(c, "n_head", 1))
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // q_heads
    cache = 2 * layers * heads * head_dim * prompt * embed.element_size()
    return weights + cache


def teacher_forced(model, seq: torch.Tensor, prompt: int) -> dict:
    """HF's logits on kernl's generated sequences: how often kernl's token is HF's argmax, and how far below
    HF's best logit (in logit standard deviations) the worst chosen token is. Random weights make near ties
    common, so free-running sequences diverge; this compares step by step on the same prefix."""
    with torch.no_grad():
        logits = model(input_ids=seq).logits[:, prompt - 1 : -1].float()
    chosen = logits.gather(2, seq[:, prompt:, None]).squeeze(2)
    best = logits.max(dim=2).values
    gap = (best - chosen) / logits.std(dim=2)
    return {"argmax_agreement": round((gap == 0).float().mean().item(), 4), "max_gap_std": round(gap.max().item(), 4)}


def cold_first_token(path: str) -> dict:
    """Fresh processes, alternated: bare torch with CUDA init, and kernl load (lazy capture) to a first token."""
    bare = "import torch; torch.cuda.init(); torch.zeros(1, device='cuda'); torch.cuda.synchronize()"
    kernl_code = (
        "import time, json; t0 = time.perf_counter(); import kernl; t1 = time.perf_counter(); "
        f"b = kernl.load({path!r}, capture='lazy'); t2 = time.perf_counter(); "
        "b.generate([[1, 2, 3]], max_new_tokens=1); t3 = time.perf_counter(); "
        "print(json.dumps({'import_s': t1 - t0, 'load_s': t2 - t1, 'first_token_s': t3 - t2, **b.load_timings}))"
    )
    unverified = kernl_code.replace("capture='lazy'", "capture='lazy', verify=False")
    out = {"bare_s": [], "kernl_s": [], "kernl_unverified_s": []}
    for _ in range(3):
        for key, code in (("bare_s", bare), ("kernl_s", kernl_code), ("kernl_unverified_s", unverified)):
            t = time.perf_counter()
            done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
            out[key].append(round(time.perf_counter() - t, 3))
            if key == "kernl_s":
                out["kernl_phases"] = json.loads(done.stdout.strip().splitlines()[-1])
    out["bare_median_s"] = statistics.median(out["bare_s"])
    out["kernl_median_s"] = statistics.median(out["kernl_s"])
    out["kernl_minus_bare_s"] = round(out["kernl_median_s"] - out["bare_median_s"], 3)
    out["kernl_unverified_minus_bare_s"] = round(statistics.median(out["kernl_unverified_s"]) - out["bare_median_s"], 3)
    return out


def bench_batch(bundle, model, batch: int, floor: float, args) -> dict:
    vocab = model.config.vocab_size
    ids = torch.randint(1, vocab, (batch, args.prompt))
    row: dict = {}
    first = timed(lambda: bundle.generate(ids, max_new_tokens=1, eos_token_id=[]), args.reps)
    total = timed(lambda: bundle.generate(ids, max_new_tokens=args.new, eos_token_id=[]), args.reps)
    step = (total - first) / (args.new - 1)
    row["kernl"] = {
        "ttft_ms": round(first * 1e3, 2),
        "total_s": round(total, 4),
        "tokens_per_s": round(batch * args.new / total, 1),
        "step_ms": round(step * 1e3, 3),
        "decode_tokens_per_s": round(batch / step, 1),
    }
    if batch == 1:
        row["kernl"]["floor_fraction"] = round(floor / step, 3)
    if args.ttft_prompt != args.prompt:
        long_ids = torch.randint(1, vocab, (batch, args.ttft_prompt))
        ttft = timed(lambda: bundle.generate(long_ids, max_new_tokens=1, eos_token_id=[]), args.reps)
        row["kernl"][f"ttft_{args.ttft_prompt}_ms"] = round(ttft * 1e3, 2)
    if args.no_hf:
        return row
    hf_ids = ids.cuda()
    mask = torch.ones_like(hf_ids)

    def hf(n):
        return model.generate(
            input_ids=hf_ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
            cache_implementation="static",
        )  # fmt: skip

    t = time.perf_counter()
    hf(args.new)
    torch.cuda.synchronize()
    first_call = time.perf_counter() - t
    hf_total = timed(lambda: hf(args.new), args.reps)
    with torch.no_grad():
        ours = bundle.generate(ids, max_new_tokens=args.new, eos_token_id=[])
        theirs = hf(args.new).cpu()
    agree = (ours[:, args.prompt :] == theirs[:, args.prompt :]).float().mean().item()
    row["teacher_forced"] = teacher_forced(model, ours.cuda(), args.prompt)
    row["hf_static"] = {
        "first_call_s": round(first_call, 2),
        "total_s": round(hf_total, 4),
        "tokens_per_s": round(batch * args.new / hf_total, 1),
    }
    row["speedup_end_to_end"] = round(hf_total / total, 2)
    row["greedy_token_agreement"] = round(agree, 4)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="llama")
    parser.add_argument("--layers", type=int)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--ttft-prompt", type=int, default=512, help="also time the first token of this prompt")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--no-hf", action="store_true")
    parser.add_argument("--cold", action="store_true")
    parser.add_argument("--bundle", help="reuse the generation bundle at this path (skip the compile)")
    parser.add_argument("--json")
    args = parser.parse_args()

    import transformers
    import triton

    import kernl

    dtype = getattr(torch, args.dtype)
    model = build_model(args.model, args.layers).to(dtype)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    batches = [int(b) for b in args.batches.split(",")]
    seq_lens = sorted({args.prompt, args.ttft_prompt})
    max_length = max(seq_lens) + args.new
    result = {
        "model": args.model,
        "layers": args.layers,
        "dtype": args.dtype,
        "gpu": torch.cuda.get_device_name(),
        "versions": {
            "torch": torch.__version__,
            "triton": triton.__version__,
            "transformers": transformers.__version__,
        },  # noqa: E501
        "prompt": args.prompt,
        "new": args.new,
        "batches": {},
    }
    bandwidth = copy_bandwidth()
    floor = step_bytes(model, args.prompt) / bandwidth
    result["copy_bandwidth_TBps"] = round(bandwidth / 1e12, 3)
    result["batch1_step_bytes_GB"] = round(step_bytes(model, args.prompt) / 1e9, 3)
    result["batch1_floor_ms"] = round(floor * 1e3, 3)
    print(f"{result['gpu']}: copy {bandwidth / 1e12:.2f} TB/s, batch-1 floor {floor * 1e3:.3f} ms/token", flush=True)

    path = args.bundle or os.path.join(tempfile.mkdtemp(), "bundle")
    if not os.path.exists(path):
        t = time.perf_counter()
        generation = {"max_length": max_length, "batch_sizes": batches, "seq_lens": seq_lens}
        kernl.compile(model, path, buckets=[], generation=generation)
        result["compile_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    bundle = kernl.load(path)
    result["load_s"] = round(time.perf_counter() - t, 2)
    print(f"compile {result.get('compile_s')} s, load {result['load_s']} s", flush=True)

    for batch in batches:
        row = bench_batch(bundle, model, batch, floor, args)
        result["batches"][batch] = row
        print(batch, json.dumps(row), flush=True)
    if args.cold:
        result["cold"] = cold_first_token(path)
        print("cold", json.dumps(result["cold"]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
