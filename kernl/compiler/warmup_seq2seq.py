"""Run a seq2seq program's entries once per bucket on the compile device (Triton compiles its kernels) and
check them against the eager model: the encoder's states per input bucket, then a few decode steps per batch
bucket (teacher forcing), with one request's beams sharing its cross cache row."""

from __future__ import annotations

from collections.abc import Callable

import torch

from kernl.compiler.lower_seq2seq import SPEECH, LoweredSeq2Seq
from kernl.compiler.warmup import compare

STEPS = 3


def _encoder_inputs(low: LoweredSeq2Seq, batch: int, seq: int) -> tuple[list[torch.Tensor], dict, torch.Tensor]:
    """(program inputs, eager kwargs, each row's encoder length) for one bucket; text rows have ragged lengths."""
    config, device = low.model.config, low.device
    if low.settings.kind == SPEECH:
        feats = torch.randn(batch, int(config.num_mel_bins), seq, device=device, dtype=low.dtype)
        return [feats], {"input_features": feats}, torch.full((batch,), low.enc_len, device=device)
    ids = torch.randint(0, int(config.vocab_size), (batch, seq), device=device)
    lengths = torch.randint(max(1, seq // 2), seq + 1, (batch,), device=device)
    lengths[0] = seq
    mask = (torch.arange(seq, device=device)[None, :] < lengths[:, None]).long()
    return [ids, mask], {"input_ids": ids, "attention_mask": mask}, lengths


def check_seq2seq(low: LoweredSeq2Seq, on_bucket: Callable[[str], None] | None = None) -> list[dict]:
    settings, device, model = low.settings, low.device, low.model
    encode, decode = low.spec.bind("encode"), low.spec.bind("decode")
    weights = low.weight_list()
    state = low.spec.allocate_state(device)
    vocab = int(model.config.vocab_size)
    long = dict(dtype=torch.int64, device=device)
    checks = []
    with torch.no_grad():
        for batch in settings.batch_sizes:
            for seq in reversed(settings.seq_lens):  # the shortest last: the decode check continues from it
                if on_bucket is not None:
                    on_bucket(f"encode {batch}x{seq}")
                inputs, eager_kwargs, lengths = _encoder_inputs(low, batch, seq)
                (got,) = encode(device, *weights, *state, *inputs, torch.arange(batch, **long))
                states = model.get_encoder()(**eager_kwargs).last_hidden_state
                keep = torch.arange(got.shape[1], device=device)[None, :] < lengths[:, None]
                checks.append({"entry": "encode", "bucket": [batch, seq],
                               **compare([got * keep[..., None]], [states * keep[..., None]])})  # fmt: skip
            beams = settings.num_beams
            if on_bucket is not None:
                on_bucket(f"decode {batch}x{beams}")
            ids = torch.randint(0, vocab, (batch * beams, STEPS), **long)
            mask = eager_kwargs.get("attention_mask")
            want = model(
                encoder_outputs=(states.repeat_interleave(beams, 0),),
                attention_mask=None if mask is None else mask.repeat_interleave(beams, 0),
                decoder_input_ids=ids,
                use_cache=False,
            ).logits
            for step in range(STEPS):
                positions = torch.full((batch * beams, 1), step, **long)
                (got,) = decode(device, *weights, *state, ids[:, step : step + 1], positions, lengths)
                checks.append({"entry": "decode", "bucket": [batch * beams, step], **compare([got], [want[:, step]])})
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return checks
