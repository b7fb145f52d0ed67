"""Generation bundles: greedy output equal to transformers' generate, sampling reproducible, eos, bad input.

CPU, fp32, tiny random GPT-2 and Llama (grouped-query attention, rotary). On CPU the kernels run through their
plain-torch references here (tests/kernels checks each kernel under Triton's interpreter against them): what
these tests check is the generation logic, and the interpreter would make each token cost seconds. The GPU
tests compile fp16/bf16 bundles and run the Triton kernels inside the captured graphs, checking each token
against HF's logits on the same prefix (teacher forcing).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import kernl
from kernl.errors import InputError, KernlError

MAX_NEW = 8
PROMPTS = [[3, 4, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18]]


def tiny_lm(name: str, **overrides) -> torch.nn.Module:
    if name == "gpt2":
        config = dict(vocab_size=99, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=1, eos_token_id=2)
        config.update(overrides)
        return GPT2LMHeadModel(GPT2Config(**config)).eval()
    config = dict(vocab_size=99, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, intermediate_size=128, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
                  pad_token_id=0)  # fmt: skip
    config.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**config)).eval()


pytestmark = pytest.mark.usefixtures("cpu_references")


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def lm_bundle(request, tmp_path_factory):
    torch.manual_seed(0)
    model = tiny_lm(request.param)
    path = tmp_path_factory.mktemp("gen") / request.param
    kernl.compile(model, path, buckets=[], generation={"max_length": 32, "batch_sizes": [1, 4], "seq_lens": [8]},
                  device="cpu")  # fmt: skip
    return model, path, kernl.load(path, device="cpu")


def left_padded(prompts: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def hf_greedy(model, prompts, max_new_tokens=MAX_NEW, eos=None) -> torch.Tensor:
    ids, mask = left_padded(prompts)
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                              eos_token_id=eos, pad_token_id=0)  # fmt: skip


def test_greedy_equals_transformers_for_a_ragged_batch(lm_bundle):
    model, _, bundle = lm_bundle
    prompts = [torch.randint(3, 99, (n,)).tolist() for n in (5, 2, 7)]
    want = hf_greedy(model, prompts)
    got = bundle.generate(prompts, max_new_tokens=MAX_NEW, eos_token_id=[], pad_token_id=0)
    assert torch.equal(got, want)
    # The same prompts as HF-style left-padded tensors give the same ids.
    ids, mask = left_padded(prompts)
    assert torch.equal(bundle.generate(ids, mask, max_new_tokens=MAX_NEW, eos_token_id=[], pad_token_id=0), want)


def test_eos_stops_a_row_and_pads_it(lm_bundle):
    model, _, bundle = lm_bundle
    prompts = [torch.randint(3, 99, (n,)).tolist() for n in (6, 3)]
    free = bundle.generate(prompts, max_new_tokens=MAX_NEW, eos_token_id=[], pad_token_id=0)
    eos = int(free[0, 6 + 2])  # row 0's third new token becomes its eos
    got = bundle.generate(prompts, max_new_tokens=MAX_NEW, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(got, hf_greedy(model, prompts, eos=eos))
    new = got[0, 6:]
    stop = (new == eos).nonzero()[0].item()
    assert stop <= 2 and (new[stop + 1 :] == 0).all()


def test_stream_yields_the_tokens_generate_returns(lm_bundle):
    _, _, bundle = lm_bundle
    prompts = [torch.randint(3, 99, (n,)).tolist() for n in (4, 7)]
    full = bundle.generate(prompts, max_new_tokens=6, eos_token_id=[])
    steps = list(bundle.stream(prompts, max_new_tokens=6, eos_token_id=[]))
    assert torch.equal(torch.stack(steps, dim=1), full[:, 7:])


def test_sampling_is_reproducible_with_a_seed(lm_bundle):
    _, _, bundle = lm_bundle
    options = dict(max_new_tokens=MAX_NEW, do_sample=True, temperature=1.5, top_k=50, top_p=0.95, eos_token_id=[])
    a = bundle.generate(PROMPTS, seed=7, **options)
    b = bundle.generate(PROMPTS, seed=7, **options)
    c = bundle.generate(PROMPTS, seed=8, **options)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    greedy = bundle.generate(PROMPTS, max_new_tokens=MAX_NEW, eos_token_id=[])
    assert not torch.equal(a, greedy)


def test_repetition_penalty_matches_transformers(lm_bundle):
    model, _, bundle = lm_bundle
    prompts = [torch.randint(3, 99, (n,)).tolist() for n in (5, 8)]
    ids, mask = left_padded(prompts)
    with torch.no_grad():
        want = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=False,
                              repetition_penalty=1.3, eos_token_id=None, pad_token_id=0)  # fmt: skip
    # HF penalizes the pad ids of a left-padded prompt too: only the unpadded row is compared.
    got = bundle.generate(prompts, max_new_tokens=MAX_NEW, repetition_penalty=1.3, eos_token_id=[], pad_token_id=0)
    assert torch.equal(got[1], want[1])


@pytest.mark.parametrize(
    ("call", "names"),
    [
        (dict(input_ids=[list(range(3, 12))]), "input_ids"),  # longer than the largest prompt bucket
        (dict(input_ids=[[3, 4]] * 5), "input_ids"),  # batch beyond the largest bucket
        (dict(input_ids=[[3, 4]], max_new_tokens=31), "max_new_tokens"),  # beyond the cache
        (dict(input_ids=[[3, 99]]), "input_ids"),  # outside the vocabulary
        (dict(input_ids=[[3, -1]]), "input_ids"),
        (dict(input_ids=[[3, 4]], top_p=0.0, do_sample=True), "top_p"),
        (dict(input_ids=[[3, 4]], temperature=-1.0, do_sample=True), "temperature"),
        (dict(input_ids=[[3, 4]], top_k=-2), "top_k"),
        (dict(input_ids=[[3, 4]], repetition_penalty=0.0), "repetition_penalty"),
        (dict(input_ids=[[3, 4]], max_new_tokens=0), "max_new_tokens"),
        (dict(input_ids=torch.ones(1, 3, dtype=torch.bool)), "input_ids"),
        (dict(input_ids=[[]]), "input_ids"),
        (dict(input_ids=[[3, 4]], seed=-1), "seed"),
    ],
)
def test_bad_calls_are_input_errors(lm_bundle, call, names):
    _, _, bundle = lm_bundle
    call.setdefault("max_new_tokens", 4)
    with pytest.raises(InputError, match=names):
        bundle.generate(**call)
    with pytest.raises(InputError, match=names):
        bundle.stream(**call)  # checked at the call, before the first token


def test_the_bundle_stays_usable_after_bad_calls(lm_bundle):
    _, _, bundle = lm_bundle
    before = bundle.generate([[3, 4, 5]], max_new_tokens=3)
    for bad in ([[3, 99]], [list(range(3, 12))]):
        with pytest.raises(InputError):
            bundle.generate(bad, max_new_tokens=3)
    assert torch.equal(bundle.generate([[3, 4, 5]], max_new_tokens=3), before)


def test_a_generation_bundle_is_not_called_as_a_forward(lm_bundle):
    _, _, bundle = lm_bundle
    with pytest.raises(InputError, match="generate"):
        bundle(input_ids=torch.tensor([[3, 4]]))


FRESH = """
import json, sys, kernl
bundle = kernl.load(sys.argv[1], device="cpu")
print(json.dumps(bundle.generate([[5, 6, 7, 8]], max_new_tokens=8, eos_token_id=[]).tolist()))
"""


def test_a_fresh_process_generates_from_the_bundle_on_disk(lm_bundle):
    model, path, _ = lm_bundle
    env = dict(os.environ, TRITON_INTERPRET="0")
    out = subprocess.run([sys.executable, "-c", FRESH, str(path)], capture_output=True, text=True, env=env,
                         timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr
    got = torch.tensor(json.loads(out.stdout.strip().splitlines()[-1]))
    assert torch.equal(got, hf_greedy(model, [[5, 6, 7, 8]], max_new_tokens=8))


def test_the_manifest_records_the_generation_settings(lm_bundle):
    model, _, bundle = lm_bundle
    gen = bundle.manifest["generation"]
    assert gen["max_length"] == 32 and gen["batch_sizes"] == [1, 4] and gen["seq_lens"] == [8]
    assert gen["vocab_size"] == model.config.vocab_size and gen["eos_token_id"] == 2
    cache = gen["cache"]
    assert cache["bytes"] == 2 * cache["layers"] * cache["rows"] * cache["heads_kv"] * 32 * cache["head_dim"] * 4
    assert all(c["cosine"] > 0.9999 for c in bundle.manifest["checks"])


# ---- GPU ------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_gpu_tokens_follow_the_models_logits(tmp_path, name, dtype):
    """Teacher forcing: HF's logits on the generated sequence pick (or all but tie with) each token generated."""
    torch.manual_seed(0)
    size = dict(n_embd=256, n_layer=4, n_head=4) if name == "gpt2" else dict(hidden_size=256, num_hidden_layers=4)
    model = tiny_lm(name, vocab_size=1000, **size)
    path = kernl.compile(model, tmp_path / "b", buckets=[], dtype=dtype, device="cuda",
                         generation={"max_length": 64, "batch_sizes": [1, 4], "seq_lens": [16]})  # fmt: skip
    bundle = kernl.load(path)
    prompts = [torch.randint(3, 1000, (n,)).tolist() for n in (16, 5, 11)]
    out = bundle.generate(prompts, max_new_tokens=24, eos_token_id=[])
    model = model.to("cuda", dtype)
    width = max(map(len, prompts))
    worst = 0.0
    with torch.no_grad():
        for r, prompt in enumerate(prompts):
            seq = torch.tensor(prompt + out[r, width:].tolist(), device="cuda")
            logits = model(input_ids=seq[None]).logits[0, len(prompt) - 1 : -1].float()
            chosen = logits.gather(1, seq[len(prompt) :, None]).squeeze(1)
            gap = (logits.max(dim=1).values - chosen) / logits.std(dim=1)
            worst = max(worst, gap.max().item())
    # A token kernl picked is HF's argmax, or within a few hundredths of a logit std of it (a near tie).
    assert worst < 0.05, f"a generated token is {worst:.3f} std below HF's best"


@pytest.mark.gpu
def test_gpu_stream_seed_and_eos_through_the_captured_graphs(tmp_path):
    """The captured decode graphs: stream equals generate, a seed reproduces a sampled run (the generator's
    state is registered with the graphs), and eos stops a row on the device."""
    torch.manual_seed(0)
    model = tiny_lm("llama", vocab_size=1000, hidden_size=256, num_hidden_layers=2)
    path = kernl.compile(model, tmp_path / "b", buckets=[], dtype=torch.float16, device="cuda",
                         generation={"max_length": 64, "batch_sizes": [1, 4], "seq_lens": [16]})  # fmt: skip
    bundle = kernl.load(path)
    prompts = [torch.randint(3, 1000, (n,)).tolist() for n in (16, 5, 11)]
    out = bundle.generate(prompts, max_new_tokens=20, eos_token_id=[])
    steps = list(bundle.stream(prompts, max_new_tokens=20, eos_token_id=[]))
    assert torch.equal(torch.stack(steps, dim=1), out[:, 16:])
    sampled = dict(max_new_tokens=20, do_sample=True, temperature=1.0, top_k=100, eos_token_id=[])
    a, b = bundle.generate(prompts, seed=3, **sampled), bundle.generate(prompts, seed=3, **sampled)
    assert torch.equal(a, b) and not torch.equal(a, bundle.generate(prompts, seed=4, **sampled))
    eos = int(out[1, 16 + 4])
    stopped = bundle.generate(prompts, max_new_tokens=20, eos_token_id=eos, pad_token_id=0)
    new = stopped[1, 16:]
    at = (new == eos).nonzero()[0].item()
    assert at <= 4 and (new[at + 1 :] == 0).all() and torch.equal(new[: at + 1], out[1, 16 : 16 + at + 1])


LOAD_GENERATE_COUNT = """
import json, sys, kernl
from kernl.kernels import autotune_cache
from kernl.kernels.triton_cache import kernel_stats
bundle = kernl.load(sys.argv[1])
for batch in (1, 3, 4):  # every decode batch bucket, padded and exact; greedy and sampled
    bundle.generate([[5] * 9] * batch, max_new_tokens=4)
    bundle.generate([[5] * 16] * batch, max_new_tokens=4, do_sample=True, repetition_penalty=1.2, seed=0)
print(json.dumps({"kernels": kernel_stats(), "tuning": autotune_cache.process_stats()}))
"""


@pytest.mark.gpu
def test_gpu_a_fresh_load_generates_without_compiling(tmp_path):
    torch.manual_seed(0)
    model = tiny_lm("gpt2", vocab_size=1000, n_embd=128)
    path = kernl.compile(model, tmp_path / "b", buckets=[], dtype=torch.float16, device="cuda",
                         generation={"max_length": 64, "batch_sizes": [1, 4], "seq_lens": [16]})  # fmt: skip
    env = dict(os.environ, KERNL_CACHE=str(tmp_path / "cache"), TRITON_CACHE_DIR=str(tmp_path / "triton"))
    out = subprocess.run([sys.executable, "-c", LOAD_GENERATE_COUNT, str(path)], env=env, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr
    stats = json.loads(out.stdout.strip().splitlines()[-1])
    assert stats["kernels"]["compiled"] == 0, "Triton compiled a kernel at load or while generating"
    assert stats["tuning"]["benchmarks_run"] == 0 and stats["tuning"]["defaults_used"] == 0


def test_a_model_whose_attention_the_kernel_cannot_take_is_refused_with_its_shapes(tmp_path):
    model = tiny_lm("llama", num_attention_heads=2, num_key_value_heads=1, head_dim=512)  # above the kernel's 256
    with pytest.raises(KernlError, match=r"stay on torch; the first has q \[1, 2, \S+, 512\].*head_dim up to 256"):
        kernl.compile(model, tmp_path / "b", buckets=[], device="cpu",
                      generation={"max_length": 16, "batch_sizes": [1], "seq_lens": [4]})  # fmt: skip
    assert not (tmp_path / "b").exists()
