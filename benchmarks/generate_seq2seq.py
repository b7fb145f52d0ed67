"""Encoder-decoder generation (Whisper, T5): a kernl seq2seq bundle beside HF generate (eager, and static cache +
torch.compile), one process.

python benchmarks/generate_seq2seq.py --geometry large-v3 --batches 1 --beams 1,5 --new 128 [--json OUT.json]
python benchmarks/generate_seq2seq.py --geometry t5-small --batches 1,4 --beams 1,4 --new 64 --src-len 128
    [--bundle build/whisper-large-v3]    # compiled there once, reused by later runs
    [--against eager,compile,static]     # HF setups beside kernl (default eager,compile; on cpu eager)
    [--cold]                             # also a fresh process to its first token
python benchmarks/generate_seq2seq.py --device cpu --geometry tiny --new 8 --reps 1   # a check without a GPU (~2 min)

Random weights (seeded), random 30 s log-mel features (Whisper) or --src-len random token ids (T5). Every run
produces exactly --new tokens: kernl is called with eos_token_id=[] (no stop token) and HF with min_new_tokens =
max_new_tokens (eos masked until the end), so both run the same number of decoder steps. Per (batch, beams):
kernl's first call after load and the median of --reps calls; HF eager generate; HF generate with a static cache
and model.forward compiled in "reduce-overhead" mode (compile; the setup transformers documents) or "default" mode
(compile-default); an exception is recorded, not raised.
Tokens/s = batch × new / seconds per call; ratio = HF seconds / kernl seconds. Greedy: how many of the first
--agree tokens kernl and HF eager share, and HF's argmax on kernl's sequences (teacher forced; random weights
make near ties, so free-running sequences may part after a flip in the last bits). Memory: the bundle's cache
bytes (manifest), what the loaded bundle holds on the GPU, and the peak allocated while it generates.
--cold: a fresh `python -c` to the first generated token from the built bundle, against bare torch + CUDA init.
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
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository, when not installed

# Whisper geometries (d_model, encoder/decoder layers, heads, ffn, mel bins, vocab); token ids as the checkpoints'.
GEOMETRIES = {
    "tiny": dict(d_model=384, encoder_layers=4, decoder_layers=4, encoder_attention_heads=6,
                 decoder_attention_heads=6, encoder_ffn_dim=1536, decoder_ffn_dim=1536, num_mel_bins=80,
                 vocab_size=51865),
    "small": dict(d_model=768, encoder_layers=12, decoder_layers=12, encoder_attention_heads=12,
                  decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072, num_mel_bins=80,
                  vocab_size=51865),
    "large-v3": dict(d_model=1280, encoder_layers=32, decoder_layers=32, encoder_attention_heads=20,
                     decoder_attention_heads=20, encoder_ffn_dim=5120, decoder_ffn_dim=5120, num_mel_bins=128,
                     vocab_size=51866),
}  # fmt: skip
# T5 geometries (the checkpoints' configs).
T5_GEOMETRIES = {
    "t5-small": dict(d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_decoder_layers=6, num_heads=8,
                     vocab_size=32128, feed_forward_proj="relu", tie_word_embeddings=True),
    "flan-t5-base": dict(d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_decoder_layers=12, num_heads=12,
                         vocab_size=32128, feed_forward_proj="gated-gelu", tie_word_embeddings=False),
}  # fmt: skip
FRAMES = 3000  # 30 s of 10 ms hops


def build_model(geometry: str, dtype: torch.dtype, device: str, seed: int = 0):
    from transformers import T5Config, T5ForConditionalGeneration, WhisperConfig, WhisperForConditionalGeneration

    if geometry in T5_GEOMETRIES:
        config = T5Config(**T5_GEOMETRIES[geometry], decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
        cls = T5ForConditionalGeneration
    else:
        config = whisper_config(geometry, WhisperConfig)
        cls = WhisperForConditionalGeneration
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise in the target dtype, on the device: large-v3 is 1.5 B parameters
    try:
        with torch.device(device):
            model = cls(config).eval()
    finally:
        torch.set_default_dtype(old)
    return model


def whisper_config(geometry: str, WhisperConfig):
    return WhisperConfig(
        **GEOMETRIES[geometry], max_source_positions=1500, max_target_positions=448,
        decoder_start_token_id=50258, eos_token_id=50257, bos_token_id=50257,
        pad_token_id=50256 if geometry == "large-v3" else 50257,
        begin_suppress_tokens=[220, 50257], suppress_tokens=None,
    )  # fmt: skip


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def first_and_median(fn, reps: int, device: str) -> tuple[float, float, object]:
    """(seconds of the first call, median seconds of reps more, the last result)."""
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    first = time.perf_counter() - t
    times = []
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return first, statistics.median(times), out


def timing_row(first: float, median: float, batch: int, new: int) -> dict:
    return {
        "first_call_s": round(first, 3),
        "ms_per_call": round(median * 1e3, 2),
        "ms_per_token_step": round(median * 1e3 / new, 3),
        "tokens_per_s": round(batch * new / median, 1),
    }


def error_text(err: BaseException) -> str:
    lines = [line for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {' | '.join(lines[:3])}"[:600]


def teacher_forced(model, inputs: dict, prefix: list[int], new: torch.Tensor) -> dict:
    """HF's logits on kernl's sequences: how often kernl's token is HF's argmax, and how far below HF's best
    logit (in logit standard deviations) the worst chosen token is."""
    device = next(iter(inputs.values())).device
    start = torch.tensor([prefix] * new.shape[0], dtype=torch.int64, device=device)
    seq = torch.cat([start, new.to(device)], dim=1)
    with torch.no_grad():
        logits = model(**inputs, decoder_input_ids=seq[:, :-1]).logits[:, len(prefix) - 1 :].float()
    chosen = logits.gather(2, seq[:, len(prefix) :, None]).squeeze(2)
    best = logits.max(dim=2).values
    gap = (best - chosen) / logits.std(dim=2)
    return {"argmax_agreement": round((gap == 0).float().mean().item(), 4), "max_gap_std": round(gap.max().item(), 4)}


def agreement(ours: torch.Tensor, theirs: torch.Tensor, k: int) -> dict:
    """Share of equal tokens among the first k of each row, and each row's count of leading equal tokens."""
    k = min(k, ours.shape[1], theirs.shape[1])
    same = ours[:, :k] == theirs[:, :k]
    leading = [int(row.long().cumprod(0).sum()) for row in same]
    return {"first_k": k, "agreement": round(same.float().mean().item(), 4), "leading_equal": leading}


def hf_generate(model, inputs: dict, new: int, beams: int, **extra) -> torch.Tensor:
    """HF generate with exactly `new` tokens (eos masked until then)."""
    out = model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, num_beams=beams, do_sample=False,
                         **extra)  # fmt: skip
    return out if isinstance(out, torch.Tensor) else out.sequences


def kernl_phase(bundle, inputs_host: dict, new: int, beams: int, args) -> tuple[dict, torch.Tensor]:
    device = args.device
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()

    def call():
        return bundle.generate(**inputs_host, max_new_tokens=new, num_beams=beams, eos_token_id=[])

    first, median, out = first_and_median(call, args.reps, device)
    row = timing_row(first, median, next(iter(inputs_host.values())).shape[0], new)
    if device == "cuda":
        row["peak_allocated_above_resident_MB"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
    return row, out


def hf_variants(model, args) -> dict:
    """name → callable(feats, new, beams) for the HF setups of --against; a setup that cannot be built records
    its error instead."""
    out = {}
    against = [a for a in args.against.split(",") if a]
    if "eager" in against:
        out["hf_eager"] = lambda f, n, b: hf_generate(model, f, n, b)
    for name, mode in (("compile", "reduce-overhead"), ("compile-default", "default")):
        if name in against:
            # transformers' docs: static cache + forward compiled (reduce-overhead: CUDA graphs too).
            out[f"hf_static_{name.replace('-', '_')}"] = static_compiled(model, mode)
    if "static" in against:
        # generate's own static-cache path (transformers compiles the decoder step itself where it can).
        out["hf_static"] = lambda f, n, b: hf_generate(model, f, n, b, cache_implementation="static")
    return out


def random_inputs(model, batch: int, seed: int, src_len: int) -> dict:
    """Whisper: {input_features: 30 s of random log-mel}; T5: {input_ids, attention_mask} of src_len tokens."""
    gen = torch.Generator().manual_seed(seed)
    if hasattr(model.config, "num_mel_bins"):
        dtype = next(model.parameters()).dtype
        return {"input_features": torch.randn(batch, model.config.num_mel_bins, FRAMES, generator=gen).to(dtype)}
    ids = torch.randint(3, model.config.vocab_size, (batch, src_len), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def static_compiled(model, mode: str):
    """generate with a static cache and model.forward compiled in mode. Under CUDA graphs each call starts a new
    graph step and copies its logits out: generate keeps them past the next replay, which rewrites that buffer."""
    compiled = {}

    def forward(*args, **kwargs):
        if mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        out = compiled["inner"](*args, **kwargs)
        out.logits = out.logits.clone()
        return out

    def run(inputs: dict, new: int, beams: int) -> torch.Tensor:
        if "inner" not in compiled:
            compiled["eager"] = model.forward
            compiled["inner"] = torch.compile(model.forward, mode=mode, fullgraph=True)
        model.forward = forward
        try:
            return hf_generate(model, inputs, new, beams, cache_implementation="static")
        finally:
            model.forward = compiled["eager"]

    return run


def run_config(bundle, model, prefix: list[int], batch: int, beams: int, args) -> dict:
    inputs_host = random_inputs(model, batch, 1000 * batch + beams, args.src_len)
    inputs = {k: v.to(args.device) for k, v in inputs_host.items()}
    row: dict = {"batch": batch, "num_beams": beams, "new_tokens": args.new}
    ours = None
    try:
        row["kernl"], ours = kernl_phase(bundle, inputs_host, args.new, beams, args)
        ours = ours[:, -args.new :]  # T5 bundles return the decoder start token too, as HF does
        assert ours.shape == (batch, args.new), f"kernl returned {tuple(ours.shape)} for {args.new} new tokens"
    except Exception as err:  # noqa: BLE001 - report and go on to the next setup
        traceback.print_exc()
        row["kernl"] = {"error": error_text(err)}
    for name, fn in hf_variants(model, args).items():
        try:
            if args.device == "cuda":
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            with torch.no_grad():
                first, median, theirs = first_and_median(
                    lambda f=fn: f(inputs, args.new, beams), args.reps, args.device
                )
            row[name] = timing_row(first, median, batch, args.new)
            if args.device == "cuda":
                row[name]["peak_allocated_above_resident_MB"] = round(
                    (torch.cuda.max_memory_allocated() - base) / 2**20, 1
                )
            theirs = theirs.cpu()
            if theirs.shape[1] < args.new:
                row[name]["warning"] = f"returned {theirs.shape[1]} tokens, fewer than {args.new}"
            theirs = theirs[:, -args.new :]  # Whisper returns the new tokens (older versions: the prefix too)
            if ours is not None and "ms_per_call" in row["kernl"]:
                row[name]["ratio_vs_kernl"] = round(row[name]["ms_per_call"] / row["kernl"]["ms_per_call"], 2)
                if name == "hf_eager":
                    row["tokens_vs_hf_eager"] = agreement(ours, theirs, args.agree)
        except Exception as err:  # noqa: BLE001 - a setup HF cannot run is a result, not a crash
            traceback.print_exc()
            row[name] = {"error": error_text(err)}
        finally:
            if args.device == "cuda":
                torch.cuda.empty_cache()
    if ours is not None and beams == 1:
        try:
            row["teacher_forced"] = teacher_forced(model, inputs, prefix, ours)
        except Exception as err:  # noqa: BLE001
            row["teacher_forced"] = {"error": error_text(err)}
    return row


COLD = """
import json, sys, time
t0 = time.perf_counter()
import torch
if sys.argv[2] == "cuda":
    torch.cuda.init(); torch.empty(1, device="cuda"); torch.cuda.synchronize()
t1 = time.perf_counter()
import kernl
bundle = kernl.load(sys.argv[1], capture="lazy")
t2 = time.perf_counter()
s = bundle.manifest["seq2seq"]
if s["kind"] == "speech":
    bundle.generate(input_features=torch.randn(1, s["num_mel_bins"], s["seq_lens"][-1]), max_new_tokens=1)
else:
    bundle.generate(input_ids=torch.randint(3, 100, (1, s["seq_lens"][-1])), max_new_tokens=1)
t3 = time.perf_counter()
print(json.dumps({"torch_ready_s": t1 - t0, "load_s": t2 - t1, "first_token_s": t3 - t2, "total_s": t3 - t0,
                  "torch_ready_to_first_token_s": t3 - t1,
                  **bundle.load_timings}))
"""


def cold_first_token(path: str, device: str, runs: int = 5) -> dict:
    """Fresh processes, alternated: bare torch with CUDA init, and kernl (load with lazy capture) to a first token."""
    bare = "import torch; torch.cuda.init(); torch.empty(1, device='cuda'); torch.cuda.synchronize()"
    bare = bare if device == "cuda" else "import torch"
    out: dict = {"bare_s": [], "kernl_s": []}
    for _ in range(runs):
        for key, cmd in (("bare_s", ["-c", bare]), ("kernl_s", ["-c", COLD, path, device])):
            t = time.perf_counter()
            done = subprocess.run([sys.executable, *cmd], capture_output=True, text=True)
            out[key].append(round(time.perf_counter() - t, 3))
            if done.returncode != 0:
                return {**out, "error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
            if key == "kernl_s":
                out["kernl_phases"] = json.loads(done.stdout.strip().splitlines()[-1])
                out.setdefault("torch_ready_to_first_token_s", []).append(
                    round(out["kernl_phases"]["torch_ready_to_first_token_s"], 3)
                )
    out["bare_median_s"] = statistics.median(out["bare_s"])
    out["kernl_median_s"] = statistics.median(out["kernl_s"])
    out["kernl_minus_bare_s"] = round(out["kernl_median_s"] - out["bare_median_s"], 3)
    out["torch_ready_to_first_token_median_s"] = statistics.median(out["torch_ready_to_first_token_s"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--geometry", choices=sorted(GEOMETRIES) + sorted(T5_GEOMETRIES), default="large-v3")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--batches", default="1", help="batch sizes, e.g. 1,4")
    parser.add_argument("--beams", default="1,5", help="num_beams values (1 = greedy)")
    parser.add_argument("--new", type=int, default=128, help="new tokens per call (every setup makes exactly these)")
    parser.add_argument("--max-length", type=int, default=None, help="the bundle's decoder positions [448; T5 256]")
    parser.add_argument("--src-len", type=int, default=128, help="T5: encoder tokens per input (its seq-len bucket)")
    parser.add_argument("--reps", type=int, default=5, help="timed calls after the first (median)")
    parser.add_argument("--agree", type=int, default=32, help="greedy: compare the first K tokens with HF eager")
    parser.add_argument(
        "--against", help="HF setups of eager, compile, compile-default, static [default: eager,compile; cpu: eager]"
    )
    parser.add_argument("--bundle", help="the bundle's path: reused when it exists, else compiled there")
    parser.add_argument("--cold", action="store_true", help="also time a fresh process to its first token")
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.against is None:  # torch.compile on the CPU takes minutes: opt in
        args.against = "eager,compile" if args.device == "cuda" else "eager"
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "0")  # CPU kernels through their torch references
    elif not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU here (use --device cpu --geometry tiny)")

    import transformers
    import triton

    import kernl

    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    batches = sorted({int(b) for b in args.batches.split(",")})
    beams = sorted({int(b) for b in args.beams.split(",")})
    result: dict = {
        "geometry": args.geometry,
        "dtype": str(dtype).removeprefix("torch."),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "date": time.strftime("%Y-%m-%d"),
        "versions": {
            "torch": torch.__version__,
            "triton": triton.__version__,
            "transformers": transformers.__version__,
            "kernl": kernl.__version__,
        },  # fmt: skip
        "frames": FRAMES,
        "new_tokens": args.new,
        "runs": [],
    }
    model = build_model(args.geometry, dtype, args.device)
    result["parameters_M"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 1)
    text = args.geometry in T5_GEOMETRIES
    if text:
        result["src_len"] = args.src_len
    print(f"{args.geometry} ({result['parameters_M']} M parameters), {result['dtype']} on {result['device']}",
          flush=True)  # fmt: skip

    path = args.bundle or os.path.join(tempfile.mkdtemp(), args.geometry)
    if not os.path.exists(path):
        generation = {"max_length": args.max_length or (256 if text else 448), "batch_sizes": batches,
                      "num_beams": max(beams)}  # fmt: skip
        if text:
            generation["seq_lens"] = [args.src_len]
        t = time.perf_counter()
        kernl.compile(model, path, buckets=None, device=args.device, generation=generation)
        result["compile_s"] = round(time.perf_counter() - t, 1)
        model.config.use_cache = True  # the compile exports with it off (HF generate reads its generation config)
    if args.device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
    t = time.perf_counter()
    bundle = kernl.load(path, device=args.device)
    result["load_s"] = round(time.perf_counter() - t, 2)
    s2s = bundle.manifest["seq2seq"]
    result["bundle"] = {"path": path, "max_length": s2s["max_length"], "batch_sizes": s2s["batch_sizes"],
                        "num_beams": s2s["num_beams"], "cache_bytes_MB": round(s2s["cache"]["bytes"] / 2**20, 1),
                        "rewrites": bundle.manifest.get("rewrites")}  # fmt: skip
    if args.device == "cuda":
        result["bundle"]["resident_MB"] = round((torch.cuda.memory_allocated() - before) / 2**20, 1)
    caches = result["bundle"]["cache_bytes_MB"]
    print(f"compile {result.get('compile_s')} s, load {result['load_s']} s, caches {caches} MB", flush=True)
    if args.cold:
        result["cold"] = cold_first_token(path, args.device)
        print("cold", json.dumps(result["cold"]), flush=True)
    prefix = list(s2s["decoder_prefix"])
    for batch in batches:
        for k in beams:
            if batch > s2s["batch_sizes"][-1] or k > s2s["num_beams"]:
                print(f"skip batch {batch} beams {k}: beyond the bundle's buckets", flush=True)
                continue
            row = run_config(bundle, model, prefix, batch, k, args)
            result["runs"].append(row)
            print(json.dumps(row), flush=True)
            if args.json:  # after each row: a run cut short keeps what it measured
                with open(args.json, "w") as f:
                    json.dump(result, f, indent=1)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print_table(result)


def print_table(result: dict) -> None:
    print(f"\n{result['geometry']} {result['dtype']} {result['device']}: {result['new_tokens']} new tokens, "
          "ms per call (tokens/s), ratio = HF / kernl")  # fmt: skip
    for row in result["runs"]:
        cells = [f"batch {row['batch']} beams {row['num_beams']}"]
        for name in ("kernl", "hf_eager", "hf_static_compile", "hf_static_compile_default", "hf_static"):
            r = row.get(name)
            if r is None:
                continue
            if "error" in r:
                cells.append(f"{name}: error")
                continue
            ratio = f" x{r['ratio_vs_kernl']}" if "ratio_vs_kernl" in r else ""
            cells.append(f"{name} {r['ms_per_call']} ms ({r['tokens_per_s']} tok/s){ratio}")
        if "tokens_vs_hf_eager" in row:
            cells.append(f"agree {row['tokens_vs_hf_eager']['agreement']}")
        print("  " + " | ".join(cells))


if __name__ == "__main__":
    main()
