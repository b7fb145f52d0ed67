"""A generation bundle to serve in benchmarks/serve_generate.py: random weights of a geometry (benchmarks/e2e.py's
models), and a word-level tokenizer with one token per id ("t0", "t1", ...), so every id the random model
produces decodes to text and the server's detokenizer does real work.

    python benchmarks/serve_generate_bundle.py --model llama --batches 1,8,32 --seq-lens 128 --max-length 512 \
        --out /tmp/llama-gen
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from e2e import build_model  # noqa: E402


def id_tokenizer(vocab: int, eos: int):
    """A fast tokenizer whose token i is "t{i}" (whitespace split), eos the model's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins tokens with spaces
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=f"t{eos}", pad_token=f"t{eos}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama")
    parser.add_argument("--layers", type=int)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--seq-lens", default="128")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    import kernl

    torch.manual_seed(0)
    model = build_model(args.model, args.layers).to(getattr(torch, args.dtype))
    vocab = model.config.vocab_size
    eos = vocab - 1  # random weights rarely pick it: requests run to max_tokens unless ignore_eos is off
    model.config.eos_token_id = model.generation_config.eos_token_id = eos
    generation = {
        "max_length": args.max_length,
        "batch_sizes": [int(b) for b in args.batches.split(",")],
        "seq_lens": [int(s) for s in args.seq_lens.split(",")],
    }
    start = time.perf_counter()
    kernl.compile(model, args.out, buckets=None, generation=generation, tokenizer=id_tokenizer(vocab, eos),
                  overwrite=True)  # fmt: skip
    print(f"built {args.out} in {time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
    main()
