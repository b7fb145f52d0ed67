"""The encode and decode entries of a seq2seq program: every attention became a cache kernel, the cross keys and
values moved into the encoder entry, and both entries match the eager model (the compile check's numbers)."""

import pytest

from kernl.compiler.lower_seq2seq import Seq2SeqSettings, lower_seq2seq
from kernl.compiler.warmup_seq2seq import check_seq2seq
from kernl.errors import KernlError
from tests.runtime.test_seq2seq import FRAMES, tiny_whisper

pytestmark = pytest.mark.usefixtures("cpu_references")


def _targets(spec, entry: str) -> list[str]:
    return [node[1] for node in spec.functions[entry]["nodes"]]


def test_whisper_entries_rewrite_and_match_eager():
    model = tiny_whisper()
    low = lower_seq2seq(model, Seq2SeqSettings.checked("speech", 16, [1, 2], [FRAMES], 2), device="cpu")
    layers = model.config.decoder_layers
    encode, decode = _targets(low.spec, "encode"), _targets(low.spec, "decode")
    assert encode.count("kernl.cache_fill") == layers  # each layer's cross k/v written once per request
    assert decode.count("kernl.decode_attention_append") == layers
    assert decode.count("kernl.decode_attention") == layers
    assert "kernl.attention" not in decode and "aten.scaled_dot_product_attention.default" not in decode
    # The decode step no longer reads the encoder's output: only the caches.
    assert [p["name"] for p in low.spec.entry_inputs("decode")] == ["decoder_input_ids", "decoder_position_ids",
                                                                    "enc_lengths"]  # fmt: skip
    cross = [s for s in low.spec.state if s["name"].startswith("cross_")]
    assert cross[0]["shape"] == [3, 4, FRAMES // 2, 8]  # requests + a scratch row, not requests x beams
    checks = check_seq2seq(low)
    assert {c["entry"] for c in checks} == {"encode", "decode"}
    assert all(c["cosine"] > 0.9999 and c["max_abs_diff"] < 1e-4 for c in checks), checks


def test_refuses_a_decoder_only_model():
    from tests.models import tiny_gpt2

    with pytest.raises(KernlError):
        lower_seq2seq(tiny_gpt2(), Seq2SeqSettings.checked("text", 16, [1], [8]), device="cpu")
