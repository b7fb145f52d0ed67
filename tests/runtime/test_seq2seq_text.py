"""Text encoder-decoder generation bundles (tiny random BART and T5, CPU fp32): greedy and beam search from a
bundle on disk, loaded in a fresh process, token for token equal to transformers' generate, batch 1 and a
ragged (right-padded) batch of 3."""

import json

import pytest
import torch

import kernl
from tests.runtime.seq2seq_fresh import generate_in_fresh_process

pytestmark = pytest.mark.usefixtures("cpu_references")

VOCAB = 100
GENERATION = {"max_length": 24, "batch_sizes": [1, 4], "seq_lens": [8, 16], "num_beams": 4}


def tiny_bart(eos: int = 54):
    from transformers import BartConfig, BartForConditionalGeneration

    config = BartConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        eos_token_id=eos, forced_eos_token_id=None, decoder_start_token_id=2,
        init_std=1.0, tie_word_embeddings=False,  # a random model whose greedy picks vary; eos 54 is frequent
    )  # fmt: skip
    torch.manual_seed(0)
    model = BartForConditionalGeneration(config).eval()
    # Processors kernl's runtime does not run (forced bos/eos, no-repeat n-grams, min_length): off on both sides.
    gen = model.generation_config
    gen.forced_bos_token_id = gen.forced_eos_token_id = gen.no_repeat_ngram_size = None
    gen.min_length = 0
    return model


def tiny_t5(gated: bool = False):
    """T5 v1.0 (relu, LM head tied and scaled by d_model ** -0.5) or v1.1 / flan geometry (gated GELU, untied).
    The decoder's self-attention carries the relative position bias."""
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, decoder_start_token_id=0,
        pad_token_id=0, eos_token_id=91 if gated else 1, initializer_factor=4.0 if gated else 1.0,
        feed_forward_proj="gated-gelu" if gated else "relu", tie_word_embeddings=not gated,
    )  # fmt: skip
    torch.manual_seed(0)
    return T5ForConditionalGeneration(config).eval()


FAMILIES = {"bart": tiny_bart, "t5": tiny_t5, "t5_v11": lambda: tiny_t5(gated=True)}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def text_bundle(request, tmp_path_factory):
    model = FAMILIES[request.param]()
    path = kernl.compile(model, tmp_path_factory.mktemp("s2s") / request.param, buckets=None, device="cpu",
                         generation=GENERATION)  # fmt: skip
    return model, path


def _ragged(lengths: list[int], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (as a tokenizer pads for these models) and their mask."""
    seq = max(lengths)
    ids = torch.randint(3, VOCAB, (len(lengths), seq))
    mask = (torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids.masked_fill(mask == 0, pad), mask


def test_text_generate_matches_hf_in_a_fresh_process(text_bundle, tmp_path):
    model, path = text_bundle
    pad = model.generation_config.pad_token_id or 0
    one, three = _ragged([7], pad), _ragged([11, 4, 9], pad)
    calls = {
        "greedy_1": (one, {"max_new_tokens": 12}),
        "greedy_3": (three, {"max_new_tokens": 12}),
        "beams_1": (one, {"max_new_tokens": 10, "num_beams": 3}),
        "beams_3": (three, {"max_new_tokens": 10, "num_beams": 4, "length_penalty": 0.5}),
        "beams_early": (three, {"max_new_tokens": 10, "num_beams": 2, "early_stopping": True}),
    }
    args = {name: {"input_ids": ids, "attention_mask": mask, **opts} for name, ((ids, mask), opts) in calls.items()}
    got = generate_in_fresh_process(path, args, tmp_path)
    for name, ((ids, mask), opts) in calls.items():
        with torch.no_grad():
            want = model.generate(input_ids=ids, attention_mask=mask, **opts)
        assert got[name] == want.tolist(), name


def test_text_entries_rewrite_and_match_eager(text_bundle):
    """BART's decoder positions reach its position table per row; T5's decoder self-attention keeps its relative
    position bias at decode (cache_append, then kernl.attention over the cache with each row's line of the bias
    as its mask); the compile check (decode steps at positions 0, 1, 2 against eager) shows a wrong bias."""
    model, path = text_bundle
    manifest = json.loads((path / "manifest.json").read_text())
    functions = json.loads((path / "program.json").read_text())["functions"]
    encode, decode = ([node[1] for node in functions[e]["nodes"]] for e in ("encode", "decode"))
    layers = model.config.decoder_layers if hasattr(model.config, "decoder_layers") else model.config.num_layers
    assert encode.count("kernl.cache_fill") == layers
    assert decode.count("kernl.decode_attention") == layers  # cross-attention over the request's row
    if model.config.model_type == "t5":  # the bias needs the whole cache
        assert decode.count("kernl.cache_append") == layers and decode.count("kernl.attention") == layers
        assert "kernl.decode_attention_append" not in decode
        assert decode.count("aten.embedding.default") == 2  # tokens, and the bias table once for every layer
    else:  # no bias: the one-kernel decode step
        assert decode.count("kernl.decode_attention_append") == layers and "kernl.attention" not in decode
    assert not [t for t in decode if "scaled_dot_product" in t]
    checks = manifest["checks"]
    assert {c["entry"] for c in checks} == {"encode", "decode"}
    # fp32 rounding only (the random BART's logits are in the hundreds)
    assert all(c["cosine"] > 0.99999 and c["max_abs_diff"] < 2e-3 for c in checks), checks


def test_first_use_captures_run_before_the_request_writes_state(text_bundle, monkeypatch):
    """On CUDA a step is captured at its first use, and capturing runs it once for real. Emulated here (the step
    run once when first asked for, then reused): a request's steps must be asked for before it writes its
    positions and beams, else its first beam call starts one step ahead (the GPU failure this guards against)."""
    from kernl.runtime.seq2seq import Seq2SeqGenerator

    def first_use_runs(self, key, run, generator=False):
        if key not in self.step_graphs:
            run()
            self.step_graphs[key] = run
        return self.step_graphs[key]

    monkeypatch.setattr(Seq2SeqGenerator, "_step", first_use_runs)
    model, path = text_bundle
    ids, mask = _ragged([11, 4, 9], model.generation_config.pad_token_id or 0)
    bundle = kernl.load(path)
    for options in ({"num_beams": 4}, {}):
        want = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, **options)
        assert torch.equal(bundle.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, **options), want)


def test_text_bad_inputs(text_bundle):
    _, path = text_bundle
    bundle = kernl.load(path)
    ids = torch.randint(3, VOCAB, (1, 5))
    with pytest.raises(kernl.InputError, match="no_repeat_ngram_size"):
        bundle.generate(input_ids=ids, max_new_tokens=4, no_repeat_ngram_size=3)
    with pytest.raises(kernl.InputError, match="forced_eos_token_id"):
        bundle.generate(input_ids=ids, max_new_tokens=4, forced_eos_token_id=2)
    with pytest.raises(kernl.InputError, match="longer than the largest bucket"):
        bundle.generate(input_ids=torch.randint(3, VOCAB, (1, 17)), max_new_tokens=4)
    with pytest.raises(kernl.InputError, match="outside the vocabulary"):
        bundle.generate(input_ids=torch.tensor([[5, VOCAB]]), max_new_tokens=4)
    with pytest.raises(kernl.InputError, match="input_features"):
        bundle.generate(input_features=torch.randn(1, 8, 8), max_new_tokens=4)
    with pytest.raises(kernl.InputError, match="max_new_tokens"):
        bundle.generate(input_ids=ids, max_new_tokens=GENERATION["max_length"])
    assert bundle.generate(input_ids=ids, max_new_tokens=3).shape[0] == 1  # still works after refusals


@pytest.mark.gpu
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_text_generate_on_cuda_graphs(family, tmp_path):
    model = FAMILIES[family]().cuda()
    path = kernl.compile(model, tmp_path / family, buckets=None, device="cuda", generation=GENERATION)
    bundle = kernl.load(path)
    ids, mask = (t.cuda() for t in _ragged([11, 4, 9], model.generation_config.pad_token_id or 0))
    for options in ({}, {"num_beams": 4}):
        want = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, **options).cpu()
        got = bundle.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, **options)
        # fp32 on the GPU: kernels may differ from eager in the last bits, which can flip a near tie.
        assert got.shape == want.shape and (got == want).float().mean() > 0.9, (options, got, want)
    assert bundle._seq2seq.step_graphs  # decode steps ran as captured graphs


def test_refuses_a_decoder_whose_positions_stay_inside(monkeypatch):
    """A decoder whose positions come from arange inside the model (here BART with its position table not
    fed) would see position 0 at every decode step: refused, not compiled wrong."""
    import kernl.compiler.lower_seq2seq as lower

    monkeypatch.setattr(lower, "position_embedding", lambda model: None)
    settings = lower.Seq2SeqSettings.checked("text", 16, [1], [8], 1)  # 1 decode row: exports too
    with pytest.raises(kernl.KernlError, match="positions inside the model"):
        lower.lower_seq2seq(tiny_bart(), settings, device="cpu")
