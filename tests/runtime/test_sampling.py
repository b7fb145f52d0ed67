"""Device sampling: greedy, temperature, top-k, top-p, repetition penalty, seeds, stopping, no host sync."""

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from kernl import InputError
from kernl.runtime.sampling import (
    SamplingParams,
    make_generator,
    mark_seen,
    sample,
    seen_tokens,
    update_done,
    warped_logits,
)

VOCAB = 50


def _logits(rows, vocab=VOCAB, scale=3.0):
    return torch.randn(rows, vocab) * scale


def _repeat(logits, n):
    """n copies of each row, so that one call draws n independent samples per row."""
    return logits.repeat_interleave(n, dim=0)


def test_greedy_is_argmax():
    logits = _logits(16)
    for params in (
        SamplingParams.build(16, temperature=0.0),
        SamplingParams.build(16, do_sample=False, temperature=0.7, top_k=5, top_p=0.5),
    ):
        assert torch.equal(sample(logits, params, generator=make_generator("cpu", 0)), logits.argmax(1))
        assert torch.equal(sample(logits, params, greedy_only=True), logits.argmax(1))
    assert SamplingParams.build(2, temperature=0.0).all_greedy
    assert not SamplingParams.build(2, temperature=[0.0, 1.0]).all_greedy


@pytest.mark.parametrize("temperature", [0.05, 1.0, 7.0, 1000.0])
def test_top_k_1_is_greedy(temperature):
    logits = _logits(64)
    params = SamplingParams.build(64, temperature=temperature, top_k=1)
    assert torch.equal(sample(logits, params, generator=make_generator("cpu", 1)), logits.argmax(1))


def test_seed_reproducible_and_seeds_differ():
    logits = _logits(256, scale=0.5)  # flat enough that draws vary
    params = SamplingParams.build(256, temperature=1.0, top_p=0.95, top_k=40)
    a = sample(logits, params, generator=make_generator("cpu", 123))
    b = sample(logits, params, generator=make_generator("cpu", 123))
    c = sample(logits, params, generator=make_generator("cpu", 124))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # Successive draws from one generator move on.
    g = make_generator("cpu", 123)
    assert torch.equal(sample(logits, params, generator=g), a)
    assert not torch.equal(sample(logits, params, generator=g), a)


@pytest.mark.parametrize("temperature", [0.6, 1.0, 1.7])
def test_empirical_distribution_matches_softmax(temperature):
    n, vocab = 20_000, 8
    row = torch.randn(1, vocab) * 1.5
    params = SamplingParams.build(n, temperature=temperature)
    tokens = sample(_repeat(row, n), params, generator=make_generator("cpu", 7))
    freq = torch.bincount(tokens, minlength=vocab).double() / n
    expected = torch.softmax(row[0].double() / temperature, 0)
    # Frequency std is <= sqrt(0.25 / n) = 0.0035: 0.015 is over 4 sigma. Chi-square, 7 dof: p = 1e-4 at 29.9.
    assert (freq - expected).abs().max() < 0.015
    chi2 = (n * (freq - expected) ** 2 / expected).sum()
    assert chi2 < 29.9, chi2


def test_top_k_stays_in_top_k_and_renormalizes():
    n, k = 20_000, 3
    row = torch.randn(1, VOCAB)
    params = SamplingParams.build(n, temperature=1.3, top_k=k)
    tokens = sample(_repeat(row, n), params, generator=make_generator("cpu", 3))
    top = row[0].topk(k).indices
    assert torch.isin(tokens, top).all()
    freq = torch.bincount(tokens, minlength=VOCAB).double()[top] / n
    assert (freq - torch.softmax(row[0, top].double() / 1.3, 0)).abs().max() < 0.015


def test_top_p_stays_in_nucleus():
    n, top_p = 20_000, 0.7
    row = torch.randn(1, VOCAB) * 2
    params = SamplingParams.build(n, temperature=1.0, top_p=top_p)
    tokens = sample(_repeat(row, n), params, generator=make_generator("cpu", 4))
    probs, order = torch.softmax(row[0].double(), 0).sort(descending=True)
    size = int((probs.cumsum(0) < top_p).sum()) + 1  # smallest prefix reaching top_p
    nucleus = order[:size]
    assert torch.isin(tokens, nucleus).all()
    assert torch.isin(nucleus, tokens).all()  # and every nucleus token shows up
    tiny = SamplingParams.build(64, temperature=2.0, top_p=1e-6)
    logits = _logits(64)
    assert torch.equal(sample(logits, tiny, generator=make_generator("cpu", 5)), logits.argmax(1))


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"), [(0.7, 0, 1.0), (1.0, 10, 1.0), (1.4, 0, 0.8), (0.9, 20, 0.6)]
)
def test_warped_logits_match_transformers(temperature, top_k, top_p):
    rows = 6
    logits = _logits(rows)
    ids = torch.randint(0, VOCAB, (rows, 12))
    params = SamplingParams.build(rows, temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=1.3)
    ours = warped_logits(logits, params, seen_tokens(ids, VOCAB))
    hf = RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone())
    hf = TemperatureLogitsWarper(temperature)(ids, hf)
    if top_k:
        hf = TopKLogitsWarper(top_k)(ids, hf)
    if top_p < 1:
        hf = TopPLogitsWarper(top_p)(ids, hf)
    assert torch.equal(torch.isinf(ours), torch.isinf(hf))
    torch.testing.assert_close(ours[~torch.isinf(ours)], hf[~torch.isinf(hf)])


@pytest.mark.parametrize("penalty", [0.5, 1.0, 1.2, 3.0])
def test_repetition_penalty_matches_transformers(penalty):
    rows = 8
    logits = _logits(rows)
    ids = torch.randint(0, VOCAB, (rows, 20))
    seen = seen_tokens(ids, VOCAB)
    params = SamplingParams.build(rows, temperature=0.0, repetition_penalty=penalty)
    hf = RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone())
    torch.testing.assert_close(warped_logits(logits, params, seen), hf, rtol=0, atol=0)
    assert torch.equal(sample(logits, params, seen), hf.argmax(1))


def test_seen_tokens_and_mark_seen():
    ids = torch.tensor([[0, 0, 3, 4], [2, 2, 2, 1]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    seen = seen_tokens(ids, 6, mask)
    assert seen.tolist() == [[True, False, False, True, True, False], [False, True, True, False, False, False]]
    assert seen_tokens(ids, 6)[0, 0]  # without a mask, pads count (as in HF)
    mark_seen(seen, torch.tensor([5, 0]))
    assert seen[0, 5] and seen[1, 0]


def test_rows_follow_their_own_params():
    n = 4000
    base = torch.randn(5, VOCAB) * 2
    settings = [
        {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0},
        {"temperature": 3.0, "top_k": 1, "top_p": 1.0, "repetition_penalty": 1.0},
        {"temperature": 1.0, "top_k": 4, "top_p": 1.0, "repetition_penalty": 1.0},
        {"temperature": 1.0, "top_k": 0, "top_p": 0.5, "repetition_penalty": 1.0},
        {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "repetition_penalty": 100.0},
    ]
    params = SamplingParams.build(5 * n, **{key: [s[key] for s in settings for _ in range(n)] for key in settings[0]})
    seen = torch.zeros(5 * n, VOCAB, dtype=torch.bool)
    seen[4 * n :, base[4].argmax()] = True  # the penalty must move row 4 off its argmax
    tokens = sample(_repeat(base, n), params, seen, make_generator("cpu", 9)).view(5, n)
    assert (tokens[0] == base[0].argmax()).all()
    assert (tokens[1] == base[1].argmax()).all()
    assert torch.isin(tokens[2], base[2].topk(4).indices).all() and tokens[2].unique().numel() > 1
    probs, order = torch.softmax(base[3], 0).sort(descending=True)
    assert torch.isin(tokens[3], order[: int((probs.cumsum(0) < 0.5).sum()) + 1]).all()
    penalized = base[4].clone()
    penalized[base[4].argmax()] /= 100
    assert (tokens[4] == penalized.argmax()).all()
    # A row's warped scores do not depend on the other rows of the batch.
    single = SamplingParams.build(1, **settings[3])
    torch.testing.assert_close(
        warped_logits(base[3:4], single), warped_logits(_repeat(base, n), params)[3 * n : 3 * n + 1]
    )


def test_update_done_eos_max_new_tokens_and_pad():
    params = SamplingParams.build(3, eos_token_id=[[7], [8, 9], []], max_new_tokens=[10, 10, 2], pad_token_id=[0, 1, 2])
    assert params.eos_token_id.tolist() == [[7, -1], [8, 9], [-1, -1]]
    step, done = torch.zeros(3, dtype=torch.int64), torch.zeros(3, dtype=torch.bool)
    history = []
    for emitted in ([5, 9, 3], [7, 4, 4], [6, 6, 6]):
        tokens = torch.tensor(emitted)
        update_done(tokens, params, step, done)
        history.append(tokens.tolist())
    # Row 0 stops on its eos at step 2, row 1 on its second eos at step 1, row 2 after 2 tokens; each then pads.
    assert history == [[5, 9, 3], [7, 1, 4], [0, 1, 2]]
    assert done.all()
    assert step.tolist() == [2, 1, 2]


def test_pad_defaults_to_first_eos():
    params = SamplingParams.build(2, eos_token_id=[4, 2])
    assert params.pad_token_id.tolist() == [4, 4]
    assert SamplingParams.build(2).pad_token_id.tolist() == [0, 0]
    assert SamplingParams.build(2, eos_token_id=3, n_eos=4).eos_token_id.tolist() == [[3, -1, -1, -1]] * 2


def test_copy_into_captured_params():
    captured = SamplingParams.build(2, temperature=0.0, eos_token_id=1, n_eos=2)
    new = SamplingParams.build(2, temperature=[0.5, 0.0], top_k=3, eos_token_id=[[1, 2], [3]], n_eos=2)
    tensor = captured.temperature
    captured.copy_(new)
    assert captured.temperature is tensor and captured.temperature.tolist() == [0.5, 0.0]
    assert captured.eos_token_id.tolist() == [[1, 2], [3, -1]]
    with pytest.raises(InputError, match="eos_token_id"):
        captured.copy_(SamplingParams.build(2, eos_token_id=1))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": float("nan")}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"top_k": True}, "top_k"),
        ({"top_k": 1000, "vocab_size": 10}, "top_k"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": -1.0}, "repetition_penalty"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": [1, 2, 3]}, "max_new_tokens"),
        ({"temperature": "hot"}, "temperature"),
        ({"eos_token_id": -3}, "eos_token_id"),
        ({"eos_token_id": 10, "vocab_size": 10}, "eos_token_id"),
        ({"eos_token_id": [[1], [2], [3]]}, "eos_token_id"),
        ({"eos_token_id": [1, 2, 3], "n_eos": 2}, "eos_token_id"),
        ({"pad_token_id": -1}, "pad_token_id"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(InputError, match=name):
        SamplingParams.build(2, **kwargs)


def test_bad_shapes():
    params = SamplingParams.build(2)
    with pytest.raises(InputError, match="logits"):
        sample(torch.randn(3, VOCAB), params)
    with pytest.raises(InputError, match="seen"):
        sample(torch.randn(2, VOCAB), params, torch.zeros(2, VOCAB + 1, dtype=torch.bool))


def test_no_host_reads(monkeypatch):
    """Nothing in a step reads a tensor value back to Python: each such path raises while the step runs."""
    rows = 4
    params = SamplingParams.build(
        rows,
        temperature=[0.0, 0.8, 1.0, 1.2],
        top_k=[0, 5, 0, 3],
        top_p=[1.0, 0.9, 0.5, 1.0],
        repetition_penalty=1.1,
        eos_token_id=[1, 2],
        max_new_tokens=3,
    )
    logits, seen = _logits(rows), torch.zeros(rows, VOCAB, dtype=torch.bool)
    step, done = torch.zeros(rows, dtype=torch.int64), torch.zeros(rows, dtype=torch.bool)
    generator = make_generator("cpu", 0)

    def host_read(*args, **kwargs):
        raise AssertionError("host read of a tensor value")

    for attr in ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__", "__iter__"):
        monkeypatch.setattr(torch.Tensor, attr, host_read)
    for _ in range(4):
        tokens = sample(logits, params, seen, generator)
        update_done(tokens, params, step, done)
        mark_seen(seen, tokens)
        warped_logits(logits, params, seen)
    monkeypatch.undo()
    assert done.all()


@pytest.mark.gpu
def test_decode_step_captures_in_a_cuda_graph():
    rows, vocab = 8, 32_000
    params = SamplingParams.build(
        rows,
        "cuda",
        temperature=[0.0, 0.7, 1.0, 1.0, 0.0, 0.9, 1.3, 0.5],
        top_k=[0, 50, 0, 1, 0, 0, 20, 0],
        top_p=[1.0, 0.9, 0.8, 1.0, 1.0, 1.0, 0.95, 0.5],
        repetition_penalty=1.1,
        eos_token_id=2,
        max_new_tokens=1000,
    )
    logits = torch.randn(rows, vocab, device="cuda") * 3
    seen = torch.zeros(rows, vocab, dtype=torch.bool, device="cuda")
    step = torch.zeros(rows, dtype=torch.int64, device="cuda")
    done = torch.zeros(rows, dtype=torch.bool, device="cuda")
    generator = make_generator("cuda", 0)
    tokens = torch.zeros(rows, dtype=torch.int64, device="cuda")

    def step_fn():
        tokens.copy_(sample(logits, params, seen, generator))
        update_done(tokens, params, step, done)

    torch.cuda.set_sync_debug_mode("error")  # an eager step that syncs raises
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step_fn()
        torch.cuda.current_stream().wait_stream(side)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    graph.register_generator_state(generator)
    with torch.cuda.graph(graph):
        step_fn()

    def run(seed, n=20):
        generator.manual_seed(seed)
        out = []
        for _ in range(n):
            step.zero_()
            done.zero_()
            graph.replay()
            out.append(tokens.clone())
        return torch.stack(out).cpu()

    a, b, c = run(5), run(5), run(6)
    greedy = logits.argmax(1).cpu()
    assert (a[:, [0, 3, 4]] == greedy[[0, 3, 4]]).all()
    assert torch.equal(a, b)  # reseeding repeats the replays
    assert not torch.equal(a, c)
    assert a[:, 2].unique().numel() > 1  # replays draw fresh noise
    assert (step.cpu() == 1).all()


@pytest.mark.parametrize("vocab", [1000, 2048, 128256])
def test_row_argmax_is_argmax_with_ties_to_the_lowest_id(vocab):
    from kernl.runtime.sampling import row_argmax

    scores = torch.randn(5, vocab)
    scores[1, 7] = scores[1, vocab - 3] = 100.0  # a tie across chunks
    scores[2] = 0.0  # all tied
    assert torch.equal(row_argmax(scores), scores.argmax(dim=1))
    assert row_argmax(scores)[1] == 7 and row_argmax(scores)[2] == 0
