"""Device beam search: token-for-token equal to HF generate(num_beams=...) on tiny random models, driven without a
cache from the state's own running sequences, with spare (inert) beams and batch items in the state."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, T5Config, T5ForConditionalGeneration
from transformers.utils import logging

from kernl import InputError
from kernl.runtime.beam import BeamState, beam_step, finalize

NEW = 10  # max_new_tokens
VOCAB = 64


@pytest.fixture(scope="module", autouse=True)
def _quiet():
    level = logging.get_verbosity()
    logging.set_verbosity_error()  # generate's notes on pad ids and generation configs
    yield
    logging.set_verbosity(level)


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    # A wide init makes the output peaky: eos ends some beams early and others late, so the length penalty matters.
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64, initializer_range=0.3)
    model = GPT2LMHeadModel(config).eval()
    prompts = torch.randint(0, VOCAB, (3, 5))
    return model, prompts, _liked_tokens(model, {"input_ids": prompts, "attention_mask": torch.ones_like(prompts)})


@pytest.fixture(scope="module")
def t5():
    torch.manual_seed(0)
    config = T5Config(vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, initializer_factor=8.0)  # fmt: skip
    model = T5ForConditionalGeneration(config).eval()
    ids = torch.randint(2, VOCAB, (3, 7))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0  # items of different lengths
    mask[2, 6:] = 0
    return model, {"input_ids": ids, "attention_mask": mask}


def _liked_tokens(model, inputs) -> list[int]:
    """Tokens greedy decoding emits a few tokens in: as eos ids, likely enough to end beams, not at once."""
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=4, pad_token_id=0, eos_token_id=None)
    return list(dict.fromkeys(out[:, -1].tolist()))


def _beam(forward, prefix, *, num_beams, spare, **settings):
    """Our beam search over a state with `spare` extra beams and batch items, the model recomputing each row's
    whole sequence every step; checks the caller's contract (parents, tokens) on the way."""
    batch, plen = prefix.shape
    state = BeamState.allocate(batch + spare, num_beams + spare, plen + NEW + 3, VOCAB, "cpu")
    state.reset(prefix, num_beams=num_beams, max_new_tokens=NEW, **settings)
    K = state.beams
    for i in range(NEW):
        old, was_done = state.seq.clone(), state.done.clone()
        with torch.no_grad():
            logits = forward(old[:, : plen + i], K)
        beam_step(state, logits)
        # A row continues its parent's sequence with its token: what a caller's cache reorder relies on.
        running = torch.zeros(state.batch, K, dtype=torch.bool)
        running[:, :num_beams] = ~was_done[:, None]
        rows = running.view(-1).nonzero().flatten()
        assert torch.equal(state.seq[rows, : plen + i], old[state.parents[rows], : plen + i])
        assert torch.equal(state.seq[rows, plen + i], state.tokens[rows])
        if bool(state.all_done):
            break
    assert bool(state.all_done)
    # Inert beams and batch items stayed put.
    idle = torch.ones(state.batch, K, dtype=torch.bool)
    idle[:batch, :num_beams] = False
    assert torch.equal(
        state.parents.view(state.batch, K)[idle], torch.arange(state.batch * K).view(state.batch, K)[idle]
    )
    return finalize(state)


def _hf(model, inputs, **settings):
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=NEW, use_cache=False,
                             output_scores=True, return_dict_in_generate=True, **settings)  # fmt: skip
    return out.sequences, out.sequences_scores


# (num_beams, early_stopping, batch, length_penalty): every beams x stopping x batch, penalties spread over them
CASES = [
    (2, True, 1, 1.0), (2, True, 3, 2.0), (2, False, 1, 0.5), (2, False, 3, 1.0), (2, "never", 1, 2.0),
    (2, "never", 3, 1.0), (4, True, 1, -1.0), (4, True, 3, 1.0), (4, False, 1, 2.0), (4, False, 3, 0.5),
    (4, "never", 1, 1.0), (4, "never", 3, 2.0),
]  # fmt: skip


@pytest.mark.parametrize("num_beams,early_stopping,batch,length_penalty", CASES)
def test_gpt2_equals_hf(gpt2, num_beams, early_stopping, batch, length_penalty):
    model, prompts, eos = gpt2  # eos: a list of ids
    prompts = prompts[:batch]
    settings = dict(length_penalty=length_penalty, early_stopping=early_stopping, eos_token_id=eos)
    want, want_scores = _hf(model, {"input_ids": prompts, "attention_mask": torch.ones_like(prompts)},
                            num_beams=num_beams, pad_token_id=eos[0], **settings)  # fmt: skip
    got, scores = _beam(lambda ids, K: model(ids, use_cache=False).logits[:, -1], prompts, num_beams=num_beams,
                        spare=1, pad_token_id=eos[0], **settings)  # fmt: skip
    assert torch.equal(got, want)
    torch.testing.assert_close(scores, want_scores)


@pytest.mark.parametrize("num_beams,early_stopping,batch,length_penalty", CASES)
def test_t5_equals_hf(t5, num_beams, early_stopping, batch, length_penalty):
    model, inputs = t5
    inputs = {k: v[:batch] for k, v in inputs.items()}
    eos = [5, 9] if batch == 3 else 9  # one id or a list
    settings = dict(length_penalty=length_penalty, early_stopping=early_stopping, eos_token_id=eos)
    want, want_scores = _hf(model, inputs, num_beams=num_beams, **settings)

    def forward(ids, K):
        # Row b * K + j decodes for item b; spare items borrow item 0's input.
        enc = {k: torch.cat([v, v[:1].expand(ids.shape[0] // K - batch, -1)]).repeat_interleave(K, 0)
               for k, v in inputs.items()}  # fmt: skip
        return model(**enc, decoder_input_ids=ids, use_cache=False).logits[:, -1]

    prefix = torch.zeros(batch, 1, dtype=torch.int64)  # decoder_start_token_id
    got, scores = _beam(forward, prefix, num_beams=num_beams, spare=1, pad_token_id=0, **settings)
    assert torch.equal(got, want)
    torch.testing.assert_close(scores, want_scores)


def test_cases_exercise_eos_and_stopping(gpt2):
    """The comparisons above mean something: eos ends hypotheses at different lengths, and the length penalty
    and each early_stopping mode change HF's answer (so getting one wrong would fail them)."""
    model, prompts, eos = gpt2
    inputs = {"input_ids": prompts, "attention_mask": torch.ones_like(prompts)}

    def hf(lp, es):
        out = _hf(model, inputs, num_beams=2, length_penalty=lp, early_stopping=es, eos_token_id=eos,
                  pad_token_id=eos[0])[0][:, 5:]  # fmt: skip
        return out, torch.isin(out, torch.tensor(eos)).any(1)

    def differ(a, b):
        return a.shape != b.shape or not torch.equal(a, b)

    (false, hit), (true, _), (never, _), (flat, _) = hf(2.0, False), hf(2.0, True), hf(2.0, "never"), hf(0.5, False)
    assert hit.any() and false.shape[1] > 2
    assert differ(false, true) and differ(false, never) and differ(false, flat)


def test_suppressed_tokens_never_chosen(gpt2):
    model, prompts, eos = gpt2
    forward = lambda ids, K: model(ids, use_cache=False).logits[:, -1]  # noqa: E731
    free, _ = _beam(forward, prompts, num_beams=2, spare=0, eos_token_id=eos, pad_token_id=eos[0])
    first = free[:, 5].tolist()
    new = free[:, 5:].flatten().tolist()
    common = max(set(new) - set(eos), key=new.count)
    got, _ = _beam(forward, prompts, num_beams=2, spare=0, eos_token_id=eos, pad_token_id=eos[0],
                   suppress_tokens=[common], begin_suppress_tokens=first)  # fmt: skip
    assert not (got[:, 5:] == common).any()
    assert not any(t in first for t in got[:, 5].tolist())


def test_reset_rejects_bad_settings():
    state = BeamState.allocate(2, 4, 16, VOCAB, "cpu")
    prefix = torch.zeros(1, 3, dtype=torch.int64)
    ok = dict(num_beams=2, max_new_tokens=4, eos_token_id=1)
    for bad in (
        dict(num_beams=5),
        dict(num_beams=0),
        dict(max_new_tokens=14),
        dict(early_stopping="sometimes"),
        dict(eos_token_id=[1, 2, 3, 4, 5]),
        dict(eos_token_id=VOCAB),
        dict(suppress_tokens=[-1]),
    ):
        with pytest.raises(InputError):
            state.reset(prefix, **{**ok, **bad})
    with pytest.raises(InputError):
        state.reset(torch.zeros(3, 3, dtype=torch.int64), **ok)
    with pytest.raises(InputError):
        state.reset(torch.full((1, 3), VOCAB), **ok)


@pytest.mark.gpu
def test_step_replays_as_cuda_graph():
    """A captured step replayed every step gives what eager steps give, with random logits as the model."""
    device = torch.device("cuda")
    table = torch.randn(VOCAB, VOCAB, device=device) * 4  # next-token logits by last token
    prefix = torch.randint(0, VOCAB, (3, 2), device=device)
    settings = dict(num_beams=3, max_new_tokens=12, eos_token_id=[7, 11], pad_token_id=0, length_penalty=1.5)
    eager = BeamState.allocate(4, 4, 16, VOCAB, device)
    eager.reset(prefix, **settings)
    for _ in range(12):
        beam_step(eager, table[eager.tokens])
    captured = BeamState.allocate(4, 4, 16, VOCAB, device)
    logits = torch.zeros(16, VOCAB, device=device)
    captured.reset(prefix, **settings)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        beam_step(captured, logits)  # warm-up on a throwaway call
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        beam_step(captured, logits)
    captured.reset(prefix, **settings)
    for _ in range(12):
        logits.copy_(table[captured.tokens])
        graph.replay()
    for a, b in zip(finalize(eager), finalize(captured)):
        assert torch.equal(a, b)
