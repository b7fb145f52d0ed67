"""Continuous batching (kernl.runtime.continuous): rows admitted into and leaving a running decode batch produce
what each request generates alone. CPU, fp32, a tiny random Llama (kernels through their references)."""

from __future__ import annotations

import pytest
import torch

import kernl
from kernl.errors import InputError
from tests.runtime.test_generation import tiny_lm

pytestmark = pytest.mark.usefixtures("cpu_references")

MAX_LENGTH = 40


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    torch.manual_seed(0)
    model = tiny_lm("llama")
    path = tmp_path_factory.mktemp("cont") / "llama"
    kernl.compile(model, path, buckets=[], device="cpu",
                  generation={"max_length": MAX_LENGTH, "batch_sizes": [1, 2, 4], "seq_lens": [4, 8]})  # fmt: skip
    return kernl.load(path, device="cpu")


def batch_of(bundle):
    gen = bundle._generation()
    return gen, gen.continuous()


def alone(bundle, prompt: list[int], n: int, **options) -> list[int]:
    """The new tokens bundle.generate gives prompt alone (no eos unless given)."""
    options.setdefault("eos_token_id", [])
    return bundle.generate([prompt], max_new_tokens=n, **options)[0, len(prompt) :].tolist()


def run_schedule(gen, batch, schedule: dict[int, list[tuple[str, list[int], dict]]]):
    """Admit the requests of schedule[step] before that decode step; step until every row has finished.
    Returns each request's tokens by name, and the steps at which each was admitted while others ran."""
    got: dict[str, list[int]] = {}
    names: dict[int, str] = {}
    joined = []
    step = 0
    while True:
        if step in schedule:
            reqs = [gen.request([p], **opts) for _, p, opts in schedule[step]]
            if batch.slots:
                joined.append(step)
            for (name, _, _), first in zip(schedule[step], batch.admit(reqs)):
                got[name] = [first.token]
                if not first.finished:
                    names[first.slot] = name
        if not batch.slots and step >= max(schedule):
            return got, joined
        for out in batch.step():
            got[names[out.slot]].append(out.token)
            if out.finished:
                del names[out.slot]
        step += 1


def test_rows_joining_and_leaving_equal_each_request_alone(bundle):
    gen, batch = batch_of(bundle)
    prompts = {n: torch.randint(3, 99, (k,)).tolist() for n, k in (("a", 5), ("b", 2), ("c", 8), ("d", 3), ("e", 7))}
    lengths = {"a": 11, "b": 5, "c": 6, "d": 1, "e": 6}
    schedule = {
        0: [("a", prompts["a"], {})],
        3: [("b", prompts["b"], {}), ("c", prompts["c"], {})],  # two prompts in one prefill call
        5: [("d", prompts["d"], {})],  # one token: finished at admission
        8: [("e", prompts["e"], {})],  # into the row b left
    }
    for reqs in schedule.values():
        for i, (name, p, _) in enumerate(reqs):
            reqs[i] = (name, p, {"max_new_tokens": lengths[name], "eos_token_id": []})
    got, joined = run_schedule(gen, batch, schedule)
    assert joined == [3, 5, 8]
    for name, prompt in prompts.items():
        assert got[name] == alone(bundle, prompt, lengths[name]), name
    assert batch.slots == {} and batch.free() == 4


def test_lowest_free_row_first_and_retire(bundle):
    gen, batch = batch_of(bundle)
    req = lambda: gen.request([torch.randint(3, 99, (4,)).tolist()], max_new_tokens=20, eos_token_id=[])  # noqa: E731
    prompt = torch.randint(3, 99, (6,)).tolist()
    want = alone(bundle, prompt, 7)
    assert [t.slot for t in batch.admit([req(), req(), req()])] == [0, 1, 2]
    batch.step()
    batch.retire(1)
    batch.retire(1)  # a free row: nothing happens
    assert batch.active == [0, 2]
    assert [t.slot for t in batch.step()] == [0, 2]
    (first,) = batch.admit([gen.request([prompt], max_new_tokens=7, eos_token_id=[])])
    assert first.slot == 1
    mine = [first.token]
    while 1 in batch.slots:
        mine += [t.token for t in batch.step() if t.slot == 1]
    assert mine == want
    for slot in batch.active:
        batch.retire(slot)
    assert batch.free() == 4
    with pytest.raises(InputError, match="free row"):
        batch.admit([req() for _ in range(5)])


def test_eos_ends_a_row_and_frees_it(bundle):
    gen, batch = batch_of(bundle)
    prompt = torch.randint(3, 99, (5,)).tolist()
    free = alone(bundle, prompt, 10)
    eos = free[3]
    want = bundle.generate([prompt], max_new_tokens=10, eos_token_id=eos)[0, 5:].tolist()
    stop = want.index(eos)
    other = torch.randint(3, 99, (3,)).tolist()
    got, _ = run_schedule(gen, batch, {0: [("o", other, {"max_new_tokens": 12, "eos_token_id": []})],
                                       1: [("p", prompt, {"max_new_tokens": 10, "eos_token_id": eos})]})  # fmt: skip
    assert got["p"] == want[: stop + 1]
    assert got["o"] == alone(bundle, other, 12)


def test_greedy_rows_beside_sampled_and_penalized_rows(bundle):
    """A greedy row is unchanged by sampled rows beside it (the sampling graph takes the argmax for it); a
    greedy row with a repetition penalty gives what generate gives it alone."""
    gen, batch = batch_of(bundle)
    p = {n: torch.randint(3, 99, (k,)).tolist() for n, k in (("g", 6), ("s", 4), ("r", 7))}
    sampled = {"max_new_tokens": 15, "do_sample": True, "temperature": 1.5, "eos_token_id": [], "seed": 3}
    schedule = {
        0: [("s", p["s"], sampled)],
        2: [("g", p["g"], {"max_new_tokens": 10, "eos_token_id": []})],
        4: [("r", p["r"], {"max_new_tokens": 8, "eos_token_id": [], "repetition_penalty": 1.5})],
    }
    got, _ = run_schedule(gen, batch, schedule)
    assert got["g"] == alone(bundle, p["g"], 10)
    assert got["r"] == alone(bundle, p["r"], 8, repetition_penalty=1.5)
    assert len(got["s"]) == 15 and all(0 <= t < 99 for t in got["s"])
    assert got["s"] != alone(bundle, p["s"], 15)  # it did sample


def test_a_sampled_request_alone_is_reproducible_with_its_seed(bundle):
    gen, batch = batch_of(bundle)
    prompt = torch.randint(3, 99, (5,)).tolist()
    opts = {"max_new_tokens": 12, "do_sample": True, "temperature": 1.5, "eos_token_id": []}
    runs = [run_schedule(gen, batch, {0: [("x", prompt, {**opts, "seed": seed})]})[0]["x"] for seed in (5, 5, 6)]
    assert runs[0] == runs[1] != runs[2]


def test_generate_waits_for_an_idle_batch_and_both_share_the_rows(bundle):
    gen, batch = batch_of(bundle)
    prompt = torch.randint(3, 99, (4,)).tolist()
    (first,) = batch.admit([gen.request([prompt], max_new_tokens=5, eos_token_id=[])])
    with pytest.raises(InputError, match="continuous batch"):
        bundle.generate([prompt], max_new_tokens=3)
    batch.retire(first.slot)
    # generate() leaves rows running (a stream abandoned after one token); the next admission idles them.
    stream = bundle.stream([prompt] * 4, max_new_tokens=8, eos_token_id=[])
    next(stream)
    stream.close()
    got, _ = run_schedule(gen, batch, {0: [("x", prompt, {"max_new_tokens": 6, "eos_token_id": []})]})
    assert got["x"] == alone(bundle, prompt, 6)


def test_max_rows_caps_the_rows_in_use(bundle):
    gen, batch = batch_of(bundle)
    batch.set_max_rows(2)
    try:
        assert batch.free() == 2
        reqs = [gen.request([[5, 6]], max_new_tokens=3, eos_token_id=[]) for _ in range(2)]
        assert [t.slot for t in batch.admit(reqs)] == [0, 1]
        assert batch.free() == 0
        with pytest.raises(InputError, match="while no row is active"):
            batch.set_max_rows(4)
        while batch.slots:
            batch.step()
    finally:
        batch.set_max_rows(4)
    with pytest.raises(InputError, match="max_rows"):
        batch.set_max_rows(5)


def test_several_steps_read_back_at_once_equal_single_steps(bundle):
    """steps(n): n steps' tokens in one read; a row appears in no step after its last, and no more steps run than
    the longest-lived row may take (n = 50 stops after 6 here)."""
    gen, batch = batch_of(bundle)
    prompts = [torch.randint(3, 99, (k,)).tolist() for k in (4, 6, 3)]
    lengths = [7, 3, 5]
    reqs = [gen.request([p], max_new_tokens=n, eos_token_id=[]) for p, n in zip(prompts, lengths)]
    firsts = batch.admit(reqs)
    slots = [first.slot for first in firsts]
    got = {first.slot: [first.token] for first in firsts}
    stepped = batch.steps(50)
    assert len(stepped) == max(lengths) - 1 and not batch.slots
    for i, step in enumerate(stepped):
        assert [out.slot for out in step] == sorted(s for s, n in zip(slots, lengths) if n > i + 1)
        for out in step:
            got[out.slot].append(out.token)
    assert [got[s] for s in slots] == [alone(bundle, p, n) for p, n in zip(prompts, lengths)]
