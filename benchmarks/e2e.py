"""End-to-end latency: HF eager, torch.compile and a kernl bundle, side by side in one process.

python benchmarks/e2e.py --model bert --modes eager,reduce-overhead,kernl [--json OUT.json]

Models are built from configs with random weights, fp16, on the GPU. Each call is timed with CUDA events
around the whole call (the bundle's input checks, padding and output copies included), median of --reps
after warm-up. First-call times include compilation (torch.compile) or load + capture (kernl).
"""

from __future__ import annotations

import argparse
import functools
import json
import tempfile
import time
from pathlib import Path

import torch

from kernl.commands.timing import median_ms

SHAPES = {
    "bert": [(1, 16), (1, 128), (8, 128), (32, 256)],
    "gpt2": [(1, 16), (1, 128), (8, 128), (32, 256), (8, 512)],
    "llama": [(1, 16), (1, 128), (8, 128), (32, 256), (8, 512)],
}


def build_model(name: str, layers: int | None = None) -> torch.nn.Module:
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    if name == "bert":
        model = BertModel(BertConfig(num_hidden_layers=layers or 12))
    elif name == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_layer=layers or 12))
    elif name == "llama":
        config = LlamaConfig(
            hidden_size=2048,
            num_hidden_layers=layers or 16,
            num_attention_heads=32,
            num_key_value_heads=8,
            intermediate_size=8192,
            vocab_size=128256,
            max_position_embeddings=2048,
        )
        model = LlamaForCausalLM(config)
    else:
        raise SystemExit(f"unknown model {name!r}")
    return model.eval().to("cuda", torch.float16)


def inputs_for(model, batch: int, seq: int) -> dict[str, torch.Tensor]:
    vocab = model.config.vocab_size
    return {
        "input_ids": torch.randint(0, vocab, (batch, seq), device="cuda"),
        "attention_mask": torch.ones(batch, seq, dtype=torch.long, device="cuda"),
    }


def first_call_s(fn) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t


def run(args) -> dict:
    model = build_model(args.model, args.layers)
    shapes = SHAPES[args.model] if not args.shapes else [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]
    modes = args.modes.split(",")
    results = {"model": args.model, "layers": args.layers, "shapes": {}, "gpu": torch.cuda.get_device_name()}
    import transformers
    import triton

    results["versions"] = {
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
    }
    results["date"] = time.strftime("%Y-%m-%d")
    bundle = None
    if "kernl" in modes:
        import kernl

        tmp = Path(tempfile.mkdtemp())
        t = time.perf_counter()
        path = kernl.compile(model, tmp / "bundle", buckets=shapes, dtype=torch.float16, device="cuda")
        results["kernl_build_s"] = time.perf_counter() - t
        results["kernl_rewrites"] = json.loads((path / "manifest.json").read_text())["rewrites"]
        t = time.perf_counter()
        bundle = kernl.load(path)
        results["kernl_load_s"] = time.perf_counter() - t
    for batch, seq in shapes:
        row = results["shapes"][f"{batch}x{seq}"] = {}
        inputs = inputs_for(model, batch, seq)
        with torch.inference_mode():
            for mode in modes:
                if mode == "eager":
                    target = model
                elif mode == "kernl":
                    target = bundle
                else:
                    torch._dynamo.reset()
                    target = torch.compile(model, mode=mode)
                fn = functools.partial(target, **inputs)
                row[f"{mode}_first_s"] = first_call_s(fn)
                row[f"{mode}_ms"] = median_ms(fn, torch.device("cuda"), warmup=5, runs=args.reps)
                print(f"{args.model} {batch}x{seq} {mode}: {row[f'{mode}_ms']:.3f} ms", flush=True)
        compiled_ms = [row[f"{m}_ms"] for m in modes if m not in ("eager", "kernl")]
        if "kernl_ms" in row and compiled_ms:
            row["kernl_over_best_compile"] = row["kernl_ms"] / min(compiled_ms)
        if args.json:  # after every shape: a run cut short by a time limit keeps what it measured
            args.json.write_text(json.dumps(results, indent=1))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, choices=list(SHAPES))
    parser.add_argument("--modes", default="eager,reduce-overhead,kernl")
    parser.add_argument("--shapes", default="", help="BATCHxSEQ,... (default: the model's standard set)")
    parser.add_argument("--layers", type=int, default=None, help="fewer layers, for quick checks")
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    results = run(args)
    text = json.dumps(results, indent=1)
    if args.json:
        args.json.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
