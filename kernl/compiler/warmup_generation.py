"""Run a generation program's entries once per bucket on the compile device: Triton compiles (and tunes) their
kernels, and the logits are checked against the eager model (prefill: at each prompt's last token; decode: one
step after it, i.e. teacher forcing)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from kernl.compiler.lower_generation import LoweredGeneration
from kernl.compiler.warmup import compare


def _eager_last(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits[:, -1]


def check_generation(low: LoweredGeneration, on_bucket: Callable[[str], None] | None = None) -> list[dict]:
    """Each prefill bucket (full-length prompts), then each decode batch bucket after its shortest prompt bucket."""
    settings, device, model = low.settings, low.device, low.model
    prefill, decode = low.spec.bind("prefill"), low.spec.bind("decode")
    weights = low.weight_list()
    vocab = model.config.vocab_size
    state = low.spec.allocate_state(device)
    long = dict(dtype=torch.int64, device=device)
    checks = []
    with torch.no_grad():
        for batch in settings.batch_sizes:
            for seq in reversed(settings.seq_lens):  # the shortest last: the decode check continues from it
                if on_bucket is not None:
                    on_bucket(f"prefill {batch}x{seq}")
                ids = torch.randint(0, vocab, (batch, seq), **long)
                positions = torch.arange(seq, **long).expand(batch, seq).contiguous()
                last = torch.full((batch,), seq - 1, **long)
                rows = torch.arange(batch, **long)
                (got,) = prefill(device, *weights, *state, ids, positions, last, rows)
                want = _eager_last(model, ids)
                checks.append({"entry": "prefill", "bucket": [batch, seq], **compare([got], [want])})
            if on_bucket is not None:
                on_bucket(f"decode {batch}")
            step = torch.randint(0, vocab, (batch, 1), **long)
            (got,) = decode(device, *weights, *state, step, torch.full((batch, 1), seq, **long))
            want = _eager_last(model, torch.cat([ids, step], dim=1))
            checks.append({"entry": "decode", "bucket": [batch, 1], **compare([got], [want])})
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return checks
