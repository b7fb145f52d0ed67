"""Tensor parallel on GPUs: compile a Llama-like model with tensor_parallel=N on cuda:0, then under torchrun each
rank loads its shard (NCCL all-reduces inside the CUDA graphs) and compares logits with the unsharded model.

python benchmarks/tp_smoke.py compile OUT --tp 2
NCCL_NVLS_ENABLE=0 torchrun --nproc-per-node 2 benchmarks/tp_smoke.py run OUT
"""

from __future__ import annotations

import json
import sys

import torch


def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=1024, num_hidden_layers=4, num_attention_heads=16,
                         num_key_value_heads=4, intermediate_size=2816, max_position_embeddings=512)  # fmt: skip
    return LlamaForCausalLM(config).eval().to("cuda", torch.float16)


def main() -> None:
    import kernl

    mode, path = sys.argv[1], sys.argv[2]
    if mode == "compile":
        tp = int(sys.argv[sys.argv.index("--tp") + 1])
        options = {"tensor_parallel": tp} if tp > 1 else {}
        kernl.compile(model(), path, buckets=[(1, 16), (4, 128)], device="cuda", overwrite=True, **options)
        return
    bundle = kernl.load(path)
    rank = getattr(bundle, "rank", 0)
    torch.manual_seed(1)
    ids = torch.randint(0, 32000, (4, 100), device=bundle.device)
    out = bundle(input_ids=ids)[0].float()
    with torch.no_grad():
        want = model().to(bundle.device)(input_ids=ids).logits.float()
    cos = torch.nn.functional.cosine_similarity(out.flatten(), want.flatten(), dim=0).item()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(5):
        bundle(input_ids=ids)
    start.record()
    for _ in range(20):
        bundle(input_ids=ids)
    end.record()
    end.synchronize()
    diff = (out - want).abs().max().item()
    ms = start.elapsed_time(end) / 20
    print(json.dumps({"rank": rank, "gpu": torch.cuda.get_device_name(), "cosine": cos, "max_abs_diff": diff,
                      "ms_4x100": ms}))  # fmt: skip


if __name__ == "__main__":
    main()
