"""Print which rewrites kernl's passes apply to real model geometries, as a markdown table.

python scripts/rewrite_report.py [--layers-llama N]

Builds bert-base, gpt2 (124M) and a Llama-class geometry (hidden 2048, 32 q / 8 kv heads, intermediate
8192, vocab 128256) from configs with random weights on the meta device: no memory for weights, no
download. Each is exported (dynamic batch/seq, as kernl.compile does) and rewritten; nothing runs.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from transformers import BertConfig, BertModel, GPT2Config, GPT2Model, LlamaConfig, LlamaModel

from kernl.compiler.build import _weights
from kernl.compiler.passes import run_passes
from kernl.compiler.trace import export_model

BUCKETS = [(2, 16)]
NOOP_COUNTERS = ("assert_removed", "dropout_removed")


def _models(llama_layers: int) -> dict[str, tuple]:
    llama = LlamaConfig(
        hidden_size=2048,
        num_hidden_layers=llama_layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=8192,
        vocab_size=128256,
    )
    return {
        "bert-base": (BertModel, BertConfig()),
        "gpt2": (GPT2Model, GPT2Config()),
        f"llama-class 1.2B ({llama_layers} layers)": (LlamaModel, llama),
    }


def _make_inputs(batch: int, seq: int) -> dict[str, torch.Tensor]:
    # Values never matter on meta: export only sees shapes and dtypes.
    return {
        "input_ids": torch.ones(batch, seq, dtype=torch.long, device="meta"),
        "attention_mask": torch.ones(batch, seq, dtype=torch.long, device="meta"),
    }


def report_for(model_cls, config) -> tuple[dict[str, int], float]:
    """The rewrite report of one model, and the seconds export + passes took."""
    with torch.device("meta"):
        model = model_cls(config).eval()
    model.config.use_cache = False
    start = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = export_model(model, _make_inputs, BUCKETS).program
    report = run_passes(program.graph_module, _weights(program))
    return report, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers-llama", type=int, default=16, help="Llama decoder layers (16 in the real model)")
    args = parser.parse_args()
    reports, seconds = {}, {}
    for name, (model_cls, config) in _models(args.layers_llama).items():
        reports[name], seconds[name] = report_for(model_cls, config)
    counters = sorted({k for r in reports.values() for k in r if k not in NOOP_COUNTERS})
    names = list(reports)
    print(f"torch {torch.__version__}; buckets {BUCKETS}; export + passes on the meta device\n")
    print("| rewrite | " + " | ".join(names) + " |")
    print("| --- |" + " --- |" * len(names))
    for counter in counters + list(NOOP_COUNTERS):
        print(f"| {counter} | " + " | ".join(str(reports[n].get(counter, 0)) for n in names) + " |")
    print("| seconds (export + passes) | " + " | ".join(f"{seconds[n]:.1f}" for n in names) + " |")


if __name__ == "__main__":
    main()
