"""Run a generation program's entries once per bucket on the compile device: Triton compiles (and tunes) their
kernels, and the logits are checked against the eager model (prefill: at each prompt's last token; decode: one
step after it, i.e. teacher forcing).

A tensor-parallel program runs its ranks as threads of this process (as warmup_sharded does for forward
bundles), each with its own weights and its own cache: rank 0's logits are checked against the model and every
rank's against rank 0's ("ranks_max_abs_diff": 0 when the ranks pick the same tokens from the same logits).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kernl.compiler.lower_generation import LoweredGeneration
from kernl.compiler.warmup import compare
from kernl.compiler.warmup_sharded import _no_interpreter
from kernl.kernels.collectives import ThreadRanks


def _compare(got: torch.Tensor, model: torch.nn.Module, ids: torch.Tensor) -> dict:
    """got against the eager model's logits at the last position of ids."""
    return compare([got], [model(input_ids=ids).logits[:, -1]])


def _entries(low: LoweredGeneration, world: int) -> Callable[[str, list[torch.Tensor]], tuple[torch.Tensor, dict]]:
    """entry(name, inputs) -> (rank 0's logits, extra check entries), over the program's first world ranks."""
    device, spec = low.device, low.spec
    fns = {name: spec.bind(name) for name in ("prefill", "decode")}
    args = []
    for r in range(world):  # each rank's weights (made from the unsharded ones) and its own cache
        weights = low.rank_weights(r)
        args.append([*(weights[name].to(device) for name in spec.weights), *spec.allocate_state(device)])

    def entry(name: str, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, dict]:
        def call(rank: int) -> torch.Tensor:
            with torch.no_grad():
                return fns[name](device, *args[rank], *inputs)[0]

        alone = ThreadRanks(1, stands_for=low.shard.world_size if low.shard is not None else 1)
        if world == 1:  # one rank, or rank 0 alone (compile only): a thread rank stands for the others' sums
            return alone.run(call)[0], {}
        alone.run(call)  # kernels compile and tune, for every rank (rank 0's cache is rewritten below)
        with _no_interpreter():
            outs = ThreadRanks(world).run(call)
        spread = max(float((out - outs[0]).abs().max()) for out in outs)
        return outs[0], {"ranks_max_abs_diff": spread}

    return entry


def check_generation(
    low: LoweredGeneration, on_bucket: Callable[[str], None] | None = None, *, eager: bool = True
) -> list[dict]:
    """Each prefill bucket (full-length prompts), then each decode batch bucket after its shortest prompt bucket.

    eager=False (a model on the meta device: no eager outputs, kernl.compiler.meta): rank 0 alone runs, on its
    own weights, so the kernels compile and tune; nothing is compared, and each check says so.
    """
    settings, device, model = low.settings, low.device, low.model
    world = 1 if low.shard is None or not eager else low.shard.world_size
    run = _entries(low, world)
    compared = _compare if eager else lambda got, model, ids: {"eager": "skipped: the model is on the meta device"}
    vocab = model.config.vocab_size
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
                got, extra = run("prefill", [ids, positions, last, rows])
                checks.append({"entry": "prefill", "bucket": [batch, seq], **compared(got, model, ids), **extra})
            if on_bucket is not None:
                on_bucket(f"decode {batch}")
            step = torch.randint(0, vocab, (batch, 1), **long)
            got, extra = run("decode", [step, torch.full((batch, 1), seq, **long)])
            both = torch.cat([ids, step], dim=1)
            checks.append({"entry": "decode", "bucket": [batch, 1], **compared(got, model, both), **extra})
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return checks
