"""`kernl bench BUNDLE --generate`: time to first token and tokens/s per decode batch, beside HF generate."""

from __future__ import annotations

import time
from typing import Any

import click

HF_MODES = {"eager": None, "hf-static": "static"}  # name -> transformers cache_implementation


def _seconds(fn, device, runs: int) -> float:
    """Median wall seconds of fn() after one warm call, synchronised on the device."""
    import statistics

    import torch

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    times = []
    for _ in range(runs):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_generation(loaded, model, baselines: list[str], *, new_tokens: int, runs: int) -> list[dict[str, Any]]:
    """Per decode batch bucket, greedy with eos off: kernl's TTFT and tokens/s, and each HF baseline's tokens/s."""

    gen = loaded.manifest["generation"]
    prompt = gen["seq_lens"][0]
    new_tokens = min(new_tokens, gen["max_length"] - prompt)
    return [_bench_batch(loaded, model, baselines, batch, prompt, new_tokens, runs) for batch in gen["batch_sizes"]]


def _bench_batch(loaded, model, baselines: list[str], batch: int, prompt: int, new_tokens: int, runs: int) -> dict:
    import torch

    ids = torch.randint(0, loaded.manifest["generation"]["vocab_size"], (batch, prompt))
    first = _seconds(lambda: loaded.generate(ids, max_new_tokens=1, eos_token_id=[]), loaded.device, runs)
    total = _seconds(lambda: loaded.generate(ids, max_new_tokens=new_tokens, eos_token_id=[]), loaded.device, runs)
    row: dict[str, Any] = {"batch": batch, "prompt": prompt, "new_tokens": new_tokens, "kernl_ttft_ms": first * 1e3,
                           "kernl_tokens_per_s": batch * new_tokens / total}  # fmt: skip
    hf_ids = ids.to(loaded.device)
    mask = torch.ones_like(hf_ids)
    for name in baselines:
        options = {"cache_implementation": HF_MODES[name]} if HF_MODES[name] else {}

        def hf(options=options):
            with torch.inference_mode():
                model.generate(input_ids=hf_ids, attention_mask=mask, max_new_tokens=new_tokens,
                               min_new_tokens=new_tokens, do_sample=False, **options)  # fmt: skip

        seconds = _seconds(hf, loaded.device, runs)
        row[f"{name}_tokens_per_s"] = batch * new_tokens / seconds
        row[f"kernl_over_{name}"] = seconds / total
    click.echo(f"batch {batch}: kernl {row['kernl_tokens_per_s']:.0f} tokens/s", err=True)
    return row


def generation_table(results: list[dict[str, Any]], baselines: list[str]) -> tuple[list[str], list[list[str]]]:
    headers = ["batch", "prompt + new", "kernl TTFT ms", "kernl tok/s",
               *[h for n in baselines for h in (f"{n} tok/s", f"kernl / {n}")]]  # fmt: skip
    rows = [
        [str(r["batch"]), f"{r['prompt']} + {r['new_tokens']}", f"{r['kernl_ttft_ms']:.2f}",
         f"{r['kernl_tokens_per_s']:.0f}"]
        + [v for n in baselines for v in (f"{r[f'{n}_tokens_per_s']:.0f}", f"{r[f'kernl_over_{n}']:.2f}x")]
        for r in results
    ]  # fmt: skip
    return headers, rows
